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
/// copied only when something in it changes (`Arc::make_mut`).
pub type Origins = Arc<HashMap<PathBuf, Origin>>;

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
    /// Entries this commit copied (absolute paths as seen from the root): a refresh by the
    /// journal after it looks at each again, since it may have copied them while they changed.
    pub copied: Vec<PathBuf>,
    /// False when `origins` is what the request's `previous` was (nothing added, changed or
    /// removed): a base's record of them need not be written again.
    pub origins_changed: bool,
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
        self.unsettled.iter().filter_map(|path| Some((path.clone(), *self.origins.get(path)?))).collect()
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
            Arc::make_mut(previous).insert(path, origin);
        }
    }
    again
}

/// `origins` but `paths` (copied only when one of them is in it).
fn without(mut origins: Origins, paths: &[PathBuf]) -> Origins {
    if paths.iter().any(|path| origins.contains_key(path)) {
        let origins = Arc::make_mut(&mut origins);
        for path in paths {
            origins.remove(path);
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
    /// With `changed`: entries looked at again besides the directories named (compared, and
    /// copied again when they changed): what the copy before this one copied while everything
    /// ran.
    pub again: &'a [PathBuf],
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
            again: &[],
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

/// The records of origins this process read or wrote last, by file and what the file was
/// (device, inode, size, mtime): the agent reads its base copy's for every backup, and parsing
/// it was most of a backup with nothing changed at 500,000 files. A record rewritten (a new
/// file renamed in place) or changed in any way is read again.
static KNOWN_ORIGINS: Mutex<Vec<(PathBuf, [i64; 4], Origins)>> = Mutex::new(Vec::new());

/// How many records [`KNOWN_ORIGINS`] keeps (the base copies of a few volumes).
const KNOWN_ORIGINS_MAX: usize = 4;

fn file_identity(path: &Path) -> Option<[i64; 4]> {
    let meta = std::fs::metadata(path).ok()?;
    Some([meta.dev() as i64, meta.ino() as i64, meta.size() as i64, meta.mtime() * 1_000_000_000 + meta.mtime_nsec()])
}

fn know_origins(path: &Path, identity: [i64; 4], origins: &Origins) {
    let mut known = KNOWN_ORIGINS.lock().expect("origins lock");
    known.retain(|(known, ..)| known != path);
    if known.len() >= KNOWN_ORIGINS_MAX {
        known.remove(0);
    }
    known.push((path.to_path_buf(), identity, Arc::clone(origins)));
}

/// The identities a base copy was made from (none when unreadable: everything is copied).
pub fn read_origins(copy_dir: &Path) -> Option<Origins> {
    let path = origins_file(copy_dir);
    let identity = file_identity(&path)?;
    let known = KNOWN_ORIGINS.lock().expect("origins lock");
    if let Some((.., origins)) = known.iter().find(|(known, id, _)| *known == path && *id == identity) {
        return Some(Arc::clone(origins));
    }
    drop(known);
    let bytes = std::fs::read(&path).ok()?;
    let list: Vec<(String, Origin)> = serde_json::from_slice(&bytes).ok()?;
    let origins: Origins = Arc::new(list.into_iter().map(|(path, origin)| (PathBuf::from(path), origin)).collect());
    // Kept only when the file did not change while it was read.
    if file_identity(&path) == Some(identity) {
        know_origins(&path, identity, &origins);
    }
    Some(origins)
}

/// Records the identities a base copy was made from. Paths that are not UTF-8 are left out,
/// so their entries are copied again next time.
pub fn write_origins(copy_dir: &Path, origins: &Origins) -> std::io::Result<()> {
    let list: Vec<(&str, &Origin)> =
        origins.iter().filter_map(|(path, origin)| Some((path.to_str()?, origin))).collect();
    let whole = list.len() == origins.len();
    let path = origins_file(copy_dir);
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec(&list).expect("origins encode"))?;
    std::fs::rename(&temp, &path)?;
    // What the next read of it would give: this map, unless a path was left out.
    if let Some(identity) = file_identity(&path).filter(|_| whole) {
        know_origins(&path, identity, origins);
    }
    Ok(())
}
