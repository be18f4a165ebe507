//! The coordinator: runs a shadow set through its phases ([`phases`]), with a watchdog that
//! thaws at the freeze deadline ([`watchdog`]) and a guard that undoes a failed set ([`guard`]).

mod additions;
mod guard;
mod members;
mod phases;
mod record;
mod recover;
mod set;
mod watchdog;

#[cfg(test)]
mod tests;

pub use record::{InFreeze, JournalRecord, ShadowSetRecord, WriterRecord};
pub use recover::Recovery;
pub use set::ShadowSet;
pub use watchdog::ThawTrigger;

use crate::error::ShadowError;
use crate::lock::{LockHolder, ShadowSetLock};
use crate::provider::{Provider, ProviderChoice};
use crate::storage::StorageArea;
use crate::writer::{OutputHook, Writer};
use members::Members;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use watchdog::{Watch, Watchdog};

/// The id of the base copy that backups refresh in place.
pub const BASE_COPY: &str = "base";

/// What a shadow set is asked to do.
#[derive(Debug, Clone)]
pub struct ShadowSetOptions {
    /// Where the lock and the writer states live.
    pub runtime_dir: PathBuf,
    /// The live root (`/`).
    pub root: PathBuf,
    /// The paths to copy, absolute as seen from the root.
    pub paths: Vec<PathBuf>,
    /// The provider.
    pub provider: ProviderChoice,
    /// Where the copies go.
    pub storage: StorageArea,
    /// The longest a commit may take.
    pub commit_timeout: Duration,
    /// Who takes the lock.
    pub holder: LockHolder,
    /// How long to wait for another shadow set to finish (`None`: fail at once).
    pub wait: Option<Duration>,
    /// Keep the copy after [`ShadowSet::complete`].
    pub persistent: bool,
    /// Told each phase as it starts (the job's current operation).
    pub phase: Option<PhaseHook>,
    /// Paths on other volumes, each group copied into its own volume's storage area under the
    /// same freeze (`paths` and `storage` are the root volume's).
    pub extra: Vec<VolumeGroup>,
    /// Told every warning as it happens (an older copy deleted, a dead holder's lock taken over),
    /// with its code and message: the caller's event log.
    pub warning: Option<WarningHook>,
    /// Told every line the writers' programs print on stderr (the job's log).
    pub output: Option<OutputHook>,
    /// Told when the set took over the lock of a dead one and recovered what it left: the dead
    /// holder (with its job) and what was done, so that job's record can say so.
    pub recovered: Option<RecoveredHook>,
    /// A change journal kept since earlier sets (the agent's): the base copies are then brought
    /// up to date from what it saw since they were last made, and the set says what changed
    /// since ([`ShadowSetRecord::journal`]). Without one, a set starts its own for its freeze.
    pub journal: Option<Arc<crate::journal::Journal>>,
}

/// A callback told a recovery of a dead shadow set: its holder and what was done.
#[derive(Clone)]
pub struct RecoveredHook(pub Arc<RecoveredFn>);

/// `(dead holder, what was done)` of a recovery.
pub type RecoveredFn = dyn Fn(&LockHolder, &Recovery) + Send + Sync;

impl std::fmt::Debug for RecoveredHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveredHook(..)")
    }
}

/// A callback told the shadow set's warnings: code and message.
#[derive(Clone)]
pub struct WarningHook(pub Arc<WarningFn>);

/// `(code, message)` of a warning.
pub type WarningFn = dyn Fn(sysstate_types::ErrorCode, &str) + Send + Sync;

impl std::fmt::Debug for WarningHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WarningHook(..)")
    }
}

/// A caller that reads the files changed since its parent version live, before the freeze,
/// rather than from the copy after it (see [`Coordinator::create_reading_live`]).
pub struct LiveRead<'h> {
    /// The journal position its parent version was read at: the set reads live only where the
    /// base copy was made there too, so that the journal says everything that changed since.
    pub parent_at: crate::journal::Position,
    /// Told, once the copy before the freeze has brought the base copy's folders up to date,
    /// what changed since `parent_at`: it reads those files live then. Every change it may have
    /// missed while it read is what the commit's take names ([`record::InFreeze`]).
    pub read: &'h mut dyn FnMut(&BeforeFreeze<'_>),
}

impl std::fmt::Debug for LiveRead<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRead").field("parent_at", &self.parent_at).finish_non_exhaustive()
    }
}

/// What changed since [`LiveRead::parent_at`], as the copy before the freeze found it.
#[derive(Debug)]
pub struct BeforeFreeze<'a> {
    /// The directories (absolute, as seen from the root) where something changed, sorted.
    pub changed: &'a [PathBuf],
    /// For directories of `changed` whose changes all named entries in them: those entries.
    pub names: &'a crate::journal::EntryNames,
}

/// Paths on one volume and the storage area that holds their copies.
#[derive(Debug, Clone)]
pub struct VolumeGroup {
    /// The storage area for the volume.
    pub storage: StorageArea,
    /// The paths, absolute as seen from the root.
    pub paths: Vec<PathBuf>,
}

/// A callback told the shadow set's phases.
#[derive(Clone)]
pub struct PhaseHook(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for PhaseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhaseHook(..)")
    }
}

/// Runs shadow sets with a fixed set of writers.
pub struct Coordinator {
    writers: Vec<Box<dyn Writer>>,
    provider: Option<Arc<dyn Provider>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("writers", &self.writers.len()).finish()
    }
}

/// Every storage area a set of `options` uses.
fn storages(options: &ShadowSetOptions) -> Vec<&StorageArea> {
    std::iter::once(&options.storage).chain(options.extra.iter().map(|group| &group.storage)).collect()
}

fn new_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the kernel's random source is available");
    hex::encode(bytes)
}

impl Coordinator {
    /// A coordinator for these writers, with the providers `shadow.provider` chooses.
    pub fn new(writers: Vec<Box<dyn Writer>>) -> Self {
        Coordinator { writers, provider: None }
    }

    /// Uses `provider` for every volume instead of the one `shadow.provider` chooses.
    pub fn with_provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// Recovers what a shadow set whose process died left (`sysstate shadows recover`): takes the
    /// lock, and when its last holder is gone, thaws and aborts that set's writers and deletes
    /// its copies. `None` when no set had died.
    pub fn recover(self, options: &ShadowSetOptions) -> Result<Option<(LockHolder, Recovery)>, ShadowError> {
        let (_lock, taken_over) = ShadowSetLock::acquire(&options.runtime_dir, &options.holder, options.wait)?;
        let Some(previous) = taken_over else { return Ok(None) };
        let members = Members::new(self.writers, &options.runtime_dir, "recovery");
        let recovery = recover::recover(&members, &storages(options));
        if let Some(hook) = &options.recovered {
            (hook.0)(&previous, &recovery);
        }
        Ok(Some((previous, recovery)))
    }

    /// Makes a shadow set. On failure, every writer is thawed and aborted and nothing is left
    /// in shadow storage.
    pub fn create(self, options: &ShadowSetOptions, trigger: &ThawTrigger) -> Result<ShadowSet, ShadowError> {
        self.create_reading_live(options, trigger, None)
    }

    /// [`create`](Self::create), for a caller that reads what changed since its parent live
    /// before the freeze (`live`). Where the set can let it — one volume, copied by the copy
    /// provider from a base made at `live.parent_at`, the journal kept since — the copy before
    /// the freeze copies no file's content: `live.read` is told what changed, and reads it; the
    /// commit copies what changed after (the set's record says what: its journal's
    /// [`in_freeze`](record::JournalRecord::in_freeze)). Elsewhere the set is made as `create`
    /// makes it, and `live.read` is not called.
    pub fn create_reading_live(
        self,
        options: &ShadowSetOptions,
        trigger: &ThawTrigger,
        live: Option<LiveRead<'_>>,
    ) -> Result<ShadowSet, ShadowError> {
        let (lock, taken_over) = ShadowSetLock::acquire(&options.runtime_dir, &options.holder, options.wait)?;
        let set_id = new_id();
        let mut writers = self.writers;
        if let Some(output) = &options.output {
            writers.iter_mut().for_each(|writer| writer.set_output(output.clone()));
        }
        writers.iter_mut().for_each(|writer| writer.set_stop(trigger.flag()));
        let members = Arc::new(Members::new(writers, &options.runtime_dir, &set_id));
        if let Some(previous) = &taken_over {
            let recovery = recover::recover(&members, &storages(options));
            tracing::warn!(holder = %previous, %recovery, "took over the shadow-set lock of a process that is gone");
            if let Some(hook) = &options.warning {
                (hook.0)(
                    sysstate_types::ErrorCode::ShadowSetInProgress,
                    &format!("took over the shadow-set lock of {previous}, which is gone: {recovery}"),
                );
            }
            if let Some(hook) = &options.recovered {
                (hook.0)(previous, &recovery);
            }
        }
        let watch = Arc::new(Watch::new(members.count()));
        // Backups refresh the storage's base copy in place; persistent copies are made whole.
        let copy_id = if options.persistent || options.provider == ProviderChoice::Btrfs {
            set_id.clone()
        } else {
            BASE_COPY.to_string()
        };
        let watchdog = Watchdog::start(members.clone(), watch.clone(), trigger)
            .map_err(|e| ShadowError::io("watchdog thread", e))?;
        let run = phases::Run {
            members: &members,
            watch: &watch,
            trigger,
            options,
            set_id: &set_id,
            copy_id: &copy_id,
            provider: self.provider,
        };
        let made = run.run(live);
        watchdog.stop();
        let phases::Made { commit, extra, mut record } = made?;
        record.lock_taken_over = taken_over;
        let keep_copy = keeps_copy(options.persistent, &copy_id, &commit);
        Ok(ShadowSet {
            members,
            storage: options.storage.clone(),
            copy_id,
            tree: commit.root,
            origins: commit.origins,
            live_device: commit.live_device,
            taken_ns: commit.taken_ns,
            skipped: commit.skipped,
            record,
            keep_copy,
            extra,
            completed: false,
            _lock: lock,
        })
    }
}

/// True when a copy stays after its set: a persistent one, or a base copy to refresh next time
/// (a snapshot is never a base: it is made whole each time and released after).
fn keeps_copy(persistent: bool, copy_id: &str, commit: &crate::provider::Commit) -> bool {
    persistent || (copy_id == BASE_COPY && commit.live_device.is_none())
}
