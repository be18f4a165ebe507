//! Providers: code that makes point-in-time copies of paths during the freeze.
//!
//! - `copy` works everywhere: it copies each file, with all its metadata, into shadow storage.
//! - `reflink` clones each file's extents with `FICLONE` (XFS, btrfs): near-zero time and space.
//! - `btrfs` takes a read-only snapshot of the subvolume holding the paths.
//! - `auto` takes a btrfs snapshot of each volume where it can (the root's, and a volume of its
//!   own with its storage on it), else uses reflink where it works and copy elsewhere, and says
//!   which.
//!
//! Each is a [`Provider`]; a future LVM or cloud-disk snapshot provider is one more impl.
//!
//! A copy has new inode numbers and ctimes. So that versions made from copies are identical to
//! versions of the live files (same trees, same dedup, unchanged files recognised), the commit
//! records each entry's **origin** — device, inode and ctime of the live file — and the archiver
//! records those instead of the copy's.

mod btrfs;
mod copy;

pub use btrfs::{delete_snapshot_in, delete_subvolume, is_btrfs, is_subvolume, BtrfsProvider};
pub use copy::{CopyProvider, Reflink};

use crate::error::ShadowError;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Live identities by absolute path as seen from the root, shared: a map of a large tree is
/// copied only when something in it changes (`Arc::make_mut`), and then its paths are shared,
/// not copied (a copy of 60,000 paths was 10 ms of a refresh, and as much again in the freeze).
pub type Origins = Arc<HashMap<Arc<Path>, Origin>>;

/// The live identity of a copied entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// `st_dev` of the live file.
    pub device: u64,
    /// `st_ino` of the live file.
    pub inode: u64,
    /// `st_ctime` of the live file, ns.
    pub ctime_ns: i64,
    /// `st_nlink` of the live file: a copy need not hold a file's names as one file (a name
    /// copied on its own in a refresh is a file of its own), the version records the live count.
    #[serde(default)]
    pub links: u64,
}

impl Origin {
    /// The identity of a live entry.
    pub fn of(meta: &std::fs::Metadata) -> Origin {
        Origin {
            device: meta.dev(),
            inode: meta.ino(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            links: meta.nlink(),
        }
    }
}

/// How a provider was asked to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// A btrfs snapshot where one btrfs subvolume on the storage's filesystem holds the paths,
    /// else reflink where it works, else copy.
    Auto,
    /// Always copy.
    Copy,
    /// Reflink or fail.
    Reflink,
    /// A read-only btrfs snapshot of the subvolume holding the root's paths, or fail.
    Btrfs,
}

impl ProviderChoice {
    /// Parses `shadow.provider`.
    pub fn parse(text: &str) -> Result<ProviderChoice, ShadowError> {
        match text {
            "auto" => Ok(ProviderChoice::Auto),
            "copy" => Ok(ProviderChoice::Copy),
            "reflink" => Ok(ProviderChoice::Reflink),
            "btrfs" => Ok(ProviderChoice::Btrfs),
            other => Err(ShadowError::Config(format!(
                "`shadow.provider = \"{other}\"` is not a provider: use auto, copy, reflink or btrfs"
            ))),
        }
    }

    /// Its name, as in `shadow.provider`.
    pub fn name(self) -> &'static str {
        match self {
            ProviderChoice::Auto => "auto",
            ProviderChoice::Copy => "copy",
            ProviderChoice::Reflink => "reflink",
            ProviderChoice::Btrfs => "btrfs",
        }
    }

    /// The provider that makes copies of `paths` (as seen from `root`) into `dest` for this
    /// choice: `auto` is a btrfs snapshot where one btrfs subvolume on the filesystem of `dest`
    /// holds the paths, else a copy that clones where it can.
    pub fn provider_for(self, root: &Path, paths: &[PathBuf], dest: &Path) -> Box<dyn Provider> {
        match self {
            ProviderChoice::Btrfs => Box::new(BtrfsProvider),
            ProviderChoice::Auto if btrfs::snapshot_works(root, paths, dest) => Box::new(BtrfsProvider),
            ProviderChoice::Auto => Box::new(CopyProvider { reflink: Reflink::Try }),
            ProviderChoice::Copy => Box::new(CopyProvider { reflink: Reflink::Never }),
            ProviderChoice::Reflink => Box::new(CopyProvider { reflink: Reflink::Require }),
        }
    }
}

/// Makes point-in-time copies of paths into shadow storage: before the freeze (a base copy
/// brought up to date while everything runs) and in it (the commit).
pub trait Provider: Send + Sync {
    /// Its name, for messages (`copy`, `reflink`, `btrfs`, …).
    fn name(&self) -> &'static str;

    /// True when the copy is a snapshot, made whole in the freeze at no cost that grows with
    /// the tree: it needs no change journal.
    fn snapshots(&self) -> bool {
        false
    }

    /// Brings a base copy at the request's `dest` up to date before the freeze, while everything
    /// runs, so that the commit in the freeze finds it current and copies only what changed in
    /// between. `None` when there is nothing to prepare (a snapshot is made whole in the freeze).
    ///
    /// Hand the commit in the freeze [`Commit::settled_origins`], not `origins`: an entry
    /// copied while it was being written is copied again in the freeze.
    fn precopy(&self, request: &CommitRequest<'_>) -> Option<Result<Commit, CommitError>> {
        let _ = request;
        None
    }

    /// Makes the copy of the request's `paths` at its `dest`, in the freeze, within its deadline
    /// and budget. A failure leaves whatever was made for the caller to delete.
    fn commit(&self, request: &CommitRequest<'_>) -> Result<Commit, CommitError>;
}

/// The providers this build has, with what they need (for `sysstate providers`).
pub const PROVIDERS: &[(&str, &str)] = &[
    ("copy", "any filesystem; copies the components' files into shadow storage during the freeze"),
    ("reflink", "XFS or btrfs, shadow storage on the same filesystem; clones extents with FICLONE"),
    ("btrfs", "the root in a btrfs subvolume, shadow storage on the same filesystem, and `btrfs` (btrfs-progs); a read-only snapshot"),
];

/// What a commit made.
#[derive(Debug, Default)]
pub struct Commit {
    /// Real bytes allocated in shadow storage.
    pub bytes: u64,
    /// Entries copied.
    pub files: u64,
    /// Live identities, by absolute path as seen from the root.
    pub origins: Origins,
    /// The provider used per volume (device number → `copy` or `reflink`).
    pub used: HashMap<u64, &'static str>,
    /// Entries not copied, with why (absolute paths as seen from the root).
    pub skipped: Vec<(PathBuf, String)>,
    /// The directory that stands for the root in the copy.
    pub root: PathBuf,
    /// For a snapshot, which keeps inodes and ctimes: the live device of every entry.
    pub live_device: Option<u64>,
    /// For a snapshot: when it was taken (wall clock, ns since the epoch; just before).
    pub taken_ns: Option<i64>,
    /// Bytes freed in a base copy by entries that changed or went away.
    pub freed: u64,
    /// Entries this commit copied that had changed less than [`SETTLED`] before it started
    /// (absolute paths as seen from the root).
    pub unsettled: Vec<PathBuf>,
    /// Entries looked at again outside the directories the journal named: forced, or another
    /// name of a multiply-linked file (absolute paths as seen from the root).
    pub looked_again: Vec<PathBuf>,
    /// False when `origins` is what the request's `previous` was (nothing added, changed or
    /// removed): a base's record of them need not be written again.
    pub origins_changed: bool,
    /// Refreshing by the journal: the paths whose origin this commit added, changed or removed
    /// (as seen from the root), what a base's record needs appended; `None` when `origins` was
    /// made anew.
    pub touched: Option<Vec<PathBuf>>,
}

impl Commit {
    /// The origins a later commit may keep, taken out of this commit: all but the
    /// [`unsettled`](Self::unsettled). `origins` is left empty, so that a map this commit made
    /// its own is not copied to remove them.
    pub fn take_settled_origins(&mut self) -> Origins {
        let origins = std::mem::take(&mut self.origins);
        without(origins, &self.unsettled)
    }

    /// [`take_settled_origins`](Self::take_settled_origins), leaving this commit's.
    pub fn settled_origins(&self) -> Origins {
        without(Arc::clone(&self.origins), &self.unsettled)
    }

    /// The live identities of the [`unsettled`](Self::unsettled) entries, which the settled
    /// origins leave out: for [`settle_by_journal`].
    pub fn unsettled_origins(&self) -> Vec<(PathBuf, Origin)> {
        self.unsettled.iter().filter_map(|path| Some((path.clone(), *self.origins.get(path.as_path())?))).collect()
    }
}

/// For a commit that follows the change journal, what becomes of the entries the copy before
/// it copied as they changed (`unsettled`, with their live identities then): a change since, in
/// the tick they were copied in, may not show in their times, but the journal names their
/// folder (or the entry itself, for a folder's own change). Those it named (`named`: folders,
/// as seen from the root) are returned, to be copied again whatever their metadata says; the
/// others are as they were copied, and go back into `previous` to be kept.
pub fn settle_by_journal(unsettled: Vec<(PathBuf, Origin)>, named: &[PathBuf], previous: &mut Origins) -> Vec<PathBuf> {
    let named: std::collections::HashSet<&Path> = named.iter().map(PathBuf::as_path).collect();
    let mut again = Vec::new();
    for (path, origin) in unsettled {
        if named.contains(path.as_path()) || path.parent().is_some_and(|parent| named.contains(parent)) {
            again.push(path);
        } else {
            Arc::make_mut(previous).insert(path.into(), origin);
        }
    }
    again
}

/// `origins` but `paths` (copied only when one of them is in it).
fn without(mut origins: Origins, paths: &[PathBuf]) -> Origins {
    if paths.iter().any(|path| origins.contains_key(path.as_path())) {
        let origins = Arc::make_mut(&mut origins);
        for path in paths {
            origins.remove(path.as_path());
        }
    }
    origins
}

/// Why a commit stopped.
#[derive(Debug)]
pub enum CommitError {
    /// The deadline passed.
    Timeout,
    /// The copy would pass its budget (bytes needed so far).
    Budget(u64),
    /// The storage's filesystem is full (bytes written so far).
    NoSpace(u64),
    /// Reflink was required and does not work here.
    Unsupported(PathBuf, String),
    /// Another I/O failure.
    Io(ShadowError),
    /// Stopped by a signal.
    Interrupted,
}

/// What a commit copies, where to, and within what.
#[derive(Debug)]
pub struct CommitRequest<'a> {
    /// The live root.
    pub root: &'a Path,
    /// The paths to copy, absolute as seen from `root`.
    pub paths: &'a [PathBuf],
    /// Where the mirrored tree goes (or the snapshot).
    pub dest: &'a Path,
    /// When the commit gives up ([`CommitError::Timeout`]).
    pub deadline: Instant,
    /// Bytes the copy may allocate ([`CommitError::Budget`]).
    pub budget: u64,
    /// Set from outside to stop ([`CommitError::Interrupted`]).
    pub interrupted: &'a std::sync::atomic::AtomicBool,
    /// Refreshing a base copy at `dest`: the live identities its entries were copied from.
    pub previous: Option<&'a Origins>,
    /// Absolute paths copied elsewhere (another volume's storage): not entered.
    pub skip: &'a [PathBuf],
    /// Refreshing a base copy that is up to date but for what the change journal saw: the
    /// directories where something changed since (absolute, as seen from `root`). Only those
    /// are looked at; `None` looks at every entry.
    pub changed: Option<&'a [PathBuf]>,
    /// With `changed`: for the directories the journal named by their entries, those entries'
    /// names (keyed as `changed` is): only they are looked at in those directories, which are
    /// not listed. A directory of `changed` not in it is looked at whole.
    pub names: Option<&'a crate::journal::EntryNames>,
    /// Files copied again whatever their metadata says (absolute, as seen from `root`): those
    /// mapped shared and writable, whose writes change neither their times nor the journal.
    pub forced: &'a [PathBuf],
    /// With `changed`: files whose link count the journal saw change through a name in another
    /// directory, by (device, inode): every name the base holds of them is looked at again.
    pub relinked: &'a [(u64, u64)],
    /// False when the caller reads the changed files live before the freeze: a refresh by the
    /// journal then brings folders, links and metadata up to date but copies no file's content.
    /// A file whose copy is out of date keeps it, its origin marked out of date (a ctime no file
    /// has), so that whatever meets it later copies it again (the commit in the freeze, a walk);
    /// a deleted file's copy stays with its origin forgotten; one new since is not made.
    pub contents: bool,
}

impl<'a> CommitRequest<'a> {
    /// A whole copy of `paths` from `root` into `dest`: no base to refresh, no journal, no
    /// budget; stopped by `deadline` or `interrupted` only.
    pub fn whole(
        root: &'a Path,
        paths: &'a [PathBuf],
        dest: &'a Path,
        deadline: Instant,
        interrupted: &'a std::sync::atomic::AtomicBool,
    ) -> CommitRequest<'a> {
        CommitRequest {
            root,
            paths,
            dest,
            deadline,
            budget: u64::MAX,
            interrupted,
            previous: None,
            skip: &[],
            changed: None,
            names: None,
            forced: &[],
            relinked: &[],
            contents: true,
        }
    }
}

/// How long before a copy an entry's ctime must lie for its copy to be trusted in the freeze:
/// timestamps are coarse (a clock tick; a second on some filesystems), so a file changed in the
/// tick it was copied in may change again without its ctime moving.
pub const SETTLED: Duration = Duration::from_secs(2);

/// Bytes a copy of `paths` would allocate (what the copy provider needs in shadow storage).
pub fn estimate(root: &Path, paths: &[PathBuf]) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = paths.iter().map(|p| root.join(p.strip_prefix("/").unwrap_or(p))).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    total
}

/// The file beside a base copy's tree that records the live identities it was made from.
pub fn origins_file(copy_dir: &Path) -> PathBuf {
    copy_dir.join("origins.json")
}

/// The file beside a base copy's tree that records where a kept change journal stood when the
/// copy was made, and the entries it copied as they changed.
pub fn journal_file(copy_dir: &Path) -> PathBuf {
    copy_dir.join("journal.json")
}

/// Where a kept journal stood when the base copy was made, and the entries not to trust.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BaseJournal {
    /// The journal's position.
    pub position: crate::journal::Position,
    /// Entries copied as they changed (absolute, as seen from the root): looked at again.
    pub unsettled: Vec<PathBuf>,
    /// The files changed before it was made were read live, not copied: the copy holds older
    /// ones where the journal named nothing since (their origins say so, see
    /// [`CommitRequest::contents`]). A set that reads from the copy alone compares every entry.
    #[serde(default)]
    pub read_live: bool,
}

/// Where a kept journal stood when the base copy was made (none: not known).
pub fn read_base_journal(copy_dir: &Path) -> Option<BaseJournal> {
    serde_json::from_slice(&std::fs::read(journal_file(copy_dir)).ok()?).ok()
}

/// Records where a kept journal stood when the base copy was made, or that it is not known.
pub fn write_base_journal(copy_dir: &Path, journal: Option<&BaseJournal>) -> std::io::Result<()> {
    let path = journal_file(copy_dir);
    let Some(journal) = journal else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    };
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec(journal).expect("journal encodes"))?;
    std::fs::rename(&temp, &path)
}

/// The file beside a base copy's tree that records, line by line, how the identities changed
/// since `origins.json` was written whole: a backup that changed a few files appends those, not
/// a record of every entry again (7 MB of JSON for 59,000 entries, a third of a freeze's step).
pub fn origins_log_file(copy_dir: &Path) -> PathBuf {
    copy_dir.join("origins.log")
}

/// What a base copy's records of origins were when they were read or written: the identity
/// (device, inode, size, mtime) of `origins.json` and of `origins.log` (none when there is none).
pub type RecordIdentity = ([i64; 4], Option<[i64; 4]>);

/// The records of origins this process read or wrote last, by file and what the files were:
/// the agent reads its base copy's for every backup, and parsing it was most of a backup with
/// nothing changed at 500,000 files. A record rewritten or appended to in any way is read again.
static KNOWN_ORIGINS: Mutex<Vec<(PathBuf, RecordIdentity, Origins)>> = Mutex::new(Vec::new());

/// How many records [`KNOWN_ORIGINS`] keeps (the base copies of a few volumes).
const KNOWN_ORIGINS_MAX: usize = 4;

fn file_identity(path: &Path) -> Option<[i64; 4]> {
    let meta = std::fs::metadata(path).ok()?;
    Some([meta.dev() as i64, meta.ino() as i64, meta.size() as i64, meta.mtime() * 1_000_000_000 + meta.mtime_nsec()])
}

/// The identity of a base copy's records of origins (none without `origins.json`).
fn record_identity(copy_dir: &Path) -> Option<RecordIdentity> {
    Some((file_identity(&origins_file(copy_dir))?, file_identity(&origins_log_file(copy_dir))))
}

fn know_origins(copy_dir: &Path, identity: RecordIdentity, origins: &Origins) {
    let path = origins_file(copy_dir);
    let mut known = KNOWN_ORIGINS.lock().expect("origins lock");
    known.retain(|(known, ..)| *known != path);
    if known.len() >= KNOWN_ORIGINS_MAX {
        known.remove(0);
    }
    known.push((path, identity, Arc::clone(origins)));
}

/// The identities a base copy was made from (none when unreadable: everything is copied).
pub fn read_origins(copy_dir: &Path) -> Option<Origins> {
    read_origins_as(copy_dir).map(|(origins, _)| origins)
}

/// [`read_origins`], with what the records were when read: a commit that changes a few of them
/// appends those to the log ([`write_origins`]) only where the records are still what it read.
/// A line of the log that does not parse (a write cut short, a damaged disk) makes the whole
/// record unreadable: a record that is not the copy's could keep a file the copy does not hold.
pub fn read_origins_as(copy_dir: &Path) -> Option<(Origins, RecordIdentity)> {
    let identity = record_identity(copy_dir)?;
    let path = origins_file(copy_dir);
    let known = KNOWN_ORIGINS.lock().expect("origins lock");
    if let Some((.., origins)) = known.iter().find(|(known, id, _)| *known == path && *id == identity) {
        return Some((Arc::clone(origins), identity));
    }
    drop(known);
    let list: Vec<(String, Origin)> = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    let mut origins: HashMap<Arc<Path>, Origin> =
        list.into_iter().map(|(path, origin)| (Arc::from(Path::new(&path)), origin)).collect();
    if identity.1.is_some() {
        let log = std::fs::read(origins_log_file(copy_dir)).ok()?;
        for line in log.split(|&b| b == b'\n').filter(|line| !line.is_empty()) {
            let (path, origin): (String, Option<Origin>) = serde_json::from_slice(line).ok()?;
            match origin {
                Some(origin) => origins.insert(Arc::from(Path::new(&path)), origin),
                None => origins.remove(Path::new(&path)),
            };
        }
    }
    let origins = Arc::new(origins);
    // Kept only when the files did not change while they were read.
    if record_identity(copy_dir) == Some(identity) {
        know_origins(copy_dir, identity, &origins);
    }
    Some((origins, identity))
}

/// Records the identities a base copy was made from. With `changed` — the records as they were
/// read, and the paths whose origin changed since — and the records still that, and their log
/// under half the size of the whole, those paths are appended to the log (their origin now, or
/// `null`), a few hundred kilobytes where the whole is megabytes; else the whole is written
/// anew. Paths that are not UTF-8 are left out, so their entries are copied again next time.
pub fn write_origins(
    copy_dir: &Path,
    origins: &Origins,
    changed: Option<(RecordIdentity, &[PathBuf])>,
) -> std::io::Result<()> {
    let log_path = origins_log_file(copy_dir);
    let appendable = changed.filter(|((whole, log), _)| {
        record_identity(copy_dir) == Some((*whole, *log)) && log.map_or(0, |log| log[2]) < whole[2] / ORIGINS_LOG_SHARE
    });
    if let Some((_, paths)) = appendable {
        let mut text = Vec::with_capacity(paths.len() * 128);
        let mut all = true;
        let mut written = std::collections::HashSet::new();
        for path in paths {
            let Some(shown) = path.to_str() else {
                all = false;
                continue;
            };
            if written.insert(path) {
                let line: (&str, Option<&Origin>) = (shown, origins.get(path.as_path()));
                serde_json::to_writer(&mut text, &line).expect("origins encode");
                text.push(b'\n');
            }
        }
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new().append(true).create(true).open(&log_path)?;
        log.write_all(&text)?;
        drop(log);
        // The tests' builds read the records back as another process would: a path whose
        // origin changed without being named in `changed` would leave them wrong.
        #[cfg(debug_assertions)]
        if all {
            KNOWN_ORIGINS.lock().expect("origins lock").retain(|(known, ..)| *known != origins_file(copy_dir));
            let read = read_origins(copy_dir);
            assert!(read.as_deref() == Some(&**origins), "the log of origins in {} is not the map", copy_dir.display());
        }
        if let Some(identity) = record_identity(copy_dir).filter(|_| all) {
            know_origins(copy_dir, identity, origins);
        }
        return Ok(());
    }
    // The log goes first: a record written whole with an older log beside it would be misread.
    match std::fs::remove_file(&log_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let list: Vec<(&str, &Origin)> =
        origins.iter().filter_map(|(path, origin)| Some((path.to_str()?, origin))).collect();
    let whole = list.len() == origins.len();
    let path = origins_file(copy_dir);
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec(&list).expect("origins encode"))?;
    std::fs::rename(&temp, &path)?;
    // What the next read of it would give: this map, unless a path was left out.
    if let Some(identity) = record_identity(copy_dir).filter(|_| whole) {
        know_origins(copy_dir, identity, origins);
    }
    Ok(())
}

/// The log is written whole into the record again once it is this share of it (one part in …).
const ORIGINS_LOG_SHARE: i64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(inode: u64) -> Origin {
        Origin { device: 1, inode, ctime_ns: inode as i64 * 10, links: 1 }
    }

    /// As another process finds the records: not from this one's memory.
    fn read_afresh(dir: &Path) -> Option<Origins> {
        KNOWN_ORIGINS.lock().unwrap().clear();
        read_origins(dir)
    }

    /// A record changed a little is appended to (the paths that changed only), read back whole
    /// by a process that did not write it; written whole again once the log is half its size
    /// or the records are not what was read; unreadable, not misread, with a line cut short.
    #[test]
    fn the_record_of_origins_logs_what_changed_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let paths =
            |range: std::ops::Range<u64>| range.map(|n| PathBuf::from(format!("/data/f{n}"))).collect::<Vec<_>>();
        let mut origins: Origins =
            Arc::new(paths(0..1000).into_iter().map(Arc::from).zip((0..1000).map(origin)).collect());
        write_origins(dir, &origins, None).unwrap();
        assert!(!origins_log_file(dir).exists(), "a first record is written whole");
        let whole_size = std::fs::metadata(origins_file(dir)).unwrap().len();
        // Changed, added and removed entries: lines in the log.
        let (_, read) = read_origins_as(dir).unwrap();
        let map = Arc::make_mut(&mut origins);
        map.insert(Path::new("/data/f1").into(), origin(5001));
        map.insert(Path::new("/data/new").into(), origin(5002));
        map.remove(Path::new("/data/f2"));
        let changed = [
            PathBuf::from("/data/f1"),
            PathBuf::from("/data/new"),
            PathBuf::from("/data/f2"),
            PathBuf::from("/data/f1"),
        ];
        write_origins(dir, &origins, Some((read, &changed))).unwrap();
        assert_eq!(std::fs::metadata(origins_file(dir)).unwrap().len(), whole_size, "rewritten whole");
        let log = std::fs::read_to_string(origins_log_file(dir)).unwrap();
        assert_eq!(log.lines().count(), 3, "{log}");
        assert_eq!(read_afresh(dir).as_deref(), Some(&*origins), "not what was written");
        // Records changed since they were read (another writer): written whole.
        let map = Arc::make_mut(&mut origins);
        map.insert(Path::new("/data/f3").into(), origin(6003));
        write_origins(dir, &origins, Some((read, &[PathBuf::from("/data/f3")]))).unwrap();
        assert!(!origins_log_file(dir).exists(), "appended to records it did not read");
        assert_eq!(read_afresh(dir).as_deref(), Some(&*origins));
        // Past half the record's size, the log is folded into it.
        let mut folded = false;
        for round in 0..5 {
            let (_, read) = read_origins_as(dir).unwrap();
            let map = Arc::make_mut(&mut origins);
            for path in paths(0..300) {
                map.insert(path.into(), origin(10_000 * (round + 1)));
            }
            write_origins(dir, &origins, Some((read, &paths(0..300)))).unwrap();
            assert_eq!(read_afresh(dir).as_deref(), Some(&*origins), "round {round}");
            let log = std::fs::metadata(origins_log_file(dir)).map_or(0, |m| m.len());
            assert!(log < whole_size, "round {round}: a log of {log} bytes beside a record of {whole_size}");
            folded |= log == 0;
        }
        assert!(folded, "the log was never folded into the record");
        // A line cut short: the record is unreadable (everything is copied again).
        write_origins(dir, &origins, None).unwrap();
        let (_, read) = read_origins_as(dir).unwrap();
        Arc::make_mut(&mut origins).insert(Path::new("/data/f7").into(), origin(7777));
        write_origins(dir, &origins, Some((read, &[PathBuf::from("/data/f7")]))).unwrap();
        let log = std::fs::read(origins_log_file(dir)).unwrap();
        std::fs::write(origins_log_file(dir), &log[..log.len() - 5]).unwrap();
        assert_eq!(read_afresh(dir), None, "a damaged log was read");
    }
}
