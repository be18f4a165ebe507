//! Linux file metadata helpers that both the archiver (`sysstate-repo`) and the providers
//! (`sysstate-shadow`) need, kept here so neither depends on the other: extended attributes
//! and the data extents of sparse files. Paths are never followed through a final symlink.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The order of [`Path::cmp`] (component by component) for paths without `.` components or
/// doubled or trailing separators — those the kernel and `join` give — found by comparing their
/// bytes with the separator below every other byte: a tenth of the cost of comparing
/// components, which is what sorting a change journal's thousands of paths spent most on.
pub fn path_order(a: &Path, b: &Path) -> std::cmp::Ordering {
    let (a, b) = (a.as_os_str().as_bytes(), b.as_os_str().as_bytes());
    let common = a.iter().zip(b).position(|(x, y)| x != y);
    match common {
        Some(at) => {
            let rank = |byte: u8| if byte == b'/' { 0 } else { u16::from(byte) + 1 };
            rank(a[at]).cmp(&rank(b[at]))
        }
        None => a.len().cmp(&b.len()),
    }
}

/// Every extended attribute of `path` (not following a final symlink), sorted by name. A
/// filesystem without xattr support gives none.
pub fn read_xattrs(path: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    read_xattrs_with(
        |names| rustix::fs::llistxattr(path, names),
        |name, value| rustix::fs::lgetxattr(path, name, value),
    )
}

/// [`read_xattrs`] of an open file.
pub fn read_file_xattrs(file: &File) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    read_xattrs_with(
        |names| rustix::fs::flistxattr(file, names),
        |name, value| rustix::fs::fgetxattr(file, name, value),
    )
}

fn read_xattrs_with(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&OsStr, &mut [u8]) -> rustix::io::Result<usize>,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let length = loop {
        match list(&mut names) {
            Ok(length) => break length,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..length].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 256];
        loop {
            match get(OsStr::from_bytes(name), &mut value) {
                Ok(len) => {
                    value.truncate(len);
                    out.push((name.to_vec(), value));
                    break;
                }
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                // Removed between the list and the read.
                Err(rustix::io::Errno::NODATA) => break,
                Err(error) => return Err(error.into()),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Sets the extended attributes on `path` (not following a final symlink). On a symlink,
/// attributes the kernel refuses to non-root users are skipped.
pub fn write_xattrs(path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)], is_symlink: bool) -> std::io::Result<()> {
    let skippable = is_symlink && !rustix::process::geteuid().is_root();
    write_xattrs_with(xattrs, skippable, |name, value| {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
    })
}

/// [`write_xattrs`] on an open file.
pub fn write_file_xattrs(file: &File, xattrs: &[(Vec<u8>, Vec<u8>)]) -> std::io::Result<()> {
    write_xattrs_with(xattrs, false, |name, value| {
        rustix::fs::fsetxattr(file, name, value, rustix::fs::XattrFlags::empty())
    })
}

/// Sets each of `xattrs` with `set`; one refused (`EPERM`) is skipped when `skip_refused`.
fn write_xattrs_with(
    xattrs: &[(Vec<u8>, Vec<u8>)],
    skip_refused: bool,
    set: impl Fn(&OsStr, &[u8]) -> rustix::io::Result<()>,
) -> std::io::Result<()> {
    for (name, value) in xattrs {
        match set(OsStr::from_bytes(name), value) {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM) if skip_refused => {}
            Err(error) => {
                return Err(std::io::Error::other(format!(
                    "cannot set extended attribute `{}`: {error}",
                    String::from_utf8_lossy(name)
                )))
            }
        }
    }
    Ok(())
}

/// The data extents `(offset, length)` of a file of `size` bytes, or `None` when it has no
/// holes.
pub fn data_extents(file: &File, size: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let start = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset as i64)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(error) => return Err(error.into()),
        };
        let end = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start as i64))?.min(size);
        if end > start {
            extents.push((start, end - start));
        }
        offset = end;
    }
    if extents.len() == 1 && extents[0] == (0, size) {
        return Ok(None);
    }
    Ok(Some(extents))
}

/// A process holding a lock on a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLocker {
    /// Its pid.
    pub pid: u32,
    /// Its command line (or name).
    pub command: String,
    /// `POSIX`, `OFDLCK` or `FLOCK`.
    pub kind: String,
    /// `READ` or `WRITE`.
    pub mode: String,
}

/// A process's command line for messages: one line, at most 100 characters; its name when the
/// command line is unreadable.
pub fn process_command(pid: u32) -> String {
    let line = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(bytes) if !bytes.is_empty() => bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        _ => std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
    };
    // One line, at most 100 characters: it goes into messages.
    let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A locked file as `(major, minor, inode)`.
type LockedFile = (u32, u32, u64);

/// One `/proc/locks` line (or the `lock:` line of `/proc/PID/fdinfo/FD`): kind, mode, pid, and
/// the locked file.
fn parse_lock_line(line: &str) -> Option<(String, String, i64, LockedFile)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "1:" [ "->" ] KIND ADVISORY|MANDATORY MODE PID MAJ:MIN:INODE START END
    let fields: Vec<&str> = fields.into_iter().filter(|f| *f != "->").collect();
    let (kind, mode, pid, file) = (fields.get(1)?, fields.get(3)?, fields.get(4)?, fields.get(5)?);
    let mut parts = file.split(':');
    let major = u32::from_str_radix(parts.next()?, 16).ok()?;
    let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
    let inode = parts.next()?.parse().ok()?;
    Some((kind.to_string(), mode.to_string(), pid.parse().ok()?, (major, minor, inode)))
}

/// The processes holding a lock (POSIX, OFD or flock) on `path`. OFD locks do not name their
/// process in `/proc/locks`; their holders are found through `/proc/PID/fdinfo`.
pub fn file_lockers(path: &Path) -> std::io::Result<Vec<FileLocker>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let file = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()), meta.ino());
    let mut holders = Vec::new();
    let mut anonymous = false;
    for line in std::fs::read_to_string("/proc/locks")?.lines() {
        let Some((kind, mode, pid, locked)) = parse_lock_line(line) else { continue };
        if locked != file {
            continue;
        }
        if pid > 0 {
            holders.push(FileLocker { pid: pid as u32, command: process_command(pid as u32), kind, mode });
        } else {
            anonymous = true;
        }
    }
    if anonymous {
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else { continue };
            for fd in fds.flatten() {
                let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
                for line in info.lines().filter(|l| l.starts_with("lock:")) {
                    if let Some((kind, mode, _, locked)) = parse_lock_line(line.trim_start_matches("lock:").trim()) {
                        if locked == file && !holders.iter().any(|h: &FileLocker| h.pid == pid) {
                            holders.push(FileLocker { pid, command: process_command(pid), kind, mode });
                        }
                    }
                }
            }
        }
    }
    Ok(holders)
}

/// A process that holds a lock on, or has open for writing, a file under some prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyFile {
    /// The file, as the process opened it.
    pub path: std::path::PathBuf,
    /// The process.
    pub pid: u32,
    /// Its command line.
    pub command: String,
    /// True for a lock (POSIX, OFD or flock), false for a file open for writing.
    pub locked: bool,
}

/// Every file under one of `prefixes` that another process holds a lock on or has open for
/// writing, found through `/proc/PID/fd`, `/proc/PID/fdinfo` and `/proc/locks`.
pub fn busy_files(prefixes: &[std::path::PathBuf]) -> Vec<BusyFile> {
    use std::os::unix::fs::MetadataExt;
    let own = std::process::id();
    // (major, minor, inode) → pids holding a POSIX or flock lock (OFD locks name no pid there;
    // they show in the holder's fdinfo). Read only once a file under a prefix is found open
    // without a lock in its fdinfo (a lock may have been taken through another descriptor of
    // the process): reading `/proc/locks` waits for an RCU grace period in the kernel, 13 ms of
    // a 2%-changed backup's 450 here, and most backups find no file of theirs open at all.
    let read_locks = std::cell::OnceCell::new();
    let locks = || {
        read_locks.get_or_init(|| {
            let mut locks: std::collections::HashMap<LockedFile, Vec<u32>> = std::collections::HashMap::new();
            for line in std::fs::read_to_string("/proc/locks").unwrap_or_default().lines() {
                if let Some((_, _, pid, file)) = parse_lock_line(line) {
                    if pid > 0 {
                        locks.entry(file).or_default().push(pid as u32);
                    }
                }
            }
            locks
        })
    };
    let mut found = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else { return found };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if !prefixes.iter().any(|p| target.starts_with(p)) {
                continue;
            }
            let info = std::fs::read_to_string(process.path().join("fdinfo").join(fd.file_name())).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .unwrap_or(0);
            let writing = matches!(flags & 0o3, 1 | 2);
            let locked = info.lines().any(|l| l.starts_with("lock:"))
                || std::fs::metadata(fd.path()).is_ok_and(|m| {
                    let file = (rustix::fs::major(m.dev()), rustix::fs::minor(m.dev()), m.ino());
                    locks().get(&file).is_some_and(|pids| pids.contains(&pid))
                });
            if (writing || locked) && !found.iter().any(|b: &BusyFile| b.pid == pid && b.path == target) {
                found.push(BusyFile { path: target, pid, command: process_command(pid), locked });
            }
        }
    }
    found.sort_by(|a, b| (&a.path, a.pid).cmp(&(&b.path, b.pid)));
    found
}

/// Environment variables that hold secrets sysstate is given: its passphrases and the object
/// stores' keys. No program sysstate runs inherits them (see [`command`]).
pub const SECRET_VARIABLES: &[&str] = &[
    "SYSSTATE_PASSPHRASE",
    "SYSSTATE_NEW_PASSPHRASE",
    "SYSSTATE_TO_PASSPHRASE",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
];

/// The umask sysstate was started with, which the programs it runs get back.
static INHERITED_UMASK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0o022);

/// Makes everything this process creates readable by its owner only — repositories, key files,
/// the state and runtime folders, logs, undo data — whatever umask it was started with (a umask
/// of 000 made the repository 0777, one of 022 made key files 0644). Restored files get their
/// recorded modes explicitly. Call it first thing, before any thread starts.
pub fn private_umask() {
    let inherited = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    INHERITED_UMASK.store(inherited.bits(), std::sync::atomic::Ordering::SeqCst);
}

/// Gives this thread its own umask, 0, in place of the process's [`private_umask`]: a file it
/// creates with its permission bits has them, and needs no change of mode after (a restore's
/// workers, the copy provider's copying threads). A thread that cannot have its own keeps the
/// process's — its callers look at each mode, and only change more of them.
pub fn exact_modes_in_this_thread() {
    if rustix::thread::unshare(rustix::thread::UnshareFlags::FS).is_ok() {
        rustix::process::umask(rustix::fs::Mode::empty());
    }
}

/// A command to run `program` with sysstate's environment less its secrets
/// ([`SECRET_VARIABLES`]), and with the umask sysstate was started with: writers' commands and
/// processes, the generated components' tools, the package manager, `btrfs`. Every program
/// sysstate runs is made here (a test checks).
pub fn command(program: impl AsRef<OsStr>) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(program);
    for name in SECRET_VARIABLES {
        command.env_remove(name);
    }
    let umask = rustix::fs::Mode::from_raw_mode(INHERITED_UMASK.load(std::sync::atomic::Ordering::SeqCst));
    // SAFETY: the closure runs in the child between fork and exec, and calls only umask(2),
    // which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            rustix::process::umask(umask);
            Ok(())
        });
    }
    command
}

#[cfg(test)]
mod tests {
    /// A lock that only `/proc/locks` shows: taken through a second name of the file, outside
    /// the selection, while the process holds the file open under it for reading (its fdinfo
    /// there shows no lock). The lazily read table must still be read and find it.
    #[test]
    fn a_lock_taken_through_another_name_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (selected, outside) = (root.join("selected"), root.join("outside"));
        std::fs::create_dir_all(&selected).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let (file, other_name) = (selected.join("db"), outside.join("db"));
        std::fs::write(&file, "x").unwrap();
        std::fs::hard_link(&file, &other_name).unwrap();
        let ready = root.join("ready");
        let code = "import fcntl, sys, time\n\
                    reading = open(sys.argv[1])\n\
                    locking = open(sys.argv[2], 'r+')\n\
                    fcntl.lockf(locking, fcntl.LOCK_EX)\n\
                    open(sys.argv[3], 'w').close()\n\
                    time.sleep(30)\n";
        let mut holder = std::process::Command::new("python3")
            .args(["-c", code])
            .args([&file, &other_name, &ready])
            .spawn()
            .expect("python3 runs");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ready.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let busy = super::busy_files(std::slice::from_ref(&selected));
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(ready.exists(), "the holder did not take its lock");
        let found: Vec<_> = busy.iter().map(|b| (b.path.clone(), b.pid, b.locked)).collect();
        assert_eq!(found, [(file, holder.id(), true)]);
    }

    /// [`path_order`] orders paths as [`Path::cmp`] does, separators and bytes around them
    /// included.
    #[test]
    fn path_order_is_the_order_of_components() {
        let parts = ["a", "b", "a-b", "a.b", "ab", "a b", "\u{e9}", "~", "A", "0"];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let paths: Vec<std::path::PathBuf> = (0..400)
            .map(|_| {
                let depth = 1 + next(4);
                let mut path = std::path::PathBuf::from("/");
                for _ in 0..depth {
                    path.push(parts[next(parts.len())]);
                }
                path
            })
            .chain([std::path::PathBuf::from("/")])
            .collect();
        for a in &paths {
            for b in &paths {
                assert_eq!(super::path_order(a, b), a.cmp(b), "{} against {}", a.display(), b.display());
            }
        }
    }

    use super::*;

    /// Every program sysstate runs is started by [`command`], which leaves the secrets out: no
    /// `Command::new` anywhere else in the sources.
    #[test]
    fn every_program_is_started_without_the_secrets() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut stack = vec![crates.to_path_buf()];
        let mut offenders = Vec::new();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() && path.file_name() != Some(OsStr::new("tests")) {
                    stack.push(path);
                } else if path.extension() == Some(OsStr::new("rs")) {
                    let text = std::fs::read_to_string(&path).unwrap();
                    if path.ends_with("sysstate-fs/src/lib.rs") {
                        continue;
                    }
                    for (number, line) in text.lines().enumerate() {
                        if line.contains("Command::new(") {
                            offenders.push(format!("{}:{}", path.display(), number + 1));
                        }
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "programs started with their secrets: {offenders:?}");
    }

    /// Checked on the command itself: the process's own environment is left alone (setting a
    /// variable while other tests start programs races).
    #[test]
    fn a_command_is_made_without_the_secrets() {
        let made = command("env");
        let removed: Vec<&OsStr> = made.get_envs().filter(|(_, value)| value.is_none()).map(|(name, _)| name).collect();
        for name in SECRET_VARIABLES {
            assert!(removed.contains(&OsStr::new(name)), "{name} is inherited");
        }
    }

    #[test]
    fn lock_lines_parse() {
        assert_eq!(
            parse_lock_line("1: POSIX  ADVISORY  WRITE 4242 fe:01:1835013 0 EOF"),
            Some(("POSIX".into(), "WRITE".into(), 4242, (0xfe, 1, 1835013)))
        );
        assert_eq!(
            parse_lock_line("2: -> FLOCK  ADVISORY  WRITE 77 08:11:12 0 EOF"),
            Some(("FLOCK".into(), "WRITE".into(), 77, (8, 0x11, 12)))
        );
        assert_eq!(parse_lock_line("3: OFDLCK ADVISORY  READ  -1 00:2a:99 0 EOF").map(|l| l.2), Some(-1));
    }

    #[test]
    fn a_lock_of_this_process_is_found() {
        let dir = std::env::temp_dir().join(format!("sysstate-fs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("locked");
        let file = std::fs::File::create(&path).unwrap();
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let holders = file_lockers(&path).unwrap();
        assert!(holders.iter().any(|h| h.pid == std::process::id() && h.kind == "FLOCK"), "{holders:?}");
        drop(file);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
