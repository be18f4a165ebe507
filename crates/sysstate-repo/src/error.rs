use crate::backend::{BackendError, ErrorKind};
use sysstate_types::ErrorCode;

/// Errors of repository operations. Each maps to a stable [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// There is no repository at the target.
    #[error("there is no sysstate repository at `{location}`")]
    NotARepository {
        /// The target.
        location: String,
    },
    /// `init` found one.
    #[error("a repository already exists at `{location}`")]
    AlreadyExists {
        /// The target.
        location: String,
    },
    /// No key opens.
    #[error("no key of the repository at `{location}` opens with the passphrase given")]
    WrongPassphrase {
        /// The target.
        location: String,
    },
    /// Another process holds a lease that excludes ours.
    #[error("the repository at `{location}` is locked by {}", .holder.describe())]
    Locked {
        /// The target.
        location: String,
        /// The lease in the way: host, pid, command, since.
        holder: Box<crate::lock::LeaseInfo>,
    },
    /// Something in the repository is damaged.
    #[error("the repository at `{location}` is damaged: {object}: {detail}")]
    Corrupt {
        /// The target.
        location: String,
        /// Which file or blob.
        object: String,
        /// What is wrong.
        detail: String,
    },
    /// A version that does not exist, or an ambiguous prefix.
    #[error("{0}")]
    VersionNotFound(String),
    /// The format version is newer than this program.
    #[error("the repository at `{location}` has format version {version}; this sysstate reads version {supported}")]
    UnsupportedFormat {
        /// The target.
        location: String,
        /// Its version.
        version: u32,
        /// Ours.
        supported: u32,
    },
    /// Selected paths the source does not hold: the backup saved no version.
    #[error("the backup's source holds none of {}: no version was saved", .paths.join(", "))]
    Unread {
        /// The selected paths, absolute as seen from the root.
        paths: Vec<String>,
    },
    /// The restore's destination cannot be created or opened.
    #[error("cannot restore to `{path}`: {source}")]
    Destination {
        /// The destination.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A local file operation outside the repository (reading a source, writing a restore).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A request that cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// The operation was stopped.
    #[error("the backup was stopped before it stored a version")]
    Interrupted,
}

impl RepoError {
    /// The stable error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            RepoError::Backend(error) => match error.kind {
                ErrorKind::NoSpace => ErrorCode::TargetFull,
                ErrorKind::Permission => ErrorCode::TargetPermission,
                ErrorKind::Mismatch | ErrorKind::NotFound => ErrorCode::RepositoryCorrupt,
                ErrorKind::Unsuitable => ErrorCode::InvalidInput,
                ErrorKind::Forbidden => ErrorCode::VaultForbidden,
                ErrorKind::VaultUnreachable => ErrorCode::VaultUnreachable,
                ErrorKind::Unavailable | ErrorKind::Transient | ErrorKind::Permanent => ErrorCode::TargetUnavailable,
            },
            RepoError::NotARepository { .. } => ErrorCode::TargetUnavailable,
            RepoError::AlreadyExists { .. } => ErrorCode::InvalidInput,
            RepoError::WrongPassphrase { .. } => ErrorCode::WrongPassphrase,
            RepoError::Locked { .. } => ErrorCode::RepositoryLocked,
            RepoError::Corrupt { .. } | RepoError::UnsupportedFormat { .. } => ErrorCode::RepositoryCorrupt,
            RepoError::VersionNotFound(_) | RepoError::Invalid(_) => ErrorCode::InvalidInput,
            RepoError::Io { source, .. } => match source.raw_os_error() {
                Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error() => ErrorCode::TargetFull,
                _ => ErrorCode::Internal,
            },
            RepoError::Destination { .. } => ErrorCode::RestoreDestination,
            RepoError::Unread { .. } => ErrorCode::ComponentIncomplete,
            RepoError::Interrupted => ErrorCode::Cancelled,
        }
    }
}

/// Result of repository operations.
pub type Result<T> = std::result::Result<T, RepoError>;
