//! The failure guard: whatever way a shadow set fails (an error, a panic), its writers are
//! thawed and aborted and nothing it made is left in shadow storage.

use super::members::Members;
use super::watchdog::{thaw_all, Watch};
use crate::state::WriterState;
use crate::storage::StorageArea;
use crate::writer::{Phase, DEFAULT_PHASE_TIMEOUT};
use std::time::Instant;

/// Undoes a failed set on drop, unless [`disarm`](FailureGuard::disarm)ed: thaws, aborts every
/// writer that got past identify, deletes the copy in every storage area. It always thaws.
pub(super) struct FailureGuard<'a> {
    members: &'a Members,
    watch: &'a Watch,
    /// Writers that were called at least once (the others have nothing to undo).
    prepared: usize,
    storages: Vec<&'a StorageArea>,
    copy_id: &'a str,
    armed: bool,
}

impl<'a> FailureGuard<'a> {
    pub(super) fn new(
        members: &'a Members,
        watch: &'a Watch,
        storages: Vec<&'a StorageArea>,
        copy_id: &'a str,
    ) -> FailureGuard<'a> {
        FailureGuard { members, watch, prepared: 0, storages, copy_id, armed: true }
    }

    /// Writer `index` is being called: it gets an abort if the set fails.
    pub(super) fn calling(&mut self, index: usize) {
        self.prepared = self.prepared.max(index + 1);
    }

    /// The set is made: nothing to undo.
    pub(super) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for FailureGuard<'_> {
    fn drop(&mut self) {
        thaw_all(self.members, self.watch);
        if !self.armed {
            return;
        }
        for index in 0..self.prepared {
            let failed = self.members.state(index).is_some_and(WriterState::is_failed);
            let _ = self.members.call(index, Phase::Abort, Instant::now() + DEFAULT_PHASE_TIMEOUT);
            if !failed {
                self.members.set_state(index, WriterState::Stable, None);
            }
        }
        for storage in &self.storages {
            if keep_base(storage, self.copy_id) {
                continue;
            }
            if let Err(error) = storage.delete(self.copy_id) {
                tracing::warn!(%error, storage = %storage.on.display(), "cannot delete the failed shadow copy");
            }
        }
    }
}

/// True when the copy `id` in `storage` is a base copy that a failed or dead set leaves good: one
/// with the record of the live identities a finished set made it from. Whatever the failed set
/// refreshed in it was copied because its live entry had changed since that record, so the next
/// refresh copies it again; what it had not reached yet is as the record says. Deleting it made
/// the next set create every file again right after deleting them, which on ext4 was slow
/// enough to fail the commit every time. A base without that record is not good: it is deleted.
pub(super) fn keep_base(storage: &StorageArea, id: &str) -> bool {
    id == super::BASE_COPY && crate::provider::read_origins(&storage.copy_dir(id)).is_some()
}
