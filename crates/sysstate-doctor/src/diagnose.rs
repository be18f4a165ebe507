//! Diagnosis of the recent failed jobs: each failure's code looked up in the knowledge base,
//! the cause chosen from the evidence (the job's events and their data, the other jobs, this
//! machine now), with the specifics an administrator needs.

use crate::{checks, knowledge, Check, Diagnosis, Options, Status};
use serde_json::Value;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{EventFilter, JobKind, JobRecord, JobStore};
use sysstate_engine::paths;
use sysstate_types::units::bytes;
use sysstate_types::ErrorCode;

/// How many failures are diagnosed at most, and how far back.
const MOST: usize = 5;
const WITHIN_DAYS: i64 = 7;

/// The failed jobs of the last week not since followed by a success of the same kind, newest
/// first.
/// What the checks of this run found: reused for the specifics "now" instead of checking again.
pub(crate) struct Found<'a> {
    /// Every check run.
    pub checks: &'a [Check],
    /// The target they checked.
    pub target: Option<&'a str>,
}

impl Found<'_> {
    /// The checks whose id starts with `prefix` that are not ok, as "now: …" lines.
    fn now(&self, prefix: &str) -> Vec<String> {
        describe_now(self.checks.iter().filter(|c| c.id.starts_with(prefix)))
    }
}

pub(crate) fn recent_failures(
    store: &JobStore,
    config: Option<&Config>,
    options: &Options,
    found: &Found<'_>,
) -> Vec<Diagnosis> {
    let jobs = store.previous(100).unwrap_or_default();
    let now = sysstate_repo::lock::now_ns();
    let mut succeeded = std::collections::HashSet::new();
    let mut out = Vec::new();
    for job in &jobs {
        if job.state.succeeded() {
            succeeded.insert(job.kind);
            continue;
        }
        let ended = job.ended.as_deref().and_then(sysstate_types::time::parse_utc).unwrap_or(now);
        // The doctor's own validation is its own check; dry runs change nothing.
        if succeeded.contains(&job.kind)
            || job.kind == JobKind::Validate
            || now - ended > WITHIN_DAYS * 86_400_000_000_000
        {
            continue;
        }
        let Some(error) = &job.error else { continue };
        out.push(diagnose(job, error, store, &jobs, config, options, found));
        if out.len() == MOST {
            break;
        }
    }
    out
}

/// The warning events of the last week, newest first, each explained from the knowledge base.
pub(crate) fn recent_warnings(store: &JobStore) -> Vec<Diagnosis> {
    let since = sysstate_repo::lock::now_ns() - WITHIN_DAYS * 86_400_000_000_000;
    let filter =
        EventFilter { level: Some(sysstate_types::Level::Warning), since_ns: Some(since), ..Default::default() };
    let events = store.events(&filter).unwrap_or_default();
    events
        .iter()
        .rev()
        .filter(|e| e.level == "warning")
        .filter_map(|event| {
            let code = ErrorCode::from_name(&event.code)?;
            let entry = knowledge::entry(code)?;
            let cause = entry.causes.first()?;
            Some(Diagnosis {
                job: event.job.clone().unwrap_or_default(),
                kind: event.source.clone(),
                ended: Some(event.time.clone()),
                code: event.code.clone(),
                event_id: event.event_id,
                message: event.message.clone(),
                symptom: entry.symptom.clone(),
                cause: cause.cause.clone(),
                tell: cause.tell.clone(),
                specifics: vec![event.message.clone()],
                resolution: cause.resolution.clone(),
            })
        })
        .take(MOST)
        .collect()
}

fn text(data: &Value, key: &str) -> String {
    match &data[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn number(data: &Value, key: &str) -> u64 {
    data[key].as_u64().unwrap_or(0)
}

fn interval(job: &JobRecord) -> (i64, i64) {
    let parse = |t: Option<&str>| t.and_then(sysstate_types::time::parse_utc);
    let start = parse(Some(&job.started)).unwrap_or(0);
    (start, parse(job.ended.as_deref()).unwrap_or(i64::MAX))
}

/// What in a pressure line says the machine was short of resources.
fn pressure_high(line: &str) -> Option<String> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let mut reasons = Vec::new();
    if let Some(load) =
        line.strip_prefix("load ").and_then(|r| r.split_whitespace().next()).and_then(|l| l.parse::<f64>().ok())
    {
        if load > 2.0 * cores {
            reasons.push(format!("load {load} on {cores} cores"));
        }
    }
    if let Some((available, total)) = line.split(", ").find(|p| p.contains("MiB available")).and_then(|p| {
        let mut numbers = p.split_whitespace().filter_map(|w| w.parse::<f64>().ok());
        Some((numbers.next()?, numbers.next()?))
    }) {
        if total > 0.0 && available / total < 0.1 {
            reasons.push(format!("only {available} of {total} MiB memory available"));
        }
    }
    for part in line.split([',', ' ']) {
        if let Some(value) = part.strip_prefix("avg10=").and_then(|v| v.parse::<f64>().ok()) {
            if value > 10.0 {
                reasons.push(format!("pressure stalls at {value}%"));
            }
        }
    }
    (!reasons.is_empty()).then(|| reasons.join(", "))
}

fn process_now(pid: u64, command: &str) -> Option<String> {
    let pid = u32::try_from(pid).ok()?;
    if !sysstate_repo::lock::process_alive(pid, None) {
        return None;
    }
    let now = sysstate_fs::process_command(pid);
    (command.is_empty() || now == command).then_some(now)
}

fn diagnose(
    job: &JobRecord,
    error: &sysstate_engine::jobs::JobError,
    store: &JobStore,
    jobs: &[JobRecord],
    config: Option<&Config>,
    options: &Options,
    found: &Found<'_>,
) -> Diagnosis {
    let code = ErrorCode::from_name(&error.code).unwrap_or(ErrorCode::Internal);
    let events = store.events(&EventFilter { job: Some(job.id.clone()), ..Default::default() }).unwrap_or_default();
    let data = events.iter().rev().find(|e| e.code == error.code).and_then(|e| e.data.clone()).unwrap_or(Value::Null);
    let mut cause = 0;
    let mut specifics = Vec::new();
    let mut resolution = error.resolution.clone();
    match code {
        ErrorCode::WriterTimeout => {
            let (writer, breakdown, pressure) =
                (text(&data, "writer"), text(&data, "breakdown"), text(&data, "pressure"));
            specifics.push(format!(
                "writer `{writer}` was frozen {} ms; its window is {} ms",
                number(&data, "frozen-ms"),
                number(&data, "window-ms")
            ));
            specifics.push(format!("what took the time: {breakdown}"));
            specifics.push(format!("system pressure then: {pressure}"));
            specifics.push(format!("system pressure now: {}", sysstate_shadow::pressure::snapshot()));
            let (start, end) = interval(job);
            let overlapping: Vec<String> = jobs
                .iter()
                .filter(|other| other.id != job.id && matches!(other.kind, JobKind::Backup | JobKind::Validate))
                .filter(|other| {
                    let (s, e) = interval(other);
                    s < end && start < e
                })
                .map(|other| format!("job {} ({}, pid {})", other.id, other.kind, other.pid))
                .collect();
            let commit_ms = breakdown
                .split(", ")
                .find_map(|p| p.strip_prefix("provider commit ")?.strip_suffix(" ms")?.parse::<u64>().ok())
                .unwrap_or(0);
            let frozen = number(&data, "frozen-ms");
            if !overlapping.is_empty() {
                cause = 1;
                specifics.push(format!("another backup ran at the same time: {}", overlapping.join(", ")));
            } else if let Some(high) = pressure_high(&pressure) {
                cause = 0;
                specifics.push(format!("the machine was short of resources: {high}"));
            } else if frozen > 0 && commit_ms * 2 >= frozen {
                cause = 2;
                specifics.push(format!("the provider commit took {commit_ms} of the {frozen} ms"));
            } else {
                cause = 3;
                specifics.push("no other backup ran, the pressure was low and the commit short: the window is too short for this writer".into());
                resolution =
                    format!("raise `freeze-timeout` of writer `{writer}` above {frozen} ms in its `[[writer]]` entry");
            }
        }
        ErrorCode::ShadowStorageFull => {
            let (used, free, needed) = (number(&data, "used"), number(&data, "free"), number(&data, "needed"));
            let (volume, location) = (text(&data, "volume"), text(&data, "location"));
            specifics.push(format!(
                "shadow storage `{location}` for `{volume}`: max size {}, {} used by copies, {} free on its volume, {} needed",
                text(&data, "max-size"),
                bytes(used),
                bytes(free),
                bytes(needed)
            ));
            if free < needed {
                cause = 1;
                resolution = format!("free at least {} on the volume of `{location}`, or move the storage with `[[shadow.storage]] on = …`", bytes(needed - free));
            } else {
                let size = (used + needed + (used + needed) / 4).div_ceil(1 << 20);
                resolution =
                    format!("sysstate shadowstorage resize --for {volume} --on {location} --max-size {size}MiB");
            }
        }
        ErrorCode::ComponentLocked => {
            let (pid, command) = (number(&data, "pid"), text(&data, "command"));
            specifics.push(format!(
                "component `{}`: `{}` held by pid {pid} (`{command}`)",
                text(&data, "component"),
                text(&data, "file")
            ));
            match process_now(pid, &command) {
                Some(now) => specifics.push(format!("pid {pid} (`{now}`) still runs now")),
                None => {
                    cause = 1;
                    specifics.push(format!("pid {pid} is gone now: the file is free"));
                }
            }
        }
        ErrorCode::ShadowSetInProgress => {
            let pid = number(&data, "pid");
            specifics.push(format!(
                "the shadow-set lock was held by pid {pid} (`{}`), job {}",
                text(&data, "command"),
                text(&data, "job")
            ));
            match sysstate_shadow::lock::current_holder(&paths::runtime_dir()) {
                Some(holder) => specifics.push(format!("the lock is held now by {holder}")),
                None => {
                    cause = 1;
                    specifics.push("the lock is free now".into());
                }
            }
        }
        ErrorCode::RepositoryLocked => {
            let pid = error
                .message
                .split("pid ")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse::<u64>().ok());
            match pid.and_then(|pid| process_now(pid, "").map(|now| (pid, now))) {
                Some((pid, now)) => specifics.push(format!("pid {pid} (`{now}`) still runs now")),
                None => {
                    cause = 1;
                    specifics.push("the lease's holder is gone now: the next job takes the lease over".into());
                }
            }
        }
        ErrorCode::WriterRetryable
        | ErrorCode::WriterNonretryable
        | ErrorCode::WriterOutOfResources
        | ErrorCode::WriterInconsistent
        | ErrorCode::WriterNotResponding => {
            let writer = text(&data, "writer");
            specifics.push(format!(
                "writer `{writer}` failed at {}: {}",
                text(&data, "phase"),
                text(&data, "writer-message")
            ));
            let states = sysstate_shadow::state::read_states(&paths::runtime_dir());
            if let Some(state) = states.iter().find(|s| s.name == writer) {
                specifics.push(format!(
                    "its state now: `{}`{}",
                    state.state,
                    state.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                ));
            }
            if let Some(log) = &job.log_path {
                specifics.push(format!("its output is in the job log `{log}`"));
            }
        }
        ErrorCode::CommitTimeout => {
            let provider = text(&data, "provider");
            specifics.push(format!(
                "provider `{provider}` took {} ms; `shadow.commit-timeout` is {} ms",
                number(&data, "elapsed-ms"),
                number(&data, "limit-ms")
            ));
            if provider != "copy" {
                cause = 1;
            }
        }
        ErrorCode::TargetUnavailable | ErrorCode::TargetFull | ErrorCode::TargetPermission => {
            let target = job.target.clone().unwrap_or_default();
            specifics.push(format!("the job's target: `{target}`"));
            if target.contains("://") {
                cause = if code == ErrorCode::TargetFull { 0 } else { 1 };
            }
            if found.target == Some(target.as_str()) {
                specifics.extend(found.now("target."));
            } else {
                let mut now = Vec::new();
                checks::target(&target, options, &mut now);
                specifics.extend(describe_now(&now));
            }
        }
        ErrorCode::StateDirPermission => specifics.extend(found.now("state-dir.")),
        ErrorCode::WrongPassphrase => {
            let keys = std::fs::read_dir(paths::state_dir().join("keys")).map(|d| d.count()).unwrap_or(0);
            specifics.push(format!(
                "now: `SYSSTATE_PASSPHRASE` is {}; {keys} key files in the state directory",
                if std::env::var_os("SYSSTATE_PASSPHRASE").is_some() { "set" } else { "not set" }
            ));
        }
        ErrorCode::ComponentMissing => {
            if let Some(config) = config {
                let listed = sysstate_engine::components::all(config)
                    .map(|all| all.into_iter().map(|c| c.name).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                specifics.push(format!("components known now: {listed}"));
            }
        }
        ErrorCode::Cancelled if error.message.contains("ended without a word") => cause = 1,
        _ => {}
    }
    let entry = knowledge::entry(code);
    let chosen = entry.and_then(|e| e.causes.get(cause).or(e.causes.first()));
    Diagnosis {
        job: job.id.clone(),
        kind: job.kind.to_string(),
        ended: job.ended.clone(),
        code: error.code.clone(),
        event_id: error.event_id,
        message: error.message.clone(),
        symptom: entry.map(|e| e.symptom.clone()).unwrap_or_default(),
        cause: chosen.map(|c| c.cause.clone()).unwrap_or_else(|| error.cause.clone()),
        tell: chosen.map(|c| c.tell.clone()).unwrap_or_default(),
        specifics,
        resolution,
    }
}

fn describe_now<'c>(checks: impl IntoIterator<Item = &'c Check>) -> Vec<String> {
    checks.into_iter().filter(|c| c.status != Status::Ok).map(|c| format!("now: {}", c.found)).collect()
}
