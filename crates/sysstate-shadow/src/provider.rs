//! Providers: code that makes point-in-time copies of paths during the freeze.
//!
//! - `copy` works everywhere: it copies each file, with all its metadata, into shadow storage.
//! - `reflink` clones each file's extents with `FICLONE` (XFS, btrfs): near-zero time and space.
//! - `auto` uses reflink on each volume where it works and copy elsewhere, and says which.
//!
//! A copy has new inode numbers and ctimes. So that versions made from copies are identical to
//! versions of the live files (same trees, same dedup, unchanged files recognised), the commit
//! records each entry's **origin** — device, inode and ctime of the live file — and the archiver
//! records those instead of the copy's.

use crate::error::ShadowError;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The live identity of a copied entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// `st_dev` of the live file.
    pub device: u64,
    /// `st_ino` of the live file.
    pub inode: u64,
    /// `st_ctime` of the live file, ns.
    pub ctime_ns: i64,
}

impl Origin {
    /// The identity of a live entry.
    pub fn of(meta: &std::fs::Metadata) -> Origin {
        Origin { device: meta.dev(), inode: meta.ino(), ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec() }
    }
}

/// How a provider was asked to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    /// A btrfs snapshot where the root is a btrfs subvolume on the storage's filesystem, else
    /// reflink where it works, else copy.
    Auto,
    /// Always copy.
    Copy,
    /// Reflink or fail.
    Reflink,
    /// A read-only btrfs snapshot of the subvolume holding the root, or fail.
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
}

/// The providers this build has, with what they need (for `sysstate providers`).
pub const PROVIDERS: &[(&str, &str)] = &[
    ("copy", "any filesystem; copies the components' files into shadow storage during the freeze"),
    ("reflink", "XFS or btrfs, shadow storage on the same filesystem; clones extents with FICLONE"),
    ("btrfs", "the root in a btrfs subvolume, shadow storage on the same filesystem, and `btrfs` (btrfs-progs); a read-only snapshot"),
];

/// `statfs` magic of btrfs.
const BTRFS_MAGIC: i64 = 0x9123_683E;
/// The inode number of every btrfs subvolume's root directory.
const BTRFS_SUBVOLUME_ROOT_INODE: u64 = 256;

/// True when `path` is on btrfs.
pub fn is_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == BTRFS_MAGIC)
}

/// The root of the btrfs subvolume holding `path`.
fn subvolume_root(path: &Path) -> Option<PathBuf> {
    let device = std::fs::metadata(path).ok()?.dev();
    path.ancestors()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.dev() == device && m.ino() == BTRFS_SUBVOLUME_ROOT_INODE))
        .map(Path::to_path_buf)
}

/// True when `dir` is a btrfs subvolume (a snapshot), which only `btrfs subvolume delete` removes.
pub fn is_subvolume(dir: &Path) -> bool {
    is_btrfs(dir) && std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.ino() == BTRFS_SUBVOLUME_ROOT_INODE)
}

/// Deletes a snapshot made by the btrfs provider.
pub fn delete_subvolume(dir: &Path) -> std::io::Result<()> {
    let output = std::process::Command::new("btrfs").args(["subvolume", "delete"]).arg(dir).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "btrfs subvolume delete: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// A read-only snapshot of the subvolume holding `root`, at `dest`.
fn snapshot(root: &Path, dest: &Path, deadline: Instant) -> Result<Commit, CommitError> {
    let root = std::fs::canonicalize(root).map_err(|e| CommitError::Io(ShadowError::io(root, e)))?;
    let subvolume = subvolume_root(&root)
        .ok_or_else(|| CommitError::Unsupported(root.clone(), "not in a btrfs subvolume".into()))?;
    let live_device = std::fs::metadata(&root).map_err(|e| CommitError::Io(ShadowError::io(&root, e)))?.dev();
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CommitError::Io(ShadowError::io(parent, e)))?;
    }
    // A base copy left by the copy provider gives way to the snapshot.
    if std::fs::symlink_metadata(dest).is_ok() {
        let removed = if is_subvolume(dest) { delete_subvolume(dest) } else { std::fs::remove_dir_all(dest) };
        removed.map_err(|e| CommitError::Io(ShadowError::io(dest, e)))?;
    }
    let taken_ns = sysstate_types::time::now_ns();
    let output = std::process::Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(&subvolume)
        .arg(dest)
        .output()
        .map_err(|e| {
            CommitError::Unsupported(subvolume.clone(), format!("cannot run `btrfs` (install btrfs-progs): {e}"))
        })?;
    if !output.status.success() {
        return Err(CommitError::Unsupported(subvolume, String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    if Instant::now() > deadline {
        return Err(CommitError::Timeout);
    }
    let inner = root.strip_prefix(&subvolume).unwrap_or(Path::new(""));
    Ok(Commit {
        root: dest.join(inner),
        live_device: Some(live_device),
        taken_ns: Some(taken_ns),
        used: HashMap::from([(live_device, "btrfs")]),
        ..Commit::default()
    })
}

/// What a commit made.
#[derive(Debug, Default)]
pub struct Commit {
    /// Real bytes allocated in shadow storage.
    pub bytes: u64,
    /// Entries copied.
    pub files: u64,
    /// Live identities, by absolute path as seen from the root.
    pub origins: HashMap<PathBuf, Origin>,
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
}

impl Commit {
    /// The origins whose copies a later commit may keep: all but the [`unsettled`](Self::unsettled).
    pub fn settled_origins(&self) -> HashMap<PathBuf, Origin> {
        let mut origins = self.origins.clone();
        for path in &self.unsettled {
            origins.remove(path);
        }
        origins
    }
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

struct Copier<'a> {
    req: &'a CommitRequest<'a>,
    out: Commit,
    links: HashMap<(u64, u64), PathBuf>,
    dirs: Vec<(PathBuf, std::fs::Metadata)>,
    reflink_works: HashMap<u64, bool>,
    /// Entries whose ctime is later than this (ns since the epoch) are unsettled when copied.
    settled_before_ns: i64,
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
    /// The provider asked for.
    pub choice: ProviderChoice,
    /// When the commit gives up ([`CommitError::Timeout`]).
    pub deadline: Instant,
    /// Bytes the copy may allocate ([`CommitError::Budget`]).
    pub budget: u64,
    /// Set from outside to stop ([`CommitError::Interrupted`]).
    pub interrupted: &'a std::sync::atomic::AtomicBool,
    /// Refreshing a base copy at `dest`: the live identities its entries were copied from.
    pub previous: Option<&'a HashMap<PathBuf, Origin>>,
    /// Absolute paths copied elsewhere (another volume's storage): not entered.
    pub skip: &'a [PathBuf],
}

/// Copies the request's `paths` from under `root` into `dest`, mirrored, or takes a btrfs
/// snapshot there.
///
/// With `previous` (the identities a base copy at `dest` was made from), `dest` is refreshed
/// in place: an entry whose live identity, type, size and mtime are what the base holds is kept
/// as it is; everything else is copied again, and entries that went away are removed. The
/// freeze then costs a `stat` of each unchanged file instead of a copy.
pub fn commit(req: &CommitRequest<'_>) -> Result<Commit, CommitError> {
    if let Some(ms) = sysstate_types::failpoint("COMMIT_DELAY_MS") {
        // Failpoint for the tests: a provider commit that takes this long.
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if takes_snapshot(req.root, req.dest, req.choice) {
        return snapshot(req.root, req.dest, req.deadline);
    }
    copy_tree(req)
}

/// True when a commit of `root` into `dest` with `choice` takes a btrfs snapshot rather than
/// copying entries.
pub fn takes_snapshot(root: &Path, dest: &Path, choice: ProviderChoice) -> bool {
    let btrfs_works = || {
        is_btrfs(root) && dest.ancestors().find(|p| p.exists()).is_some_and(|p| is_btrfs(p) && same_filesystem(root, p))
    };
    choice == ProviderChoice::Btrfs || (choice == ProviderChoice::Auto && btrfs_works())
}

/// How long before a copy an entry's ctime must lie for its copy to be trusted in the freeze:
/// timestamps are coarse (a clock tick; a second on some filesystems), so a file changed in the
/// tick it was copied in may change again without its ctime moving.
pub const SETTLED: Duration = Duration::from_secs(2);

/// Brings a base copy up to date before the freeze, while everything runs, so that the commit
/// in the freeze finds it current and copies only what changed in between: the first backup's
/// freeze then costs a `stat` per entry instead of a clone or a copy per file. `None` when the
/// commit takes a snapshot (there is nothing to prepare).
///
/// Hand the commit in the freeze [`Commit::settled_origins`], not `origins`: an entry copied
/// while it was being written is copied again in the freeze.
pub fn precopy(req: &CommitRequest<'_>) -> Option<Result<Commit, CommitError>> {
    if takes_snapshot(req.root, req.dest, req.choice) {
        return None;
    }
    Some(copy_tree(req))
}

/// [`commit`] by copying (or cloning) entries into a mirrored tree.
fn copy_tree(req: &CommitRequest<'_>) -> Result<Commit, CommitError> {
    let (root, dest) = (req.root, req.dest);
    let mut copier = Copier {
        req,
        out: Commit::default(),
        links: HashMap::new(),
        dirs: Vec::new(),
        reflink_works: HashMap::new(),
        settled_before_ns: sysstate_types::time::now_ns() - SETTLED.as_nanos() as i64,
    };
    std::fs::create_dir_all(dest).map_err(|e| CommitError::Io(ShadowError::io(dest, e)))?;
    let mut done: Vec<&Path> = Vec::new();
    for path in req.paths {
        let relative = path.strip_prefix("/").unwrap_or(path);
        if done.iter().any(|d| relative.starts_with(d)) {
            continue; // nested in a path already copied
        }
        done.push(relative);
        // The folders above the path, with their metadata.
        let mut above = PathBuf::new();
        for component in relative.parent().into_iter().flat_map(|p| p.components()) {
            above.push(component);
            let target = dest.join(&above);
            if copier.dirs.iter().any(|(d, _)| *d == above) {
                continue;
            }
            let meta = std::fs::symlink_metadata(root.join(&above))
                .map_err(|e| CommitError::Io(ShadowError::io(root.join(&above), e)))?;
            if !std::fs::symlink_metadata(&target).is_ok_and(|t| t.is_dir()) {
                copier.remove(&target)?;
                std::fs::create_dir(&target).map_err(|e| copier.io_error(&target, e))?;
            }
            copier.note_origin(&above, &meta);
            copier.dirs.push((above.clone(), meta));
        }
        match std::fs::symlink_metadata(root.join(relative)) {
            Ok(meta) => copier.entry(relative, meta)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CommitError::Io(ShadowError::io(root.join(relative), e))),
        }
    }
    // Folders last, deepest first: creating their entries changed their times.
    for (relative, meta) in copier.dirs.iter().rev() {
        apply_metadata(&root.join(relative), &dest.join(relative), meta)
            .map_err(|e| CommitError::Io(ShadowError::io(dest.join(relative), e)))?;
    }
    copier.out.root = dest.to_path_buf();
    Ok(copier.out)
}

/// True when both paths are on one filesystem (`statfs` fsid).
fn same_filesystem(a: &Path, b: &Path) -> bool {
    match (rustix::fs::statfs(a), rustix::fs::statfs(b)) {
        (Ok(a), Ok(b)) => format!("{:?}", a.f_fsid) == format!("{:?}", b.f_fsid),
        _ => false,
    }
}

impl Copier<'_> {
    fn io_error(&self, path: &Path, error: std::io::Error) -> CommitError {
        if error.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            CommitError::NoSpace(self.out.bytes)
        } else {
            CommitError::Io(ShadowError::io(path, error))
        }
    }

    fn note_origin(&mut self, relative: &Path, meta: &std::fs::Metadata) {
        self.out.origins.insert(Path::new("/").join(relative), Origin::of(meta));
    }

    /// Counts what an entry added to shadow storage: its allocated bytes, or nothing for a
    /// reflinked file, whose extents are shared with the live file.
    fn charge(&mut self, path: &Path, reflinked: bool) -> Result<(), CommitError> {
        let allocated =
            if reflinked { 0 } else { std::fs::symlink_metadata(path).map(|m| m.blocks() * 512).unwrap_or(0) };
        self.out.bytes += allocated;
        self.out.files += 1;
        self.check_limits()
    }

    /// The budget, the deadline and the stop flag, checked after every entry.
    fn check_limits(&mut self) -> Result<(), CommitError> {
        if self.out.bytes > self.req.budget {
            return Err(CommitError::Budget(self.out.bytes));
        }
        if Instant::now() > self.req.deadline {
            return Err(CommitError::Timeout);
        }
        if self.req.interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CommitError::Interrupted);
        }
        Ok(())
    }

    /// Removes whatever stands at `target` in the copy, counting the bytes freed.
    fn remove(&mut self, target: &Path) -> Result<(), CommitError> {
        let Ok(meta) = std::fs::symlink_metadata(target) else { return Ok(()) };
        if meta.is_dir() {
            for entry in std::fs::read_dir(target).map_err(|e| CommitError::Io(ShadowError::io(target, e)))?.flatten() {
                self.remove(&entry.path())?;
            }
            std::fs::remove_dir(target).map_err(|e| CommitError::Io(ShadowError::io(target, e)))?;
        } else {
            std::fs::remove_file(target).map_err(|e| CommitError::Io(ShadowError::io(target, e)))?;
        }
        if meta.nlink() <= 1 {
            self.out.freed += meta.blocks() * 512;
        }
        Ok(())
    }

    /// True when the base copy already holds this live entry as it is now.
    fn unchanged(&self, relative: &Path, live: &std::fs::Metadata, copied: &std::fs::Metadata) -> bool {
        let Some(previous) = self.req.previous else { return false };
        previous.get(&Path::new("/").join(relative)) == Some(&Origin::of(live))
            && live.file_type() == copied.file_type()
            && (live.is_dir()
                || (live.size() == copied.size()
                    && live.mtime() == copied.mtime()
                    && live.mtime_nsec() == copied.mtime_nsec()))
    }

    fn entry(&mut self, relative: &Path, meta: std::fs::Metadata) -> Result<(), CommitError> {
        if self.req.skip.iter().any(|s| s.strip_prefix("/").unwrap_or(s) == relative) {
            return Ok(());
        }
        let source = self.req.root.join(relative);
        let target = self.req.dest.join(relative);
        let file_type = meta.file_type();
        let copied = std::fs::symlink_metadata(&target).ok();
        let keep = copied.as_ref().is_some_and(|copied| self.unchanged(relative, &meta, copied));
        self.note_origin(relative, &meta);
        if file_type.is_dir() {
            // A folder is kept when it is one already; its entries are compared one by one.
            let existed = copied.as_ref().is_some_and(|c| c.is_dir());
            if !existed {
                self.remove(&target)?;
                std::fs::create_dir(&target).map_err(|e| self.io_error(&target, e))?;
            }
            self.dirs.push((relative.to_path_buf(), meta));
            let mut names: Vec<_> = std::fs::read_dir(&source)
                .map_err(|e| CommitError::Io(ShadowError::io(&source, e)))?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            if existed {
                // Entries of the base that are gone from the live folder.
                let gone: Vec<_> = std::fs::read_dir(&target)
                    .map_err(|e| CommitError::Io(ShadowError::io(&target, e)))?
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .filter(|name| names.binary_search(name).is_err())
                    .collect();
                for name in gone {
                    self.remove(&target.join(name))?;
                }
            }
            for name in names {
                let child = relative.join(&name);
                match std::fs::symlink_metadata(self.req.root.join(&child)) {
                    Ok(child_meta) => self.entry(&child, child_meta)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(CommitError::Io(ShadowError::io(self.req.root.join(&child), e))),
                }
            }
            return if existed { self.check_limits() } else { self.charge(&target, false) };
        }
        if keep {
            if file_type.is_file() && !self.out.used.contains_key(&meta.dev()) {
                let provider = self.provider_on(&source, &target, meta.dev());
                self.out.used.insert(meta.dev(), provider);
            }
            if file_type.is_file() && meta.nlink() > 1 {
                self.links.entry((meta.dev(), meta.ino())).or_insert(target);
            }
            return self.check_limits();
        }
        if copied.is_some() {
            self.remove(&target)?;
        }
        if Origin::of(&meta).ctime_ns >= self.settled_before_ns {
            self.out.unsettled.push(Path::new("/").join(relative));
        }
        let mut reflinked = false;
        if file_type.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                    std::fs::hard_link(first, &target).map_err(|e| self.io_error(&target, e))?;
                    return Ok(());
                }
                self.links.insert((meta.dev(), meta.ino()), target.clone());
            }
            reflinked = self.copy_file(&source, &target, &meta)?;
        } else if file_type.is_symlink() {
            let link = std::fs::read_link(&source).map_err(|e| CommitError::Io(ShadowError::io(&source, e)))?;
            std::os::unix::fs::symlink(link, &target).map_err(|e| self.io_error(&target, e))?;
        } else if file_type.is_socket() {
            self.out.skipped.push((
                Path::new("/").join(relative),
                "is a socket: skipped (sockets are recreated by the programs that own them)".into(),
            ));
            return Ok(());
        } else {
            let kind = if file_type.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else if file_type.is_block_device() {
                rustix::fs::FileType::BlockDevice
            } else {
                rustix::fs::FileType::Fifo
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                kind,
                rustix::fs::Mode::from_raw_mode(meta.mode() & 0o777),
                meta.rdev(),
            )
            .map_err(|e| self.io_error(&target, e.into()))?;
        }
        apply_metadata(&source, &target, &meta).map_err(|e| CommitError::Io(ShadowError::io(&target, e)))?;
        self.charge(&target, reflinked)
    }

    /// Which provider copies files of `device` here: `reflink` when cloning `source` beside
    /// `target` works (tried once per device), else `copy`. For the record of a commit that
    /// kept every file it met.
    fn provider_on(&mut self, source: &Path, target: &Path, device: u64) -> &'static str {
        if self.req.choice == ProviderChoice::Copy {
            return "copy";
        }
        let works = *self.reflink_works.entry(device).or_insert_with(|| {
            let probe = target.with_file_name(".sysstate-reflink-probe");
            let cloned = File::open(source).and_then(|input| {
                let output = File::create(&probe)?;
                rustix::fs::ioctl_ficlone(&output, &input).map_err(std::io::Error::from)
            });
            let _ = std::fs::remove_file(&probe);
            cloned.is_ok()
        });
        if works {
            "reflink"
        } else {
            "copy"
        }
    }

    /// Copies a file's content; true when it was reflinked.
    fn copy_file(&mut self, source: &Path, target: &Path, meta: &std::fs::Metadata) -> Result<bool, CommitError> {
        let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOATIME).bits() as i32;
        let input = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(source)
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(source)
            })
            .map_err(|e| CommitError::Io(ShadowError::io(source, e)))?;
        let output = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map_err(|e| self.io_error(target, e))?;
        let device = meta.dev();
        if self.req.choice != ProviderChoice::Copy && *self.reflink_works.get(&device).unwrap_or(&true) {
            match rustix::fs::ioctl_ficlone(&output, &input) {
                Ok(()) => {
                    self.reflink_works.insert(device, true);
                    self.out.used.insert(device, "reflink");
                    return Ok(true);
                }
                Err(error) if self.req.choice == ProviderChoice::Reflink => {
                    return Err(CommitError::Unsupported(source.to_path_buf(), error.to_string()));
                }
                Err(_) => {
                    self.reflink_works.insert(device, false);
                }
            }
        }
        self.out.used.insert(device, "copy");
        copy_data(&input, &output, meta).map_err(|e| self.io_error(target, e))?;
        Ok(false)
    }
}

/// Copies content, keeping holes as holes.
fn copy_data(input: &File, output: &File, meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let size = meta.size();
    let extents = if meta.blocks() * 512 < size { sysstate_fs::data_extents(input, size)? } else { None };
    let Some(extents) = extents else {
        let (mut reader, mut writer) = (input, output);
        std::io::copy(&mut reader, &mut writer)?;
        return Ok(());
    };
    let mut buffer = vec![0u8; 1 << 20];
    for (start, length) in extents {
        let mut at = start;
        while at < start + length {
            let want = buffer.len().min((start + length - at) as usize);
            let n = input.read_at(&mut buffer[..want], at)?;
            if n == 0 {
                break;
            }
            output.write_all_at(&buffer[..n], at)?;
            at += n as u64;
        }
    }
    output.set_len(size)
}

/// Owner, xattrs (read from `source`), mode and times of `meta` onto `target` (neither is
/// followed through a final symlink).
fn apply_metadata(source: &Path, target: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    let is_symlink = meta.file_type().is_symlink();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::lchown(target, Some(meta.uid()), Some(meta.gid()))?;
    }
    // After chown, which clears file capabilities.
    sysstate_fs::write_xattrs(target, &sysstate_fs::read_xattrs(source)?, is_symlink)?;
    if !is_symlink {
        std::fs::set_permissions(target, std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777))?;
    }
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: meta.atime(), tv_nsec: meta.atime_nsec() },
        last_modification: rustix::fs::Timespec { tv_sec: meta.mtime(), tv_nsec: meta.mtime_nsec() },
    };
    rustix::fs::utimensat(rustix::fs::CWD, target, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

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

/// The identities a base copy was made from (none when unreadable: everything is copied).
pub fn read_origins(copy_dir: &Path) -> Option<HashMap<PathBuf, Origin>> {
    let bytes = std::fs::read(origins_file(copy_dir)).ok()?;
    let list: Vec<(String, Origin)> = serde_json::from_slice(&bytes).ok()?;
    Some(list.into_iter().map(|(path, origin)| (PathBuf::from(path), origin)).collect())
}

/// Records the identities a base copy was made from. Paths that are not UTF-8 are left out,
/// so their entries are copied again next time.
pub fn write_origins(copy_dir: &Path, origins: &HashMap<PathBuf, Origin>) -> std::io::Result<()> {
    let list: Vec<(&str, &Origin)> =
        origins.iter().filter_map(|(path, origin)| Some((path.to_str()?, origin))).collect();
    let path = origins_file(copy_dir);
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec(&list).expect("origins encode"))?;
    std::fs::rename(&temp, &path)
}
