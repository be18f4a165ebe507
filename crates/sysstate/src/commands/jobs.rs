//! The job store and the event log: `sysstate job`, `sysstate events`.

use super::{Context, Outcome};
use crate::output::{bytes, print_json};
use sysstate_engine::jobs::EventFilter;
use sysstate_engine::{EngineError, ErrorCode, Result};

pub fn job(context: &Context<'_>, previous: Option<usize>) -> Result<Outcome> {
    let store = context.job_store()?;
    let jobs = match previous {
        Some(count) => store.previous(count)?,
        None => store.running()?,
    };
    if context.json() {
        print_json(&serde_json::to_value(&jobs).expect("jobs encode"));
        return Ok(Outcome::Success);
    }
    if jobs.is_empty() {
        crate::outln!("{}", if previous.is_some() { "no job has ended yet" } else { "no job is running" });
    }
    for job in &jobs {
        crate::outln!("job {} ({}): {}", job.id, job.kind, job.state);
        crate::outln!(
            "   started: {}{}",
            job.started,
            job.ended.as_ref().map(|e| format!(", ended: {e}")).unwrap_or_default()
        );
        if let Some(operation) = &job.current_operation {
            crate::outln!("   current operation: {operation}");
        }
        crate::outln!("   progress: {}", progress_line(&job.progress));
        if let Some(version) = &job.version {
            crate::outln!("   version: {}", version.get(..8).unwrap_or(version));
        }
        if let Some(error) = &job.error {
            crate::outln!("   error[{}]: {}", error.code, error.message);
            crate::outln!("     cause: {}", error.cause);
            crate::outln!("     resolution: {}", error.resolution);
        }
        if let Some(log) = &job.log_path {
            crate::outln!("   log: {log}");
        }
    }
    Ok(Outcome::Success)
}

pub fn events(
    context: &Context<'_>,
    source: &Option<String>,
    level: &Option<String>,
    since: &Option<String>,
    job: &Option<String>,
) -> Result<Outcome> {
    let level = match level.as_deref() {
        None => None,
        Some("info") => Some(sysstate_types::Level::Info),
        Some("warning") => Some(sysstate_types::Level::Warning),
        Some("error") => Some(sysstate_types::Level::Error),
        Some(other) => {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("`--level {other}`: use info, warning or error"),
            ))
        }
    };
    let since_ns = since
        .as_deref()
        .map(sysstate_engine::jobs::parse_since)
        .transpose()
        .map_err(|e| EngineError::new(ErrorCode::InvalidInput, format!("`--since` {e}")))?;
    let store = context.job_store()?;
    let filter = EventFilter { source: source.clone(), level, since_ns, job: job.clone() };
    let events = store.events(&filter)?;
    if context.json() {
        print_json(&serde_json::to_value(&events).expect("events encode"));
    } else {
        for event in &events {
            crate::outln!(
                "{} {:<7} {:<10} {} {}: {}{}",
                event.time,
                event.level,
                event.source,
                event.event_id,
                event.code,
                event.message,
                event.job.as_ref().map(|j| format!(" (job {j})")).unwrap_or_default()
            );
        }
    }
    Ok(Outcome::Success)
}

/// `1,234 of 5,000 files, 1.2 GiB of 3.4 GiB (35%), 120.0 MiB/s, about 20 s left`: the totals,
/// rate and time left where they are known.
fn progress_line(progress: &sysstate_engine::jobs::JobProgress) -> String {
    let files = match progress.files_total {
        0 => format!("{} files", progress.files_done),
        total => format!("{} of {total} files", progress.files_done),
    };
    let mut line = match progress.bytes_total {
        0 => format!("{files}, {}", bytes(progress.bytes_done)),
        total => format!("{files}, {} of {}", bytes(progress.bytes_done), bytes(total)),
    };
    if let Some(percent) = progress.percent {
        line += &format!(" ({percent}%)");
    }
    if let Some(rate) = progress.bytes_per_second {
        line += &format!(", {}/s", bytes(rate));
    }
    if let Some(left) = progress.seconds_left {
        line += &format!(", about {} left", sysstate_types::time::format_duration_s(left));
    }
    line
}
