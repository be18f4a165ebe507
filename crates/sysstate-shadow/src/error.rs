use crate::lock::LockHolder;
use crate::writer::ErrorClass;
use sysstate_types::ErrorCode;

/// One writer's failure, with the phase it failed in.
#[derive(Debug, Clone)]
pub struct WriterFailure {
    /// The writer.
    pub writer: String,
    /// The phase (`freeze`, `prepare-backup`, …).
    pub phase: &'static str,
    /// Its class.
    pub class: ErrorClass,
    /// The writer's own message.
    pub message: String,
}

/// Why a shadow set failed.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// A writer failed or stopped answering.
    #[error("writer `{}` failed at {}: {}", .0.writer, .0.phase, .0.message)]
    Writer(WriterFailure),
    /// A writer stayed frozen past its window.
    #[error("writer `{writer}` was frozen for {frozen_ms} ms, past its freeze-timeout of {window_ms} ms: {breakdown}; system pressure then: {pressure}")]
    WriterTimeout {
        /// The writer whose window was exceeded first.
        writer: String,
        /// Its window.
        window_ms: u64,
        /// How long the freeze really lasted (its freeze start to the thaw).
        frozen_ms: u64,
        /// What took the time: each writer's freeze and the provider commit.
        breakdown: String,
        /// Load, memory and PSI at the time.
        pressure: String,
    },
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
    #[error("shadow storage for `{volume}` on `{location}` is full: max size {max_size}, used {used} bytes, free {free} bytes on its volume, {needed} bytes needed")]
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
            ShadowError::WriterTimeout { .. } => ErrorCode::WriterTimeout,
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
