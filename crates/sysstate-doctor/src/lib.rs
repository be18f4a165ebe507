//! `sysstate doctor` and `sysstate services`: the seed's troubleshooting guide as a command.
//!
//! The doctor runs checks — installation, the state directory, the service's parts, shadow
//! storage, the target, a real validation backup — each with a stable id, a status, what it
//! found and the resolution; then it diagnoses the recent failed jobs from the job store and
//! the event log, matching each against the [`knowledge`] base with this machine's specifics.

mod agent;
mod checks;
mod diagnose;

pub use diagnose::diagnose_job;
pub mod knowledge;
pub mod services;

use serde::Serialize;
use std::path::PathBuf;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Works, but deserves a look.
    Warning,
    /// A backup would fail (or did): fix it.
    Failed,
}

/// One check.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Check {
    /// A stable id: `state-dir.mode`, `target.writable` …
    pub id: String,
    /// Ok, warning or failed.
    pub status: Status,
    /// What was found, with this machine's specifics.
    pub found: String,
    /// What to do (for a warning or a failure).
    pub resolution: Option<String>,
    /// What `--fix` changed.
    pub fixed: Option<String>,
    /// The error code a job fails with while this check fails.
    pub code: Option<String>,
}

impl Check {
    fn new(id: &str, status: Status, found: impl Into<String>) -> Check {
        Check { id: id.into(), status, found: found.into(), resolution: None, fixed: None, code: None }
    }

    /// Names the error code a job fails with while this check fails.
    fn code(mut self, code: sysstate_types::ErrorCode) -> Check {
        self.code = Some(code.as_str().to_string());
        self
    }

    fn ok(id: &str, found: impl Into<String>) -> Check {
        Check::new(id, Status::Ok, found)
    }

    fn warning(id: &str, found: impl Into<String>, resolution: impl Into<String>) -> Check {
        Check { resolution: Some(resolution.into()), ..Check::new(id, Status::Warning, found) }
    }

    fn failed(id: &str, found: impl Into<String>, resolution: impl Into<String>) -> Check {
        Check { resolution: Some(resolution.into()), ..Check::new(id, Status::Failed, found) }
    }
}

/// A failed job matched against the knowledge base.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Diagnosis {
    /// The job (empty for a warning outside a job).
    pub job: String,
    /// `backup`, `restore` …
    pub kind: String,
    /// When it ended.
    pub ended: Option<String>,
    /// Its error code.
    pub code: String,
    /// The code's event id.
    pub event_id: u32,
    /// Its error message.
    pub message: String,
    /// What the administrator saw (knowledge base).
    pub symptom: String,
    /// The cause the evidence points to (knowledge base).
    pub cause: String,
    /// What told it apart.
    pub tell: String,
    /// This machine's specifics, then and now.
    pub specifics: Vec<String>,
    /// What to do, as specific as known.
    pub resolution: String,
}

/// What the doctor found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// The recent failed jobs not since followed by a success of the same kind.
    pub diagnoses: Vec<Diagnosis>,
    /// The recent warnings (events of warning level), explained the same way.
    pub notices: Vec<Diagnosis>,
}

impl Report {
    /// True when a check failed or a recent failure stands unresolved.
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Failed) || !self.diagnoses.is_empty()
    }
}

/// What to check and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// The config file.
    pub config_file: PathBuf,
    /// Named explicitly (`--config`): a missing file is an error.
    pub config_required: bool,
    /// The root (`/`).
    pub root: PathBuf,
    /// `--target`, overriding `backup.target`.
    pub target: Option<String>,
    /// The repository passphrase, when one was found.
    pub passphrase: Option<Vec<u8>>,
    /// Repair what can be repaired (the state directory).
    pub fix: bool,
    /// Run the validation backup.
    pub validate: bool,
}

/// The error code a job fails with while the check `id` fails.
fn code_of(id: &str) -> Option<sysstate_types::ErrorCode> {
    use sysstate_types::ErrorCode as C;
    let prefix = |p: &str| id.starts_with(p);
    Some(match id {
        "installation.config" => C::InvalidInput,
        "target.reachable" => C::TargetUnavailable,
        "target.writable" => C::TargetPermission,
        "target.space" => C::TargetFull,
        "target.leases" => C::RepositoryLocked,
        _ if prefix("state-dir.") => C::StateDirPermission,
        _ if prefix("shadow-storage.") => C::ShadowStorageFull,
        _ if prefix("services.writer.") => C::WriterNotResponding,
        _ => return None,
    })
}

/// Runs every check and diagnoses the recent failed jobs.
pub fn run(options: &Options) -> Report {
    let mut checks = Vec::new();
    let config = checks::installation(options, &mut checks);
    checks::state_dir(options, &mut checks);
    let mut target = None;
    if let Some(config) = &config {
        checks::services(config, options, &mut checks);
        agent::checks(config, &mut checks);
        checks::shadow_storage(config, options, &mut checks);
        let checked = options
            .target
            .clone()
            .or_else(|| config.backup.target.clone())
            .unwrap_or_else(sysstate_engine::paths::default_target);
        checks::target(&checked, options, &mut checks);
        if options.validate {
            checks::validation(config, &checked, &mut checks);
        }
        target = Some(checked);
    }
    for check in checks.iter_mut().filter(|c| c.status != Status::Ok && c.code.is_none()) {
        check.code = code_of(&check.id).map(|code| code.as_str().to_string());
    }
    let Ok(store) = sysstate_engine::jobs::JobStore::open(&sysstate_engine::paths::state_dir()) else {
        // The event log cannot be read: the `services.event-log` check says why.
        return Report { checks, diagnoses: Vec::new(), notices: Vec::new() };
    };
    let found = diagnose::Found { checks: &checks, target: target.as_deref() };
    let diagnoses = diagnose::recent_failures(&store, config.as_ref(), options, &found);
    let notices = diagnose::recent_warnings(&store);
    Report { checks, diagnoses, notices }
}
