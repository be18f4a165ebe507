use super::{Backend, BackendError, ErrorKind, FileKind, Result};
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A repository in a local directory (the embedded default target).
///
/// Writes go to a temp name in the destination folder, are fsynced, then linked into place with
/// `renameat2(RENAME_NOREPLACE)` so an existing file is never replaced, and the folder is fsynced.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    /// Packs kept open for ranged reads, most recent first: a restore or a walk reads many
    /// blobs from few packs, and opening the pack for each was a path lookup and three system
    /// calls a blob. Packs never change under their name; a removed one is let go.
    open_packs: Arc<Mutex<VecDeque<OpenPack>>>,
}

/// A pack's name and its open file.
type OpenPack = (String, Arc<File>);

/// How many packs [`LocalBackend`] keeps open.
const OPEN_PACKS: usize = 32;

impl LocalBackend {
    /// A backend rooted at `root` (which need not exist until [`Backend::create`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend { root: root.into(), open_packs: Arc::default() }
    }

    /// Builds the repository of `files` in `staging` and renames it to the target.
    fn stage_and_move(&self, staging: &Path, files: &[super::NewFile<'_>]) -> Result<()> {
        let staged = LocalBackend::new(staging);
        staged.create()?;
        for file in files {
            staged.write(file.kind, file.name, file.data)?;
        }
        sync_dir(staging).map_err(|e| staged.error("create", FileKind::Config, "", &e))?;
        let flags =
            if self.root.exists() { rustix::fs::RenameFlags::empty() } else { rustix::fs::RenameFlags::NOREPLACE };
        rustix::fs::renameat_with(rustix::fs::CWD, staging, rustix::fs::CWD, &self.root, flags)
            .map_err(|errno| BackendError::from_io("create", String::new(), self.location(), &errno.into()))
    }

    /// The pack `name`, open.
    fn open_pack(&self, name: &str) -> std::io::Result<Arc<File>> {
        let mut open = self.open_packs.lock().expect("open packs lock");
        if let Some(at) = open.iter().position(|(n, _)| n == name) {
            let entry = open.remove(at).expect("found above");
            let file = entry.1.clone();
            open.push_front(entry);
            return Ok(file);
        }
        drop(open);
        let file = Arc::new(File::open(self.full(FileKind::Pack, name))?);
        let mut open = self.open_packs.lock().expect("open packs lock");
        open.push_front((name.to_string(), file.clone()));
        open.truncate(OPEN_PACKS);
        Ok(file)
    }

    fn full(&self, kind: FileKind, name: &str) -> PathBuf {
        self.root.join(kind.path(name))
    }

    fn error(&self, operation: &'static str, kind: FileKind, name: &str, error: &std::io::Error) -> BackendError {
        let mut classified = BackendError::from_io(operation, kind.path(name), self.location(), error);
        if classified.kind == ErrorKind::NotFound && !self.root.exists() {
            classified.kind = ErrorKind::Unavailable;
        }
        classified
    }
}

/// Writes a new file and syncs it.
fn write_buffered(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// The alignment `O_DIRECT` asks of buffers, offsets and lengths: a logical block, 4 KiB at most
/// on the devices Linux supports for it.
const DIRECT_ALIGN: usize = 4096;
/// How much of a pack is written at once, through an aligned buffer of that size.
const DIRECT_PIECE: usize = 1024 * 1024;

thread_local! {
    /// The aligned buffer `write_direct` copies through, one per writing thread.
    static DIRECT_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes a new file with `O_DIRECT` where the filesystem takes it, else through the page cache,
/// and syncs it. A pack is written once and read back only by a restore or a check, usually long
/// after: through the page cache it cost a copy into the cache and then its write-back (1.2 s of
/// CPU for 377 MB here, against 0.05 s direct), and pushed the server's own pages out of the
/// cache. The last piece is padded to a block and the file cut to its length after.
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let einval = |e: &std::io::Error| e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error());
    let file = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(file) => file,
        // tmpfs and some others have no O_DIRECT.
        Err(e) if einval(&e) => return write_buffered(path, data),
        Err(e) => return Err(e),
    };
    let written = DIRECT_BUFFER.with(|cell| {
        let mut buffer = cell.borrow_mut();
        if buffer.len() < DIRECT_PIECE + DIRECT_ALIGN {
            *buffer = vec![0; DIRECT_PIECE + DIRECT_ALIGN];
        }
        let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut buffer[start..start + DIRECT_PIECE];
        let mut offset = 0;
        for piece in data.chunks(DIRECT_PIECE) {
            let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
            aligned[..piece.len()].copy_from_slice(piece);
            aligned[piece.len()..padded].fill(0);
            file.write_all_at(&aligned[..padded], offset)?;
            offset += piece.len() as u64;
        }
        Ok::<_, std::io::Error>(())
    });
    match written {
        Ok(()) => {
            if !data.len().is_multiple_of(DIRECT_ALIGN) {
                file.set_len(data.len() as u64)?;
            }
            file.sync_all()
        }
        // A filesystem that takes the flag but not the write: through the page cache then.
        Err(e) if einval(&e) => {
            drop(file);
            fs::remove_file(path)?;
            write_buffered(path, data)
        }
        Err(e) => Err(e),
    }
}

/// The table of filesystems a new repository's place is checked against.
const FSTAB: &str = "/etc/fstab";

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self) -> Result<()> {
        let io = |e: &std::io::Error| BackendError::from_io("create", String::new(), self.location(), e);
        fs::create_dir_all(&self.root).map_err(|e| io(&e))?;
        for kind in FileKind::FOLDERS {
            fs::create_dir_all(self.root.join(kind.dir())).map_err(|e| io(&e))?;
        }
        for prefix in 0..=255u8 {
            fs::create_dir_all(self.root.join("data").join(format!("{prefix:02x}"))).map_err(|e| io(&e))?;
        }
        sync_dir(&self.root).map_err(|e| io(&e))
    }

    /// Checks the target against the rules of [`super::new_target`], builds the repository in
    /// a staging folder beside it and renames that into place: a new folder appears whole, an
    /// empty one is replaced whole (`rename` takes an empty folder's place atomically), and of
    /// concurrent creators the first rename wins. Where the folder cannot be replaced (a mount
    /// point, a parent that is not writable), the repository is made inside it with the config
    /// last, written only if absent.
    fn create_repository(&self, files: &[super::NewFile<'_>]) -> Result<bool> {
        if self.root.join("config").exists() {
            return Ok(false);
        }
        if let Err(refused) = super::new_target::check(&self.root, Path::new(FSTAB)) {
            // Another creator's repository may have appeared since the look above.
            return if self.root.join("config").exists() { Ok(false) } else { Err(refused) };
        }
        let name = self.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = self.root.with_file_name(format!(".{name}.sysstate-new-{}", crate::Id::random().short()));
        let moved = self.stage_and_move(&staging, files);
        if moved.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        match moved {
            Ok(()) => {
                let parent = self.root.parent().unwrap_or(Path::new("/"));
                sync_dir(parent).map_err(|e| BackendError::from_io("create", String::new(), self.location(), &e))?;
                Ok(true)
            }
            // Another creator's repository took the name first.
            Err(_) if self.root.join("config").exists() => Ok(false),
            // A mount point, or a parent this process cannot write: made in place.
            Err(_) if self.root.is_dir() => super::create_config_last(self, files),
            Err(error) => Err(error),
        }
    }

    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        let dirs: Vec<PathBuf> = match kind {
            FileKind::Config => {
                return match fs::metadata(self.full(kind, "config")) {
                    Ok(meta) => Ok(vec![("config".into(), meta.len())]),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if self.root.exists() {
                            Ok(Vec::new())
                        } else {
                            Err(self.error("list", kind, "", &e))
                        }
                    }
                    Err(e) => Err(self.error("list", kind, "", &e)),
                }
            }
            FileKind::Pack => (0..=255u8).map(|p| self.root.join("data").join(format!("{p:02x}"))).collect(),
            _ => vec![self.root.join(kind.dir())],
        };
        let mut out = Vec::new();
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.root.exists() => continue,
                Err(e) => return Err(self.error("list", kind, "", &e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.error("list", kind, "", &e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Removed since the folder was read (a lease released, a prune): not listed.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(self.error("list", kind, &name, &error)),
                };
                out.push((name, meta.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn clean_temporaries(&self, older_than: std::time::Duration, dry_run: bool) -> Result<Vec<String>> {
        let mut dirs = vec![self.root.clone()];
        // Packs' temporaries are in the prefix folders below.
        dirs.extend(FileKind::FOLDERS.iter().filter(|k| **k != FileKind::Pack).map(|k| self.root.join(k.dir())));
        dirs.extend((0..=255u8).map(|p| self.root.join("data").join(format!("{p:02x}"))));
        let now = std::time::SystemTime::now();
        let mut found = Vec::new();
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|modified| now.duration_since(modified).unwrap_or_default() > older_than);
                if !name.starts_with(".tmp-") || !old {
                    continue;
                }
                let path = entry.path();
                if !dry_run {
                    fs::remove_file(&path)
                        .map_err(|e| BackendError::from_io("remove", name.clone(), self.location(), &e))?;
                }
                found.push(path.strip_prefix(&self.root).unwrap_or(&path).display().to_string());
            }
        }
        found.sort();
        Ok(found)
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        fs::read(self.full(kind, name)).map_err(|e| self.error("read", kind, name, &e))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        let file = match kind {
            FileKind::Pack => self.open_pack(name),
            _ => File::open(self.full(kind, name)).map(Arc::new),
        }
        .map_err(|e| self.error("read", kind, name, &e))?;
        let mut buffer = vec![0u8; length as usize];
        file.read_exact_at(&mut buffer, offset).map_err(|e| self.error("read", kind, name, &e))?;
        Ok(buffer)
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let path = self.full(kind, name);
        let dir = path.parent().expect("repository files live in a folder").to_path_buf();
        let temp = dir.join(format!(".tmp-{}", crate::Id::random().short()));
        let err = |e: &std::io::Error| self.error("write", kind, name, e);
        let write =
            |temp: &Path| if kind == FileKind::Pack { write_direct(temp, data) } else { write_buffered(temp, data) };
        let mut result = write(&temp);
        // A kind's folder can be missing from a repository that is whole (copied by a tool that
        // drops empty folders, such as git): it is made again, inside a repository that exists.
        if result.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            && self.root.join("config").is_file()
        {
            result = fs::create_dir_all(&dir)
                .and_then(|()| sync_dir(dir.parent().unwrap_or(&dir)))
                .and_then(|()| write(&temp));
        }
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(err(&e));
        }
        let renamed = if kind == FileKind::Lock {
            fs::rename(&temp, &path)
        } else {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &temp,
                rustix::fs::CWD,
                &path,
                rustix::fs::RenameFlags::NOREPLACE,
            )
            .map_err(std::io::Error::from)
        };
        match renamed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_file(&temp);
                return same_bytes(&path, data).map_err(|e| err(&e)).and_then(|same| {
                    if same {
                        Ok(())
                    } else {
                        Err(BackendError {
                            kind: ErrorKind::Mismatch,
                            operation: "write",
                            path: kind.path(name),
                            location: self.location(),
                            message: "the file already exists with other bytes".into(),
                        })
                    }
                });
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(err(&e));
            }
        }
        sync_dir(&dir).map_err(|e| err(&e))?;
        crash_failpoint();
        Ok(())
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        if kind == FileKind::Pack {
            self.open_packs.lock().expect("open packs lock").retain(|(n, _)| n != name);
        }
        match fs::remove_file(self.full(kind, name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error("remove", kind, name, &e)),
        }
    }
}

fn same_bytes(path: &Path, data: &[u8]) -> std::io::Result<bool> {
    let mut file = File::open(path)?;
    if file.seek(SeekFrom::End(0))? != data.len() as u64 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(0))?;
    let mut existing = Vec::with_capacity(data.len());
    file.read_to_end(&mut existing)?;
    Ok(existing == data)
}

/// Failpoint for the crash-safety tests: with `SYSSTATE_FAILPOINT_KILL_AFTER_WRITES=N`, the
/// process kills itself with SIGKILL right after its N-th durable write, so tests can stop a
/// backup at every point of its write sequence.
fn crash_failpoint() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| sysstate_types::failpoint("KILL_AFTER_WRITES"));
    if let Some(limit) = limit {
        if WRITES.fetch_add(1, Ordering::SeqCst) + 1 >= *limit {
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::Kill);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_folder_is_made_again_in_a_repository_but_no_repository_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(dir.path().join("repo"));
        backend.create().unwrap();
        backend.write(FileKind::Config, "config", b"{}").unwrap();
        for kind in ["locks", "index", "data"] {
            fs::remove_dir_all(dir.path().join("repo").join(kind)).unwrap();
        }
        backend.write(FileKind::Lock, "l1", b"lease").unwrap();
        backend.write(FileKind::Index, "i1", b"index").unwrap();
        backend.write(FileKind::Pack, &"ab".repeat(32), b"pack").unwrap();
        assert_eq!(backend.read(FileKind::Pack, &"ab".repeat(32)).unwrap(), b"pack");
        // Without a config there is no repository to mend: nothing is made.
        let elsewhere = LocalBackend::new(dir.path().join("none"));
        assert!(elsewhere.write(FileKind::Lock, "l1", b"lease").is_err());
        assert!(!dir.path().join("none").exists());
    }

    #[test]
    fn packs_written_direct_hold_exactly_their_bytes_on_any_length() {
        // ext4 (the temp folder here) takes O_DIRECT; tmpfs refuses it at open, and the write
        // goes through the page cache.
        let mut folders = vec![std::env::temp_dir()];
        if Path::new("/dev/shm").is_dir() {
            folders.push(PathBuf::from("/dev/shm"));
        }
        for folder in folders {
            let dir = tempfile::tempdir_in(&folder).unwrap();
            for len in [0, 1, 4095, 4096, 4097, DIRECT_PIECE - 1, DIRECT_PIECE, 3 * DIRECT_PIECE + 5] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let path = dir.path().join(format!("pack-{len}"));
                write_direct(&path, &data).unwrap();
                assert_eq!(fs::read(&path).unwrap(), data, "{len} bytes in {}", folder.display());
            }
        }
    }

    #[test]
    fn a_pack_is_never_written_over_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        fs::write(&path, b"earlier").unwrap();
        assert_eq!(write_direct(&path, b"later").unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"earlier");
    }
}
