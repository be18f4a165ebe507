//! Writers' additions to a copy after post-snapshot (a database's backup label, its log).

use crate::error::ShadowError;
use crate::provider::{CommitRequest, CopyProvider, Provider, Reflink};
use crate::writer::CopyAddition;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Applies writers' additions to the copy whose root is `copy_root` (inside `dest`, the copy's
/// folder or snapshot). A read-only btrfs snapshot is made writable for the time it takes.
pub(super) fn apply_additions(
    live_root: &Path,
    copy_root: &Path,
    dest: &Path,
    additions: &[CopyAddition],
) -> Result<(), ShadowError> {
    let snapshot = crate::provider::is_subvolume(dest);
    let set_read_only = |value: &str| -> Result<(), ShadowError> {
        let output = sysstate_fs::command("btrfs")
            .args(["property", "set", "-ts"])
            .arg(dest)
            .args(["ro", value])
            .output()
            .map_err(|e| ShadowError::io(dest, e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ShadowError::io(
                dest,
                std::io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()),
            ))
        }
    };
    if snapshot {
        set_read_only("false")?;
    }
    let result = (|| {
        for addition in additions {
            match addition {
                CopyAddition::Contents(path, bytes) => {
                    let target = copy_root.join(path.strip_prefix("/").unwrap_or(path));
                    std::fs::write(&target, bytes).map_err(|e| ShadowError::io(&target, e))?;
                    // Owned like the folder it is in, readable by its owner only.
                    if let Some(parent) = target.parent().and_then(|p| std::fs::metadata(p).ok()) {
                        use std::os::unix::fs::MetadataExt;
                        if rustix::process::geteuid().is_root() {
                            std::os::unix::fs::chown(&target, Some(parent.uid()), Some(parent.gid()))
                                .map_err(|e| ShadowError::io(&target, e))?;
                        }
                    }
                    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                        .map_err(|e| ShadowError::io(&target, e))?;
                }
                CopyAddition::FromLive(path) => {
                    let never = AtomicBool::new(false);
                    CopyProvider { reflink: Reflink::Never }
                        .commit(&CommitRequest::whole(
                            live_root,
                            std::slice::from_ref(path),
                            copy_root,
                            Instant::now() + Duration::from_secs(3600),
                            &never,
                        ))
                        .map_err(|e| ShadowError::io(path, std::io::Error::other(format!("{e:?}"))))?;
                }
                CopyAddition::Remove(path) => {
                    let target = copy_root.join(path.strip_prefix("/").unwrap_or(path));
                    match std::fs::remove_file(&target) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(ShadowError::io(&target, e)),
                    }
                }
            }
        }
        Ok(())
    })();
    if snapshot {
        set_read_only("true")?;
    }
    result
}
