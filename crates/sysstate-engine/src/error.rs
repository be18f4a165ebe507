use sysstate_repo::RepoError;
use sysstate_types::ErrorCode;

/// An engine failure: a code, a message naming the object, and optionally a cause and a
/// resolution more specific than the code's own.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// The stable code.
    pub code: ErrorCode,
    /// What failed, naming the object.
    pub message: String,
    /// Why, for this occurrence (falls back to the code's generic cause).
    pub cause: Option<String>,
    /// What to do, for this occurrence (falls back to the code's generic resolution).
    pub resolution: Option<String>,
    /// The specifics as data (pid, sizes, durations), recorded with the job's error event for
    /// `sysstate doctor`.
    pub data: Option<serde_json::Value>,
}

impl EngineError {
    /// An error with the code's generic cause and resolution.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        EngineError { code, message: message.into(), cause: None, resolution: None, data: None }
    }

    /// Sets a specific cause.
    pub fn with_cause(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// Sets a specific resolution.
    pub fn with_resolution(mut self, resolution: impl Into<String>) -> Self {
        self.resolution = Some(resolution.into());
        self
    }

    /// Sets the specifics as data.
    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The cause to print.
    pub fn cause(&self) -> &str {
        self.cause.as_deref().unwrap_or(self.code.cause())
    }

    /// The resolution to print.
    pub fn resolution(&self) -> &str {
        self.resolution.as_deref().unwrap_or(self.code.resolution())
    }
}

impl From<RepoError> for EngineError {
    fn from(error: RepoError) -> Self {
        let code = error.code();
        let resolution = match &error {
            RepoError::Locked { .. } => Some(
                "wait for that process to finish; if it is gone, its lease expires by itself (at once on this host)"
                    .to_string(),
            ),
            RepoError::NotARepository { location } => {
                Some(format!("check the target `{location}`; a backup to a new, empty target creates the repository"))
            }
            _ => None,
        };
        let data = match &error {
            RepoError::Locked { holder, .. } => Some(serde_json::to_value(holder).expect("a lease encodes")),
            _ => None,
        };
        EngineError { code, message: error.to_string(), cause: None, resolution, data }
    }
}

/// Result of engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;

impl From<sysstate_repo::backend::BackendError> for EngineError {
    fn from(error: sysstate_repo::backend::BackendError) -> Self {
        RepoError::from(error).into()
    }
}
