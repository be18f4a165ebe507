//! The phases of one shadow set, in the order [`Run::run`] takes them: prepare the writers,
//! make room in shadow storage, plan the groups, bring the base copies up to date, freeze,
//! commit, check the windows, post-snapshot, record.

use super::additions::apply_additions;
use super::guard::FailureGuard;
use super::members::Members;
use super::record::{InFreeze, ShadowSetRecord, WriterRecord};
use super::set::ExtraCopy;
use super::watchdog::{thaw_all, ThawTrigger, Watch};
use super::{BeforeFreeze, LiveRead, ShadowSetOptions, BASE_COPY};
use crate::error::{ShadowError, WriterTimeout};
use crate::journal::{self, Changes, EntryNames, Journal, JournalOptions, Position};
use crate::pressure::Pressure;
use crate::provider::{self, Commit, CommitError, CommitRequest, Provider, ProviderChoice};
use crate::state::WriterState;
use crate::storage::{CopyMeta, StorageArea};
use crate::writer::{Phase, DEFAULT_PHASE_TIMEOUT};
use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use sysstate_types::time::now_ns;
use sysstate_types::ErrorCode;

/// The longest the copy before the freeze may take: far beyond any tree, only a backstop.
const PRECOPY_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// One shadow set being made.
pub(super) struct Run<'a> {
    pub(super) members: &'a Members,
    pub(super) watch: &'a Watch,
    pub(super) trigger: &'a ThawTrigger,
    pub(super) options: &'a ShadowSetOptions,
    pub(super) set_id: &'a str,
    /// The copy's id in every storage area: the set's, or [`BASE_COPY`].
    pub(super) copy_id: &'a str,
    /// Stands in for the providers `options.provider` would choose.
    pub(super) provider: Option<Arc<dyn Provider>>,
}

/// A shadow set made: the root volume's commit (with the other volumes' live identities merged
/// in), the other volumes' copies, and the record.
pub(super) struct Made {
    pub(super) commit: Commit,
    pub(super) extra: Vec<ExtraCopy>,
    pub(super) record: ShadowSetRecord,
}

/// One storage area's part of the set: the root volume's (the first), or another volume's.
struct Group<'a> {
    storage: &'a StorageArea,
    paths: &'a [PathBuf],
    /// Where its copy goes: the `tree` of its copy in `storage`.
    dest: PathBuf,
    provider: Arc<dyn Provider>,
    /// Bytes the copy may take.
    budget: u64,
    /// Bytes the copy was estimated to need (for `shadow-storage-full`).
    needed: u64,
    /// Paths not to enter: other groups' and shadow storage.
    skip: Vec<PathBuf>,
    /// Refreshing the base copy: the bytes it held before.
    base_bytes: u64,
    /// The provider that made the base copy (a refresh that copies nothing is still its).
    base_provider: Option<String>,
    /// Refreshing the base copy: the live identities its entries were copied from.
    previous: Option<provider::Origins>,
    /// Refreshing the base copy: what its records of origins were when `previous` was read.
    record: Option<provider::RecordIdentity>,
    /// What the copy before the freeze made.
    precopy: Option<Commit>,
    /// The live identities of the entries the copy before the freeze copied as they changed
    /// (its `unsettled`), left out of `previous`: a commit that follows the journal keeps
    /// those the journal did not name since, and copies the others again.
    unsettled: Vec<(PathBuf, provider::Origin)>,
    /// The directories the change journal saw change since the copy before the freeze began
    /// (absolute, as seen from the root): the commit looks at those only.
    changed: Option<Vec<PathBuf>>,
    /// With `changed`: the names of the entries that changed in those of its directories the
    /// journal named by their entries (as seen from the root); the others are looked at whole.
    names: Option<EntryNames>,
    /// Files the commit copies again whatever their metadata says.
    forced: Vec<PathBuf>,
    /// With `changed`: files whose link count changed through a name elsewhere (device, inode).
    relinked: Vec<(u64, u64)>,
    /// How the commit finds what changed: `journal`, `walk` or `snapshot`, and why it walks.
    read: (&'static str, Option<String>),
    /// True when the set's journal watches every filesystem its copy before the freeze met.
    covered: bool,
    /// The devices the copy before the freeze met.
    devices: std::collections::BTreeSet<u64>,
    /// False while the copy before the freeze copies no file's content (the caller reads the
    /// changed files live: see [`LiveRead`]).
    contents: bool,
    /// The caller read this group's changed files live before the freeze: its commit looks at
    /// every entry of the directories the journal named, and what it named is recorded apart.
    live: bool,
    /// With `live`: the names the commit's take gave (the commit itself looks at whole folders).
    freeze_names: Option<EntryNames>,
}

/// The change journal a set uses: the caller's, kept since earlier sets, or its own.
struct SetJournal {
    journal: Arc<Journal>,
    /// The caller's (the agent's), kept since earlier sets.
    kept: bool,
    /// The position the base copies were made at, when the copy before the freeze was brought
    /// up to date from what the journal saw since: every change since is then known.
    since: Option<Position>,
    /// With `since`: the directories where something changed (absolute, as seen from the root).
    changed: Vec<PathBuf>,
    /// With `since`: for directories of `changed`, the entries in them that changed, unless a
    /// change in the directory named none (then it is in `named_whole`).
    entries: std::collections::HashMap<PathBuf, std::collections::BTreeSet<std::ffi::OsString>>,
    /// With `since`: directories of `changed` that are read whole.
    named_whole: std::collections::HashSet<PathBuf>,
    /// With `since`: the paths of the groups whose commit did not follow the journal (a
    /// snapshot, a copy of a volume it does not watch): read whole.
    whole: Vec<PathBuf>,
    /// Without `since`: why not every change since the base copies were made is known.
    unknown: Option<String>,
    /// With `since`, when the caller read the changed files live: what changed while it read.
    in_freeze: Option<InFreeze>,
    /// A base copy was last made for a caller that read the changed files live.
    base_read_live: bool,
}

impl SetJournal {
    fn new(journal: Arc<Journal>, kept: bool) -> SetJournal {
        SetJournal {
            journal,
            kept,
            since: None,
            changed: Vec::new(),
            entries: Default::default(),
            named_whole: Default::default(),
            whole: Vec::new(),
            unknown: None,
            in_freeze: None,
            base_read_live: false,
        }
    }

    /// Adds what a commit looked at to what changed: the directories named (as seen from the
    /// root), with the entries named in them (`names`), and the entries it looked at again
    /// outside them.
    fn add(&mut self, dirs: &[PathBuf], names: Option<&EntryNames>, copy: &Commit) {
        if self.since.is_none() {
            return;
        }
        for dir in dirs {
            match names.and_then(|names| names.get(dir)) {
                Some(named) => self.entries.entry(dir.clone()).or_default().extend(named.iter().cloned()),
                None => {
                    self.named_whole.insert(dir.clone());
                }
            }
        }
        self.changed.extend(dirs.iter().cloned());
        for path in copy.looked_again.iter().chain(&copy.unsettled) {
            if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
                self.entries.entry(parent.to_path_buf()).or_default().insert(name.to_os_string());
                self.changed.push(parent.to_path_buf());
            }
        }
    }

    /// The entries named in each directory of `changed` not read whole.
    fn names(&self) -> EntryNames {
        self.entries
            .iter()
            .filter(|(dir, _)| !self.named_whole.contains(*dir))
            .map(|(dir, names)| (dir.clone(), names.iter().cloned().collect()))
            .collect()
    }
}

impl Group<'_> {
    fn request<'r>(
        &'r self,
        root: &'r Path,
        deadline: Instant,
        budget: u64,
        stop: &'r AtomicBool,
    ) -> CommitRequest<'r> {
        CommitRequest {
            root,
            paths: self.paths,
            dest: &self.dest,
            deadline,
            budget,
            interrupted: stop,
            previous: self.previous.as_ref(),
            skip: &self.skip,
            changed: self.changed.as_deref(),
            names: self.names.as_ref(),
            forced: &self.forced,
            relinked: &self.relinked,
            contents: self.contents,
        }
    }

    fn precopied_bytes(&self) -> u64 {
        self.precopy.as_ref().map_or(0, |c| c.bytes)
    }
}

/// Room made in one storage area: bytes needed and bytes allowed.
struct Room {
    needed: u64,
    budget: u64,
}

impl Run<'_> {
    /// Takes the set through every phase. On failure the guard thaws and aborts the writers and
    /// deletes what was made.
    pub(super) fn run(self, live: Option<LiveRead<'_>>) -> Result<Made, ShadowError> {
        let storages = std::iter::once(&self.options.storage).chain(self.options.extra.iter().map(|g| &g.storage));
        let mut guard = FailureGuard::new(self.members, self.watch, storages.collect(), self.copy_id);
        self.prepare(&mut guard)?;
        let (deleted, room) = self.make_room()?;
        let mut groups = self.plan_groups(room);
        self.write_back(&groups);
        let (precopy_ms, mut journal) = self.precopy(&mut groups, live)?;
        let (freeze_started, frozen_at_ns) = self.freeze()?;
        let (commits, commit_ms) = self.commit(&mut groups, journal.as_mut())?;
        self.check_windows(commit_ms)?;
        let freeze_window_ms = self.watch.window_ms(freeze_started);
        self.post_snapshot(&groups, &commits)?;
        let recording = Instant::now();
        let mut record = self.record(&groups, &commits, deleted, journal.as_ref())?;
        tracing::debug!(ms = recording.elapsed().as_millis() as u64, "shadow set recorded");
        record.freeze_window_ms = freeze_window_ms;
        record.commit_ms = commit_ms;
        record.precopy_ms = precopy_ms;
        record.frozen_at_ns = frozen_at_ns;
        let made = self.made(commits, record);
        guard.disarm();
        Ok(made)
    }

    fn phase(&self, name: &str) {
        if let Some(hook) = &self.options.phase {
            (hook.0)(name);
        }
    }

    fn warn(&self, code: ErrorCode, message: &str) {
        if let Some(hook) = &self.options.warning {
            (hook.0)(code, message);
        }
    }

    fn interrupted(&self) -> ShadowError {
        ShadowError::Interrupted(self.trigger.fired().unwrap_or(0))
    }

    fn stop_if_interrupted(&self) -> Result<(), ShadowError> {
        match self.trigger.fired() {
            Some(signal) => Err(ShadowError::Interrupted(signal)),
            None => Ok(()),
        }
    }

    /// identify → prepare-backup → prepare-snapshot, each for every writer before the next.
    fn prepare(&self, guard: &mut FailureGuard<'_>) -> Result<(), ShadowError> {
        self.phase("preparing writers");
        for (phase, next) in [
            (Phase::Identify, WriterState::Stable),
            (Phase::PrepareBackup, WriterState::WaitingForFreeze),
            (Phase::PrepareSnapshot, WriterState::WaitingForFreeze),
        ] {
            for index in 0..self.members.count() {
                self.stop_if_interrupted()?;
                guard.calling(index);
                self.members.call(index, phase, Instant::now() + DEFAULT_PHASE_TIMEOUT).map_err(|error| {
                    // A writer stopped by the signal has not failed: the set was stopped.
                    match self.trigger.fired() {
                        Some(signal) => ShadowError::Interrupted(signal),
                        None => self.members.failed(index, phase, error),
                    }
                })?;
                self.members.set_state(index, next, None);
            }
        }
        Ok(())
    }

    /// Room in every storage area before anything is frozen: older persistent copies are
    /// deleted (each a `shadow-storage-oldest-deleted` warning) until the copy fits.
    fn make_room(&self) -> Result<(Vec<CopyMeta>, Vec<Room>), ShadowError> {
        let options = self.options;
        let areas = std::iter::once((&options.storage, &options.paths))
            .chain(options.extra.iter().map(|group| (&group.storage, &group.paths)));
        let (mut deleted, mut rooms) = (Vec::new(), Vec::new());
        for (storage, paths) in areas {
            let needed =
                if options.provider == ProviderChoice::Copy { provider::estimate(&options.root, paths) } else { 0 };
            let on_delete = |copy: &CopyMeta| {
                self.warn(
                    ErrorCode::ShadowStorageOldestDeleted,
                    &format!(
                        "deleted persistent shadow copy {} of `{}` (made {}, {} bytes) to make room in `{}`",
                        copy.id,
                        copy.for_volume,
                        sysstate_types::time::format_utc(copy.created_ns),
                        copy.bytes,
                        storage.on.display()
                    ),
                );
            };
            deleted.extend(storage.make_room_with(needed, &on_delete)?);
            rooms.push(Room { needed, budget: storage.budget()? });
        }
        Ok((deleted, rooms))
    }

    /// The groups, the root volume's first: where each copy goes, with which provider, within
    /// what, and what it must not enter; and for a base copy, what it holds already.
    fn plan_groups(&self, rooms: Vec<Room>) -> Vec<Group<'_>> {
        let options = self.options;
        // Never copy another group's paths, nor shadow storage itself (as seen from the root).
        let storage_dirs: Vec<PathBuf> = std::iter::once(&options.storage)
            .chain(options.extra.iter().map(|g| &g.storage))
            .filter_map(|storage| storage.on.strip_prefix(&options.root).ok().map(|inside| Path::new("/").join(inside)))
            .collect();
        let skip_for = |own: Option<usize>| -> Vec<PathBuf> {
            let others = options.extra.iter().enumerate().filter(|(i, _)| Some(*i) != own);
            others.flat_map(|(_, g)| g.paths.iter().cloned()).chain(storage_dirs.iter().cloned()).collect()
        };
        // Extra volumes go into their own storage: `btrfs` names the root's snapshot, and each
        // other volume gets what `auto` finds for it (a snapshot of its subvolume where it can).
        let extra_choice =
            if options.provider == ProviderChoice::Btrfs { ProviderChoice::Auto } else { options.provider };
        let parts = std::iter::once((&options.storage, &options.paths[..], options.provider, skip_for(None))).chain(
            options.extra.iter().enumerate().map(|(i, g)| (&g.storage, &g.paths[..], extra_choice, skip_for(Some(i)))),
        );
        let base = self.copy_id == BASE_COPY;
        parts
            .zip(rooms)
            .map(|((storage, paths, choice, skip), room)| {
                let dest = storage.copy_dir(self.copy_id).join("tree");
                let provider = self
                    .provider
                    .clone()
                    .unwrap_or_else(|| Arc::from(choice.provider_for(&options.root, paths, &dest)));
                let base_meta = if base { storage.copies().into_iter().find(|c| c.id == BASE_COPY) } else { None };
                let base_bytes = base_meta.as_ref().map_or(0, |c| c.bytes);
                // Without the record of what it was made from, a base is made anew.
                let read = if base { provider::read_origins_as(&storage.copy_dir(self.copy_id)) } else { None };
                let (previous, record) = read.unzip();
                if base && previous.is_none() {
                    let _ = storage.delete(self.copy_id);
                }
                Group {
                    storage,
                    paths,
                    dest,
                    provider,
                    budget: room.budget,
                    needed: room.needed,
                    skip,
                    base_bytes,
                    base_provider: base_meta.map(|c| c.provider),
                    previous,
                    record,
                    precopy: None,
                    unsettled: Vec::new(),
                    changed: None,
                    names: None,
                    forced: Vec::new(),
                    relinked: Vec::new(),
                    read: ("walk", None),
                    covered: false,
                    devices: Default::default(),
                    contents: true,
                    live: false,
                    freeze_names: None,
                }
            })
            .collect()
    }

    /// Writes back what is dirty before the freeze, not in it: a snapshot or a clone first
    /// flushes the filesystem's dirty data, and that was most of a first freeze window on btrfs
    /// (60 of 66 ms after the tree had just been written). Not where every group copies bytes
    /// (its base was made by copying, not cloning): a copy reads dirty pages as they are, and
    /// writing back what a 2% change left dirty was a twentieth of such a backup on ext4.
    fn write_back(&self, groups: &[Group<'_>]) {
        let copies_bytes = |g: &Group<'_>| {
            !g.provider.snapshots() && (g.provider.name() == "copy" || g.base_provider.as_deref() == Some("copy"))
        };
        if groups.iter().all(copies_bytes) {
            return;
        }
        let options = self.options;
        for path in std::iter::once(&options.root).chain(options.extra.iter().map(|g| &g.storage.on)) {
            if let Ok(dir) = std::fs::File::open(path) {
                let _ = rustix::fs::syncfs(&dir);
            }
        }
    }

    /// Brings the base copies up to date before the freeze, while everything runs; the commit
    /// in the freeze then copies only what changed in between — what the change journal,
    /// started before, names. Returns how long it took, ms, and the journal.
    fn precopy(
        &self,
        groups: &mut [Group<'_>],
        live: Option<LiveRead<'_>>,
    ) -> Result<(u64, Option<SetJournal>), ShadowError> {
        if self.copy_id != BASE_COPY {
            for group in groups.iter_mut() {
                group.read = ("walk", Some("a copy kept on its own is made whole in the freeze".into()));
            }
            return Ok((0, None));
        }
        self.phase("bringing the base copy up to date");
        let started = Instant::now();
        let mut journal = self.start_journal(groups);
        if let Ok(journal) = &mut journal {
            self.refresh_from(groups, journal);
        }
        // The caller reads the changed files live where the journal says every change since
        // its parent, for every group (one volume, copied): their content is not copied now.
        let mut live = live.filter(|live| {
            journal.as_ref().is_ok_and(|journal| journal.since == Some(live.parent_at))
                && self.options.extra.is_empty()
                && groups.iter().all(|g| !g.provider.snapshots() && g.changed.is_some() && g.previous.is_some())
        });
        if live.is_some() {
            for group in groups.iter_mut() {
                (group.contents, group.live) = (false, true);
            }
        }
        // A base copy last made for a caller that read live holds older files where nothing
        // named them since: one that will be read from is compared whole (what the journal
        // named still goes into the record: the journal is right about what changed).
        let read_live_before = journal.as_ref().is_ok_and(|j| j.base_read_live && j.since.is_some());
        let compare_whole = live.is_none() && read_live_before;
        // Its forced files are copied again still (a whole comparison trusts times).
        let named: Vec<_> = groups
            .iter_mut()
            .map(|group| if compare_whole { (group.changed.take(), group.names.take()) } else { (None, None) })
            .collect();
        if compare_whole {
            tracing::debug!("the base copy was made for a backup that read live: it is compared whole");
        }
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "journal taken before the copy");
        // Nothing is frozen yet: this copy takes what it takes (a signal still stops it). Bound
        // by `shadow.commit-timeout`, a first copy of a large tree on a slow filesystem timed
        // out, was thrown away, and left the freeze to copy everything.
        let deadline = started + PRECOPY_LIMIT;
        let failed = self.trigger.with_stop_flag(|stop| {
            for (index, group) in groups.iter_mut().enumerate() {
                let copied = group.provider.precopy(&group.request(&self.options.root, deadline, group.budget, stop));
                match copied {
                    None => {}
                    Some(Ok(copy)) => {
                        let (before, before_names) = &named[index];
                        if let (Ok(journal), Some(changed)) = (&mut journal, group.changed.as_ref().or(before.as_ref()))
                        {
                            journal.add(changed, group.names.as_ref().or(before_names.as_ref()), &copy);
                        }
                        group.changed = None;
                        group.names = None;
                        group.forced.clear();
                        let mut copy = copy;
                        group.devices = copy.origins.values().map(|o| o.device).collect();
                        group.unsettled = copy.unsettled_origins();
                        group.previous = Some(copy.take_settled_origins());
                        group.precopy = Some(copy);
                    }
                    Some(Err(
                        error @ (CommitError::Budget(_) | CommitError::NoSpace(_) | CommitError::Interrupted),
                    )) => {
                        return Some((index, error));
                    }
                    Some(Err(error)) => {
                        // The commit in the freeze makes the copy whole and reports what fails.
                        tracing::debug!(?error, "the copy before the freeze failed; the freeze copies everything");
                        if let Ok(journal) = &mut journal {
                            journal.since = None;
                        }
                        group.changed = None;
                        group.names = None;
                        group.forced.clear();
                        group.previous = None;
                        group.unsettled.clear();
                        let _ = group.storage.delete(self.copy_id);
                    }
                }
            }
            None
        });
        match failed {
            None => {
                self.check_coverage(groups, journal.as_ref());
                let precopy_ms = started.elapsed().as_millis() as u64;
                for group in groups.iter_mut() {
                    group.contents = true;
                }
                if let (Some(live), Ok(journal)) = (&mut live, &journal) {
                    // A copy that failed was thrown away (the freeze copies it whole): nothing
                    // is read live then, and the commit's walk makes the copy whole.
                    if journal.since.is_some() && groups.iter().all(|g| g.live && g.previous.is_some()) {
                        self.phase("reading changed files before the freeze");
                        let mut changed = journal.changed.clone();
                        changed.sort();
                        changed.dedup();
                        (live.read)(&BeforeFreeze { changed: &changed, names: &journal.names() });
                    } else {
                        groups.iter_mut().for_each(|g| g.live = false);
                    }
                }
                Ok((precopy_ms, journal.ok()))
            }
            Some((_, CommitError::Interrupted)) => Err(self.interrupted()),
            Some((index, CommitError::Budget(bytes) | CommitError::NoSpace(bytes))) => {
                Err(groups[index].storage.full(groups[index].needed.max(bytes)))
            }
            Some((_, other)) => unreachable!("only budget, space and interruption stop the copy: {other:?}"),
        }
    }

    /// Freezes the writers in order, each with its own window, which the watchdog enforces.
    /// Returns when the freeze started and its wall-clock time: the set's point in time.
    fn freeze(&self) -> Result<(Instant, i64), ShadowError> {
        self.phase("freezing writers");
        let started = Instant::now();
        let frozen_at_ns = now_ns();
        for index in 0..self.members.count() {
            self.stop_if_interrupted()?;
            // Recorded before the call: a process killed while the writer freezes leaves a state
            // that says it may be frozen, so the next one thaws it.
            self.members.set_state(index, WriterState::Freezing, None);
            let deadline = self.watch.start_freeze(index, self.members.window(index));
            if let Err(error) = self.members.call(index, Phase::Freeze, deadline) {
                if Instant::now() >= deadline {
                    return Err(self.timeout(index, 0));
                }
                return Err(self.members.failed(index, Phase::Freeze, error));
            }
            self.members.set_state(index, WriterState::WaitingForThaw, None);
        }
        Ok((started, frozen_at_ns))
    }

    /// Each group's provider commits its copy within `shadow.commit-timeout`; then every
    /// writer is thawed, whatever happened. Returns the commits and how long they took, ms.
    fn commit(
        &self,
        groups: &mut [Group<'_>],
        mut journal: Option<&mut SetJournal>,
    ) -> Result<(Vec<Commit>, u64), ShadowError> {
        self.phase("committing shadow copies");
        let started = Instant::now();
        self.read_journal(groups, journal.as_ref().map(|j| &*j.journal));
        let groups = &*groups;
        let deadline = started + self.options.commit_timeout;
        let committed = self.trigger.with_stop_flag(|stop| {
            if let Some(ms) = sysstate_types::failpoint("COMMIT_DELAY_MS") {
                // Failpoint for the tests: a provider commit that takes this long, and stops at
                // the stop flag as the providers do.
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let commit = |(index, group): (usize, &Group<'_>)| {
                let budget = group.budget.saturating_sub(group.precopied_bytes());
                group
                    .provider
                    .commit(&group.request(&self.options.root, deadline, budget, stop))
                    .map_err(|e| (index, e))
            };
            groups.iter().enumerate().map(commit).collect::<Result<Vec<_>, _>>()
        });
        let commit_ms = started.elapsed().as_millis() as u64;
        thaw_all(self.members, self.watch);
        let mut commits = committed.map_err(|(index, error)| self.commit_failed(&groups[index], error, commit_ms))?;
        self.stop_if_interrupted()?;
        let root = self.live_root();
        for (group, copy) in groups.iter().zip(commits.iter_mut()) {
            // What the copy before the freeze left out (a socket) and the commit did not meet
            // again is left out still, while it is there.
            for (path, why) in group.precopy.iter().flat_map(|precopy| &precopy.skipped) {
                let live = root.join(path.strip_prefix("/").unwrap_or(path));
                if !copy.skipped.iter().any(|(p, _)| p == path)
                    && std::fs::symlink_metadata(live).is_ok_and(|m| m.file_type().is_socket())
                {
                    copy.skipped.push((path.clone(), why.clone()));
                }
            }
        }
        if let Some(journal) = journal.as_mut() {
            journal.in_freeze = in_freeze(groups, &commits);
            for (group, copy) in groups.iter().zip(&commits) {
                match &group.changed {
                    Some(changed) => journal.add(changed, group.freeze_names.as_ref().or(group.names.as_ref()), copy),
                    // A snapshot, or a copy that walked: its base is whole, and its paths are read
                    // whole; the journal still says what changed under the others.
                    None => journal.whole.extend(group.paths.iter().cloned()),
                }
            }
        }
        Ok((commits, commit_ms))
    }

    /// The live root as the journal names paths (symlinks resolved).
    fn live_root(&self) -> PathBuf {
        std::fs::canonicalize(&self.options.root).unwrap_or_else(|_| self.options.root.clone())
    }

    /// With a journal kept since earlier sets, whose position is where every base copy was last
    /// made: what changed since, for the copy before the freeze to look at (and only that).
    /// The journal is taken either way, so that the commit's take holds only what changed
    /// during the copy.
    fn refresh_from(&self, groups: &mut [Group<'_>], journal: &mut SetJournal) {
        if !journal.kept {
            return;
        }
        let position = journal.journal.position();
        // A snapshot has no base: only the copies count.
        let copied = || groups.iter().filter(|g| !g.provider.snapshots());
        let bases: Vec<Option<provider::BaseJournal>> = copied()
            .map(|g| g.previous.as_ref().and(provider::read_base_journal(&g.storage.copy_dir(self.copy_id))))
            .collect();
        let root = self.live_root();
        let live: Vec<PathBuf> =
            copied().flat_map(|g| g.paths.iter()).map(|p| root.join(p.strip_prefix("/").unwrap_or(p))).collect();
        let changes = journal.journal.take_under(&live);
        let unknown = if copied().any(|g| g.previous.is_none()) {
            Some("the base copy had no readable record of the live files it was copied from (`origins.json` and `origins.log` beside it): it was made anew".to_string())
        } else if bases.iter().any(Option::is_none) {
            Some("the base copy has no readable record of where the journal stood when it was made (`journal.json` beside it): the first backup since the agent started, or a damaged record".to_string())
        } else if bases.iter().flatten().any(|b| b.position != position) {
            Some("the base copy was made at another position of the journal (a command's backup in between, or before the agent restarted)".to_string())
        } else if let Changes::Doubt(why) = &changes {
            Some(why.clone())
        } else {
            None
        };
        let seen = match (unknown, changes) {
            (None, Changes::Seen(seen)) => seen,
            (why, _) => {
                journal.unknown = why;
                return;
            }
        };
        journal.base_read_live = bases.iter().flatten().any(|b| b.read_live);
        for (group, base) in groups.iter_mut().filter(|g| !g.provider.snapshots()).zip(bases) {
            group.changed = Some(shown_under(&root, &seen.dirs, group.paths));
            group.names = Some(shown_names(&root, &seen.names, group.paths));
            group.relinked = seen.relinked.clone();
            group.forced = shown_under(&root, &seen.written, group.paths);
            group.forced.extend(base.map(|b| b.unsettled).unwrap_or_default());
        }
        journal.since = Some(position);
    }

    /// The change journal of this set: the caller's, kept since earlier sets, or one started
    /// now on every filesystem the base copies are made from, before they are brought up to
    /// date. Each group that cannot use one is told why it walks.
    fn start_journal(&self, groups: &mut [Group<'_>]) -> Result<SetJournal, String> {
        if let Some(journal) = &self.options.journal {
            return Ok(SetJournal::new(journal.clone(), true));
        }
        // A snapshot needs none (and fanotify cannot watch a nested btrfs subvolume).
        let copied = || groups.iter().filter(|g| !g.provider.snapshots());
        let started = if sysstate_types::failpoint::<u8>("JOURNAL_OFF").is_some() {
            Err("the change journal is off (a test's failpoint)".to_string())
        } else if copied().next().is_none() {
            Err("every copy is a snapshot".to_string())
        } else {
            let root = &self.options.root;
            let live: Vec<PathBuf> = copied()
                .flat_map(|g| g.paths.iter())
                .map(|p| root.join(p.strip_prefix("/").unwrap_or(p)))
                .filter(|p| p.exists())
                .chain(std::iter::once(root.clone()))
                .collect();
            let live: Vec<&Path> = live.iter().map(PathBuf::as_path).collect();
            Journal::start(&live, JournalOptions::default())
                .map(|journal| SetJournal::new(Arc::new(journal), false))
                .map_err(|e| format!("the change journal cannot start here (fanotify: {e})"))
        };
        if let Err(why) = &started {
            for group in groups.iter_mut() {
                group.read = ("walk", Some(why.clone()));
            }
        }
        started
    }

    /// A group whose copy before the freeze met a filesystem the journal does not watch (one
    /// mounted below its paths) walks.
    fn check_coverage(&self, groups: &mut [Group<'_>], journal: Result<&SetJournal, &String>) {
        for group in groups.iter_mut() {
            if group.precopy.is_none() {
                group.read = ("snapshot", None);
                continue;
            }
            let Ok(SetJournal { journal, .. }) = journal else { continue };
            if let Some(device) = group.devices.iter().copied().find(|d| !journal.covers(*d)) {
                let device = format!("{}:{}", rustix::fs::major(device), rustix::fs::minor(device));
                group.read = ("walk", Some(format!("device {device} below the copied paths is not watched")));
            } else {
                group.read = ("journal", None);
                group.covered = true;
            }
        }
    }

    /// In the freeze, for a base copy brought up to date: what each journaled group's commit
    /// looks at — the directories the journal named under its paths — and the files every
    /// commit copies again whatever their metadata says: mapped for writing now (their writes
    /// move neither their times nor the journal), and with the journal, closed after writing
    /// and copied before the freeze as they changed. A journal in doubt makes its groups walk.
    fn read_journal(&self, groups: &mut [Group<'_>], journal: Option<&Journal>) {
        if groups.iter().all(|g| g.previous.is_none()) {
            return; // nothing kept from before: everything is copied
        }
        let root = std::fs::canonicalize(&self.options.root).unwrap_or_else(|_| self.options.root.clone());
        let live_prefixes: Vec<PathBuf> =
            groups.iter().flat_map(|g| g.paths.iter()).map(|p| root.join(p.strip_prefix("/").unwrap_or(p))).collect();
        let started = Instant::now();
        let changes = journal.map(|journal| journal.take_under(&live_prefixes));
        let taken = started.elapsed();
        let mapped: Vec<PathBuf> = journal::mapped_for_writing(&live_prefixes)
            .into_iter()
            .filter_map(|p| p.strip_prefix(&root).ok().map(|inside| Path::new("/").join(inside)))
            .collect();
        tracing::debug!(
            take_ms = taken.as_millis() as u64,
            mapped_ms = (started.elapsed() - taken).as_millis() as u64,
            "journal taken and mappings listed in the freeze"
        );
        for group in groups.iter_mut() {
            let under = |path: &Path| group.paths.iter().any(|p| path.starts_with(p));
            // Kept or not, a file mapped for writing is copied again.
            group.forced = mapped.iter().filter(|p| under(p)).cloned().collect();
            let changed = match (&changes, group.read.0) {
                (Some(Changes::Seen(changed)), "journal") => changed,
                (Some(Changes::Doubt(why)), "journal") => {
                    group.read = ("walk", Some(why.clone()));
                    continue;
                }
                _ => continue,
            };
            let named = shown_under(&root, &changed.dirs, group.paths);
            if let Some(previous) = &mut group.previous {
                let unsettled = std::mem::take(&mut group.unsettled);
                group.forced.extend(provider::settle_by_journal(unsettled, &named, previous));
            }
            // Read live before the freeze, the copy's folders hold the files changed before
            // as they were (or not at all, new ones): every folder a read from the copy may
            // list — those named, those above them, the paths themselves — is looked at whole.
            let named = if group.live { with_folders_above(named, group.paths, &root) } else { named };
            group.changed = Some(named);
            let names = shown_names(&root, &changed.names, group.paths);
            // Read live before the freeze, a folder named may hold files changed before that
            // the copy did not take then: the commit looks at all of it.
            (group.names, group.freeze_names) = if group.live { (None, Some(names)) } else { (Some(names), None) };
            group.relinked = changed.relinked.clone();
            group.forced.extend(shown_under(&root, &changed.written, group.paths));
        }
    }

    /// The error a failed commit of `group` ends the set with.
    fn commit_failed(&self, group: &Group<'_>, error: CommitError, commit_ms: u64) -> ShadowError {
        match error {
            CommitError::Budget(bytes) | CommitError::NoSpace(bytes) => {
                group.storage.full(group.needed.max(group.precopied_bytes() + bytes))
            }
            CommitError::Timeout => ShadowError::CommitTimeout {
                provider: group.provider.name().to_string(),
                elapsed_ms: commit_ms,
                limit_ms: self.options.commit_timeout.as_millis() as u64,
            },
            CommitError::Unsupported(path, message) => ShadowError::Provider {
                provider: group.provider.name().to_string(),
                path: path.display().to_string(),
                message,
            },
            CommitError::Io(error) => error,
            CommitError::Interrupted => self.interrupted(),
        }
    }

    /// Every writer must have been thawed within its window.
    fn check_windows(&self, commit_ms: u64) -> Result<(), ShadowError> {
        match self.watch.overrun(self.members) {
            Some(index) => Err(self.timeout(index, commit_ms)),
            None => Ok(()),
        }
    }

    /// The `writer-timeout` error of writer `index`: its window, how long it was frozen, what
    /// took the time, and the system's pressure now.
    fn timeout(&self, index: usize, commit_ms: u64) -> ShadowError {
        thaw_all(self.members, self.watch);
        let frozen_ms = self.watch.frozen_ms(index);
        let window_ms = self.members.window(index).as_millis() as u64;
        self.members.set_state(
            index,
            WriterState::Failed(Phase::Freeze),
            Some(format!("frozen for {frozen_ms} ms, past its window of {window_ms} ms")),
        );
        ShadowError::WriterTimeout(Box::new(WriterTimeout {
            writer: self.members.name(index).to_string(),
            window_ms,
            frozen_ms,
            breakdown: self.watch.breakdown(self.members, frozen_ms, commit_ms),
            pressure: Pressure::now(),
        }))
    }

    /// post-snapshot to every writer, then what they add to the root volume's copy.
    fn post_snapshot(&self, groups: &[Group<'_>], commits: &[Commit]) -> Result<(), ShadowError> {
        for index in 0..self.members.count() {
            self.members
                .call(index, Phase::PostSnapshot, Instant::now() + DEFAULT_PHASE_TIMEOUT)
                .map_err(|error| self.members.failed(index, Phase::PostSnapshot, error))?;
            self.members.set_state(index, WriterState::WaitingForCompletion, None);
        }
        let additions = self.members.copy_additions();
        if !additions.is_empty() {
            apply_additions(&self.options.root, &commits[0].root, &groups[0].dest, &additions)?;
        }
        Ok(())
    }

    /// Each group's copy gets its record beside it (and a base, the identities it was made
    /// from); the set's record sums them up. Timings are the caller's to fill in.
    fn record(
        &self,
        groups: &[Group<'_>],
        commits: &[Commit],
        deleted: Vec<CopyMeta>,
        journal: Option<&SetJournal>,
    ) -> Result<ShadowSetRecord, ShadowError> {
        let writers = (0..self.members.count())
            .map(|index| WriterRecord {
                name: self.members.name(index).to_string(),
                kind: self.members.kind(index).to_string(),
                result: "ok".into(),
                message: None,
                frozen_ms: self.watch.frozen_ms(index),
            })
            .collect();
        let mut record = ShadowSetRecord {
            id: self.set_id.to_string(),
            providers: BTreeMap::new(),
            writers,
            freeze_window_ms: 0,
            commit_ms: 0,
            precopy_ms: 0,
            storage: self.options.storage.on.display().to_string(),
            copies: Vec::new(),
            bytes: 0,
            files: 0,
            precopied_files: 0,
            deleted_to_make_room: deleted.into_iter().map(|c| c.id).collect(),
            lock_taken_over: None,
            frozen_at_ns: 0,
            journal: None,
        };
        let kept = journal.filter(|j| j.kept);
        for (group, copy) in groups.iter().zip(commits) {
            let precopy = group.precopy.as_ref();
            let dir = group.storage.copy_dir(self.copy_id);
            let meta = CopyMeta {
                id: self.copy_id.to_string(),
                set: self.set_id.to_string(),
                for_volume: group.storage.for_volume.display().to_string(),
                // What copied, or what made the base a refresh found current.
                provider: precopy
                    .iter()
                    .flat_map(|c| c.used.values())
                    .chain(copy.used.values())
                    .next()
                    .map(|name| name.to_string())
                    .or_else(|| group.base_provider.clone().filter(|_| group.previous.is_some()))
                    .unwrap_or_else(|| group.provider.name().to_string()),
                created_ns: now_ns(),
                // A refreshed base holds what it held, less what was freed, plus what was copied.
                bytes: group.base_bytes.saturating_sub(precopy.map_or(0, |c| c.freed)).saturating_sub(copy.freed)
                    + group.precopied_bytes()
                    + copy.bytes,
                files: copy.files,
                persistent: self.options.persistent,
                paths: group.paths.iter().map(|p| p.display().to_string()).collect(),
            };
            std::fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta).expect("meta encodes"))
                .map_err(|e| ShadowError::io(dir.join("meta.json"), e))?;
            record.copies.push(super::record::CopyRecord {
                for_volume: meta.for_volume.clone(),
                on: group.storage.on.display().to_string(),
                provider: meta.provider.clone(),
                bytes: group.precopied_bytes() + copy.bytes,
                files: copy.files,
                read: group.read.0.to_string(),
                walked_because: group.read.1.clone(),
                dirs_looked_at: group.changed.as_ref().map(Vec::len),
            });
            // A snapshot is made whole each time: nothing of it is a base.
            if self.copy_id == BASE_COPY && copy.live_device.is_none() {
                // What was copied in the tick it changed in is copied again next time.
                // As read from the record beside the base, unless something changed: the
                // record of a large tree is megabytes.
                let unchanged = precopy.is_some()
                    && [precopy, Some(copy)]
                        .into_iter()
                        .flatten()
                        .all(|c| !c.origins_changed && c.unsettled.is_empty());
                if !unchanged {
                    // What changed since the records were read, when both copies followed the
                    // journal: appended to them.
                    let touched = [precopy, Some(copy)].into_iter().flatten().try_fold(Vec::new(), |mut all, c| {
                        all.extend(c.touched.as_ref()?.iter().chain(&c.unsettled).cloned());
                        Some(all)
                    });
                    let changed = group.record.zip(touched.filter(|_| precopy.is_some()));
                    let changed = changed.as_ref().map(|(record, paths)| (*record, &paths[..]));
                    provider::write_origins(&dir, &copy.settled_origins(), changed)
                        .map_err(|e| ShadowError::io(provider::origins_file(&dir), e))?;
                }
                // Where a kept journal stood when this copy was made: the next set brings it
                // up to date from what the journal saw after.
                let base = kept.filter(|_| group.covered).map(|j| provider::BaseJournal {
                    position: j.journal.position(),
                    unsettled: copy.unsettled.clone(),
                    read_live: group.live,
                });
                provider::write_base_journal(&dir, base.as_ref())
                    .map_err(|e| ShadowError::io(provider::journal_file(&dir), e))?;
            }
            for (device, name) in precopy.iter().flat_map(|c| &c.used).chain(&copy.used) {
                let device = format!("{}:{}", rustix::fs::major(*device), rustix::fs::minor(*device));
                record.providers.insert(device, name.to_string());
            }
            record.bytes += group.precopied_bytes() + copy.bytes;
            record.files += copy.files;
            record.precopied_files += precopy.map_or(0, |c| c.files);
        }
        record.journal = kept.map(|j| {
            let mut changed = j.changed.clone();
            changed.sort_unstable_by(|a, b| sysstate_fs::path_order(a, b));
            changed.dedup();
            // Every group whose commit did not follow the journal is read whole (see `commit`).
            let mut whole = j.whole.clone();
            whole.sort_unstable_by(|a, b| sysstate_fs::path_order(a, b));
            whole.dedup();
            let complete = j.since.is_some() && groups.iter().any(|g| g.covered && g.read.0 == "journal");
            super::record::JournalRecord {
                position: j.journal.position(),
                since: j.since.filter(|_| complete),
                changed: if complete { changed } else { Vec::new() },
                names: if complete { j.names() } else { Default::default() },
                whole: if complete { whole } else { Vec::new() },
                unknown: j.unknown.clone(),
                in_freeze: j.in_freeze.clone().filter(|_| complete),
            }
        });
        Ok(record)
    }

    /// The made set: the other volumes' copies, and their live identities merged into the
    /// root volume's.
    fn made(&self, mut commits: Vec<Commit>, record: ShadowSetRecord) -> Made {
        let mut commit = commits.remove(0);
        let mut extra = Vec::new();
        for (group, copy) in self.options.extra.iter().zip(commits) {
            extra.push(ExtraCopy {
                storage: group.storage.clone(),
                paths: group.paths.clone(),
                root: copy.root.clone(),
                live_device: copy.live_device,
                keep: super::keeps_copy(self.options.persistent, self.copy_id, &copy),
            });
            Arc::make_mut(&mut commit.origins)
                .extend(copy.origins.iter().map(|(path, origin)| (path.clone(), *origin)));
        }
        Made { commit, extra, record }
    }
}

/// When every group's changed files were read live before the freeze and its commit followed
/// the journal: what changed since the copy before the freeze took it — the folders the commit
/// looked at, the names in them, and the files it looked at again outside them, each with its
/// folder named by it.
fn in_freeze(groups: &[Group<'_>], commits: &[Commit]) -> Option<InFreeze> {
    if !groups.iter().all(|g| g.live && g.changed.is_some()) {
        return None;
    }
    let mut made = InFreeze::default();
    for (group, copy) in groups.iter().zip(commits) {
        made.changed.extend(group.changed.iter().flatten().cloned());
        made.names.extend(group.freeze_names.clone().unwrap_or_default());
        made.reread.extend(copy.looked_again.iter().chain(&copy.unsettled).cloned());
    }
    // A file looked at again outside the folders the commit looked at whole (another name of a
    // file whose links changed): its folder and those above it hold other files as they were
    // before the live read, so a read of the copy lists none of them — it names the file in
    // its folder, and nothing in those above.
    let looked_at: std::collections::HashSet<PathBuf> = made.changed.iter().cloned().collect();
    let paths: Vec<&PathBuf> = groups.iter().flat_map(|g| g.paths.iter()).collect();
    for path in &made.reread {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { continue };
        let within = paths.iter().find(|p| dir.starts_with(p));
        for above in dir.ancestors().take_while(|a| within.is_some_and(|p| a.starts_with(p))) {
            if !looked_at.contains(above) && !made.names.contains_key(above) {
                made.changed.push(above.to_path_buf());
                made.names.insert(above.to_path_buf(), Vec::new());
            }
        }
        if let Some(names) = made.names.get_mut(dir) {
            names.push(name.to_os_string());
        }
    }
    made.changed.sort();
    made.changed.dedup();
    for names in made.names.values_mut() {
        names.sort();
        names.dedup();
    }
    made.reread.sort();
    made.reread.dedup();
    Some(made)
}

/// The folders `named` (as seen from the root), with every folder above each up to the path
/// of `paths` it is in, and those of `paths` that are folders (live under `root`), in path
/// order.
fn with_folders_above(named: Vec<PathBuf>, paths: &[PathBuf], root: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = paths
        .iter()
        .filter(|path| {
            std::fs::symlink_metadata(root.join(path.strip_prefix("/").unwrap_or(path))).is_ok_and(|m| m.is_dir())
        })
        .cloned()
        .collect();
    for dir in named {
        let within = paths.iter().find(|path| dir.starts_with(path));
        all.extend(
            dir.ancestors()
                .skip(1)
                .take_while(|above| within.is_some_and(|path| above.starts_with(path)))
                .map(Path::to_path_buf),
        );
        all.push(dir);
    }
    all.sort_by(|a, b| sysstate_fs::path_order(a, b));
    all.dedup();
    all
}

/// [`shown_under`] for the keys of a journal's entry names.
fn shown_names(root: &Path, live: &EntryNames, paths: &[PathBuf]) -> EntryNames {
    live.iter()
        .filter_map(|(path, names)| {
            let shown = Path::new("/").join(path.strip_prefix(root).ok()?);
            paths.iter().any(|p| shown.starts_with(p)).then(|| (shown, names.clone()))
        })
        .collect()
}

/// The live paths in `live` (absolute, under `root`) that lie under one of `paths`, as seen from
/// the root.
fn shown_under(root: &Path, live: &[PathBuf], paths: &[PathBuf]) -> Vec<PathBuf> {
    live.iter()
        .filter_map(|path| path.strip_prefix(root).ok().map(|inside| Path::new("/").join(inside)))
        .filter(|shown| paths.iter().any(|p| shown.starts_with(p)))
        .collect()
}
