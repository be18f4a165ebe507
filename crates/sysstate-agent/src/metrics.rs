//! Metrics for Prometheus (`[metrics]`): served on an opt-in listen address (`GET /metrics`)
//! and written as a textfile for node_exporter's textfile collector, in the text exposition
//! format. What a scrape shows: when each kind of job last succeeded and failed and how long the
//! last one took, failures by error code, what the last backup read, added and stored and how
//! long its writers were frozen, the repository's size, shadow storage used, the next run of
//! each schedule, and the jobs running and queued. A failed job leaves the last success where
//! it was: an alert on its age is the dead-man alert of a monitoring system.

use crate::daemon::Shared;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{JobKind, JobRecord};

/// What the agent counts itself (the rest is read from the job store when scraped).
#[derive(Debug, Default)]
pub struct Counters {
    /// Failed jobs by error code, since the agent started.
    pub failures: BTreeMap<String, u64>,
    /// The last successful backup's figures.
    pub last_backup: Option<BackupFigures>,
    /// The repository's packs, in bytes, after the last backup.
    pub repository_bytes: Option<u64>,
}

/// A backup's figures.
#[derive(Debug, Clone, Default)]
pub struct BackupFigures {
    /// Bytes of the files in the version.
    pub bytes_total: u64,
    /// Bytes read (new or changed files).
    pub bytes_read: u64,
    /// Plaintext bytes of new blobs.
    pub bytes_added: u64,
    /// Bytes of packs written.
    pub bytes_stored: u64,
    /// Files in the version.
    pub files: u64,
    /// How long the writers were frozen.
    pub freeze_window_ms: u64,
}

fn seconds(time: Option<&str>) -> Option<f64> {
    time.and_then(sysstate_types::time::parse_utc).map(|ns| ns as f64 / 1e9)
}

fn duration(job: &JobRecord) -> Option<f64> {
    Some(seconds(job.ended.as_deref())? - seconds(Some(&job.started))?)
}

/// A label value, escaped as the exposition format wants.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Family<'t> {
    text: &'t mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
        let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
        let _ = writeln!(self.text, "{name}{labels} {value}");
    }
}

/// The metrics now, in the text exposition format.
pub fn render(shared: &Shared, config: &Config) -> String {
    let mut text = String::new();
    let mut out = Family { text: &mut text };
    out.head("sysstate_agent_info", "gauge", "The agent's version (the value is 1).");
    out.sample("sysstate_agent_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    out.head("sysstate_agent_start_time_seconds", "gauge", "When the agent started (Unix time).");
    out.sample("sysstate_agent_start_time_seconds", &[], shared.started_ns as f64 / 1e9);

    let kinds = [JobKind::Backup, JobKind::Forget, JobKind::Replicate, JobKind::Prune, JobKind::Check];
    let last = |succeeded: bool| -> Vec<(JobKind, JobRecord)> {
        kinds.iter().filter_map(|kind| Some((*kind, shared.store.last_ended(*kind, succeeded).ok()??))).collect()
    };
    let (successes, failures) = (last(true), last(false));
    out.head(
        "sysstate_last_success_timestamp_seconds",
        "gauge",
        "When the last job of each kind succeeded (Unix time); a failure leaves it as it was.",
    );
    for (kind, job) in &successes {
        if let Some(at) = seconds(job.ended.as_deref()) {
            out.sample("sysstate_last_success_timestamp_seconds", &[("kind", kind.as_str())], at);
        }
    }
    out.head("sysstate_last_failure_timestamp_seconds", "gauge", "When the last job of each kind failed (Unix time).");
    for (kind, job) in &failures {
        if let Some(at) = seconds(job.ended.as_deref()) {
            out.sample("sysstate_last_failure_timestamp_seconds", &[("kind", kind.as_str())], at);
        }
    }
    out.head("sysstate_last_job_duration_seconds", "gauge", "How long the last ended job of each kind took.");
    for kind in kinds {
        let newest = [successes.iter().find(|(k, _)| *k == kind), failures.iter().find(|(k, _)| *k == kind)]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.1.ended.cmp(&b.1.ended));
        if let Some(took) = newest.and_then(|(_, job)| duration(job)) {
            out.sample("sysstate_last_job_duration_seconds", &[("kind", kind.as_str())], took);
        }
    }

    let (running, queued, next_runs) = {
        let state = shared.lock();
        let next: Vec<(String, f64)> = state
            .slots
            .iter()
            .filter_map(|slot| Some((slot.schedule.work.key().to_string(), slot.next?.timestamp() as f64)))
            .collect();
        (usize::from(state.running.is_some()), state.queue.len(), next)
    };
    out.head("sysstate_jobs_running", "gauge", "Jobs the agent runs now (0 or 1).");
    out.sample("sysstate_jobs_running", &[], running as f64);
    out.head("sysstate_jobs_queued", "gauge", "Requests waiting in the agent's queue.");
    out.sample("sysstate_jobs_queued", &[], queued as f64);
    out.head("sysstate_next_run_timestamp_seconds", "gauge", "When each schedule runs next (Unix time).");
    for (schedule, at) in &next_runs {
        out.sample("sysstate_next_run_timestamp_seconds", &[("schedule", schedule)], *at);
    }

    let counters = shared.counters();
    out.head(
        "sysstate_job_failures_total",
        "counter",
        "Jobs of the agent that failed, by error code, since it started.",
    );
    for (code, count) in &counters.failures {
        out.sample("sysstate_job_failures_total", &[("code", code)], *count as f64);
    }
    if let Some(backup) = &counters.last_backup {
        out.head(
            "sysstate_last_backup_bytes",
            "gauge",
            "The last successful backup: bytes in it, read, added (new data, plaintext) and stored (packs written).",
        );
        for (what, value) in [
            ("total", backup.bytes_total),
            ("read", backup.bytes_read),
            ("added", backup.bytes_added),
            ("stored", backup.bytes_stored),
        ] {
            out.sample("sysstate_last_backup_bytes", &[("what", what)], value as f64);
        }
        out.head("sysstate_last_backup_files", "gauge", "Files in the last successful backup.");
        out.sample("sysstate_last_backup_files", &[], backup.files as f64);
        out.head(
            "sysstate_freeze_window_seconds",
            "gauge",
            "How long the last successful backup kept its writers frozen.",
        );
        out.sample("sysstate_freeze_window_seconds", &[], backup.freeze_window_ms as f64 / 1000.0);
    }
    if let Some(bytes) = counters.repository_bytes {
        out.head("sysstate_repository_size_bytes", "gauge", "The repository's packs, in bytes, after the last backup.");
        out.sample("sysstate_repository_size_bytes", &[], bytes as f64);
    }
    drop(counters);

    if let Ok(areas) = sysstate_engine::shadow::storage_areas(config, &sysstate_engine::paths::state_dir()) {
        out.head("sysstate_shadow_storage_used_bytes", "gauge", "Bytes of shadow copies in each shadow storage area.");
        for area in &areas {
            let (volume, on) = (area.for_volume.display().to_string(), area.on.display().to_string());
            out.sample(
                "sysstate_shadow_storage_used_bytes",
                &[("volume", &volume), ("storage", &on)],
                area.used() as f64,
            );
        }
    }
    text
}

/// Writes the metrics to `[metrics] textfile`, whole or not at all (a new file renamed over
/// the old, as node_exporter's textfile collector asks).
pub fn write_textfile(shared: &Arc<Shared>, config: &Config) {
    let Some(path) = &config.metrics.textfile else { return };
    let path = std::path::Path::new(path);
    let temporary = path.with_extension(format!("prom.{}.tmp", std::process::id()));
    let written = std::fs::write(&temporary, render(shared, config)).and_then(|_| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        crate::daemon::say(format!("cannot write the metrics textfile `{}`: {error}", path.display()));
    }
}
