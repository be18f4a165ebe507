use crate::lock::LockHolder;
use crate::pressure::Pressure;
use crate::writer::{ErrorClass, Phase};
use serde::{Deserialize, Serialize};
use sysstate_types::ErrorCode;

/// One writer's failure, with the phase it failed in.
#[derive(Debug, Clone)]
pub struct WriterFailure {
    /// The writer.
    pub writer: String,
    /// The phase it failed in.
    pub phase: Phase,
    /// Its class.
    pub class: ErrorClass,
    /// The writer's own message.
    pub message: String,
}

/// A writer that stayed frozen past its window: which, how long, what took the time and how
/// busy the machine was. Recorded as the event's data; the doctor reads it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case")]
#[error(
    "writer `{writer}` was frozen for {frozen_ms} ms, past its freeze-timeout of {window_ms} ms: {}; system pressure then: {pressure}",
    FreezePart::describe(.breakdown)
)]
pub struct WriterTimeout {
    /// The writer whose window was exceeded first.
    pub writer: String,
    /// Its window.
    pub window_ms: u64,
    /// How long the freeze really lasted (its freeze start to the thaw).
    pub frozen_ms: u64,
    /// What took the time.
    pub breakdown: Vec<FreezePart>,
    /// Load, memory and PSI at the time.
    pub pressure: Pressure,
}

/// One part of a freeze window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "part", rename_all = "kebab-case")]
pub enum FreezePart {
    /// A writer's freeze call (until the next writer's freeze started, or the thaw).
    WriterFreeze {
        /// The writer.
        writer: String,
        /// How long, ms.
        ms: u64,
    },
    /// The provider's commit of the copies.
    ProviderCommit {
        /// How long, ms.
        ms: u64,
    },
}

impl FreezePart {
    /// `writer `pg` freeze 12 ms, provider commit 340 ms`.
    pub fn describe(parts: &[FreezePart]) -> String {
        let parts: Vec<String> = parts
            .iter()
            .map(|part| match part {
                FreezePart::WriterFreeze { writer, ms } => format!("writer `{writer}` freeze {ms} ms"),
                FreezePart::ProviderCommit { ms } => format!("provider commit {ms} ms"),
            })
            .collect();
        if parts.is_empty() {
            "nothing measured".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Why a shadow set failed.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// A writer failed or stopped answering.
    #[error("writer `{}` failed at {}: {}", .0.writer, .0.phase, .0.message)]
    Writer(WriterFailure),
    /// A writer stayed frozen past its window.
    #[error("{0}")]
    WriterTimeout(Box<WriterTimeout>),
    /// Another shadow set holds the lock.
    #[error("another shadow set is in progress: {0}")]
    InProgress(LockHolder),
    /// The provider's commit took too long.
    #[error("provider `{provider}` took {elapsed_ms} ms to commit the shadow copies, past `shadow.commit-timeout` of {limit_ms} ms")]
    CommitTimeout {
        /// The provider.
        provider: String,
        /// How long it took before it was stopped.
        elapsed_ms: u64,
        /// The limit.
        limit_ms: u64,
    },
    /// The shadow storage could not hold the copies.
    #[error(
        "shadow storage for `{volume}` on `{location}` is full: max size {max_size}, {} used by copies, {} free on its volume, {} needed",
        sysstate_types::units::bytes(*used),
        sysstate_types::units::bytes(*free),
        sysstate_types::units::bytes(*needed)
    )]
    StorageFull {
        /// The volume whose copies it holds.
        volume: String,
        /// Where the storage is.
        location: String,
        /// Its maximum (`unbounded` or bytes).
        max_size: String,
        /// Bytes used by existing copies.
        used: u64,
        /// Free bytes on the storage's volume.
        free: u64,
        /// Bytes the new copy needed.
        needed: u64,
    },
    /// A provider could not work on a volume.
    #[error("provider `{provider}` cannot make a shadow copy of `{path}`: {message}")]
    Provider {
        /// The provider.
        provider: String,
        /// The path.
        path: String,
        /// Why.
        message: String,
    },
    /// The configuration is wrong.
    #[error("{0}")]
    Config(String),
    /// A file operation of the service itself failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A signal stopped the shadow set; the writers were thawed.
    #[error("stopped by signal {0}; the writers were thawed and the shadow copies released")]
    Interrupted(i32),
}

impl ShadowError {
    /// The stable error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ShadowError::Writer(failure) => failure.class.code(),
            ShadowError::WriterTimeout(_) => ErrorCode::WriterTimeout,
            ShadowError::InProgress(_) => ErrorCode::ShadowSetInProgress,
            ShadowError::CommitTimeout { .. } => ErrorCode::CommitTimeout,
            ShadowError::StorageFull { .. } => ErrorCode::ShadowStorageFull,
            ShadowError::Provider { .. } => ErrorCode::ProviderUnsupported,
            ShadowError::Io { .. } => ErrorCode::Internal,
            ShadowError::Interrupted(_) => ErrorCode::Cancelled,
            ShadowError::Config(_) => ErrorCode::InvalidInput,
        }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> ShadowError {
        ShadowError::Io { path: path.as_ref().display().to_string(), source }
    }
}
