//! Diagnosis of the recent failed jobs: each failure's code looked up in the knowledge base,
//! the cause chosen from the evidence (the job's events and their data, the other jobs, this
//! machine now), with the specifics an administrator needs.

use crate::{checks, knowledge, Check, Diagnosis, Options, Status};
use serde_json::Value;
use sysstate_engine::config::Config;
use sysstate_engine::jobs::{EventFilter, JobKind, JobRecord, JobStore};
use sysstate_engine::paths;
use sysstate_repo::lock::LeaseInfo;
use sysstate_shadow::{FreezePart, LockHolder, Pressure, WriterTimeout};
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
        // A mistyped command is the administrator's, not the machine's: it says so at once and
        // is no standing failure. An in-place restore undone since is over.
        let usage = job.error.as_ref().is_some_and(|e| {
            e.code == "invalid-input" || (e.code == "component-missing" && e.message.ends_with("is not known"))
        });
        let undone = job.kind == JobKind::RestoreInPlace && succeeded.contains(&JobKind::Undo);
        if usage || undone {
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

/// The diagnosis of one failed job, as a notification carries it: the code looked up, the
/// cause chosen from the evidence, and this machine's specifics (without the checks: what they
/// would add is left out).
pub fn diagnose_job(
    store: &JobStore,
    job: &JobRecord,
    config: Option<&Config>,
    options: &Options,
) -> Option<Diagnosis> {
    let error = job.error.as_ref()?;
    let jobs = store.previous(100).unwrap_or_default();
    let found = Found { checks: &[], target: options.target.as_deref() };
    Some(diagnose(job, error, store, &jobs, config, options, &found))
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

fn process_now(pid: u64, command: &str) -> Option<String> {
    let pid = u32::try_from(pid).ok()?;
    if !sysstate_repo::lock::process_alive(pid, None) {
        return None;
    }
    let now = sysstate_fs::process_command(pid);
    (command.is_empty() || now == command).then_some(now)
}

/// What the evidence says of one failure: which of the knowledge base's causes it points to,
/// the specifics, and a resolution more specific than the error's when one is known.
#[derive(Debug, Default)]
struct Evidence {
    cause: usize,
    specifics: Vec<String>,
    resolution: Option<String>,
}

impl Evidence {
    fn cause(cause: usize) -> Evidence {
        Evidence { cause, ..Evidence::default() }
    }

    fn of(specifics: Vec<String>) -> Evidence {
        Evidence { specifics, ..Evidence::default() }
    }

    fn say(&mut self, specific: impl Into<String>) {
        self.specifics.push(specific.into());
    }
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
    let evidence = match code {
        ErrorCode::WriterTimeout => writer_timeout(job, jobs, &data),
        ErrorCode::ShadowStorageFull => shadow_storage_full(&data),
        ErrorCode::ComponentLocked => component_locked(&data),
        ErrorCode::ShadowSetInProgress => shadow_set_in_progress(&data),
        ErrorCode::RepositoryLocked => repository_locked(&data),
        ErrorCode::WriterRetryable
        | ErrorCode::WriterNonretryable
        | ErrorCode::WriterOutOfResources
        | ErrorCode::WriterInconsistent
        | ErrorCode::WriterNotResponding => writer_failed(job, &data),
        ErrorCode::CommitTimeout => commit_timeout(&data),
        ErrorCode::TargetUnavailable | ErrorCode::TargetFull | ErrorCode::TargetPermission => {
            target(job, code, options, found)
        }
        ErrorCode::StateDirPermission => Evidence::of(found.now("state-dir.")),
        ErrorCode::WrongPassphrase => wrong_passphrase(),
        ErrorCode::ComponentMissing => component_missing(config),
        ErrorCode::ComponentIncomplete => component_incomplete(&data),
        ErrorCode::RepositoryCorrupt => repository_corrupt(&error.message),
        ErrorCode::Cancelled if error.message.contains("ended without a word") => Evidence::cause(1),
        _ => Evidence::default(),
    };
    let entry = knowledge::entry(code);
    let chosen = entry.and_then(|e| e.causes.get(evidence.cause).or(e.causes.first()));
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
        specifics: evidence.specifics,
        resolution: evidence.resolution.unwrap_or_else(|| error.resolution.clone()),
    }
}

/// Causes: 0 the machine was short of resources, 1 another backup ran, 2 the provider's commit
/// took the window, 3 the window is too short for the writer.
fn writer_timeout(job: &JobRecord, jobs: &[JobRecord], data: &Value) -> Evidence {
    let Ok(timeout) = serde_json::from_value::<WriterTimeout>(data.clone()) else {
        return Evidence::of(
            vec!["the job's event does not say what took the time (an older version wrote it)".into()],
        );
    };
    let WriterTimeout { writer, window_ms, frozen_ms, breakdown, pressure } = timeout;
    let mut evidence = Evidence::default();
    evidence.say(format!("writer `{writer}` was frozen {frozen_ms} ms; its window is {window_ms} ms"));
    evidence.say(format!("what took the time: {}", FreezePart::describe(&breakdown)));
    evidence.say(format!("system pressure then: {pressure}"));
    evidence.say(format!("system pressure now: {}", Pressure::now()));
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
        .iter()
        .find_map(|part| match part {
            FreezePart::ProviderCommit { ms } => Some(*ms),
            FreezePart::WriterFreeze { .. } => None,
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !overlapping.is_empty() {
        evidence.cause = 1;
        evidence.say(format!("another backup ran at the same time: {}", overlapping.join(", ")));
    } else if let Some(shortage) = pressure.shortage(cores) {
        evidence.say(format!("the machine was short of resources: {shortage}"));
    } else if frozen_ms > 0 && commit_ms * 2 >= frozen_ms {
        evidence.cause = 2;
        evidence.say(format!("the provider commit took {commit_ms} of the {frozen_ms} ms"));
    } else {
        evidence.cause = 3;
        evidence.say(
            "no other backup ran, the pressure was low and the commit short: the window is too short for this writer",
        );
        evidence.resolution =
            Some(format!("raise `freeze-timeout` of writer `{writer}` above {frozen_ms} ms in its `[[writer]]` entry"));
    }
    evidence
}

/// Causes: 0 the storage's limit, 1 its volume is full.
fn shadow_storage_full(data: &Value) -> Evidence {
    let (used, free, needed) = (number(data, "used"), number(data, "free"), number(data, "needed"));
    let (volume, location) = (text(data, "volume"), text(data, "location"));
    let mut evidence = Evidence::of(vec![format!(
        "shadow storage `{location}` for `{volume}`: max size {}, {} used by copies, {} free on its volume, {} needed",
        text(data, "max-size"),
        bytes(used),
        bytes(free),
        bytes(needed)
    )]);
    if free < needed {
        evidence.cause = 1;
        evidence.resolution = Some(format!(
            "free at least {} on the volume of `{location}`, or move the storage with `[[shadow.storage]] on = …`",
            bytes(needed - free)
        ));
    } else {
        evidence.resolution = Some(sysstate_shadow::storage::resize_command(&volume, &location, used, needed));
    }
    evidence
}

/// Causes: 0 the holder still runs, 1 it is gone.
fn component_locked(data: &Value) -> Evidence {
    let (pid, command) = (number(data, "pid"), text(data, "command"));
    let mut evidence = Evidence::of(vec![format!(
        "component `{}`: `{}` held by pid {pid} (`{command}`)",
        text(data, "component"),
        text(data, "file")
    )]);
    match process_now(pid, &command) {
        Some(now) => evidence.say(format!("pid {pid} (`{now}`) still runs now")),
        None => {
            evidence.cause = 1;
            evidence.say(format!("pid {pid} is gone now: the file is free"));
        }
    }
    evidence
}

/// Causes: 0 the lock is still held, 1 it is free now.
fn shadow_set_in_progress(data: &Value) -> Evidence {
    let mut evidence = Evidence::default();
    if let Ok(holder) = serde_json::from_value::<LockHolder>(data.clone()) {
        evidence.say(format!("the shadow-set lock was held by {holder}"));
    }
    match sysstate_shadow::lock::current_holder(&paths::runtime_dir()) {
        Some(holder) => evidence.say(format!("the lock is held now by {holder}")),
        None => {
            evidence.cause = 1;
            evidence.say("the lock is free now");
        }
    }
    evidence
}

/// Causes: 0 the lease's holder still runs, 1 it is gone.
fn repository_locked(data: &Value) -> Evidence {
    let lease = serde_json::from_value::<LeaseInfo>(data.clone()).ok();
    let this_host = sysstate_repo::lock::host_name();
    let running = lease.as_ref().filter(|lease| lease.host == this_host).and_then(|lease| {
        sysstate_repo::lock::process_alive(lease.pid, lease.start_ticks)
            .then(|| (lease.pid, sysstate_fs::process_command(lease.pid)))
    });
    match (&lease, running) {
        (_, Some((pid, now))) => Evidence::of(vec![format!("pid {pid} (`{now}`) still runs now")]),
        (Some(lease), None) if lease.host != this_host => Evidence::of(vec![format!(
            "the lease is held by pid {} on host `{}`, which this machine cannot look at; it expires 30 minutes after its last refresh",
            lease.pid, lease.host
        )]),
        _ => Evidence {
            cause: 1,
            specifics: vec!["the lease's holder is gone now: the next job takes the lease over".into()],
            resolution: None,
        },
    }
}

fn writer_failed(job: &JobRecord, data: &Value) -> Evidence {
    let writer = text(data, "writer");
    let mut evidence = Evidence::of(vec![format!(
        "writer `{writer}` failed at {}: {}",
        text(data, "phase"),
        text(data, "writer-message")
    )]);
    let states = sysstate_shadow::state::read_states(&paths::runtime_dir());
    if let Some(state) = states.iter().find(|s| s.name == writer) {
        evidence.say(format!(
            "its state now: `{}`{}",
            state.state,
            state.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
        ));
    }
    if let Some(log) = &job.log_path {
        evidence.say(format!("its output is in the job log `{log}`"));
    }
    evidence
}

/// Causes: 0 a copy is slow for this much data, 1 a provider that should be fast was not.
fn commit_timeout(data: &Value) -> Evidence {
    let provider = text(data, "provider");
    let mut evidence = Evidence::of(vec![format!(
        "provider `{provider}` took {} ms; `shadow.commit-timeout` is {} ms",
        number(data, "elapsed-ms"),
        number(data, "limit-ms")
    )]);
    if provider != "copy" {
        evidence.cause = 1;
    }
    evidence
}

/// The target's state now, from this run's checks or checked again.
fn target(job: &JobRecord, code: ErrorCode, options: &Options, found: &Found<'_>) -> Evidence {
    let target = job.target.clone().unwrap_or_default();
    let mut evidence = Evidence::of(vec![format!("the job's target: `{target}`")]);
    if target.contains("://") {
        evidence.cause = if code == ErrorCode::TargetFull { 0 } else { 1 };
    }
    if found.target == Some(target.as_str()) {
        evidence.specifics.extend(found.now("target."));
    } else {
        let mut now = Vec::new();
        checks::target(&target, options, &mut now);
        evidence.specifics.extend(describe_now(&now));
    }
    evidence
}

fn wrong_passphrase() -> Evidence {
    let keys = std::fs::read_dir(paths::state_dir().join("keys")).map(|d| d.count()).unwrap_or(0);
    Evidence::of(vec![format!(
        "now: `SYSSTATE_PASSPHRASE` is {}; {keys} key files in the state directory",
        if std::env::var_os("SYSSTATE_PASSPHRASE").is_some() { "set" } else { "not set" }
    )])
}

/// Causes: 0 data damaged or lost (the repairs), 1 the config or the keys gone or replaced, 2 a
/// tree nested too deep. Told apart by the object the message names.
fn repository_corrupt(message: &str) -> Evidence {
    let mut evidence = if message.contains("deeper than") {
        Evidence::cause(2)
    } else if message.contains(": config:") || message.contains(": keys/") {
        Evidence::cause(1)
    } else {
        Evidence::default()
    };
    evidence.say(format!("the job's message: {message}"));
    evidence
}

/// Causes: 0 the path went away while the backup ran, 1 the copy was made in the wrong place.
fn component_incomplete(data: &Value) -> Evidence {
    let paths: Vec<String> =
        data["paths"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect();
    let root = std::path::PathBuf::from(text(data, "root"));
    let mut evidence = Evidence::default();
    let mut all_there = !paths.is_empty();
    for path in &paths {
        let now = root.join(path.trim_start_matches('/'));
        let there = now.exists();
        all_there &= there;
        evidence.say(format!(
            "`{path}` was selected but the shadow copy held nothing of it; now it {}",
            if there { "exists" } else { "is gone" }
        ));
    }
    if all_there {
        evidence.cause = 1;
    }
    evidence
}

fn component_missing(config: Option<&Config>) -> Evidence {
    let Some(config) = config else { return Evidence::default() };
    let listed = sysstate_engine::components::all(config)
        .map(|all| all.into_iter().map(|c| c.name).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    Evidence::of(vec![format!("components known now: {listed}")])
}

fn describe_now<'c>(checks: impl IntoIterator<Item = &'c Check>) -> Vec<String> {
    checks.into_iter().filter(|c| c.status != Status::Ok).map(|c| format!("now: {}", c.found)).collect()
}
