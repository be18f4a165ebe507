//! The proof that a commit guided by the change journal is the commit a full walk makes.
//!
//! Rounds of a random workload — files created, written, truncated by path, deleted, renamed
//! over others, hardlinked and unlinked, chmod, extended attributes, folders made, moved
//! between folders and removed, symlinks, writes through shared mappings (some still mapped at
//! the "freeze", one mapped before the journal started) — run while the base copy is brought
//! up to date and after it. Then the commit that looks only at what the journal named is
//! compared, entry for entry and byte for byte, with a full copy of the same moment, and that
//! one with the live tree. Overflow is provoked too: the journal then doubts, and the walk
//! that follows must be right as well.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sysstate_shadow::journal::{self, Changes, Journal, JournalOptions};
use sysstate_shadow::provider::{Commit, CommitRequest, CopyProvider, Origin, Provider, Reflink};

/// A small deterministic generator (xorshift64*), seeded per run so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Every entry under `root` (relative), folders first in each.
fn entries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let Ok(list) = std::fs::read_dir(root.join(&relative)) else { continue };
        for entry in list.flatten() {
            let child = relative.join(entry.file_name());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(child.clone());
            }
            out.push(child);
        }
    }
    out.sort();
    out
}

/// A shared writable mapping of a file, unmapped when dropped.
struct Mapping {
    address: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory of a file; writes to it are bytes, from one thread
// at a time.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(path: &Path, len: usize) -> Option<Mapping> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).ok()?;
        if file.metadata().ok()?.len() < len as u64 {
            file.set_len(len as u64).ok()?;
        }
        // SAFETY: a new shared mapping of an open file; the result is checked.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        (address != libc::MAP_FAILED).then_some(Mapping { address, len })
    }

    fn write(&self, at: usize, byte: u8) {
        // SAFETY: `at` is inside the mapping.
        unsafe { *self.address.cast::<u8>().add(at % self.len) = byte };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.address, self.len) };
    }
}

/// The workload on the live tree.
struct Workload {
    live: PathBuf,
    rng: Rng,
    counter: u64,
    /// Mappings kept across the freeze.
    mapped: Vec<Mapping>,
}

impl Workload {
    fn pick(&mut self, want_dir: bool) -> Option<PathBuf> {
        let all: Vec<PathBuf> =
            entries(&self.live).into_iter().filter(|p| self.live.join(p).is_dir() == want_dir).collect();
        (!all.is_empty()).then(|| all[self.rng.below(all.len())].clone())
    }

    fn a_dir(&mut self) -> PathBuf {
        if self.rng.below(4) == 0 {
            return PathBuf::new();
        }
        self.pick(true).unwrap_or_default()
    }

    fn new_name(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    fn content(&mut self) -> Vec<u8> {
        let len = self.rng.below(6000);
        let byte = self.rng.next() as u8;
        vec![byte; len]
    }

    /// One random operation; failures (a path gone meanwhile) are part of the game.
    fn step(&mut self) {
        let live = self.live.clone();
        let _ = match self.rng.below(16) {
            0 | 1 => {
                let dir = self.a_dir();
                let name = self.new_name("f");
                let content = self.content();
                std::fs::write(live.join(dir).join(name), content)
            }
            2 => match self.pick(false) {
                Some(file) if live.join(&file).is_file() => {
                    let content = self.content();
                    std::fs::write(live.join(file), content)
                }
                _ => Ok(()),
            },
            3 => match self.pick(false) {
                Some(file) => {
                    let path = std::ffi::CString::new(live.join(file).into_os_string().into_encoded_bytes()).unwrap();
                    let len = self.rng.below(3000) as libc::off_t;
                    // SAFETY: a valid C string; truncate by path.
                    unsafe { libc::truncate(path.as_ptr(), len) };
                    Ok(())
                }
                None => Ok(()),
            },
            4 => match self.pick(false) {
                Some(file) => std::fs::remove_file(live.join(file)),
                None => Ok(()),
            },
            5 => match (self.pick(false), self.pick(false)) {
                (Some(a), Some(b)) if a != b => std::fs::rename(live.join(a), live.join(b)),
                _ => Ok(()),
            },
            6 => match self.pick(false) {
                Some(file) if live.join(&file).is_file() => {
                    let dir = self.a_dir();
                    let name = self.new_name("link");
                    std::fs::hard_link(live.join(file), live.join(dir).join(name))
                }
                _ => Ok(()),
            },
            7 => {
                let target = if self.rng.below(3) == 0 { self.pick(true) } else { self.pick(false) };
                match target {
                    Some(path) if !live.join(&path).is_symlink() => {
                        let mode = if live.join(&path).is_dir() {
                            0o700 | self.rng.below(0o100) as u32
                        } else {
                            0o600 | self.rng.below(0o200) as u32
                        };
                        std::fs::set_permissions(live.join(path), std::fs::Permissions::from_mode(mode))
                    }
                    _ => Ok(()),
                }
            }
            8 => match self.pick(false) {
                Some(file) if !live.join(&file).is_symlink() => {
                    let value = self.new_name("v");
                    rustix::fs::lsetxattr(
                        live.join(file),
                        "user.test",
                        value.as_bytes(),
                        rustix::fs::XattrFlags::empty(),
                    )
                    .map_err(std::io::Error::from)
                }
                _ => Ok(()),
            },
            9 => {
                let dir = self.a_dir();
                let name = self.new_name("d");
                std::fs::create_dir(live.join(dir).join(name))
            }
            10 => match (self.pick(true), self.pick(true)) {
                // A folder moved into another (not into itself).
                (Some(a), Some(b)) if !b.starts_with(&a) => {
                    let name = self.new_name("moved");
                    std::fs::rename(live.join(a), live.join(b).join(name))
                }
                _ => Ok(()),
            },
            11 => match self.pick(true) {
                Some(dir) if entries(&live.join(&dir)).len() < 8 => std::fs::remove_dir_all(live.join(dir)),
                _ => Ok(()),
            },
            12 => {
                let dir = self.a_dir();
                let name = self.new_name("s");
                let target = self.new_name("target");
                std::os::unix::fs::symlink(target, live.join(dir).join(name))
            }
            13 | 14 => match self.pick(false) {
                Some(file) if live.join(&file).is_file() && !live.join(&file).is_symlink() => {
                    if let Some(mapping) = Mapping::new(&live.join(file), 4096) {
                        mapping.write(self.rng.below(4096), self.rng.next() as u8);
                        if self.rng.below(3) == 0 {
                            self.mapped.push(mapping);
                        }
                    }
                    Ok(())
                }
                _ => Ok(()),
            },
            _ => match self.pick(false) {
                Some(file) => {
                    let time = std::time::SystemTime::UNIX_EPOCH
                        + Duration::from_secs(1_000_000 + self.rng.below(1000) as u64);
                    std::fs::File::options().write(true).open(live.join(file)).and_then(|f| f.set_modified(time))
                }
                None => Ok(()),
            },
        };
    }
}

/// What a copy holds of each entry, to compare two copies (or a copy and the live tree).
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn look(root: &Path) -> BTreeMap<PathBuf, Seen> {
    entries(root)
        .into_iter()
        .map(|relative| {
            let path = root.join(&relative);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let seen = Seen {
                kind: meta.mode() & libc::S_IFMT,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: if meta.is_dir() { 0 } else { meta.size() },
                mtime: if meta.is_dir() { (0, 0) } else { (meta.mtime(), meta.mtime_nsec()) },
                content: meta.is_file().then(|| std::fs::read(&path).unwrap()),
                link: meta.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
                xattrs: sysstate_fs::read_xattrs(&path).unwrap_or_default(),
            };
            (relative, seen)
        })
        .collect()
}

/// The differences between two looks, at most a few, for the failure message.
fn differences(a: &BTreeMap<PathBuf, Seen>, b: &BTreeMap<PathBuf, Seen>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, seen) in a {
        match b.get(path) {
            None => out.push(format!("{}: only in the first", path.display())),
            Some(other) if other != seen => out.push(format!(
                "{}: {:?} / {:?}",
                path.display(),
                Seen { content: None, ..clone_seen(seen) },
                Seen { content: None, ..clone_seen(other) }
            )),
            _ => {}
        }
    }
    out.extend(b.keys().filter(|p| !a.contains_key(*p)).map(|p| format!("{}: only in the second", p.display())));
    out.truncate(10);
    out
}

fn clone_seen(seen: &Seen) -> Seen {
    Seen { content: seen.content.clone(), link: seen.link.clone(), xattrs: seen.xattrs.clone(), ..*seen }
}

#[allow(clippy::too_many_arguments)] // each a field of the request, named where it is called
fn request<'a>(
    live: &'a Path,
    paths: &'a [PathBuf],
    dest: &'a Path,
    stop: &'a AtomicBool,
    previous: Option<&'a sysstate_shadow::provider::Origins>,
    changed: Option<&'a [PathBuf]>,
    forced: &'a [PathBuf],
    relinked: &'a [(u64, u64)],
) -> CommitRequest<'a> {
    CommitRequest {
        root: live,
        paths,
        dest,
        deadline: Instant::now() + Duration::from_secs(600),
        budget: u64::MAX,
        interrupted: stop,
        previous,
        skip: &[],
        changed,
        names: None,
        forced,
        relinked,
        contents: true,
    }
}

/// As seen from the live root: `/` + the path under it.
fn shown(live: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.iter().filter_map(|p| p.strip_prefix(live).ok().map(|inside| Path::new("/").join(inside))).collect()
}

/// One round: the journal starts (and `flood` files are made and removed at once), the base copy
/// is refreshed while `before` operations run beside it, `after` runs, then in the "freeze"
/// the commit looks at what the journal named. Returns whether the journal was trusted.
/// Entries copied before the freeze as they changed that the journal did not name after, and
/// that the commit therefore kept: the rounds must meet some, or they do not test keeping them.
static UNSETTLED_KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn round(
    workload: &mut Workload,
    live: &Path,
    base: &Path,
    previous: &mut Option<sysstate_shadow::provider::Origins>,
    options: JournalOptions,
    (flood, before): (usize, usize),
    after: &dyn Fn(&mut Workload),
) -> bool {
    let paths = [PathBuf::from("/data")];
    let provider = CopyProvider { reflink: Reflink::Never };
    let stop = AtomicBool::new(false);
    // What changed before this round settles (see `SETTLED`): the copy before the freeze then
    // trusts it, and only the journal can say it changed again.
    std::thread::sleep(sysstate_shadow::provider::SETTLED + Duration::from_millis(100));
    let journal = Journal::start(&[live], options).expect("the change journal starts here (fanotify, as root)");
    // The events of one name merge into one; those of distinct names do not.
    for i in 0..flood {
        let path = workload.live.join(format!("flood{i}"));
        std::fs::write(&path, [i as u8]).unwrap();
        std::fs::remove_file(path).unwrap();
    }
    // The copy before the freeze, with the workload running beside it.
    let running = Arc::new(AtomicBool::new(true));
    let mut side = Workload {
        live: workload.live.clone(),
        rng: Rng(workload.rng.next() | 1),
        counter: workload.counter + 1_000_000,
        mapped: Vec::new(),
    };
    let flag = running.clone();
    let beside = std::thread::spawn(move || {
        let mut done = 0;
        while flag.load(Ordering::SeqCst) && done < before {
            side.step();
            done += 1;
        }
        side.counter
    });
    let precopy = provider.precopy(&request(live, &paths, base, &stop, previous.as_ref(), None, &[], &[])).unwrap();
    running.store(false, Ordering::SeqCst);
    workload.counter = beside.join().unwrap();
    // A copy made while everything runs can meet an entry replaced between two looks at it (a
    // file's extended attributes read from a symlink renamed over it): the coordinator then
    // lets the freeze copy everything, and so does this round.
    let (precopy, base_made): (Commit, bool) = match precopy {
        Ok(precopy) => (precopy, true),
        Err(error) => {
            eprintln!("the copy before the freeze failed ({error:?}): the commit copies everything");
            std::fs::remove_dir_all(base).unwrap();
            (Commit::default(), false)
        }
    };
    after(workload);
    // The freeze: what the journal saw, the files mapped for writing now.
    let mut settled = precopy.settled_origins();
    let changes = journal.take();
    let trusted = matches!(changes, Changes::Seen(_)) || !base_made;
    let (changed, names, mut forced, relinked) = match changes {
        Changes::Seen(seen) => {
            let names: sysstate_shadow::journal::EntryNames = seen
                .names
                .iter()
                .filter_map(|(dir, names)| Some((Path::new("/").join(dir.strip_prefix(live).ok()?), names.clone())))
                .collect();
            (Some(shown(live, &seen.dirs)), Some(names), shown(live, &seen.written), seen.relinked)
        }
        Changes::Doubt(_) => (None, None, Vec::new(), Vec::new()),
    };
    forced.extend(shown(live, &journal::mapped_for_writing(&[live.to_path_buf()])));
    // As the coordinator does: with the journal, what the copy before copied as it changed is
    // copied again only where the journal named it since; walking, all of it.
    match &changed {
        Some(named) => {
            let unsettled = precopy.unsettled_origins();
            let count = unsettled.len();
            let again = sysstate_shadow::provider::settle_by_journal(unsettled, named, &mut settled);
            UNSETTLED_KEPT.fetch_add(count - again.len(), Ordering::SeqCst);
            forced.extend(again);
        }
        None => forced.extend(precopy.unsettled.iter().cloned()),
    }
    let settled = base_made.then_some(&settled);
    let commit = provider
        .commit(&CommitRequest {
            names: names.as_ref(),
            ..request(live, &paths, base, &stop, settled, changed.as_deref(), &forced, &relinked)
        })
        .unwrap();
    // A full copy of the same moment.
    let reference_dir = base.with_file_name("reference");
    let _ = std::fs::remove_dir_all(&reference_dir);
    let reference = provider.commit(&request(live, &paths, &reference_dir, &stop, None, None, &[], &[])).unwrap();
    let (journaled, walked, now) = (look(base), look(&reference_dir), look(live));
    let differ = differences(&journaled, &walked);
    assert!(differ.is_empty(), "the journaled copy differs from a full copy of the same moment: {differ:#?}");
    let differ = differences(&walked, &now);
    assert!(differ.is_empty(), "a full copy differs from the live tree: {differ:#?}");
    let key = |(path, o): (&std::sync::Arc<Path>, &Origin)| (path.to_path_buf(), o.device, o.inode, o.ctime_ns);
    let mut a: Vec<_> = commit.origins.iter().map(key).collect();
    let mut b: Vec<_> = reference.origins.iter().map(key).collect();
    a.sort();
    b.sort();
    if a != b {
        let only: Vec<_> = a.iter().filter(|x| !b.contains(x)).take(5).collect();
        let other: Vec<_> = b.iter().filter(|x| !a.contains(x)).take(5).collect();
        panic!("the journaled copy's live identities differ from a full copy's: {only:?} / {other:?}");
    }
    *previous = Some(commit.settled_origins());
    trusted
}

/// `count` random operations.
fn steps(count: usize) -> impl Fn(&mut Workload) {
    move |workload| {
        for _ in 0..count {
            workload.step();
        }
    }
}

#[test]
fn a_commit_guided_by_the_journal_is_the_commit_a_full_walk_makes() {
    let dir = tempfile::tempdir().unwrap();
    let top = std::fs::canonicalize(dir.path()).unwrap();
    let live = top.join("live");
    std::fs::create_dir_all(live.join("data")).unwrap();
    let seed = std::env::var("SYSSTATE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("seed {seed} (SYSSTATE_TEST_SEED={seed} replays it)");
    let mut workload = Workload { live: live.join("data"), rng: Rng(seed), counter: 0, mapped: Vec::new() };
    for _ in 0..300 {
        workload.step();
    }
    // One file mapped before any journal starts, written through that mapping later.
    std::fs::write(live.join("data/early-mapped"), vec![1u8; 4096]).unwrap();
    let early = Mapping::new(&live.join("data/early-mapped"), 4096).unwrap();
    early.write(0, 2);
    let base = top.join("storage/base");
    let mut previous = None;
    let mut operations = 300;
    for round_number in 0..12 {
        if round_number == 5 {
            early.write(100, 3);
        }
        if round_number == 6 {
            // Mappings held across freezes go away (a close after writing, seen by the journal).
            workload.mapped.clear();
        }
        let trusted =
            round(&mut workload, &live, &base, &mut previous, JournalOptions::default(), (0, 150), &steps(150));
        assert!(trusted, "round {round_number}: the journal doubted without a cause");
        operations += 300;
    }
    let kept = UNSETTLED_KEPT.load(Ordering::SeqCst);
    eprintln!("{kept} entries copied as they changed were kept by the journal's word");
    assert!(kept > 0, "no round kept an entry copied as it changed: that path went untested");
    drop(early);
    // Doubt provoked: the kernel's queue overflows (nobody reads it while 20,000 events come),
    // then the journal's own bound is passed. The walk that follows is right too.
    let overflow = JournalOptions { max_dirs: 65_536, reader: false };
    assert!(!round(&mut workload, &live, &base, &mut previous, overflow, (20_000, 0), &steps(150)), "no overflow seen");
    let bounded = JournalOptions { max_dirs: 2, reader: true };
    assert!(
        !round(&mut workload, &live, &base, &mut previous, bounded, (0, 150), &steps(150)),
        "the bound of 2 not seen"
    );
    // And the journal is trusted again after.
    assert!(round(&mut workload, &live, &base, &mut previous, JournalOptions::default(), (0, 150), &steps(150)));
    operations += 40_000 + 750;
    eprintln!("{operations} operations in 15 rounds");
}

/// The changes no event names in their own folder, one at a time after a settled base: a link
/// made and removed through another folder (the first name's ctime), in two rounds and in one,
/// a file written through a
/// mapping made before the journal started and still held, and one unmapped before the freeze.
#[test]
fn changes_without_an_event_in_their_folder_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let top = std::fs::canonicalize(dir.path()).unwrap();
    let live = top.join("live");
    for folder in ["data/a", "data/b", "data/c"] {
        std::fs::create_dir_all(live.join(folder)).unwrap();
    }
    std::fs::write(live.join("data/a/first"), "linked").unwrap();
    std::fs::write(live.join("data/c/held"), vec![0u8; 4096]).unwrap();
    std::fs::write(live.join("data/c/dropped"), vec![0u8; 4096]).unwrap();
    let held = Mapping::new(&live.join("data/c/held"), 4096).unwrap();
    let dropped = std::cell::RefCell::new(Mapping::new(&live.join("data/c/dropped"), 4096));
    held.write(0, 1);
    dropped.borrow().as_ref().unwrap().write(0, 1);
    let base = top.join("storage/base");
    let mut previous = None;
    let mut workload = Workload { live: live.join("data"), rng: Rng(7), counter: 0, mapped: Vec::new() };
    let nothing = |_: &mut Workload| {};
    assert!(round(&mut workload, &live, &base, &mut previous, JournalOptions::default(), (0, 0), &nothing));
    let link = |_: &mut Workload| std::fs::hard_link(live.join("data/a/first"), live.join("data/b/second")).unwrap();
    let unlink = |_: &mut Workload| std::fs::remove_file(live.join("data/b/second")).unwrap();
    // A name made and removed between two looks: only the file itself is reported.
    let transient = |_: &mut Workload| {
        std::fs::hard_link(live.join("data/a/first"), live.join("data/b/third")).unwrap();
        std::fs::remove_file(live.join("data/b/third")).unwrap();
    };
    let write_held = |_: &mut Workload| held.write(1, 2);
    let write_and_drop = |_: &mut Workload| {
        dropped.borrow().as_ref().unwrap().write(1, 2);
        dropped.borrow_mut().take();
    };
    // (A round with no change lets the file copied again in the round before settle.)
    let changes: [&dyn Fn(&mut Workload); 6] = [&link, &unlink, &nothing, &transient, &write_held, &write_and_drop];
    for change in changes {
        assert!(round(&mut workload, &live, &base, &mut previous, JournalOptions::default(), (0, 0), change));
    }
    drop(held);
}
