//! Where a new repository may be created on a local filesystem: a folder that does not exist yet
//! under one that does, or an empty folder — never a folder of unrelated files, never inside
//! another repository, never under a mount point `/etc/fstab` names that is not mounted (the
//! backup would fill the root filesystem and then hide beneath the mount).

use super::{BackendError, ErrorKind};
use std::path::{Path, PathBuf};

/// Entries a freshly made filesystem holds that do not make its root "not empty".
const EMPTY_ANYWAY: &[&str] = &["lost+found"];

/// Checks that a new repository may be created at `target`.
pub(super) fn check(target: &Path, fstab: &Path) -> Result<(), BackendError> {
    let refuse = |kind: ErrorKind, message: String| BackendError {
        kind,
        operation: "create",
        path: String::new(),
        location: target.display().to_string(),
        message,
    };
    let absolute = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    if let Some(mount) = unmounted_mount_point(&absolute, fstab) {
        return Err(refuse(
            ErrorKind::Unavailable,
            format!(
                "it lies under `{}`, which `{}` mounts but which is not mounted now: mount it (`mount {}`) and run again. A repository created now would fill the filesystem beneath and vanish under the mount",
                mount.display(),
                fstab.display(),
                mount.display()
            ),
        ));
    }
    for ancestor in absolute.ancestors().skip(1) {
        if is_repository(ancestor) {
            return Err(refuse(
                ErrorKind::Unsuitable,
                format!("it lies inside the repository at `{}`: give a folder outside it", ancestor.display()),
            ));
        }
    }
    match std::fs::read_dir(&absolute) {
        Ok(entries) => {
            let names: Vec<String> = entries
                .flatten()
                .filter(|e| !ignorable(&e.path()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if let Some(first) = names.first() {
                return Err(refuse(
                    ErrorKind::Unsuitable,
                    format!(
                        "the folder is not empty ({} entries, such as `{first}`) and holds no repository: give a new or empty folder, or the repository's own folder if this is a typo",
                        names.len()
                    ),
                ));
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let parent = absolute.parent().unwrap_or(Path::new("/"));
            if parent.is_dir() {
                Ok(())
            } else {
                Err(refuse(
                    ErrorKind::Unavailable,
                    format!(
                        "its parent folder `{}` does not exist: create it first, or check the target for a typo",
                        parent.display()
                    ),
                ))
            }
        }
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => {
            Err(refuse(ErrorKind::Unsuitable, "it is a file, not a folder".into()))
        }
        Err(error) => Err(BackendError::from_io("create", String::new(), target.display().to_string(), &error)),
    }
}

/// True for what an empty place may hold: `lost+found`, and the empty folders of a repository's
/// layout (left by a creation that stopped before its first file).
fn ignorable(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if EMPTY_ANYWAY.contains(&name.as_str()) {
        return true;
    }
    super::FileKind::FOLDERS.iter().any(|kind| kind.dir() == name) && holds_no_file(path, 2)
}

/// True when `dir` is a folder whose tree, `depth` levels down, holds only folders.
fn holds_no_file(dir: &Path, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().all(|entry| {
        entry.file_type().is_ok_and(|t| t.is_dir()) && depth > 0 && holds_no_file(&entry.path(), depth - 1)
    })
}

/// True when `dir` holds a sysstate repository's config.
fn is_repository(dir: &Path) -> bool {
    std::fs::read(dir.join("config")).is_ok_and(|bytes| {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|config| config["magic"] == crate::keys::CONFIG_MAGIC)
    })
}

/// The deepest mount point `fstab` names above `path` (not `/`) that is not mounted now.
fn unmounted_mount_point(path: &Path, fstab: &Path) -> Option<PathBuf> {
    let fstab = std::fs::read_to_string(fstab).ok()?;
    let mounted: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(|field| PathBuf::from(unescape(field))))
        .collect();
    fstab
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_whitespace().nth(1).map(|field| PathBuf::from(unescape(field))))
        .filter(|mount| mount.is_absolute() && mount != Path::new("/") && path.starts_with(mount))
        .filter(|mount| !mounted.contains(mount))
        .max_by_key(|mount| mount.components().count())
}

/// Undoes the octal escapes of fstab and mountinfo (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok().and_then(|digits| u8::from_str_radix(digits, 8).ok()));
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_targets_are_checked_against_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let fstab = dir.path().join("fstab");
        std::fs::write(
            &fstab,
            format!(
                "# comment\nUUID=1 / ext4 defaults 0 1\n/dev/sdz1 {}/usb\\040disk ext4 noauto 0 2\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let kind = |target: &Path| check(target, &fstab).err().map(|e| e.kind);
        assert_eq!(kind(&dir.path().join("new")), None, "a new folder under an existing one");
        assert_eq!(kind(&dir.path().join("missing/new")), Some(ErrorKind::Unavailable));
        std::fs::create_dir_all(dir.path().join("empty/lost+found")).unwrap();
        assert_eq!(kind(&dir.path().join("empty")), None, "lost+found alone is empty");
        std::fs::create_dir_all(dir.path().join("empty/data/00")).unwrap();
        assert_eq!(kind(&dir.path().join("empty")), None, "so is an empty layout");
        std::fs::write(dir.path().join("empty/data/00/x"), "x").unwrap();
        assert_eq!(kind(&dir.path().join("empty")), Some(ErrorKind::Unsuitable), "but not with a file in it");
        std::fs::remove_file(dir.path().join("empty/data/00/x")).unwrap();
        std::fs::write(dir.path().join("empty/notes.txt"), "x").unwrap();
        assert_eq!(kind(&dir.path().join("empty")), Some(ErrorKind::Unsuitable));
        std::fs::create_dir_all(dir.path().join("repo/data")).unwrap();
        std::fs::write(dir.path().join("repo/config"), r#"{"magic": "sysstate-repository"}"#).unwrap();
        assert_eq!(kind(&dir.path().join("repo/data/inner")), Some(ErrorKind::Unsuitable));
        let error = check(&dir.path().join("usb disk/backups"), &fstab).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Unavailable);
        assert!(error.message.contains("usb disk"), "{}", error.message);
        assert_eq!(unescape(r"/mnt/a\040b\\x"), r"/mnt/a b\\x");
    }
}
