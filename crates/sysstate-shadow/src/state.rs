//! Writer states, persisted in the runtime directory so `sysstate writers` shows them from
//! another process (like `vssadmin list writers`).

use crate::writer::Phase;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use sysstate_types::time::now_ns;

/// Where a writer is in a shadow set (VSS's writer states), stored as its kebab-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum WriterState {
    /// Not in a shadow set, or done with one.
    Stable,
    /// Prepared; the freeze comes next.
    WaitingForFreeze,
    /// Its freeze has begun and not answered yet: it may be frozen.
    Freezing,
    /// Frozen.
    WaitingForThaw,
    /// Thawed; post-snapshot comes next.
    WaitingForPostSnapshot,
    /// Waiting for the backup to read the copies (backup-complete or abort).
    WaitingForCompletion,
    /// Failed in this phase.
    Failed(Phase),
}

impl WriterState {
    /// True for a failure.
    pub fn is_failed(self) -> bool {
        matches!(self, WriterState::Failed(_))
    }
}

impl std::fmt::Display for WriterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterState::Stable => f.write_str("stable"),
            WriterState::WaitingForFreeze => f.write_str("waiting-for-freeze"),
            WriterState::Freezing => f.write_str("freezing"),
            WriterState::WaitingForThaw => f.write_str("waiting-for-thaw"),
            WriterState::WaitingForPostSnapshot => f.write_str("waiting-for-post-snapshot"),
            WriterState::WaitingForCompletion => f.write_str("waiting-for-completion"),
            WriterState::Failed(phase) => write!(f, "failed-at-{phase}"),
        }
    }
}

impl From<WriterState> for String {
    fn from(state: WriterState) -> String {
        state.to_string()
    }
}

impl TryFrom<String> for WriterState {
    type Error = String;

    fn try_from(name: String) -> Result<WriterState, String> {
        let state = match name.as_str() {
            "stable" => WriterState::Stable,
            "waiting-for-freeze" => WriterState::WaitingForFreeze,
            "freezing" => WriterState::Freezing,
            "waiting-for-thaw" => WriterState::WaitingForThaw,
            "waiting-for-post-snapshot" => WriterState::WaitingForPostSnapshot,
            "waiting-for-completion" => WriterState::WaitingForCompletion,
            other => WriterState::Failed(
                other
                    .strip_prefix("failed-at-")
                    .and_then(Phase::from_name)
                    .ok_or_else(|| format!("`{other}` is not a writer state"))?,
            ),
        };
        Ok(state)
    }
}

/// One writer's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WriterStatus {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Where it is.
    pub state: WriterState,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// The shadow set it last took part in.
    pub set: Option<String>,
    /// When the state was set, ns since the epoch.
    pub updated_ns: i64,
}

/// The state file.
pub fn states_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("writers.json")
}

/// Reads the persisted states (empty when none were written yet).
pub fn read_states(runtime_dir: &Path) -> Vec<WriterStatus> {
    std::fs::read(states_path(runtime_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// The live states of one coordinator, written through on every change.
#[derive(Debug)]
pub struct StateBook {
    runtime_dir: PathBuf,
    states: Mutex<Vec<WriterStatus>>,
}

impl StateBook {
    /// A book for these writers, starting from the persisted states (writers not in the shadow
    /// set keep theirs).
    pub fn new(runtime_dir: &Path, writers: &[(String, String)]) -> StateBook {
        let mut states = read_states(runtime_dir);
        for (name, kind) in writers {
            if !states.iter().any(|s| &s.name == name) {
                states.push(WriterStatus {
                    name: name.clone(),
                    kind: kind.clone(),
                    state: WriterState::Stable,
                    last_error: None,
                    set: None,
                    updated_ns: now_ns(),
                });
            }
        }
        let book = StateBook { runtime_dir: runtime_dir.to_path_buf(), states: Mutex::new(states) };
        book.persist();
        book
    }

    /// Sets a writer's state (and error).
    pub fn set(&self, name: &str, state: WriterState, error: Option<String>, set: &str) {
        {
            let mut states = self.states.lock().expect("states lock");
            if let Some(status) = states.iter_mut().find(|s| s.name == name) {
                status.state = state;
                if error.is_some() || state == WriterState::Stable {
                    status.last_error = error.or(status.last_error.take());
                }
                status.set = Some(set.to_string());
                status.updated_ns = now_ns();
            }
        }
        self.persist();
    }

    /// Sets a writer's state only when `allowed` accepts its current one (a thaw racing a
    /// failure must not hide the failure).
    pub fn set_when(
        &self,
        name: &str,
        allowed: impl Fn(WriterState) -> bool,
        state: WriterState,
        error: Option<String>,
        set: &str,
    ) {
        if self.get(name).is_some_and(allowed) {
            self.set(name, state, error, set);
        }
    }

    /// The current state of a writer.
    pub fn get(&self, name: &str) -> Option<WriterState> {
        self.states.lock().expect("states lock").iter().find(|s| s.name == name).map(|s| s.state)
    }

    fn persist(&self) {
        let states = self.states.lock().expect("states lock").clone();
        let path = states_path(&self.runtime_dir);
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = std::fs::create_dir_all(&self.runtime_dir)
            .and_then(|_| std::fs::write(&temp, serde_json::to_vec_pretty(&states).expect("states encode")))
            .and_then(|_| std::fs::rename(&temp, &path));
        if let Err(error) = result {
            tracing::warn!(%error, path = %path.display(), "cannot persist the writer states");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        let states = [
            WriterState::Stable,
            WriterState::Freezing,
            WriterState::WaitingForThaw,
            WriterState::Failed(Phase::PrepareBackup),
        ];
        for state in states {
            assert_eq!(WriterState::try_from(state.to_string()), Ok(state));
        }
        assert_eq!(WriterState::Failed(Phase::Freeze).to_string(), "failed-at-freeze");
        assert!(WriterState::try_from("failed-at-lunch".to_string()).is_err());
    }
}
