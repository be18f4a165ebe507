//! The coordinator: runs a shadow set through its phases, with a watchdog that thaws.

use crate::error::{ShadowError, WriterFailure};
use crate::lock::{LockHolder, ShadowSetLock};
use crate::provider::{self, CommitError, Origin, ProviderChoice};
use crate::state::StateBook;
use crate::storage::{CopyMeta, StorageArea};
use crate::writer::{CopyAddition, Event, Writer, DEFAULT_EVENT_TIMEOUT};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use sysstate_types::time::now_ns;

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

/// Paths on one volume and the storage area that holds their copies.
#[derive(Debug, Clone)]
pub struct VolumeGroup {
    /// The storage area for the volume.
    pub storage: StorageArea,
    /// The paths, absolute as seen from the root.
    pub paths: Vec<PathBuf>,
}

/// A copy of another volume's paths in its own storage area.
#[derive(Debug, Clone)]
struct ExtraCopy {
    storage: StorageArea,
    paths: Vec<PathBuf>,
    root: PathBuf,
}

/// One storage area's part of a commit: the root volume's, or an extra volume's.
struct CommitGroup<'a> {
    storage: &'a StorageArea,
    paths: &'a [PathBuf],
    /// Where its copy goes: the `tree` of its copy in `storage`.
    dest: PathBuf,
    choice: ProviderChoice,
    /// Bytes the copy may take.
    budget: u64,
    /// Paths not to enter: other groups' and shadow storage.
    skip: Vec<PathBuf>,
    /// Bytes the copy was estimated to need (for `shadow-storage-full`).
    needed: u64,
}

impl CommitGroup<'_> {
    /// A commit of this group's paths from `root` into its copy.
    fn request<'r>(
        &'r self,
        root: &'r Path,
        deadline: Instant,
        budget: u64,
        stop: &'r AtomicBool,
        previous: Option<&'r HashMap<PathBuf, Origin>>,
    ) -> provider::CommitRequest<'r> {
        provider::CommitRequest {
            root,
            paths: self.paths,
            dest: &self.dest,
            choice: self.choice,
            deadline,
            budget,
            interrupted: stop,
            previous,
            skip: &self.skip,
        }
    }
}

/// Runs `work` with a stop flag that is raised when the trigger fires (a signal), and lowered
/// for good when `work` returns.
fn with_stop_flag<T>(trigger: &ThawTrigger, work: impl FnOnce(&AtomicBool) -> T) -> T {
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if trigger.fired().is_some() {
                    stop.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let result = work(&stop);
        done.store(true, Ordering::SeqCst);
        result
    })
}

/// A callback told the shadow set's phases.
#[derive(Clone)]
pub struct PhaseHook(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for PhaseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhaseHook(..)")
    }
}

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
    /// Where the copy was.
    pub storage: String,
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
    /// When the first writer was frozen (ns since the epoch): the set's point in time, which
    /// every copy was made at or after.
    #[serde(skip)]
    pub frozen_at_ns: i64,
}

/// Fires a thaw from anywhere (a signal handler thread): frozen writers are thawed at once and
/// the shadow set stops with [`ShadowError::Interrupted`].
#[derive(Debug, Clone, Default)]
pub struct ThawTrigger {
    inner: Arc<TriggerInner>,
}

#[derive(Debug, Default)]
struct TriggerInner {
    fired: Arc<AtomicBool>,
    signal: AtomicI32,
    watchers: Mutex<Vec<Arc<Watch>>>,
}

impl ThawTrigger {
    /// Fires, with the signal number that caused it.
    pub fn fire(&self, signal: i32) {
        self.inner.signal.store(signal, Ordering::SeqCst);
        self.inner.fired.store(true, Ordering::SeqCst);
        for watch in self.inner.watchers.lock().expect("watchers lock").iter() {
            watch.wake.notify_all();
        }
    }

    /// A flag that is set when the trigger fires (for work outside the shadow set, such as the
    /// archiver, to stop too).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.inner.fired.clone()
    }

    /// Waits until no writer of any running shadow set is frozen or being thawed, up to `limit`.
    pub fn wait_thawed(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let busy = self.inner.watchers.lock().expect("watchers lock").iter().any(|watch| {
                let state = watch.state.lock().expect("watch lock");
                state.thawing > 0 || state.frozen.iter().any(Option::is_some)
            });
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The signal, once fired.
    pub fn fired(&self) -> Option<i32> {
        self.inner.fired.load(Ordering::SeqCst).then(|| self.inner.signal.load(Ordering::SeqCst))
    }
}

/// Shared between the coordinator's thread and its watchdog.
#[derive(Debug)]
struct Watch {
    state: Mutex<WatchState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct WatchState {
    /// Per writer: its thaw deadline while frozen.
    frozen: Vec<Option<Instant>>,
    /// When each writer's freeze started and ended (thaw).
    freeze_started: Vec<Option<Instant>>,
    thawed_at: Vec<Option<Instant>>,
    /// The first writer whose window the watchdog saw pass.
    expired: Option<usize>,
    /// Thaws in progress.
    thawing: usize,
    done: bool,
}

struct Members {
    writers: Vec<Mutex<Box<dyn Writer>>>,
    names: Vec<(String, String)>,
    states: StateBook,
    set_id: String,
}

impl Members {
    fn call(&self, index: usize, event: Event, deadline: Instant) -> Result<(), crate::writer::WriterError> {
        self.writers[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner()).handle(event, deadline)
    }

    fn state(&self, index: usize, state: &str, error: Option<String>) {
        self.states.set(&self.names[index].0, state, error, &self.set_id);
    }
}

/// Thaws every writer still frozen (whoever calls it first does the work), last frozen first.
fn thaw_all(members: &Members, watch: &Watch) {
    let frozen: Vec<usize> = {
        let mut state = watch.state.lock().expect("watch lock");
        let now = Instant::now();
        let frozen: Vec<usize> = (0..state.frozen.len()).rev().filter(|i| state.frozen[*i].is_some()).collect();
        for i in &frozen {
            state.frozen[*i] = None;
            state.thawed_at[*i] = Some(now);
        }
        state.thawing += frozen.len();
        frozen
    };
    for index in frozen {
        let name = &members.names[index].0;
        match members.call(index, Event::Thaw, Instant::now() + DEFAULT_EVENT_TIMEOUT) {
            Ok(()) => members.states.set_when(
                name,
                |s| s == "waiting-for-thaw",
                "waiting-for-post-snapshot",
                None,
                &members.set_id,
            ),
            Err(error) => members.states.set_when(
                name,
                |s| !s.starts_with("failed"),
                "failed-at-thaw",
                Some(error.message),
                &members.set_id,
            ),
        }
        watch.state.lock().expect("watch lock").thawing -= 1;
    }
}

/// The watchdog: thaws at the earliest freeze deadline, or at once when the trigger fires.
fn watchdog(members: Arc<Members>, watch: Arc<Watch>, trigger: ThawTrigger) {
    let mut state = watch.state.lock().expect("watch lock");
    loop {
        if state.done {
            return;
        }
        if trigger.fired().is_some() {
            drop(state);
            thaw_all(&members, &watch);
            return;
        }
        let next = state.frozen.iter().enumerate().filter_map(|(i, d)| d.map(|d| (d, i))).min();
        match next {
            Some((deadline, index)) if deadline <= Instant::now() => {
                state.expired.get_or_insert(index);
                drop(state);
                tracing::warn!(writer = %members.names[index].0, "freeze window expired: the watchdog thaws every writer");
                thaw_all(&members, &watch);
                state = watch.state.lock().expect("watch lock");
            }
            Some((deadline, _)) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                state = watch.wake.wait_timeout(state, wait).expect("watch lock").0;
            }
            None => state = watch.wake.wait(state).expect("watch lock"),
        }
    }
}

/// A shadow set whose copies exist: read them, then [`complete`](ShadowSet::complete).
pub struct ShadowSet {
    members: Arc<Members>,
    storage: StorageArea,
    copy_id: String,
    tree: PathBuf,
    origins: Arc<HashMap<PathBuf, Origin>>,
    live_device: Option<u64>,
    taken_ns: Option<i64>,
    skipped: Vec<(PathBuf, String)>,
    record: ShadowSetRecord,
    /// The copy stays after the set: a persistent copy, or the base copy.
    keep_copy: bool,
    /// Copies of the paths on other volumes.
    extra: Vec<ExtraCopy>,
    completed: bool,
    _lock: ShadowSetLock,
}

/// The id of the base copy that backups refresh in place.
pub const BASE_COPY: &str = "base";

impl std::fmt::Debug for ShadowSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowSet").field("id", &self.record.id).field("tree", &self.tree).finish()
    }
}

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
    pub fn live_identity(&self) -> impl Fn(&Path) -> Option<(u64, Option<u64>, Option<i64>)> + Send + Sync + 'static {
        let origins = self.origins.clone();
        let device = self.live_device;
        move |path| match origins.get(path) {
            Some(origin) => Some((origin.device, Some(origin.inode), Some(origin.ctime_ns))),
            None => device.map(|device| (device, None, None)),
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
        let event = if backup_succeeded { Event::BackupComplete } else { Event::Abort };
        for index in 0..self.members.writers.len() {
            match self.members.call(index, event, Instant::now() + DEFAULT_EVENT_TIMEOUT) {
                Ok(()) => self.members.state(index, "stable", None),
                Err(error) => self.members.state(index, &format!("failed-at-{}", event.as_str()), Some(error.message)),
            }
        }
        if !self.keep_copy {
            if let Err(error) = self.storage.delete(&self.copy_id) {
                tracing::warn!(%error, "cannot release the shadow copy");
            }
            for extra in &self.extra {
                if let Err(error) = extra.storage.delete(&self.copy_id) {
                    tracing::warn!(%error, "cannot release the shadow copy");
                }
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

/// Runs shadow sets with a fixed set of writers.
pub struct Coordinator {
    writers: Vec<Box<dyn Writer>>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("writers", &self.writers.len()).finish()
    }
}

fn new_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the kernel's random source is available");
    hex::encode(bytes)
}

/// Undoes a failed set: thaws, aborts every writer that got past identify, deletes the copy.
struct FailureGuard<'a> {
    members: &'a Members,
    watch: &'a Watch,
    prepared: usize,
    storage: &'a StorageArea,
    extra: &'a [VolumeGroup],
    copy_id: &'a str,
    armed: bool,
}

impl Drop for FailureGuard<'_> {
    fn drop(&mut self) {
        thaw_all(self.members, self.watch);
        if !self.armed {
            return;
        }
        for index in 0..self.prepared {
            let failed = self.members.states.get(&self.members.names[index].0).is_some_and(|s| s.starts_with("failed"));
            let _ = self.members.call(index, Event::Abort, Instant::now() + DEFAULT_EVENT_TIMEOUT);
            if !failed {
                self.members.state(index, "stable", None);
            }
        }
        let _ = self.storage.delete(self.copy_id);
        for group in self.extra {
            let _ = group.storage.delete(self.copy_id);
        }
    }
}

impl Coordinator {
    /// A coordinator for these writers.
    pub fn new(writers: Vec<Box<dyn Writer>>) -> Self {
        Coordinator { writers }
    }

    /// Makes a shadow set. On failure, every writer is thawed and aborted and nothing is left
    /// in shadow storage.
    pub fn create(self, options: &ShadowSetOptions, trigger: &ThawTrigger) -> Result<ShadowSet, ShadowError> {
        let (lock, taken_over) = ShadowSetLock::acquire(&options.runtime_dir, &options.holder, options.wait)?;
        if let Some(previous) = &taken_over {
            tracing::warn!(holder = %previous, "took over the shadow-set lock of a process that is gone");
            if let Some(hook) = &options.warning {
                (hook.0)(
                    sysstate_types::ErrorCode::ShadowSetInProgress,
                    &format!("took over the shadow-set lock of {previous}, which is gone"),
                );
            }
        }
        let set_id = new_id();
        let names: Vec<(String, String)> =
            self.writers.iter().map(|w| (w.name().to_string(), w.kind().to_string())).collect();
        let windows: Vec<Duration> = self.writers.iter().map(|w| w.freeze_timeout()).collect();
        let members = Arc::new(Members {
            states: StateBook::new(&options.runtime_dir, &names),
            writers: self.writers.into_iter().map(Mutex::new).collect(),
            names,
            set_id: set_id.clone(),
        });
        let count = members.writers.len();
        let watch = Arc::new(Watch {
            state: Mutex::new(WatchState {
                frozen: vec![None; count],
                freeze_started: vec![None; count],
                thawed_at: vec![None; count],
                ..WatchState::default()
            }),
            wake: Condvar::new(),
        });
        trigger.inner.watchers.lock().expect("watchers lock").push(watch.clone());
        // Backups refresh the storage's base copy in place; persistent copies are made whole.
        let copy_id = if options.persistent || options.provider == ProviderChoice::Btrfs {
            set_id.clone()
        } else {
            BASE_COPY.to_string()
        };
        let watchdog_thread = {
            let (members, watch, trigger) = (members.clone(), watch.clone(), trigger.clone());
            std::thread::Builder::new()
                .name("sysstate-watchdog".into())
                .spawn(move || watchdog(members, watch, trigger))
                .map_err(|e| ShadowError::io("watchdog thread", e))?
        };
        let result = run(&members, &watch, trigger, options, &set_id, &copy_id, &windows);
        watch.state.lock().expect("watch lock").done = true;
        watch.wake.notify_all();
        let _ = watchdog_thread.join();
        trigger.inner.watchers.lock().expect("watchers lock").retain(|w| !Arc::ptr_eq(w, &watch));
        let (commit, extra, mut record) = result?;
        record.lock_taken_over = taken_over;
        let tree = commit.root.clone();
        // A snapshot is never a base: it is made whole each time and released after.
        let keep_copy = options.persistent || (copy_id == BASE_COPY && commit.live_device.is_none());
        Ok(ShadowSet {
            members,
            storage: options.storage.clone(),
            copy_id,
            tree,
            origins: Arc::new(commit.origins),
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

#[allow(clippy::too_many_arguments)]
fn run(
    members: &Members,
    watch: &Watch,
    trigger: &ThawTrigger,
    options: &ShadowSetOptions,
    set_id: &str,
    copy_id: &str,
    windows: &[Duration],
) -> Result<(provider::Commit, Vec<ExtraCopy>, ShadowSetRecord), ShadowError> {
    let count = members.writers.len();
    let phase = |name: &str| {
        if let Some(hook) = &options.phase {
            (hook.0)(name);
        }
    };
    phase("preparing writers");
    let mut guard = FailureGuard {
        members,
        watch,
        prepared: 0,
        storage: &options.storage,
        extra: &options.extra,
        copy_id,
        armed: true,
    };
    let interrupted = |trigger: &ThawTrigger| trigger.fired().map(ShadowError::Interrupted);
    let fail = |index: usize, phase: &'static str, error: crate::writer::WriterError| {
        members.state(index, &format!("failed-at-{phase}"), Some(error.message.clone()));
        ShadowError::Writer(WriterFailure {
            writer: members.names[index].0.clone(),
            phase,
            class: error.class,
            message: error.message,
        })
    };
    for (event, waiting) in [
        (Event::Identify, "stable"),
        (Event::PrepareBackup, "waiting-for-freeze"),
        (Event::PrepareSnapshot, "waiting-for-freeze"),
    ] {
        for index in 0..count {
            if let Some(error) = interrupted(trigger) {
                return Err(error);
            }
            guard.prepared = guard.prepared.max(index + 1);
            members
                .call(index, event, Instant::now() + DEFAULT_EVENT_TIMEOUT)
                .map_err(|e| fail(index, event.as_str(), e))?;
            members.state(index, waiting, None);
        }
    }

    // Room in shadow storage, before anything is frozen.
    let needed =
        if options.provider == ProviderChoice::Copy { provider::estimate(&options.root, &options.paths) } else { 0 };
    let on_delete = |copy: &CopyMeta, storage: &StorageArea| {
        if let Some(hook) = &options.warning {
            let message = format!(
                "deleted persistent shadow copy {} of `{}` (made {}, {} bytes) to make room in `{}`",
                copy.id,
                copy.for_volume,
                sysstate_types::time::format_utc(copy.created_ns),
                copy.bytes,
                storage.on.display()
            );
            (hook.0)(sysstate_types::ErrorCode::ShadowStorageOldestDeleted, &message);
        }
    };
    let deleted: Vec<CopyMeta> = options.storage.make_room_with(needed, &|copy| on_delete(copy, &options.storage))?;
    for copy in &deleted {
        tracing::warn!(copy = %copy.id, created = %sysstate_types::time::format_utc(copy.created_ns), "shadow-storage-oldest-deleted: deleted an older persistent shadow copy to make room");
    }
    let budget = options.storage.budget()?;
    let mut extra_budgets = Vec::new();
    for group in &options.extra {
        let needed =
            if options.provider == ProviderChoice::Copy { provider::estimate(&options.root, &group.paths) } else { 0 };
        group.storage.make_room_with(needed, &|copy| on_delete(copy, &group.storage))?;
        extra_budgets.push((needed, group.storage.budget()?));
    }
    // Never copy another group's paths, nor shadow storage itself (as seen from the root).
    let storage_dirs: Vec<PathBuf> = std::iter::once(&options.storage)
        .chain(options.extra.iter().map(|g| &g.storage))
        .filter_map(|storage| storage.on.strip_prefix(&options.root).ok().map(|inside| Path::new("/").join(inside)))
        .collect();
    let skip_for = |own: Option<usize>| -> Vec<PathBuf> {
        let others = options
            .extra
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != own)
            .flat_map(|(_, g)| g.paths.iter().cloned());
        others.chain(storage_dirs.iter().cloned()).collect()
    };
    let skip = skip_for(None);

    // Write back what is dirty before the freeze, not in it: a snapshot or a clone first
    // flushes the filesystem's dirty data, and that was most of a first freeze window on btrfs
    // (60 of 66 ms after the tree had just been written).
    for path in std::iter::once(&options.root).chain(options.extra.iter().map(|g| &g.storage.on)) {
        if let Ok(dir) = std::fs::File::open(path) {
            let _ = rustix::fs::syncfs(&dir);
        }
    }

    // The base copies (one per storage area) are brought up to date before the freeze, while
    // everything runs; the commit in the freeze then copies only what changed in between.
    let groups: Vec<CommitGroup> = std::iter::once(CommitGroup {
        storage: &options.storage,
        paths: &options.paths,
        dest: options.storage.copy_dir(copy_id).join("tree"),
        choice: options.provider,
        budget,
        skip: skip.clone(),
        needed,
    })
    .chain(options.extra.iter().enumerate().map(|(index, group)| {
        // Extra volumes are copied (or reflinked) into their own storage; a snapshot is only
        // ever of the root's subvolume.
        let choice = if options.provider == ProviderChoice::Btrfs { ProviderChoice::Auto } else { options.provider };
        let dest = group.storage.copy_dir(copy_id).join("tree");
        CommitGroup {
            storage: &group.storage,
            paths: &group.paths,
            dest,
            choice,
            budget: extra_budgets[index].1,
            skip: skip_for(Some(index)),
            needed: extra_budgets[index].0,
        }
    }))
    .collect();
    let base = copy_id == BASE_COPY;
    // What each base holds: its size, and the live identities it was made from (without that
    // record it is made anew).
    let base_bytes =
        |storage: &StorageArea| storage.copies().into_iter().find(|c| c.id == BASE_COPY).map_or(0, |c| c.bytes);
    let bases_before: Vec<u64> = groups.iter().map(|g| if base { base_bytes(g.storage) } else { 0 }).collect();
    let mut previous: Vec<Option<HashMap<PathBuf, Origin>>> = groups
        .iter()
        .map(|group| {
            let origins = if base { provider::read_origins(&group.storage.copy_dir(copy_id)) } else { None };
            if base && origins.is_none() {
                let _ = group.storage.delete(copy_id);
            }
            origins
        })
        .collect();
    let mut precopies: Vec<Option<provider::Commit>> = groups.iter().map(|_| None).collect();
    let mut precopy_ms = 0;
    if base {
        phase("bringing the base copy up to date");
        let started = Instant::now();
        let done = with_stop_flag(trigger, |stop| {
            for (index, group) in groups.iter().enumerate() {
                let deadline = started + options.commit_timeout;
                let copy = provider::precopy(&group.request(
                    &options.root,
                    deadline,
                    group.budget,
                    stop,
                    previous[index].as_ref(),
                ));
                match copy {
                    None => {}
                    Some(Ok(copy)) => {
                        previous[index] = Some(copy.settled_origins());
                        precopies[index] = Some(copy);
                    }
                    Some(Err(
                        error @ (CommitError::Budget(_) | CommitError::NoSpace(_) | CommitError::Interrupted),
                    )) => {
                        return Err((index, error));
                    }
                    Some(Err(error)) => {
                        // The commit in the freeze makes the copy whole and reports what fails.
                        tracing::debug!(?error, "the copy before the freeze failed; the freeze copies everything");
                        previous[index] = None;
                        let _ = group.storage.delete(copy_id);
                    }
                }
            }
            Ok(())
        });
        match done {
            Ok(()) => {}
            Err((_, CommitError::Interrupted)) => {
                return Err(interrupted(trigger).unwrap_or(ShadowError::Interrupted(0)))
            }
            Err((index, error)) => {
                let bytes = match error {
                    CommitError::Budget(bytes) | CommitError::NoSpace(bytes) => bytes,
                    _ => 0,
                };
                let _ = groups[index].storage.delete(copy_id);
                return Err(groups[index].storage.full(groups[index].needed.max(bytes)));
            }
        }
        precopy_ms = started.elapsed().as_millis() as u64;
    }

    // Freeze, each writer with its own window.
    phase("freezing writers");
    let freeze_started = Instant::now();
    let frozen_at_ns = now_ns();
    for index in 0..count {
        if let Some(error) = interrupted(trigger) {
            return Err(error);
        }
        let start = Instant::now();
        let deadline = start + windows[index];
        {
            let mut state = watch.state.lock().expect("watch lock");
            state.freeze_started[index] = Some(start);
            state.frozen[index] = Some(deadline);
        }
        watch.wake.notify_all();
        if let Err(error) = members.call(index, Event::Freeze, deadline) {
            if Instant::now() >= deadline {
                return Err(timeout(members, watch, index, windows, 0));
            }
            return Err(fail(index, "freeze", error));
        }
        members.state(index, "waiting-for-thaw", None);
    }

    // Commit.
    phase("committing shadow copies");
    let commit_started = Instant::now();
    let committed = with_stop_flag(trigger, |stop| {
        let mut commits = Vec::new();
        for (index, group) in groups.iter().enumerate() {
            let spent = precopies[index].as_ref().map_or(0, |c| c.bytes);
            let deadline = commit_started + options.commit_timeout;
            let budget = group.budget.saturating_sub(spent);
            let copy =
                provider::commit(&group.request(&options.root, deadline, budget, stop, previous[index].as_ref()))
                    .map_err(|e| (index, e))?;
            commits.push(copy);
        }
        Ok(commits)
    });
    let commit_ms = commit_started.elapsed().as_millis() as u64;
    thaw_all(members, watch);
    let mut commits = match committed {
        Ok(commits) => commits,
        Err((index, CommitError::Budget(bytes))) | Err((index, CommitError::NoSpace(bytes))) => {
            let group = &groups[index];
            let _ = group.storage.delete(copy_id);
            let before = precopies[index].as_ref().map_or(0, |c| c.bytes);
            return Err(group.storage.full(group.needed.max(before + bytes)));
        }
        Err((_, error)) => match error {
            CommitError::Budget(_) | CommitError::NoSpace(_) => unreachable!("matched above"),
            CommitError::Timeout => {
                return Err(ShadowError::CommitTimeout {
                    provider: provider_name(options.provider).to_string(),
                    elapsed_ms: commit_ms,
                    limit_ms: options.commit_timeout.as_millis() as u64,
                })
            }
            CommitError::Unsupported(path, message) => {
                let _ = options.storage.delete(copy_id);
                return Err(ShadowError::Provider {
                    provider: provider_name(options.provider).to_string(),
                    path: path.display().to_string(),
                    message,
                });
            }
            CommitError::Io(error) => return Err(error),
            CommitError::Interrupted => return Err(interrupted(trigger).unwrap_or(ShadowError::Interrupted(0))),
        },
    };
    if let Some(error) = interrupted(trigger) {
        return Err(error);
    }
    // Every writer must have been thawed within its window.
    let (expired, overrun) = {
        let state = watch.state.lock().expect("watch lock");
        let overrun = (0..count).find(|i| match (state.freeze_started[*i], state.thawed_at[*i]) {
            (Some(start), Some(end)) => end.duration_since(start) > windows[*i],
            _ => false,
        });
        (state.expired, overrun)
    };
    if let Some(index) = expired.or(overrun) {
        return Err(timeout(members, watch, index, windows, commit_ms));
    }
    let freeze_window_ms = {
        let state = watch.state.lock().expect("watch lock");
        state
            .thawed_at
            .iter()
            .flatten()
            .max()
            .map(|end| end.duration_since(freeze_started).as_millis() as u64)
            .unwrap_or(0)
    };

    for index in 0..count {
        members
            .call(index, Event::PostSnapshot, Instant::now() + DEFAULT_EVENT_TIMEOUT)
            .map_err(|e| fail(index, "post-snapshot", e))?;
        members.state(index, "waiting-for-completion", None);
    }
    let additions: Vec<CopyAddition> = members
        .writers
        .iter()
        .flat_map(|writer| writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).copy_additions())
        .collect();
    if !additions.is_empty() {
        apply_additions(&options.root, &commits[0].root, &groups[0].dest, &additions)?;
    }

    let writers = {
        let state = watch.state.lock().expect("watch lock");
        (0..count)
            .map(|i| WriterRecord {
                name: members.names[i].0.clone(),
                kind: members.names[i].1.clone(),
                result: "ok".into(),
                message: None,
                frozen_ms: match (state.freeze_started[i], state.thawed_at[i]) {
                    (Some(start), Some(end)) => end.duration_since(start).as_millis() as u64,
                    _ => 0,
                },
            })
            .collect()
    };
    let mut record = ShadowSetRecord {
        id: set_id.to_string(),
        providers: BTreeMap::new(),
        writers,
        freeze_window_ms,
        commit_ms,
        precopy_ms,
        storage: options.storage.on.display().to_string(),
        bytes: 0,
        files: 0,
        precopied_files: 0,
        deleted_to_make_room: deleted.iter().map(|c| c.id.clone()).collect(),
        lock_taken_over: None,
        frozen_at_ns,
    };
    // Each group's copy: its record beside it, and what it adds to the set's record.
    for (index, (group, copy)) in groups.iter().zip(&commits).enumerate() {
        let precopy = precopies[index].as_ref();
        let dir = group.storage.copy_dir(copy_id);
        let meta = CopyMeta {
            id: copy_id.to_string(),
            set: set_id.to_string(),
            for_volume: group.storage.for_volume.display().to_string(),
            provider: copy.used.values().next().copied().unwrap_or(provider_name(group.choice)).to_string(),
            created_ns: now_ns(),
            // A refreshed base holds what it held, less what was freed, plus what was copied.
            bytes: bases_before[index].saturating_sub(precopy.map_or(0, |c| c.freed)).saturating_sub(copy.freed)
                + precopy.map_or(0, |c| c.bytes)
                + copy.bytes,
            files: copy.files,
            persistent: options.persistent,
            paths: group.paths.iter().map(|p| p.display().to_string()).collect(),
        };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta).expect("meta encodes"))
            .map_err(|e| ShadowError::io(dir.join("meta.json"), e))?;
        if base {
            // What was copied in the tick it changed in is copied again next time.
            provider::write_origins(&dir, &copy.settled_origins())
                .map_err(|e| ShadowError::io(provider::origins_file(&dir), e))?;
        }
        for (device, name) in precopy.iter().flat_map(|c| &c.used).chain(&copy.used) {
            record
                .providers
                .insert(format!("{}:{}", rustix::fs::major(*device), rustix::fs::minor(*device)), name.to_string());
        }
        record.bytes += precopy.map_or(0, |c| c.bytes) + copy.bytes;
        record.files += copy.files;
        record.precopied_files += precopy.map_or(0, |c| c.files);
    }
    // The extra volumes' copies, and their live identities merged into the root volume's.
    let mut commit = commits.remove(0);
    let mut extra = Vec::new();
    for (group, copy) in options.extra.iter().zip(commits) {
        extra.push(ExtraCopy { storage: group.storage.clone(), paths: group.paths.clone(), root: copy.root.clone() });
        commit.origins.extend(copy.origins);
    }
    guard.armed = false;
    drop(guard);
    Ok((commit, extra, record))
}

/// The `writer-timeout` error: which writer, its window, how long it was frozen, what took the
/// time, and the system's pressure now.
fn timeout(members: &Members, watch: &Watch, index: usize, windows: &[Duration], commit_ms: u64) -> ShadowError {
    thaw_all(members, watch);
    let state = watch.state.lock().expect("watch lock");
    let frozen_ms = match (state.freeze_started[index], state.thawed_at[index]) {
        (Some(start), Some(end)) => end.duration_since(start).as_millis() as u64,
        (Some(start), None) => start.elapsed().as_millis() as u64,
        _ => 0,
    };
    let mut parts = Vec::new();
    for i in 0..members.writers.len() {
        if let Some(start) = state.freeze_started[i] {
            let next = (i + 1 < members.writers.len()).then(|| state.freeze_started[i + 1]).flatten();
            let freeze_call = next
                .map(|n| n.duration_since(start).as_millis())
                .unwrap_or_else(|| start.elapsed().as_millis().min(u128::from(frozen_ms)));
            parts.push(format!("writer `{}` freeze {} ms", members.names[i].0, freeze_call));
        }
    }
    if commit_ms > 0 {
        parts.push(format!("provider commit {commit_ms} ms"));
    }
    members.state(
        index,
        "failed-at-freeze",
        Some(format!("frozen for {frozen_ms} ms, past its window of {} ms", windows[index].as_millis())),
    );
    ShadowError::WriterTimeout {
        writer: members.names[index].0.clone(),
        window_ms: windows[index].as_millis() as u64,
        frozen_ms,
        breakdown: parts.join(", "),
        pressure: crate::pressure::snapshot(),
    }
}

/// The provider's name, as in `shadow.provider`.
fn provider_name(choice: ProviderChoice) -> &'static str {
    match choice {
        ProviderChoice::Auto => "auto",
        ProviderChoice::Copy => "copy",
        ProviderChoice::Reflink => "reflink",
        ProviderChoice::Btrfs => "btrfs",
    }
}

/// Applies writers' additions to the copy whose root is `copy_root` (inside `dest`, the copy's
/// folder or snapshot). A read-only btrfs snapshot is made writable for the time it takes.
fn apply_additions(
    live_root: &Path,
    copy_root: &Path,
    dest: &Path,
    additions: &[CopyAddition],
) -> Result<(), ShadowError> {
    let snapshot = provider::is_subvolume(dest);
    let set_read_only = |value: &str| -> Result<(), ShadowError> {
        let output = std::process::Command::new("btrfs")
            .args(["property", "set", "-ts"])
            .arg(dest)
            .args(["ro", value])
            .output()
            .map_err(|e| ShadowError::io(dest, e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ShadowError::io(
                dest,
                std::io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()),
            ))
        }
    };
    if snapshot {
        set_read_only("false")?;
    }
    let result = (|| {
        for addition in additions {
            match addition {
                CopyAddition::Contents(path, bytes) => {
                    let target = copy_root.join(path.strip_prefix("/").unwrap_or(path));
                    std::fs::write(&target, bytes).map_err(|e| ShadowError::io(&target, e))?;
                    // Owned like the folder it is in, readable by its owner only.
                    if let Some(parent) = target.parent().and_then(|p| std::fs::metadata(p).ok()) {
                        use std::os::unix::fs::MetadataExt;
                        if rustix::process::geteuid().is_root() {
                            std::os::unix::fs::chown(&target, Some(parent.uid()), Some(parent.gid()))
                                .map_err(|e| ShadowError::io(&target, e))?;
                        }
                    }
                    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                        .map_err(|e| ShadowError::io(&target, e))?;
                }
                CopyAddition::FromLive(path) => {
                    let never = AtomicBool::new(false);
                    provider::commit(&provider::CommitRequest {
                        root: live_root,
                        paths: std::slice::from_ref(path),
                        dest: copy_root,
                        choice: ProviderChoice::Copy,
                        deadline: Instant::now() + Duration::from_secs(3600),
                        budget: u64::MAX,
                        interrupted: &never,
                        previous: None,
                        skip: &[],
                    })
                    .map_err(|e| ShadowError::io(path, std::io::Error::other(format!("{e:?}"))))?;
                }
                CopyAddition::Remove(path) => {
                    let target = copy_root.join(path.strip_prefix("/").unwrap_or(path));
                    match std::fs::remove_file(&target) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(ShadowError::io(&target, e)),
                    }
                }
            }
        }
        Ok(())
    })();
    if snapshot {
        set_read_only("true")?;
    }
    result
}
