//! The change journal: which directories changed on a filesystem since a point, the Linux
//! counterpart of the NTFS change journal (USN) that Windows' backup reads.
//!
//! A [`Journal`] puts a fanotify mark on each whole filesystem it watches
//! (`FAN_MARK_FILESYSTEM`) and asks the kernel to name, for every change, the directory it
//! happened in (`FAN_REPORT_DFID_NAME`): an entry created, deleted, moved in or out, a file
//! written, truncated or closed after writing, an owner, mode, time or extended attribute
//! changed. A thread reads the events as they come and keeps the set of directories they
//! named, as file handles (a directory keeps its handle when it moves; its path is looked up
//! when the set is taken), and for each the names of the entries that changed in it, so that
//! a reader looks at those entries only ([`Changed::names`]). Memory is bounded: past
//! [`JournalOptions::max_dirs`] directories the journal stops counting and says so; past
//! [`MAX_NAMES_PER_DIR`] names in one directory, or [`MAX_NAMES`] in all, a directory is kept
//! without its names and read whole.
//!
//! A file's link count changes when a name of it is made or removed in another directory, and
//! the kernel then reports the file itself, with no directory (`FAN_REPORT_FID`): the journal
//! keeps those files by handle, and names them by device and inode ([`Changed::relinked`]), so
//! that their other names are looked at again — a link made and removed between two takes
//! leaves no other trace but a ctime.
//!
//! It is never trusted blindly. [`Journal::take`] answers [`Changes::Doubt`] — and its user
//! falls back to a full walk — when the kernel's queue overflowed, an event came that names
//! neither a directory nor a file whose link count changed, too many directories changed, or
//! a read failed. Writes through a shared writable mapping produce no
//! event at all: its user must look at such files itself ([`mapped_for_writing`]).

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The events the journal asks for: every change to a directory entry, a file's data or an
/// inode's metadata, on files and directories.
const EVENTS: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_ONDIR;

/// How often the reader looks whether it must stop, ms.
const POLL_MS: i32 = 100;

/// While events come, the reader reads them this often instead of as each one comes: a
/// wake-up for every event took a third of a backup's CPU when its copy wrote into shadow
/// storage on a watched filesystem. The kernel's queue holds 16,384 events: past it, the
/// journal doubts.
const BATCH: std::time::Duration = std::time::Duration::from_millis(20);

/// The most entry names the journal keeps for one directory; past it the directory is read
/// whole (every entry looked at), as one whose names are not known.
pub const MAX_NAMES_PER_DIR: usize = 4096;

/// The most entry names the journal keeps in all (a few megabytes); past it, each directory
/// that gets another name is kept without its names.
pub const MAX_NAMES: usize = 262_144;

/// The fixed part of an event (`struct fanotify_event_metadata`).
const METADATA_LEN: usize = 24;

/// How the journal is bounded.
#[derive(Debug, Clone, Copy)]
pub struct JournalOptions {
    /// The most directories and written files the journal remembers; past it,
    /// [`Changes::Doubt`].
    pub max_dirs: usize,
    /// Read events as they come (a thread). Without it only [`Journal::take`] reads, and the
    /// kernel's queue (16,384 events) overflows when more wait: for the tests.
    pub reader: bool,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions { max_dirs: 65_536, reader: true }
    }
}

/// What changed since the journal started, or why that cannot be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// What the journal saw.
    Seen(Changed),
    /// The journal cannot say: read everything.
    Doubt(String),
}

/// What the journal saw change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed {
    /// The directories where something changed (entries added, removed or moved, a file's data
    /// or an entry's metadata, or the directory's own), by their path now, sorted; directories
    /// that no longer exist are left out (their parents are named).
    pub dirs: Vec<PathBuf>,
    /// For the directories of `dirs` whose changes all named an entry in them: those entries'
    /// names, sorted (empty when only the directory itself changed). A directory of `dirs` that
    /// is not here changed in a way that named no entry, or in too many: every entry in it is
    /// looked at.
    pub names: EntryNames,
    /// Files closed after writing (by their path now, sorted): a file written through a shared
    /// mapping made before the journal started may show no other sign, not even in its times.
    pub written: Vec<PathBuf>,
    /// Files whose link count changed through a name in another directory, by (device, inode),
    /// sorted; files gone since are left out. A name made and removed between two takes, or
    /// renamed over, changes the ctime of every other name of the file with no event in their
    /// directories: those names must be looked at again.
    pub relinked: Vec<(u64, u64)>,
}

/// Directories (absolute paths) and the names of the entries in them that changed: see
/// [`Changed::names`].
pub type EntryNames = std::collections::HashMap<PathBuf, Vec<std::ffi::OsString>>;

/// A filesystem the journal watches.
struct Watched {
    /// `statfs`'s id of the filesystem, as events carry it.
    fsid: [i32; 2],
    /// The device number of its files.
    device: u64,
    /// A directory on it, to open handles with.
    mount: OwnedFd,
}

/// A directory as events name it: (fsid, handle type, handle bytes).
type DirKey = ([i32; 2], i32, Vec<u8>);

/// What the reader gathered.
#[derive(Default)]
struct Gathered {
    /// Directories named by events: (fsid, handle type, handle bytes), with the names of the
    /// entries the events named in each (`None`: read whole).
    dirs: std::collections::HashMap<DirKey, Option<HashSet<Vec<u8>>>>,
    /// How many names `dirs` holds.
    names: usize,
    /// Files closed after writing: their directory and name.
    written: HashSet<(DirKey, Vec<u8>)>,
    /// Files reported without a directory because their link count changed: (fsid, handle
    /// type, handle bytes).
    relinked: HashSet<DirKey>,
    /// Why the set cannot be trusted, once it cannot.
    doubt: Option<String>,
    /// How many directory moves and removals were read since the journal started (carried
    /// from take to take): a path looked up before the last of them may no longer be its
    /// directory's.
    moves: u64,
    /// Directories named for the first time since the last take, for the reader to look up
    /// while nothing waits for them.
    fresh: Vec<DirKey>,
}

impl Gathered {
    /// What was gathered since the last take, leaving only what is carried over.
    fn take(&mut self) -> Gathered {
        std::mem::replace(self, Gathered { moves: self.moves, ..Gathered::default() })
    }
}

/// The paths of directories looked up, by handle.
#[derive(Default)]
struct Paths {
    by_key: std::collections::HashMap<DirKey, PathBuf>,
    /// [`Gathered::moves`] when they were looked up: once more were read, they are forgotten.
    moves: u64,
}

impl Paths {
    /// Forgets every path when a directory moved or was removed after they were looked up.
    fn forget_before(&mut self, moves: u64) -> bool {
        let stale = self.moves < moves;
        if stale {
            self.by_key.clear();
            self.moves = moves;
        }
        stale
    }
}

/// A point in a journal's life: after its `take`-th take. Changes taken at position P+1 are
/// those made after the take that made P.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The journal (random, new with each journal: a restart is a new journal).
    pub journal: u64,
    /// How many times it was taken.
    pub take: u64,
}

/// A change journal over one or more whole filesystems. Dropping it removes its marks.
pub struct Journal {
    id: u64,
    takes: std::sync::atomic::AtomicU64,
    fd: Arc<OwnedFd>,
    watched: Arc<Vec<Watched>>,
    gathered: Arc<Mutex<Gathered>>,
    max_dirs: usize,
    /// The path of each directory looked up, by handle: kept until a directory moves or is
    /// removed (or the journal doubts), so each is looked up once, not at every take
    /// (`open_by_handle_at` and `readlink` of a few thousand directories — the copies of
    /// other backups on the filesystem too — were half of the journal's take). The reader
    /// looks up each directory as events first name it, so a backup's take finds most known.
    paths: Arc<Mutex<Paths>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("devices", &self.devices()).finish()
    }
}

impl Journal {
    /// Starts watching the filesystems that hold `paths` (each one once). Needs
    /// `CAP_SYS_ADMIN`, and filesystems that give file handles (ext4, XFS, btrfs, tmpfs).
    pub fn start(paths: &[&Path], options: JournalOptions) -> std::io::Result<Journal> {
        // SAFETY: plain system call; the result is checked.
        let raw = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_REPORT_DFID_NAME
                    | libc::FAN_REPORT_FID,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u32,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut watched: Vec<Watched> = Vec::new();
        let mut unmarked = None;
        for path in paths {
            let device = std::fs::metadata(path)?.dev();
            if watched.iter().any(|w| w.device == device) {
                continue;
            }
            let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
            // SAFETY: `c_path` is a valid C string; the result is checked.
            let marked = unsafe {
                libc::fanotify_mark(
                    fd.as_raw_fd(),
                    libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                    EVENTS,
                    libc::AT_FDCWD,
                    c_path.as_ptr(),
                )
            };
            if marked < 0 {
                let error = std::io::Error::last_os_error();
                // A filesystem fanotify cannot mark whole (a btrfs subvolume that is not the
                // filesystem's top, EXDEV) is left unwatched: `covers` says so, and what is
                // copied from it walks. Any other failure is the journal's.
                if error.raw_os_error() == Some(libc::EXDEV) {
                    unmarked = Some(error);
                    continue;
                }
                return Err(error);
            }
            // `open_by_handle_at` wants a descriptor it can read through (not `O_PATH`).
            let mount: OwnedFd = std::fs::File::open(path)?.into();
            watched.push(Watched { fsid: fsid(path)?, device, mount });
        }
        if let (true, Some(error)) = (watched.is_empty(), unmarked) {
            return Err(error);
        }
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut journal = Journal {
            id: u64::from_le_bytes(id),
            takes: Default::default(),
            fd: Arc::new(fd),
            watched: Arc::new(watched),
            gathered: Arc::default(),
            max_dirs: options.max_dirs,
            paths: Arc::default(),
            stop: Arc::default(),
            reader: None,
        };
        if options.reader {
            let reader = Reader {
                fd: journal.fd.clone(),
                watched: journal.watched.clone(),
                gathered: journal.gathered.clone(),
                paths: journal.paths.clone(),
                stop: journal.stop.clone(),
                max_dirs: journal.max_dirs,
            };
            journal.reader =
                Some(std::thread::Builder::new().name("sysstate-journal".into()).spawn(move || reader.run())?);
        }
        Ok(journal)
    }

    /// The device numbers of the filesystems watched.
    pub fn devices(&self) -> Vec<u64> {
        self.watched.iter().map(|w| w.device).collect()
    }

    /// True when the journal watches the filesystem of device `device`.
    pub fn covers(&self, device: u64) -> bool {
        self.watched.iter().any(|w| w.device == device)
    }

    /// Where the journal is: after its last take.
    pub fn position(&self) -> Position {
        Position { journal: self.id, take: self.takes.load(Ordering::SeqCst) }
    }

    /// What changed since the journal started or was last taken, and starts again from now
    /// (its [`position`](Self::position) moves on by one). Every change made before the call is
    /// in it: the kernel queues an event before the call that made the change returns, and
    /// this reads the queue to its end.
    ///
    /// Directories are named by their paths when the queue was read. A path looked up earlier
    /// (by the reader as events first named its directory, or by an earlier take) is used
    /// again while no directory moved or was removed since: every such move or removal comes
    /// with an event (`FAN_ONDIR`), and once one is read every path looked up before it is
    /// forgotten and looked up again. A directory moved after the queue was read is named by
    /// its path before the move (looked up afresh, by its path after it); the move's events are
    /// in the next take either way.
    pub fn take(&self) -> Changes {
        self.take_under(&[])
    }

    /// [`take`](Self::take), naming only what is at or under one of `prefixes` (absolute live
    /// paths; none: everything). The rest of the filesystem changes too — shadow storage on it
    /// most of all, where the copies themselves are written — and sorting and handing on its
    /// folders cost as much as the components' own.
    pub fn take_under(&self, prefixes: &[PathBuf]) -> Changes {
        // As `Path::starts_with`, on bytes (the prefixes made of their components, as the
        // kernel's paths are): a take passes over every folder changed on the filesystem, and
        // most are not wanted (other copies in shadow storage).
        let prefixes: Vec<PathBuf> = prefixes.iter().map(|p| p.components().collect()).collect();
        let wanted = |path: &Path| {
            let path = path.as_os_str().as_bytes();
            prefixes.is_empty()
                || prefixes.iter().map(|p| p.as_os_str().as_bytes()).any(|prefix| {
                    let prefix = prefix.strip_suffix(b"/").unwrap_or(prefix);
                    path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/'))
                })
        };
        let mut gathered = self.gathered.lock().expect("journal lock");
        drain(&self.fd, &mut gathered, self.max_dirs);
        let taken = gathered.take();
        self.takes.fetch_add(1, Ordering::SeqCst);
        drop(gathered);
        let mut known = self.paths.lock().expect("journal paths lock");
        let doubted = taken.doubt.is_some() || known.by_key.len() > self.max_dirs;
        if doubted {
            known.by_key.clear();
        }
        let forgotten = known.forget_before(taken.moves) || doubted;
        let paths = &mut known.by_key;
        let mut looked_up = 0usize;
        if let Some(doubt) = taken.doubt {
            return Changes::Doubt(doubt);
        }
        let mut dirs = Vec::with_capacity(taken.dirs.len());
        let mut names = EntryNames::new();
        for (key, named) in &taken.dirs {
            let path = match paths.get(key) {
                Some(path) => wanted(path).then(|| path.clone()),
                None => {
                    looked_up += 1;
                    let path = dir_path(&self.watched, key);
                    if let Some(path) = &path {
                        paths.insert(key.clone(), path.clone());
                    }
                    path.filter(|path| wanted(path))
                }
            };
            if let (Some(path), Some(named)) = (&path, named) {
                let mut named: Vec<_> = named.iter().map(|n| std::ffi::OsStr::from_bytes(n).to_os_string()).collect();
                named.sort();
                names.insert(path.clone(), named);
            }
            dirs.extend(path);
        }
        // Every folder of a written file is one of the folders above: looked up there.
        let mut written: Vec<PathBuf> = taken
            .written
            .iter()
            .filter_map(|(key, name)| {
                let dir = paths.get(key).filter(|dir| wanted(dir))?;
                Some(dir.join(std::ffi::OsStr::from_bytes(name)))
            })
            .collect();
        drop(known);
        let mut relinked: Vec<(u64, u64)> = taken
            .relinked
            .iter()
            .filter_map(|key| {
                let meta = rustix::fs::fstat(open_handle(&self.watched, key, 0)?).ok()?;
                Some((meta.st_dev, meta.st_ino))
            })
            .collect();
        tracing::debug!(
            dirs = taken.dirs.len(),
            looked_up,
            forgotten,
            relinked = taken.relinked.len(),
            still_there = relinked.len(),
            "journal read"
        );
        // In the order of their components, compared as bytes (see `path_order`).
        dirs.sort_unstable_by(|a, b| sysstate_fs::path_order(a, b));
        written.sort_unstable_by(|a, b| sysstate_fs::path_order(a, b));
        relinked.sort();
        relinked.dedup();
        Changes::Seen(Changed { dirs, names, written, relinked })
    }
}

/// The entry with this handle on one of the `watched` filesystems (`O_PATH`, with `flags`);
/// `None` when it was deleted.
fn open_handle(watched: &[Watched], (fsid, handle_type, bytes): &DirKey, flags: i32) -> Option<OwnedFd> {
    let watched = watched.iter().find(|w| w.fsid == *fsid)?;
    // `struct file_handle` followed by its bytes, 4-aligned.
    let mut buffer = vec![0u32; 2 + bytes.len().div_ceil(4)];
    buffer[0] = bytes.len() as u32;
    buffer[1] = *handle_type as u32;
    // SAFETY: the buffer holds 8 + len bytes; copying `len` bytes after the header stays in it.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.as_mut_ptr().add(2).cast::<u8>(), bytes.len());
    }
    // SAFETY: the buffer is a `struct file_handle` as the kernel wrote it; the result is checked.
    let raw = unsafe {
        libc::open_by_handle_at(
            watched.mount.as_raw_fd(),
            buffer.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC | flags,
        )
    };
    // SAFETY: a new descriptor nothing else owns.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The path now of the directory with this handle; `None` when it was deleted.
fn dir_path(watched: &[Watched], key: &DirKey) -> Option<PathBuf> {
    open_handle(watched, key, libc::O_DIRECTORY).and_then(|dir| path_of(&dir))
}

/// The path now of an open directory; `None` when it was deleted.
fn path_of(dir: &OwnedFd) -> Option<PathBuf> {
    let path = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
    // A directory removed while its handle stayed open reads " (deleted)".
    let deleted = path.as_os_str().as_bytes().ends_with(b" (deleted)") && !path.exists();
    (!deleted && path.is_absolute()).then_some(path)
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// `statfs`'s filesystem id of `path`, as fanotify reports it.
fn fsid(path: &Path) -> std::io::Result<[i32; 2]> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `stat` is written by the call before it is read; the result is checked.
    let stat = unsafe {
        let mut stat = std::mem::zeroed::<libc::statfs>();
        if libc::statfs(c_path.as_ptr(), &mut stat) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        stat
    };
    // SAFETY: `fsid_t` is two ints.
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [i32; 2]>(stat.f_fsid) })
}

/// What the reader thread shares with its journal.
struct Reader {
    fd: Arc<OwnedFd>,
    watched: Arc<Vec<Watched>>,
    gathered: Arc<Mutex<Gathered>>,
    paths: Arc<Mutex<Paths>>,
    stop: Arc<AtomicBool>,
    max_dirs: usize,
}

/// How many directories the reader looks up under one hold of the paths' lock: a take waits
/// for at most these (a millisecond or two).
const LOOKUPS_PER_HOLD: usize = 64;

impl Reader {
    /// Waits for the first event, then reads what came every [`BATCH`] until a read finds
    /// nothing, looking up the directories first named, and waits again; until told to stop.
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            let mut poll = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid `pollfd`; the result is checked.
            if unsafe { libc::poll(&mut poll, 1, POLL_MS) } <= 0 {
                continue;
            }
            loop {
                let (read, fresh, moves) = {
                    let mut gathered = self.gathered.lock().expect("journal lock");
                    let read = drain(&self.fd, &mut gathered, self.max_dirs);
                    (read, std::mem::take(&mut gathered.fresh), gathered.moves)
                };
                self.look_up(&fresh, moves);
                if !read || self.stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(BATCH);
            }
        }
    }

    /// Looks up the paths of `fresh` directories not known yet, as they are now: after the
    /// `moves`-th directory move read, and so after every move that paths known before were
    /// looked up under.
    fn look_up(&self, fresh: &[DirKey], moves: u64) {
        for keys in fresh.chunks(LOOKUPS_PER_HOLD) {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let mut paths = self.paths.lock().expect("journal paths lock");
            paths.forget_before(moves);
            if paths.by_key.len() > self.max_dirs {
                return;
            }
            for key in keys {
                if !paths.by_key.contains_key(key) {
                    if let Some(path) = dir_path(&self.watched, key) {
                        paths.by_key.insert(key.clone(), path);
                    }
                }
            }
        }
    }
}

/// Reads every event waiting in the queue into `gathered`; true when there was one.
fn drain(fd: &OwnedFd, gathered: &mut Gathered, max_dirs: usize) -> bool {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut read_any = false;
    loop {
        match rustix::io::read(fd, &mut buffer) {
            Ok(0) => return read_any,
            Ok(n) => {
                read_any = true;
                parse(&buffer[..n], gathered, max_dirs);
            }
            Err(rustix::io::Errno::AGAIN) => return read_any,
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => {
                gathered.doubt.get_or_insert(format!("reading the change journal failed: {error}"));
                return read_any;
            }
        }
    }
}

fn u16_at(bytes: &[u8], at: usize) -> usize {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]]) as usize
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Gathers the events in `bytes` (whole events, as `read` returns them).
fn parse(bytes: &[u8], gathered: &mut Gathered, max_dirs: usize) {
    let mut at = 0;
    while at + METADATA_LEN <= bytes.len() {
        let event_len = u32_at(bytes, at) as usize;
        let metadata_len = u16_at(bytes, at + 6);
        let mask = u64::from_ne_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
        if event_len < METADATA_LEN || at + event_len > bytes.len() {
            gathered.doubt.get_or_insert("the change journal read an event it could not parse".into());
            return;
        }
        let event = &bytes[at..at + event_len];
        at += event_len;
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            gathered.doubt.get_or_insert("the change journal's queue overflowed: changes were lost".into());
            continue;
        }
        const MOVED: u64 =
            libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO | libc::FAN_MOVE_SELF | libc::FAN_DELETE | libc::FAN_DELETE_SELF;
        if mask & libc::FAN_ONDIR != 0 && mask & MOVED != 0 {
            gathered.moves += 1;
        }
        let mut found_dir = false;
        let mut object = None;
        let mut info = metadata_len;
        while info + 4 <= event.len() {
            let (info_type, info_len) = (event[info], u16_at(event, info + 2));
            if info_len < 4 || info + info_len > event.len() {
                break;
            }
            let record = &event[info..info + info_len];
            info += info_len;
            // header (4) + fsid (8) + handle_bytes (4) + handle_type (4) + handle [+ name]
            if record.len() < 20 {
                continue;
            }
            let fsid = [u32_at(record, 4) as i32, u32_at(record, 8) as i32];
            let handle_bytes = u32_at(record, 12) as usize;
            let handle_type = u32_at(record, 16) as i32;
            let Some(handle) = record.get(20..20 + handle_bytes) else { continue };
            if info_type == libc::FAN_EVENT_INFO_TYPE_FID {
                object = Some((fsid, handle_type, handle.to_vec()));
                continue;
            }
            if !matches!(info_type, libc::FAN_EVENT_INFO_TYPE_DFID_NAME | libc::FAN_EVENT_INFO_TYPE_DFID) {
                continue;
            }
            found_dir = true;
            if full(gathered, max_dirs) {
                continue;
            }
            let key = (fsid, handle_type, handle.to_vec());
            // The name, NUL-terminated, follows the handle (none, or `.`: the directory itself).
            let name = match info_type {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME => {
                    let name = &record[(20 + handle_bytes).min(record.len())..];
                    &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())]
                }
                _ => &[],
            };
            let entry = !name.is_empty() && name != b".";
            if entry && mask & libc::FAN_CLOSE_WRITE != 0 && mask & libc::FAN_ONDIR == 0 {
                gathered.written.insert((key.clone(), name.to_vec()));
            }
            let total = gathered.names;
            let named = match gathered.dirs.entry(key) {
                std::collections::hash_map::Entry::Occupied(named) => named.into_mut(),
                std::collections::hash_map::Entry::Vacant(new) => {
                    gathered.fresh.push(new.key().clone());
                    new.insert(Some(HashSet::new()))
                }
            };
            if let Some(names) = named.as_mut().filter(|_| entry) {
                if names.len() >= MAX_NAMES_PER_DIR || total >= MAX_NAMES {
                    gathered.names -= names.len();
                    *named = None;
                } else if names.insert(name.to_vec()) {
                    gathered.names += 1;
                }
            }
        }
        // A file reported alone: its link count changed (`FAN_ATTRIB`: a name of it made or
        // removed elsewhere), or it was deleted or moved (its directories are named by their
        // own events). Anything else cannot be placed.
        const ALONE: u64 = libc::FAN_ATTRIB | libc::FAN_DELETE_SELF | libc::FAN_MOVE_SELF;
        match object {
            _ if found_dir => {}
            Some(object) if mask & libc::FAN_ONDIR == 0 && mask & !ALONE == 0 => {
                // A file whose last name went (every removal of a file's copy in shadow storage,
                // a few thousand per backup) has no name left to look at: forgotten now, not
                // opened in vain at the take (under the freeze, for the copy's own removals).
                if mask & libc::FAN_DELETE_SELF != 0 {
                    gathered.relinked.remove(&object);
                } else if mask & libc::FAN_ATTRIB != 0 && !full(gathered, max_dirs) {
                    gathered.relinked.insert(object);
                }
            }
            _ => {
                gathered.doubt.get_or_insert(format!(
                    "the change journal got an event (mask {mask:#x}) that does not name the directory it happened in"
                ));
            }
        }
    }
}

/// True when the journal cannot take one more directory or file (it then doubts, and forgets
/// what it gathered), or doubts already.
fn full(gathered: &mut Gathered, max_dirs: usize) -> bool {
    if gathered.doubt.is_some() {
        return true;
    }
    if gathered.dirs.len() + gathered.written.len() + gathered.relinked.len() >= max_dirs {
        gathered.doubt = Some(format!("more than {max_dirs} directories and files changed"));
        gathered.dirs.clear();
        gathered.names = 0;
        gathered.written.clear();
        gathered.relinked.clear();
        return true;
    }
    false
}

/// Files under one of `prefixes` that a process has mapped shared and writable: writes through
/// such a mapping reach the file without any event, so a journal cannot see them (from
/// `/proc/PID/maps`).
pub fn mapped_for_writing(prefixes: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else { return found };
    for process in processes.flatten() {
        if !process.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(maps) = std::fs::read(process.path().join("maps")) else { continue };
        for line in maps.split(|b| *b == b'\n') {
            // address perms offset dev inode path
            let mut fields = line.splitn(6, |b| *b == b' ');
            let (Some(_), Some(perms)) = (fields.next(), fields.next()) else { continue };
            if perms.len() < 4 || perms[1] != b'w' || perms[3] != b's' {
                continue;
            }
            let Some(rest) = fields.nth(3) else { continue };
            let path = Path::new(std::ffi::OsStr::from_bytes(rest.trim_ascii_start()));
            if path.is_absolute() && prefixes.iter().any(|p| path.starts_with(p)) && !found.iter().any(|f| f == path) {
                found.push(path.to_path_buf());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(changes: Changes) -> Vec<PathBuf> {
        match changes {
            Changes::Seen(changed) => changed.dirs,
            Changes::Doubt(why) => panic!("the journal doubts: {why}"),
        }
    }

    #[test]
    fn the_journal_names_the_directories_where_things_changed() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["a/b", "c", "d/e", "f"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("a/b/file"), "one").unwrap();
        std::fs::write(root.join("c/file"), "one").unwrap();
        std::fs::write(root.join("f/file"), "one").unwrap();
        let journal = Journal::start(&[&root], JournalOptions::default()).unwrap();
        assert!(journal.covers(std::fs::metadata(&root).unwrap().dev()));
        std::fs::write(root.join("a/b/file"), "two").unwrap(); // data
        std::fs::rename(root.join("d/e"), root.join("c/e")).unwrap(); // a directory moved
        std::fs::set_permissions(root.join("f"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let changed = dirs(journal.take());
        let under: Vec<_> = changed.iter().filter(|p| p.starts_with(&root)).cloned().collect();
        for expected in ["a/b", "c", "d"] {
            assert!(under.contains(&root.join(expected)), "{expected} is not named: {under:?}");
        }
        // The folder whose mode changed: named itself or through its parent.
        assert!(under.contains(&root.join("f")) || under.contains(&root), "f's chmod is not seen: {under:?}");
        assert!(!under.contains(&root.join("a")), "a did not change: {under:?}");
        // Taken: it starts again.
        std::fs::write(root.join("c/e/new"), "x").unwrap();
        let changed = dirs(journal.take());
        assert_eq!(changed.iter().filter(|p| p.starts_with(&root)).collect::<Vec<_>>(), [&root.join("c/e")]);
    }

    /// A take under some paths names only what changed at or under them: its folders, the
    /// entries named in them and the files closed after writing.
    #[test]
    fn a_take_under_paths_names_only_what_is_under_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["kept/inner", "kept-not", "other"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let journal = Journal::start(&[&root], JournalOptions::default()).unwrap();
        for d in ["kept", "kept/inner", "kept-not", "other"] {
            std::fs::write(root.join(d).join("file"), "x").unwrap();
        }
        // Named loosely (a doubled separator, a trailing one), as a configuration may.
        let loose = PathBuf::from(format!("{}//kept/", root.display()));
        let Changes::Seen(changed) = journal.take_under(&[loose]) else { panic!("the journal doubts") };
        assert_eq!(changed.dirs, [root.join("kept"), root.join("kept/inner")]);
        assert_eq!(changed.written, [root.join("kept/file"), root.join("kept/inner/file")]);
        assert_eq!(changed.names.keys().collect::<std::collections::BTreeSet<_>>(), changed.dirs.iter().collect());
    }

    /// The paths a take keeps for directories are looked up again once one moved or was removed:
    /// a change after the move is named at the directory's new path, never its old one.
    #[test]
    fn a_directory_moved_since_an_earlier_take_is_named_by_its_new_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["a/inner", "b", "c/deep/er"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let journal = Journal::start(&[&root], JournalOptions::default()).unwrap();
        let under =
            |changes: Changes| -> Vec<PathBuf> { dirs(changes).into_iter().filter(|p| p.starts_with(&root)).collect() };
        // Each take: something changed in the folders, so their paths are kept...
        for round in 0..2 {
            std::fs::write(root.join("a/inner/file"), format!("{round}")).unwrap();
            std::fs::write(root.join("c/deep/er/file"), format!("{round}")).unwrap();
            assert_eq!(under(journal.take()), [root.join("a/inner"), root.join("c/deep/er")]);
        }
        // ...then a folder moves (alone in its take), and another's parent is renamed.
        std::fs::rename(root.join("a/inner"), root.join("b/inner")).unwrap();
        std::fs::rename(root.join("c/deep"), root.join("c/shallow")).unwrap();
        journal.take();
        std::fs::write(root.join("b/inner/file"), "moved").unwrap();
        std::fs::write(root.join("c/shallow/er/file"), "moved").unwrap();
        assert_eq!(under(journal.take()), [root.join("b/inner"), root.join("c/shallow/er")]);
        // A folder removed, and another made at its path: the new one is named, at that path.
        std::fs::write(root.join("b/inner/file"), "again").unwrap();
        journal.take();
        std::fs::remove_dir_all(root.join("b/inner")).unwrap();
        std::fs::rename(root.join("c/shallow/er"), root.join("b/inner")).unwrap();
        journal.take();
        std::fs::write(root.join("b/inner/file"), "replaced").unwrap();
        assert_eq!(under(journal.take()), [root.join("b/inner")]);
    }

    #[test]
    fn the_reader_looks_up_folders_as_they_are_named_and_forgets_them_when_one_moves() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["a/inner", "b"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let journal = Journal::start(&[&root], JournalOptions::default()).unwrap();
        let known = |path: &Path| journal.paths.lock().unwrap().by_key.values().any(|p| p == path);
        let waited = |path: &Path| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !known(path) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            known(path)
        };
        // Named by an event, looked up by the reader before any take.
        std::fs::write(root.join("a/inner/file"), "x").unwrap();
        assert!(waited(&root.join("a/inner")), "the reader did not look up a/inner");
        // Moved after the reader looked it up: the take names it where it is now.
        std::fs::rename(root.join("a/inner"), root.join("b/inner")).unwrap();
        std::fs::write(root.join("b/inner/file"), "moved").unwrap();
        let named: Vec<_> = dirs(journal.take()).into_iter().filter(|p| p.starts_with(&root)).collect();
        assert_eq!(named, [root.join("a"), root.join("b"), root.join("b/inner")]);
        assert!(!known(&root.join("a/inner")), "a path from before the move is still kept");
    }

    #[test]
    fn the_journal_names_the_entries_that_changed_in_each_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["a", "b", "many"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        for f in ["a/kept", "a/written", "a/gone", "b/moved"] {
            std::fs::write(root.join(f), "one").unwrap();
        }
        let journal = Journal::start(&[&root], JournalOptions::default()).unwrap();
        std::fs::write(root.join("a/written"), "two").unwrap();
        std::fs::remove_file(root.join("a/gone")).unwrap();
        std::fs::rename(root.join("b/moved"), root.join("a/arrived")).unwrap();
        std::fs::set_permissions(root.join("b"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        // More names in one folder than the journal keeps: it is read whole.
        for i in 0..=MAX_NAMES_PER_DIR {
            std::fs::File::create(root.join(format!("many/{i}"))).unwrap();
        }
        let Changes::Seen(changed) = journal.take() else { panic!("the journal doubts") };
        let names = |dir: &str| changed.names.get(&root.join(dir)).cloned();
        assert_eq!(names("a"), Some(vec!["arrived".into(), "gone".into(), "written".into()]), "{:?}", changed.names);
        assert_eq!(names("b"), Some(vec!["moved".into()]));
        // b's own mode: named as an entry of the root, or as b itself (no name).
        assert!(
            names("").is_some_and(|n| n.contains(&"b".into())) || changed.dirs.contains(&root.join("b")),
            "{:?}",
            changed.names
        );
        assert!(changed.dirs.contains(&root.join("many")) && names("many").is_none(), "{:?}", changed.dirs);
    }

    #[test]
    fn a_link_made_and_removed_elsewhere_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["a", "b", "c"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        for f in ["a/file", "c/other", "c/third"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let journal = Journal::start(&[&root], JournalOptions::default()).unwrap();
        // A second name made in b, moved over a file in c, then renamed over: `a/file` has one
        // name again, its ctime moved, and nothing happened in `a`.
        std::fs::hard_link(root.join("a/file"), root.join("b/link")).unwrap();
        std::fs::rename(root.join("b/link"), root.join("c/other")).unwrap();
        std::fs::rename(root.join("c/third"), root.join("c/other")).unwrap();
        let Changes::Seen(changed) = journal.take() else { panic!("the journal doubts") };
        let file = std::fs::metadata(root.join("a/file")).unwrap();
        assert_eq!(file.nlink(), 1);
        assert!(changed.relinked.contains(&(file.dev(), file.ino())), "a/file is not named: {changed:?}");
        let under: Vec<_> = changed.dirs.iter().filter(|p| p.starts_with(&root)).cloned().collect();
        assert_eq!(under, [root.join("b"), root.join("c")]);
        // A file deleted is not named (its folder is).
        std::fs::hard_link(root.join("c/other"), root.join("b/again")).unwrap();
        std::fs::remove_file(root.join("b/again")).unwrap();
        std::fs::remove_file(root.join("c/other")).unwrap();
        let Changes::Seen(changed) = journal.take() else { panic!("the journal doubts") };
        assert!(!changed.relinked.iter().any(|(_, inode)| *inode == file.ino()), "{changed:?}");
        assert!(changed.dirs.contains(&root.join("c")), "{changed:?}");
    }

    #[test]
    fn a_file_whose_last_name_went_is_forgotten_before_the_take() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        for i in 0..50 {
            std::fs::write(root.join(format!("a/f{i}")), "x").unwrap();
        }
        std::fs::write(root.join("a/kept"), "x").unwrap();
        let journal = Journal::start(&[&root], JournalOptions { reader: false, ..Default::default() }).unwrap();
        for i in 0..50 {
            std::fs::remove_file(root.join(format!("a/f{i}"))).unwrap();
        }
        std::fs::hard_link(root.join("a/kept"), root.join("a/link")).unwrap();
        std::fs::remove_file(root.join("a/link")).unwrap();
        let mut gathered = journal.gathered.lock().unwrap();
        drain(&journal.fd, &mut gathered, journal.max_dirs);
        // Each removal's link count change came alone; only the file still there is kept.
        let kept = std::fs::metadata(root.join("a/kept")).unwrap();
        assert_eq!(gathered.relinked.len(), 1, "51 files relinked, 50 of them gone");
        drop(gathered);
        let Changes::Seen(changed) = journal.take() else { panic!("the journal doubts") };
        assert_eq!(changed.relinked, [(kept.dev(), kept.ino())]);
    }

    #[test]
    fn an_overflowed_queue_and_too_many_directories_are_doubts() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let journal = Journal::start(&[&root], JournalOptions { max_dirs: 65_536, reader: false }).unwrap();
        for i in 0..20_000 {
            std::fs::write(root.join(format!("f{i}")), "x").unwrap();
        }
        match journal.take() {
            Changes::Doubt(why) => assert!(why.contains("overflowed"), "{why}"),
            other => panic!("20,000 files past a queue of 16,384 events: {other:?}"),
        }
        let journal = Journal::start(&[&root], JournalOptions { max_dirs: 3, reader: true }).unwrap();
        for i in 0..5 {
            std::fs::create_dir(root.join(format!("d{i}"))).unwrap();
            std::fs::write(root.join(format!("d{i}/f")), "x").unwrap();
        }
        match journal.take() {
            Changes::Doubt(why) => assert!(why.contains("more than 3 directories"), "{why}"),
            other => panic!("six directories past a bound of three: {other:?}"),
        }
    }

    #[test]
    fn a_shared_writable_mapping_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let file = root.join("mapped");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        let handle = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        // SAFETY: a fresh mapping of a file this test owns, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                handle.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        drop(handle);
        assert_eq!(mapped_for_writing(std::slice::from_ref(&root)), [file]);
        // SAFETY: the mapping made above.
        assert_eq!(unsafe { libc::munmap(map, 4096) }, 0);
        assert!(mapped_for_writing(&[root]).is_empty());
    }
}
