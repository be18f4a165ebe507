//! What a shadow set did, as the version manifest records it.

use crate::journal::Position;
use crate::lock::LockHolder;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One writer's part in a shadow set, for the version manifest.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct WriterRecord {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// `ok` or the error code.
    pub result: String,
    /// The writer's message on failure.
    pub message: Option<String>,
    /// How long it was frozen, ms.
    pub frozen_ms: u64,
}

/// One volume's copy in a shadow set.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CopyRecord {
    /// The volume (mount point) copied.
    #[serde(rename = "for")]
    pub for_volume: String,
    /// The shadow storage it was copied to.
    pub on: String,
    /// The provider that made it.
    pub provider: String,
    /// Real bytes it took.
    pub bytes: u64,
    /// Entries copied in the freeze.
    pub files: u64,
    /// How the commit in the freeze found what changed since the base copy was brought up to
    /// date: `journal` (only the directories the change journal named), `walk` (every entry)
    /// or `snapshot` (nothing to find).
    pub read: String,
    /// Why it walked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walked_because: Option<String>,
    /// With the journal: how many directories it named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirs_looked_at: Option<usize>,
}

/// Where a set made with a kept change journal (the agent's) stands in it.
#[derive(Debug, Clone, Serialize)]
pub struct JournalRecord {
    /// The journal's position at the commit: the next set's changes are those after it.
    #[serde(flatten)]
    pub position: Position,
    /// The position the base copies this set refreshed were made at, when every change since
    /// is known: then [`changed`](Self::changed) says where.
    #[serde(skip)]
    pub since: Option<Position>,
    /// The directories (absolute, as seen from the root) where something changed since `since`.
    #[serde(skip)]
    pub changed: Vec<PathBuf>,
    /// For directories of `changed` whose changes all named entries in them: those entries.
    /// The others are read whole.
    #[serde(skip)]
    pub names: crate::journal::EntryNames,
    /// With `since`: the paths of the volumes the journal does not cover (copied by snapshot,
    /// or not watched): read whole.
    #[serde(skip)]
    pub whole: Vec<PathBuf>,
    /// Without `since`, when the set knows it: why not every change since the base copies
    /// were made is known.
    #[serde(skip)]
    pub unknown: Option<String>,
    /// With `since`, when the caller read the changed files live before the freeze: what
    /// changed after the copy before the freeze took the journal, which the commit copied.
    #[serde(skip)]
    pub in_freeze: Option<InFreeze>,
}

/// What changed while a caller read the changed files live before the freeze (from the copy
/// before the freeze's take of the journal to the commit's): the commit copied it, and it is
/// to be read again from the copy.
#[derive(Debug, Clone, Default)]
pub struct InFreeze {
    /// The directories (absolute, as seen from the root) where something changed, sorted. The
    /// commit looked at every entry of each, so the copy holds each as it was in the freeze.
    pub changed: Vec<PathBuf>,
    /// For directories of `changed` whose changes all named entries in them: those entries.
    pub names: crate::journal::EntryNames,
    /// Files the commit copied again whatever their metadata said (mapped for writing, another
    /// name of a file whose links changed): to be read again whatever it says.
    pub reread: Vec<PathBuf>,
}

/// What a shadow set did, recorded in the version manifest.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ShadowSetRecord {
    /// The set's id.
    pub id: String,
    /// The provider used on each volume (device number → provider).
    pub providers: BTreeMap<String, String>,
    /// The writers.
    pub writers: Vec<WriterRecord>,
    /// From the first freeze to the last thaw, ms.
    pub freeze_window_ms: u64,
    /// The provider's commit in the freeze, ms.
    pub commit_ms: u64,
    /// Bringing the base copies up to date before the freeze, ms (0: none was).
    pub precopy_ms: u64,
    /// Where the root volume's copy was.
    pub storage: String,
    /// Every volume's copy, the root volume's first: a component on another volume with its
    /// own `[[shadow.storage]]` is copied there.
    pub copies: Vec<CopyRecord>,
    /// Real bytes the copy took.
    pub bytes: u64,
    /// Entries copied in the freeze.
    pub files: u64,
    /// Entries copied before the freeze (into a base copy).
    pub precopied_files: u64,
    /// Persistent copies deleted to make room (`shadow-storage-oldest-deleted`).
    pub deleted_to_make_room: Vec<String>,
    /// A lock left by a process that is gone, taken over.
    pub lock_taken_over: Option<LockHolder>,
    /// Made with a kept change journal: where the set stands in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalRecord>,
    /// When the first writer was frozen (ns since the epoch): the set's point in time, which
    /// every copy was made at or after.
    #[serde(skip)]
    pub frozen_at_ns: i64,
}
