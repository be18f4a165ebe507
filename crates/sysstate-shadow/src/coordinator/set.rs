//! A shadow set whose copies exist, until it is completed.

use super::members::Members;
use super::record::ShadowSetRecord;
use crate::lock::ShadowSetLock;
use crate::state::WriterState;
use crate::storage::StorageArea;
use crate::writer::{Phase, DEFAULT_PHASE_TIMEOUT};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A copy of another volume's paths in its own storage area.
#[derive(Debug, Clone)]
pub(super) struct ExtraCopy {
    pub(super) storage: StorageArea,
    pub(super) paths: Vec<PathBuf>,
    pub(super) root: PathBuf,
    /// For a snapshot: the live device its entries are recorded with.
    pub(super) live_device: Option<u64>,
    /// Kept after the set: a persistent copy, or a base copy (a snapshot never is one).
    pub(super) keep: bool,
}

/// A shadow set whose copies exist: read them, then [`complete`](ShadowSet::complete).
pub struct ShadowSet {
    pub(super) members: Arc<Members>,
    pub(super) storage: StorageArea,
    pub(super) copy_id: String,
    pub(super) tree: PathBuf,
    pub(super) origins: crate::provider::Origins,
    pub(super) live_device: Option<u64>,
    pub(super) taken_ns: Option<i64>,
    pub(super) skipped: Vec<(PathBuf, String)>,
    pub(super) record: ShadowSetRecord,
    /// The copy stays after the set: a persistent copy, or the base copy.
    pub(super) keep_copy: bool,
    /// Copies of the paths on other volumes.
    pub(super) extra: Vec<ExtraCopy>,
    pub(super) completed: bool,
    pub(super) _lock: ShadowSetLock,
}

impl std::fmt::Debug for ShadowSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowSet").field("id", &self.record.id).field("tree", &self.tree).finish()
    }
}

/// The live identity of an entry of a copy: device, and inode, ctime (ns) and link count where
/// the copy's are not the live ones.
pub type LiveIdentity = (u64, Option<u64>, Option<i64>, Option<u64>);

impl ShadowSet {
    /// The directory that stands for `/` in the copies.
    pub fn root(&self) -> &Path {
        &self.tree
    }

    /// Where to read `path` (absolute as seen from the root) when it lies on another volume
    /// whose copy is in that volume's own storage; `None` for paths in [`root`](Self::root).
    pub fn source_for(&self, path: &Path) -> Option<PathBuf> {
        self.extra
            .iter()
            .find(|extra| extra.paths.iter().any(|p| path.starts_with(p)))
            .map(|extra| extra.root.join(path.strip_prefix("/").unwrap_or(path)))
    }

    /// Maps an entry of the copy (by its absolute path as seen from the root) to the live
    /// entry's identity: `(device, inode, ctime ns)`, where `None` means the copy kept it.
    pub fn live_identity(&self) -> impl Fn(&Path) -> Option<LiveIdentity> + Send + Sync + 'static {
        let origins = self.origins.clone();
        let device = self.live_device;
        // A volume snapshotted on its own: its entries are the live device's.
        let snapshots: Vec<(Vec<PathBuf>, Option<u64>)> =
            self.extra.iter().map(|extra| (extra.paths.clone(), extra.live_device)).collect();
        move |path| match origins.get(path) {
            Some(origin) => Some((origin.device, Some(origin.inode), Some(origin.ctime_ns), Some(origin.links))),
            None => snapshots
                .iter()
                .find(|(paths, _)| paths.iter().any(|p| path.starts_with(p)))
                .map_or(device, |(_, device)| *device)
                .map(|device| (device, None, None, None)),
        }
    }

    /// For a btrfs snapshot, when it was taken (ns since the epoch): its files share their
    /// extents with the live files, and taking it wrote back every dirty page, so a live file
    /// whose ctime is still the snapshot's — and was well before this — holds what the snapshot
    /// holds (a later write, even through a shared mapping, moves the ctime). `None` for a copy,
    /// which a write through a mapping can leave behind without a new ctime.
    pub fn taken_ns(&self) -> Option<i64> {
        self.taken_ns
    }

    /// For a snapshot, which keeps inodes and ctimes: the live device its entries are recorded
    /// with. `None` for a copy.
    pub fn live_device(&self) -> Option<u64> {
        self.live_device
    }

    /// Entries the provider did not copy (sockets), with why.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    /// What the set did.
    pub fn record(&self) -> &ShadowSetRecord {
        &self.record
    }

    /// Ends the set: backup-complete (or abort, when the backup failed) to every writer, and the
    /// copy released unless it is persistent.
    pub fn complete(mut self, backup_succeeded: bool) -> ShadowSetRecord {
        self.finish(backup_succeeded);
        self.record.clone()
    }

    fn finish(&mut self, backup_succeeded: bool) {
        if std::mem::replace(&mut self.completed, true) {
            return;
        }
        let phase = if backup_succeeded { Phase::BackupComplete } else { Phase::Abort };
        for index in 0..self.members.count() {
            match self.members.call(index, phase, Instant::now() + DEFAULT_PHASE_TIMEOUT) {
                Ok(()) => self.members.set_state(index, WriterState::Stable, None),
                Err(error) => self.members.set_state(index, WriterState::Failed(phase), Some(error.message)),
            }
        }
        if !self.keep_copy {
            if let Err(error) = self.storage.delete(&self.copy_id) {
                tracing::warn!(%error, "cannot release the shadow copy");
            }
        }
        for extra in self.extra.iter().filter(|extra| !extra.keep) {
            if let Err(error) = extra.storage.delete(&self.copy_id) {
                tracing::warn!(%error, "cannot release the shadow copy");
            }
        }
    }
}

impl Drop for ShadowSet {
    fn drop(&mut self) {
        // A caller that never completed (an error, a panic): abort and release.
        self.finish(false);
    }
}
