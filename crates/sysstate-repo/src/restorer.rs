//! The restorer: a version's trees back into files, with every piece of metadata.
//!
//! Safety by construction: every file is opened or created relative to a directory handle that
//! was itself opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the restore root,
//! and every name has passed [`crate::tree::is_safe_name`] when its tree was decoded. A hostile
//! repository can therefore not make restore write outside the root, whether with `..` names or
//! with a symlink followed by entries "under" it.
//!
//! Order, per entry: content, owner, xattrs (ACLs, capabilities, SELinux labels), mode, times —
//! chown clears setuid bits and file capabilities, so both come after it. Directories get their
//! metadata last, deepest first, so restoring their entries does not change their times.

use crate::error::{RepoError, Result};
use crate::fetcher::{BlobSource, Fetcher};
use crate::id::Id;
use crate::progress::{NoProgress, Progress, Warning};
use crate::repo::Repository;
use crate::tree::{at_path, too_deep, Node, NodeKind, MAX_TREE_DEPTH};
use crossbeam_channel::bounded;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What to restore and where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The directory that stands for `/` of the version.
    pub target: PathBuf,
    /// Only these absolute paths (and what is under them); empty means everything.
    pub include: Vec<PathBuf>,
    /// But not these (other components' paths nested in the included ones, like the ESP under
    /// `/boot`).
    pub exclude: Vec<PathBuf>,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Set owners (needs root; off, files belong to the restoring user).
    pub owners: bool,
}
/// The most a restore from a remote repository fetches ahead of the files it writes (plaintext,
/// counted from the start of each fetch). With reads streamed (a fetcher holds no whole
/// request) and 16 MiB requests, 64 MiB restored the vault benchmark's tree from Garage in
/// 5.1–5.6 s, against 6.1–6.6 s with 4 MiB requests and 32 MiB (writers waited for blobs in
/// flight; the machine idled), at 200–220 MiB peak; 96 MiB was no faster and took 50 MiB more.
const FETCH_AHEAD: u64 = 64 << 20;

/// Counters of a restore.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreStats {
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks, devices, fifos, hardlinks.
    pub others: u64,
    /// Bytes of content written.
    pub bytes: u64,
}

/// The result of a restore.
#[derive(Debug)]
pub struct RestoreOutcome {
    /// Counters.
    pub stats: RestoreStats,
    /// Entries that could not be restored (the rest was).
    pub warnings: Vec<Warning>,
    /// Files and directories that could not be restored because the repository's data for
    /// them is damaged or missing (also among `warnings`). Such a file is not left behind.
    pub damaged: Vec<Warning>,
}

/// A blob a file needs cannot be read from the repository: carried inside the `io::Error` of a
/// file's write so the restore can tell damage from a local failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct DamagedData(String);

/// True when `error` says the repository's data is damaged or missing.
fn is_damage(error: &std::io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<DamagedData>())
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Opens the directory `relative` beneath `root`, never through a symlink.
pub(crate) fn open_dir_beneath(root: &OwnedFd, relative: &Path) -> std::io::Result<OwnedFd> {
    let path = if relative.as_os_str().is_empty() { Path::new(".") } else { relative };
    Ok(rustix::fs::openat2(root, path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty(), RESOLVE)?)
}

/// Files of one directory for one worker: two workers creating files in one directory wait
/// for each other on its lock, so each takes a directory's files in batches.
struct Job {
    dir: PathBuf,
    nodes: Vec<Node>,
}

/// A batch is sent when it holds this many files or this many bytes.
const BATCH_FILES: usize = 64;
const BATCH_BYTES: u64 = 8 << 20;

struct Shared<'a> {
    repo: &'a Repository,
    /// Reads ahead from a remote repository.
    fetcher: Option<&'a Fetcher<'a>>,
    root: OwnedFd,
    options: &'a RestoreOptions,
    progress: &'a dyn Progress,
    warnings: Mutex<Vec<Warning>>,
    damaged: Mutex<Vec<Warning>>,
    stats: Mutex<RestoreStats>,
}

impl Shared<'_> {
    fn warn(&self, dir: &Path, name: &[u8], message: String) {
        self.record(dir, name, message, false);
    }

    /// Records an entry that the repository's damage kept from being restored.
    fn damaged(&self, dir: &Path, name: &[u8], message: String) {
        self.record(dir, name, message, true);
    }

    fn record(&self, dir: &Path, name: &[u8], message: String, damage: bool) {
        let path = Path::new("/").join(dir).join(OsStr::from_bytes(name));
        let warning = Warning { path: path.display().to_string(), message };
        self.progress.warning(&warning);
        if damage {
            self.damaged.lock().expect("damaged lock").push(warning.clone());
        }
        self.warnings.lock().expect("warnings lock").push(warning);
    }
}

/// Restores version `version` of `repo` (index loaded) under `options.target`.
pub fn restore(
    repo: &Repository,
    version: &Id,
    options: &RestoreOptions,
    progress: Option<&dyn Progress>,
) -> Result<RestoreOutcome> {
    let manifest = repo.read_version(version)?;
    restore_tree(repo, &manifest.tree, options, progress)
}

/// Restores the directory tree `tree` into `options.target`, which stands for that directory.
pub fn restore_tree(
    repo: &Repository,
    tree: &Id,
    options: &RestoreOptions,
    progress: Option<&dyn Progress>,
) -> Result<RestoreOutcome> {
    let io = |path: &Path, source: std::io::Error| RepoError::Destination { path: path.display().to_string(), source };
    if std::fs::symlink_metadata(&options.target).is_ok_and(|m| !m.is_dir()) {
        let error = std::io::Error::other("it is a file, not a folder: give a folder to restore into");
        return Err(io(&options.target, error));
    }
    std::fs::create_dir_all(&options.target).map_err(|e| io(&options.target, e))?;
    let root = rustix::fs::open(&options.target, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io(&options.target, e.into()))?;
    // A remote repository is read ahead, many requests at once; a local one blob by blob, as
    // the files are written.
    let fetcher = repo.backend().is_remote().then(|| Fetcher::new(repo, FETCH_AHEAD));
    let shared = Shared {
        repo,
        fetcher: fetcher.as_ref(),
        root,
        options,
        progress: progress.unwrap_or(&NoProgress),
        warnings: Mutex::new(Vec::new()),
        damaged: Mutex::new(Vec::new()),
        stats: Mutex::new(RestoreStats::default()),
    };
    let threads = if options.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    } else {
        options.threads
    };

    let mut dirs = Vec::new();
    let mut links = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        if let Some(fetcher) = &fetcher {
            for _ in 0..repo.connections() {
                scope.spawn(move || fetcher.fetch());
            }
        }
        // From a remote repository the walk runs far ahead of the writers, so that the fetcher
        // sees most of what each pack is wanted for before it reads it.
        let (tx, rx) = bounded::<Job>(if fetcher.is_some() { 1024 } else { threads * 4 });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, shared) = (rx.clone(), &shared);
                scope.spawn(move || {
                    sysstate_fs::exact_modes_in_this_thread();
                    let mut cached: Option<(PathBuf, OwnedFd)> = None;
                    for job in rx {
                        for node in &job.nodes {
                            restore_file(shared, &mut cached, &job.dir, node);
                        }
                    }
                })
            })
            .collect();
        drop(rx);
        let walked =
            Walk { shared: &shared, jobs: tx, dirs: &mut dirs, links: &mut links, seen: HashMap::new() }.tree(tree);
        if let Some(fetcher) = &fetcher {
            fetcher.start();
        }
        let joined: Vec<_> = workers.into_iter().map(|worker| worker.join()).collect();
        // Every file is written: the fetchers end.
        if let Some(fetcher) = &fetcher {
            fetcher.close();
        }
        for joined in joined {
            if let Err(panic) = joined {
                std::panic::resume_unwind(panic);
            }
        }
        walked
    })?;

    for (dir, node, first) in links {
        if let Err(error) = make_hardlink(&shared, &dir, &node, &first) {
            shared.warn(&dir, &node.name, format!("cannot create the hardlink to `/{}`: {error}", first.display()));
        } else {
            shared.stats.lock().expect("stats lock").others += 1;
        }
    }
    for (dir, node) in dirs.iter().rev() {
        let result = open_dir_beneath(&shared.root, &dir.join(OsStr::from_bytes(&node.name)))
            .and_then(|fd| apply_metadata(options.owners, Target::Fd(fd.as_fd()), node));
        if let Err(error) = result {
            shared.warn(dir, &node.name, format!("cannot set the directory's metadata: {error}"));
        }
    }
    Ok(RestoreOutcome {
        stats: shared.stats.into_inner().expect("stats lock"),
        warnings: shared.warnings.into_inner().expect("warnings lock"),
        damaged: shared.damaged.into_inner().expect("damaged lock"),
    })
}

struct Walk<'s, 'a> {
    shared: &'s Shared<'a>,
    jobs: crossbeam_channel::Sender<Job>,
    dirs: &'s mut Vec<(PathBuf, Node)>,
    links: &'s mut Vec<(PathBuf, Node, PathBuf)>,
    seen: HashMap<(u64, u64), PathBuf>,
}

impl Walk<'_, '_> {
    fn included(&self, path: &Path) -> (bool, bool) {
        let include = &self.shared.options.include;
        if include.is_empty() {
            return (true, true);
        }
        let absolute = Path::new("/").join(path);
        // (restore this entry, descend into it)
        let inside = include.iter().any(|p| absolute.starts_with(p))
            && !self.shared.options.exclude.iter().any(|p| absolute.starts_with(p));
        let above = include.iter().any(|p| p.starts_with(&absolute));
        (inside, inside || above)
    }

    /// Restores the tree `root` with an explicit stack of open directories (a crafted
    /// repository cannot overflow it; a tree nested deeper than [`MAX_TREE_DEPTH`] is damage).
    /// Directories' metadata is recorded when their walk is over, deepest first.
    fn tree(&mut self, root: &Id) -> Result<()> {
        let mut stack: Vec<Frame> = Vec::new();
        stack.extend(self.enter(root, PathBuf::new(), None)?);
        loop {
            let depth = stack.len();
            let Some(frame) = stack.last_mut() else { break };
            let Some(node) = frame.nodes.next() else {
                let frame = stack.pop().expect("the frame just seen");
                self.leave(frame);
                continue;
            };
            let path = frame.dir.join(OsStr::from_bytes(&node.name));
            let (restore_it, descend) = self.included(&path);
            if !descend {
                continue;
            }
            match &node.kind {
                NodeKind::Dir { subtree } => {
                    if let Err(error) = make_dir(&frame.fd, &node.name) {
                        self.shared.warn(&frame.dir, &node.name, format!("cannot create the directory: {error}"));
                        continue;
                    }
                    if depth > MAX_TREE_DEPTH {
                        return Err(too_deep(self.shared.repo, at_path(&Path::new("/").join(&path))));
                    }
                    let subtree = *subtree;
                    if restore_it {
                        self.shared.stats.lock().expect("stats lock").dirs += 1;
                    }
                    // Directories only on the way to an included path keep default metadata.
                    let leave = restore_it.then(|| (frame.dir.clone(), node));
                    let child = self.enter(&subtree, path, leave)?;
                    stack.extend(child);
                }
                _ if !restore_it => {}
                NodeKind::File(_) => {
                    if node.links > 1 {
                        if let Some(first) = self.seen.get(&(node.device, node.inode)) {
                            self.links.push((frame.dir.clone(), node.clone(), first.clone()));
                            continue;
                        }
                        self.seen.insert((node.device, node.inode), path);
                    }
                    frame.batch_bytes += node.size;
                    frame.batch.push(node);
                    if frame.batch.len() >= BATCH_FILES || frame.batch_bytes >= BATCH_BYTES {
                        let nodes = std::mem::take(&mut frame.batch);
                        frame.batch_bytes = 0;
                        let dir = frame.dir.clone();
                        self.send(Job { dir, nodes });
                    }
                }
                _ => match make_special(self.shared.options.owners, &frame.fd, &node.name, &node) {
                    Ok(()) => self.shared.stats.lock().expect("stats lock").others += 1,
                    Err(error) => self.shared.warn(&frame.dir, &node.name, format!("cannot create it: {error}")),
                },
            }
        }
        Ok(())
    }

    /// Opens the directory `dir` of the tree `id` for its walk; `None` (with a warning) when its
    /// entries cannot be read or the directory cannot be opened. `leave` is the directory's
    /// own entry, recorded when its walk is over.
    fn enter(&mut self, id: &Id, dir: PathBuf, leave: Option<(PathBuf, Node)>) -> Result<Option<Frame>> {
        let opened = match self.shared.repo.read_tree(id) {
            Ok(tree) => match open_dir_beneath(&self.shared.root, &dir) {
                Ok(fd) => Some((tree, fd)),
                Err(error) => {
                    self.shared.warn(&dir, b"", format!("cannot open the directory: {error}"));
                    None
                }
            },
            Err(error) if error.code() == sysstate_types::ErrorCode::RepositoryCorrupt => {
                self.shared.damaged(&dir, b"", format!("cannot read this directory's entries: {error}"));
                None
            }
            Err(error) => return Err(error),
        };
        Ok(match opened {
            Some((tree, fd)) => {
                Some(Frame { dir, fd, nodes: tree.nodes.into_iter(), batch: Vec::new(), batch_bytes: 0, leave })
            }
            None => {
                self.dirs.extend(leave);
                None
            }
        })
    }

    /// A directory's walk is over: its last files go to the writers, its entry to the list of
    /// directories whose metadata is set at the end.
    fn leave(&mut self, frame: Frame) {
        if !frame.batch.is_empty() {
            self.send(Job { dir: frame.dir, nodes: frame.batch });
        }
        self.dirs.extend(frame.leave);
    }

    /// Sends files to the writers, after telling the fetcher (if any) the blobs they will take;
    /// when the writers are that far behind, the fetcher begins.
    fn send(&self, job: Job) {
        let Some(fetcher) = self.shared.fetcher else {
            let _ = self.jobs.send(job);
            return;
        };
        for node in &job.nodes {
            if let NodeKind::File(content) = &node.kind {
                fetcher.announce(&content.blobs);
            }
        }
        if let Err(crossbeam_channel::TrySendError::Full(job)) = self.jobs.try_send(job) {
            fetcher.start();
            let _ = self.jobs.send(job);
        }
    }
}

/// A directory being restored.
struct Frame {
    /// Relative to the restore root.
    dir: PathBuf,
    fd: OwnedFd,
    nodes: std::vec::IntoIter<Node>,
    /// Files not yet sent to the writers, and their bytes.
    batch: Vec<Node>,
    batch_bytes: u64,
    /// The directory's own entry, in its parent.
    leave: Option<(PathBuf, Node)>,
}

/// Removes whatever stands at `name` in `dir` (not a directory with content).
pub(crate) fn clear(dir: &OwnedFd, name: &[u8]) -> std::io::Result<()> {
    match rustix::fs::unlinkat(dir, OsStr::from_bytes(name), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR) => Ok(rustix::fs::unlinkat(dir, OsStr::from_bytes(name), AtFlags::REMOVEDIR)?),
        Err(error) => Err(error.into()),
    }
}

fn make_dir(dir: &OwnedFd, name: &[u8]) -> std::io::Result<()> {
    let name = OsStr::from_bytes(name);
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => {
            let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Directory {
                Ok(())
            } else {
                // A symlink or file where the version has a directory: replace it, never follow it.
                rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
                Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?)
            }
        }
        Err(error) => Err(error.into()),
    }
}

/// Creates the symlink, device or fifo `node` as `name` in `dir`, with its metadata.
pub(crate) fn make_special(owners: bool, dir: &OwnedFd, name_bytes: &[u8], node: &Node) -> std::io::Result<()> {
    let name = OsStr::from_bytes(name_bytes);
    let mode = Mode::from_raw_mode(node.mode & 0o777);
    let make = || match &node.kind {
        NodeKind::Symlink { target } => rustix::fs::symlinkat(OsStr::from_bytes(target), dir, name),
        NodeKind::CharDevice { rdev } => {
            rustix::fs::mknodat(dir, name, rustix::fs::FileType::CharacterDevice, mode, *rdev)
        }
        NodeKind::BlockDevice { rdev } => {
            rustix::fs::mknodat(dir, name, rustix::fs::FileType::BlockDevice, mode, *rdev)
        }
        NodeKind::Fifo => rustix::fs::mknodat(dir, name, rustix::fs::FileType::Fifo, mode, 0),
        NodeKind::File(_) | NodeKind::Dir { .. } => unreachable!("files and directories are made elsewhere"),
    };
    // Into an empty target the make succeeds at once; only an existing entry costs an unlink.
    match make() {
        Err(rustix::io::Errno::EXIST) => {
            clear(dir, name_bytes)?;
            make()?
        }
        other => other?,
    }
    // Set by name: symlinks must not be followed, and devices and fifos must not be opened
    // (opening a fifo blocks).
    apply_metadata(owners, Target::ByName(dir.as_fd(), name), node)
}

fn make_hardlink(shared: &Shared<'_>, dir: &Path, node: &Node, first: &Path) -> std::io::Result<()> {
    let dir_fd = open_dir_beneath(&shared.root, dir)?;
    let first_dir = open_dir_beneath(&shared.root, first.parent().unwrap_or(Path::new("")))?;
    let first_name = first.file_name().unwrap_or_default();
    clear(&dir_fd, &node.name)?;
    Ok(rustix::fs::linkat(&first_dir, first_name, &dir_fd, OsStr::from_bytes(&node.name), AtFlags::empty())?)
}

fn restore_file(shared: &Shared<'_>, cached: &mut Option<(PathBuf, OwnedFd)>, dir: &Path, node: &Node) {
    let result = (|| -> std::io::Result<u64> {
        if cached.as_ref().map(|(path, _)| path != dir).unwrap_or(true) {
            *cached = Some((dir.to_path_buf(), open_dir_beneath(&shared.root, dir)?));
        }
        let dir_fd = &cached.as_ref().expect("just set").1;
        match shared.fetcher {
            Some(fetcher) => write_file(fetcher, dir_fd, &node.name, node, shared.options.owners),
            None => write_file(shared.repo, dir_fd, &node.name, node, shared.options.owners),
        }
    })();
    match result {
        Ok(bytes) => {
            let mut stats = shared.stats.lock().expect("stats lock");
            stats.files += 1;
            stats.bytes += bytes;
            drop(stats);
            shared.progress.file_done(bytes);
        }
        Err(error) if is_damage(&error) => {
            shared.damaged(dir, &node.name, format!("cannot be restored whole, so it was not written: {error}"))
        }
        Err(error) => shared.warn(dir, &node.name, format!("cannot restore the file: {error}")),
    }
}

/// Writes the file `node` as `name` in `dir` (replacing what stands there), content then metadata,
/// and returns the bytes written. The blobs come from `source`; those a failure leaves untaken
/// are released.
pub(crate) fn write_file(
    source: &dyn BlobSource,
    dir: &OwnedFd,
    name: &[u8],
    node: &Node,
    owners: bool,
) -> std::io::Result<u64> {
    let NodeKind::File(content) = &node.kind else { unreachable!("only files are written here") };
    let mut taken = 0;
    let written = write_file_taking(source, dir, name, node, owners, &mut taken);
    if written.is_err() {
        source.release(&content.blobs[taken.min(content.blobs.len())..]);
    }
    written
}

fn write_file_taking(
    source: &dyn BlobSource,
    dir: &OwnedFd,
    name: &[u8],
    node: &Node,
    owners: bool,
    taken: &mut usize,
) -> std::io::Result<u64> {
    let name_os = OsStr::from_bytes(name);
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // Created with its permissions (never the set-ID or sticky bits, which a change of owner
    // would clear), in a thread whose umask is 0: most files need no change of mode after.
    let mode = Mode::from_raw_mode(node.mode & 0o777);
    // Into an empty target the create succeeds at once; only an existing entry (restoring over
    // an earlier restore) costs an unlink.
    let fd = match rustix::fs::openat(dir, name_os, flags, mode) {
        Err(rustix::io::Errno::EXIST) => {
            clear(dir, name)?;
            rustix::fs::openat(dir, name_os, flags, mode)?
        }
        other => other?,
    };
    let mut file = std::fs::File::from(fd);
    let NodeKind::File(content) = &node.kind else { unreachable!("only files are written here") };
    // A file that cannot be written whole is not left under its name, half written.
    let written =
        write_content(source, &mut file, &content.blobs, content.extents.as_deref(), taken).inspect_err(|_| {
            let _ = rustix::fs::unlinkat(dir, name_os, AtFlags::empty());
        })?;
    if written != node.size || content.extents.is_some() {
        // Holes at the end, or content that does not match the recorded size.
        file.set_len(node.size)?;
    }
    apply_metadata(owners, Target::Fd(file.as_fd()), node)?;
    Ok(written)
}

/// Writes the blobs' content into `file` (at the extents' offsets when it is sparse), counting
/// in `taken` the blobs taken from `source`.
fn write_content(
    source: &dyn BlobSource,
    file: &mut std::fs::File,
    blobs: &[Id],
    extents: Option<&[(u64, u64)]>,
    taken: &mut usize,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut read = |id: &Id| {
        *taken += 1;
        source.blob(id).map_err(|e| match e.code() {
            sysstate_types::ErrorCode::RepositoryCorrupt => std::io::Error::other(DamagedData(e.to_string())),
            _ => std::io::Error::other(e.to_string()),
        })
    };
    let mut written = 0u64;
    match extents {
        None => {
            for id in blobs {
                let data = read(id)?;
                file.write_all(&data)?;
                written += data.len() as u64;
            }
        }
        Some(extents) => {
            // The blobs hold the extents' data back to back; write each piece at its offset and
            // leave the gaps as holes.
            let mut extents = extents.iter().copied();
            let (mut offset, mut left) = extents.next().unwrap_or((0, 0));
            for id in blobs {
                let data = read(id)?;
                let mut data = data.as_slice();
                while !data.is_empty() {
                    while left == 0 {
                        (offset, left) = extents
                            .next()
                            .ok_or_else(|| std::io::Error::other("the content is longer than its extents"))?;
                    }
                    let n = data.len().min(left as usize);
                    file.write_all_at(&data[..n], offset)?;
                    written += n as u64;
                    offset += n as u64;
                    left -= n as u64;
                    data = &data[n..];
                }
            }
        }
    }
    Ok(written)
}

pub(crate) enum Target<'f> {
    Fd(std::os::fd::BorrowedFd<'f>),
    /// Set by name in a directory, without following or opening it.
    ByName(std::os::fd::BorrowedFd<'f>, &'f OsStr),
}

/// Sets `node`'s owner (when `owners` and root), extended attributes, mode and times on `target`.
pub(crate) fn apply_metadata(owners: bool, target: Target<'_>, node: &Node) -> std::io::Result<()> {
    use rustix::fs::{Gid, Timespec, Timestamps, Uid};
    // Asked once: a process's effective user does not change, and this runs for every entry.
    static IS_ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let is_root = *IS_ROOT.get_or_init(|| rustix::process::geteuid().is_root());
    let owners = owners && is_root && node.uid != u32::MAX && node.gid != u32::MAX;
    // SAFETY: `u32::MAX` (the "do not change" value) was excluded above; any other value is a
    // valid id to pass to chown.
    let (uid, gid) = unsafe { (Uid::from_raw(node.uid), Gid::from_raw(node.gid)) };
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: node.atime_ns.div_euclid(1_000_000_000),
            tv_nsec: node.atime_ns.rem_euclid(1_000_000_000),
        },
        last_modification: Timespec {
            tv_sec: node.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: node.mtime_ns.rem_euclid(1_000_000_000),
        },
    };
    match target {
        Target::Fd(fd) => {
            // Each change of owner or mode is a journalled inode update; most files are created
            // with the owner and mode they are to have (root's, with the version's permissions),
            // and a look costs far less than setting them again.
            let now = rustix::fs::fstat(fd)?;
            if owners && (now.st_uid, now.st_gid) != (node.uid, node.gid) {
                rustix::fs::fchown(fd, Some(uid), Some(gid))?;
            }
            for (name, value) in &node.xattrs {
                set_xattr_fd(fd, name, value)?;
            }
            // An access ACL set as an attribute rewrites the permission bits: after one, the mode
            // is set whatever it was. (Set-ID bits, which a change of owner clears, are never
            // given at the create, so the look before it stands.) Other attributes — SELinux
            // labels, capabilities — leave the mode alone.
            let acl = node.xattrs.iter().any(|(name, _)| name.as_slice() == b"system.posix_acl_access");
            if acl || now.st_mode & 0o7777 != node.mode & 0o7777 {
                rustix::fs::fchmod(fd, Mode::from_raw_mode(node.mode & 0o7777))?;
            }
            rustix::fs::futimens(fd, &times)?;
        }
        Target::ByName(dir, name) => {
            if owners {
                rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
            }
            if !node.xattrs.is_empty() {
                // l*xattr calls take a path: reach the entry through the directory's fd in /proc,
                // which does not follow the entry itself.
                let path = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir))).join(name);
                for (xattr, value) in &node.xattrs {
                    match rustix::fs::lsetxattr(&path, OsStr::from_bytes(xattr), value, rustix::fs::XattrFlags::empty())
                    {
                        Ok(()) => {}
                        // Only trusted/security attributes may be set on symlinks by non-root users.
                        Err(rustix::io::Errno::PERM) if !is_root => {}
                        Err(error) => return Err(error.into()),
                    }
                }
            }
            if !matches!(node.kind, NodeKind::Symlink { .. }) {
                rustix::fs::chmodat(dir, name, Mode::from_raw_mode(node.mode & 0o7777), AtFlags::empty())?;
            }
            rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
        }
    }
    Ok(())
}

fn set_xattr_fd(fd: std::os::fd::BorrowedFd<'_>, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    match rustix::fs::fsetxattr(fd, OsStr::from_bytes(name), value, rustix::fs::XattrFlags::empty()) {
        Ok(()) => Ok(()),
        Err(error) => Err(std::io::Error::other(format!(
            "cannot set extended attribute `{}`: {error}",
            String::from_utf8_lossy(name)
        ))),
    }
}
