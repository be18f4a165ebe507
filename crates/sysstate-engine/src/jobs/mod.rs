//! Jobs and the event log (DESIGN §4). Every operation that changes or reads a repository at
//! length runs as a job through [`run`]: the job store ([`JobStore`], SQLite in the state
//! directory, shared by every CLI process and the agent) holds a row from the job's start to its
//! end, with its current operation and progress while it runs and its state, version or error
//! after; the event log holds every failure and warning with a level, a source, a numeric id and
//! a stable code.
//!
//! The runner is the only code that starts and ends job rows: the CLI, the doctor's validation
//! backup and the agent all go through it, so a job ends with the right state, error and event
//! on every path out of its work, a panic included.

mod runner;
mod store;

pub use runner::{run, run_triggered, Job, JobOutput};
pub use store::{JobStore, RETENTION};

use serde::Serialize;
use sysstate_types::{ErrorCode, Level};

/// Declares a kebab-case enum stored and shown as its name.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The name stored in the job store and shown to users.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            /// The value of a stored name.
            pub fn from_name(name: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|value| value.as_str() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// What a job does.
    JobKind {
        /// `sysstate backup`.
        Backup => "backup",
        /// `sysstate restore --to DIR`.
        Restore => "restore",
        /// `sysstate restore --in-place`.
        RestoreInPlace => "restore-in-place",
        /// `sysstate restore --in-place --dry-run`: plans, changes nothing.
        RestoreDryRun => "restore-dry-run",
        /// `sysstate restore --undo JOB`.
        Undo => "undo",
        /// `sysstate recover`.
        Recover => "recover",
        /// `sysstate recover --dry-run`: plans, changes nothing.
        RecoverDryRun => "recover-dry-run",
        /// `sysstate check`.
        Check => "check",
        /// `sysstate forget`.
        Forget => "forget",
        /// `sysstate prune`.
        Prune => "prune",
        /// `sysstate copy`.
        Copy => "copy",
        /// The agent's copy of new versions to its vault.
        Replicate => "replicate",
        /// `sysstate repair`.
        Repair => "repair",
        /// The doctor's validation backup.
        Validate => "validate",
        /// The vault reads its storage's files and checks each against its name.
        VaultVerify => "vault-verify",
        /// The vault soft-deletes what its retention drops.
        VaultRetention => "vault-retention",
        /// The vault purges versions soft-deleted longer ago than its window.
        VaultPurge => "vault-purge",
    }
}

named_enum! {
    /// What started a job.
    JobTrigger {
        /// A command at a prompt (or a script).
        Command => "command",
        /// The agent, at a scheduled time.
        Schedule => "schedule",
        /// The agent, at its start, for a scheduled time it missed while it was not running.
        CatchUp => "catch-up",
        /// The agent, asked through its API (`sysstate backup --now`).
        Api => "api",
    }
}

named_enum! {
    /// Where a job is in its life.
    JobState {
        /// Started, not ended.
        Running => "running",
        /// Ended with everything done.
        Succeeded => "succeeded",
        /// Ended with everything done but some entries, each a warning.
        SucceededWithWarnings => "succeeded-with-warnings",
        /// Ended with an error.
        Failed => "failed",
        /// Stopped on request (a signal, `job cancel`).
        Cancelled => "cancelled",
    }
}

impl JobState {
    /// True for the two successful ends.
    pub fn succeeded(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::SucceededWithWarnings)
    }
}

/// The layer an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The repository and its backend.
    Repository,
    /// The shadow copy coordinator, providers and storage.
    Shadow,
    /// A writer.
    Writer,
    /// Everything else.
    Engine,
}

impl Source {
    /// The name stored in the event log.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Repository => "repository",
            Source::Shadow => "shadow",
            Source::Writer => "writer",
            Source::Engine => "engine",
        }
    }

    /// The layer an error code comes from: the `source` of its event.
    pub fn of(code: ErrorCode) -> Source {
        use ErrorCode::*;
        match code {
            WriterTimeout | WriterRetryable | WriterNonretryable | WriterOutOfResources | WriterInconsistent
            | WriterNotResponding => Source::Writer,
            ShadowSetInProgress
            | CommitTimeout
            | ShadowStorageFull
            | ShadowStorageOldestDeleted
            | ProviderUnsupported => Source::Shadow,
            TargetUnavailable | TargetFull | TargetPermission | RepositoryLocked | RepositoryCorrupt
            | WrongPassphrase | VaultUnreachable | VaultForbidden => Source::Repository,
            _ => Source::Engine,
        }
    }
}

/// The progress of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobProgress {
    /// Bytes processed.
    pub bytes_done: u64,
    /// Bytes to process, when known.
    pub bytes_total: u64,
    /// Files processed.
    pub files_done: u64,
    /// Files to process, when known.
    pub files_total: u64,
    /// Of a running job with a known total: how far, in percent of the bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u64>,
    /// Of a running job: bytes a second since it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// Of a running job with a known total: about how many seconds are left at that rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_left: Option<u64>,
}

impl JobProgress {
    /// Fills in the percentage, the rate and the time left of a job running for
    /// `elapsed_ns` (as `Get-WBJob` shows them).
    pub fn estimate(&mut self, elapsed_ns: i64) {
        let seconds = elapsed_ns as f64 / 1e9;
        self.percent = self.bytes_done.saturating_mul(100).checked_div(self.bytes_total).map(|p| p.min(100));
        if seconds >= 0.5 && self.bytes_done > 0 {
            let rate = self.bytes_done as f64 / seconds;
            self.bytes_per_second = Some(rate as u64);
            if self.bytes_total > self.bytes_done {
                self.seconds_left = Some(((self.bytes_total - self.bytes_done) as f64 / rate).ceil() as u64);
            }
        }
    }
}

/// A job's error (DESIGN §4 job JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobError {
    /// The code.
    pub code: String,
    /// The message.
    pub message: String,
    /// The cause.
    pub cause: String,
    /// The resolution.
    pub resolution: String,
    /// The event id.
    pub event_id: u32,
}

/// A job as `sysstate job --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobRecord {
    /// Its id.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// Where it is in its life.
    pub state: JobState,
    /// What started it.
    pub trigger: JobTrigger,
    /// The process running it.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started: String,
    /// When it ended.
    pub ended: Option<String>,
    /// The target.
    pub target: Option<String>,
    /// The components.
    pub components: Vec<String>,
    /// What it is doing now.
    pub current_operation: Option<String>,
    /// How far it is.
    pub progress: JobProgress,
    /// The version it made.
    pub version: Option<String>,
    /// Its log file.
    pub log_path: Option<String>,
    /// Its error.
    pub error: Option<JobError>,
}

/// An event as `sysstate events --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EventRecord {
    /// When (RFC 3339).
    pub time: String,
    /// `info`, `warning`, `error`.
    pub level: String,
    /// `repository`, `shadow`, `writer`, `engine`.
    pub source: String,
    /// The numeric id.
    pub event_id: u32,
    /// The stable code.
    pub code: String,
    /// The message.
    pub message: String,
    /// The job it belongs to.
    pub job: Option<String>,
    /// Details.
    pub data: Option<serde_json::Value>,
}

/// A point in time as filters take it: a date (`2026-11-24`), a time (`2026-11-24T10:00:00Z`)
/// or a duration before now (`2h`); in ns.
pub fn parse_since(text: &str) -> std::result::Result<i64, String> {
    if let Some(ns) = sysstate_types::time::parse_utc(text) {
        return Ok(ns);
    }
    let ago = crate::shadow::parse_duration(text).map_err(|_| {
        format!("`{text}`: use a date (`2026-11-24`), a time (`2026-11-24T10:00:00Z`) or a duration (`2h`)")
    })?;
    Ok(sysstate_repo::lock::now_ns() - ago.as_nanos() as i64)
}

/// Filters of the agent's job list (as Proxmox's task list).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only running jobs (`Some(true)`), only ended ones (`Some(false)`).
    pub running: Option<bool>,
    /// Only jobs started since this time (ns).
    pub since_ns: Option<i64>,
    /// Only this kind.
    pub kind: Option<JobKind>,
    /// Only this state.
    pub state: Option<JobState>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// Filters of `sysstate events`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this source.
    pub source: Option<String>,
    /// Only this level and above.
    pub level: Option<Level>,
    /// Only since this time (ns).
    pub since_ns: Option<i64>,
    /// Only this job.
    pub job: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_job_shows_how_far_how_fast_and_how_long_yet() {
        let mut progress = JobProgress { bytes_done: 300 << 20, bytes_total: 1200 << 20, ..JobProgress::default() };
        progress.estimate(10_000_000_000);
        assert_eq!(progress.percent, Some(25));
        assert_eq!(progress.bytes_per_second, Some(30 << 20));
        assert_eq!(progress.seconds_left, Some(30));
        // Unknown total: a rate, no percentage and no time left.
        let mut progress = JobProgress { bytes_done: 100, ..JobProgress::default() };
        progress.estimate(2_000_000_000);
        assert_eq!((progress.percent, progress.bytes_per_second, progress.seconds_left), (None, Some(50), None));
    }
}
