//! Recovery of a shadow set whose process died (SIGKILL, a crash, the power): the next process
//! that takes the shadow-set lock thaws and aborts every writer the dead set left in the middle
//! of its phases, and deletes what the dead set made in shadow storage.

use super::members::Members;
use crate::state::WriterState;
use crate::storage::StorageArea;
use crate::writer::DEFAULT_PHASE_TIMEOUT;
use std::time::Instant;

/// What a recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Writers thawed (they were left frozen) and aborted.
    pub thawed: Vec<String>,
    /// Writers aborted (left prepared).
    pub aborted: Vec<String>,
    /// Writers whose thaw or abort failed, with why.
    pub failed: Vec<(String, String)>,
    /// Copies deleted from shadow storage (`storage: id`).
    pub deleted: Vec<String>,
}

impl Recovery {
    /// True when there was nothing to undo.
    pub fn is_empty(&self) -> bool {
        self.thawed.is_empty() && self.aborted.is_empty() && self.failed.is_empty() && self.deleted.is_empty()
    }
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.thawed.is_empty() {
            parts.push(format!("thawed and aborted writer(s) {}", self.thawed.join(", ")));
        }
        if !self.aborted.is_empty() {
            parts.push(format!("aborted writer(s) {}", self.aborted.join(", ")));
        }
        for (writer, why) in &self.failed {
            parts.push(format!("could not recover writer {writer}: {why}"));
        }
        if !self.deleted.is_empty() {
            parts.push(format!("deleted its shadow copies {}", self.deleted.join(", ")));
        }
        if parts.is_empty() {
            parts.push("nothing was left to undo".into());
        }
        f.write_str(&parts.join("; "))
    }
}

/// Undoes what a dead set left: every writer not `stable` in the persisted states is thawed if
/// it was frozen and aborted; every copy in `storages` that is not a finished persistent one or
/// a good base (see `guard::keep_base`) is deleted.
pub(super) fn recover(members: &Members, storages: &[&StorageArea]) -> Recovery {
    let mut done = Recovery::default();
    for index in 0..members.count() {
        let Some(state) = members.state(index).filter(|state| *state != WriterState::Stable) else { continue };
        // Frozen, or perhaps partly: its freeze had started.
        let frozen = matches!(
            state,
            WriterState::Freezing | WriterState::WaitingForThaw | WriterState::Failed(crate::writer::Phase::Freeze)
        );
        let name = members.name(index).to_string();
        match members.recover(index, frozen, Instant::now() + DEFAULT_PHASE_TIMEOUT) {
            Ok(()) => {
                members.set_state(index, WriterState::Stable, None);
                if frozen {
                    done.thawed.push(name);
                } else {
                    done.aborted.push(name);
                }
            }
            Err(error) => {
                let phase = if frozen { crate::writer::Phase::Thaw } else { crate::writer::Phase::Abort };
                members.set_state(index, WriterState::Failed(phase), Some(error.message.clone()));
                done.failed.push((name, error.message));
            }
        }
    }
    for storage in storages {
        let finished: Vec<String> =
            storage.copies().into_iter().filter(|copy| copy.persistent).map(|copy| copy.id).collect();
        let Ok(entries) = std::fs::read_dir(&storage.on) else { continue };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if finished.contains(&id) || !entry.path().is_dir() || super::guard::keep_base(storage, &id) {
                continue;
            }
            match storage.delete(&id) {
                Ok(()) => done.deleted.push(format!("{}: {id}", storage.on.display())),
                Err(error) => done.failed.push((format!("copy {id}"), error.to_string())),
            }
        }
    }
    done
}
