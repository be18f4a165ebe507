use super::{ErrorClass, Phase, Writer, WriterError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from `<linux/fs.h>`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Freezes whole filesystems (`FIFREEZE`) for the freeze window and thaws them (`FITHAW`).
///
/// A write to a frozen filesystem blocks, uninterruptibly, until the thaw: freezing the
/// filesystem that holds sysstate's own state, shadow storage, target or binary would hang
/// sysstate itself. Those are refused at identify. The coordinator's watchdog thaws at the end
/// of the window whatever the main flow is doing.
#[derive(Debug)]
pub struct FsfreezeWriter {
    name: String,
    mount_points: Vec<PathBuf>,
    protected: Vec<(String, PathBuf)>,
    freeze_timeout: Duration,
    frozen: Vec<(PathBuf, File)>,
    /// One process per frozen filesystem that thaws it at the end of the window if sysstate
    /// cannot (killed with SIGKILL: no watchdog, no guard runs then).
    guardians: Vec<std::process::Child>,
}

impl FsfreezeWriter {
    /// A writer for `mount_points`, refusing any that holds one of `protected` (what, path).
    pub fn new(
        name: &str,
        mount_points: Vec<PathBuf>,
        protected: Vec<(String, PathBuf)>,
        freeze_timeout: Duration,
    ) -> Self {
        FsfreezeWriter {
            name: name.into(),
            mount_points,
            protected,
            freeze_timeout,
            frozen: Vec::new(),
            guardians: Vec::new(),
        }
    }

    fn check(&self) -> Result<(), WriterError> {
        for mount in &self.mount_points {
            let meta = std::fs::metadata(mount).map_err(|e| {
                WriterError::new(ErrorClass::Nonretryable, format!("mount point `{}`: {e}", mount.display()))
            })?;
            let parent_dev = mount.parent().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.dev());
            if mount.parent().is_some() && parent_dev == Some(meta.dev()) {
                return Err(WriterError::new(
                    ErrorClass::Nonretryable,
                    format!("`{}` is not a mount point: fsfreeze freezes whole filesystems", mount.display()),
                ));
            }
            for (what, path) in &self.protected {
                // The nearest existing ancestor tells the filesystem a path will be on.
                let existing = path.ancestors().find(|p| p.exists());
                if existing.and_then(|p| std::fs::metadata(p).ok()).is_some_and(|m| m.dev() == meta.dev()) {
                    return Err(WriterError::new(
                        ErrorClass::Nonretryable,
                        format!("refusing to freeze `{}`: it holds the {what} `{}`, and sysstate would block on its own writes", mount.display(), path.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Starts the process that thaws `mount` at the end of the window whatever happens to this
    /// one: `fsfreeze --unfreeze` (util-linux) after the window. It is a child of sysstate and
    /// outlives it; a thaw by sysstate stops it first.
    fn guard(&mut self, mount: &std::path::Path) -> Result<(), WriterError> {
        let guardian = crate::writer::guardian_command(self.freeze_timeout, mount)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                WriterError::new(
                    ErrorClass::Nonretryable,
                    format!("cannot start the thaw guardian of `{}`: {e}", mount.display()),
                )
            })?;
        self.guardians.push(guardian);
        Ok(())
    }

    fn thaw(&mut self) -> Result<(), WriterError> {
        for mut guardian in self.guardians.drain(..) {
            let _ = guardian.kill();
            let _ = guardian.wait();
        }
        let mut failure = None;
        while let Some((mount, file)) = self.frozen.pop() {
            // SAFETY: FITHAW takes no argument through the pointer; `file` is an open
            // directory on the filesystem to thaw.
            if unsafe { libc::ioctl(file.as_raw_fd(), FITHAW as _, 0) } != 0 {
                failure = Some(format!("cannot thaw `{}`: {}", mount.display(), std::io::Error::last_os_error()));
            }
        }
        match failure {
            Some(message) => Err(WriterError::new(ErrorClass::Nonretryable, message)),
            None => Ok(()),
        }
    }
}

impl Writer for FsfreezeWriter {
    fn name(&self) -> &str {
        &self.name
    }

    fn recover(&mut self, _frozen: bool, _deadline: Instant) -> Result<(), WriterError> {
        // This writer froze nothing itself: thaw every mount point, whoever froze it. A
        // filesystem that is not frozen refuses the thaw (EINVAL), which is what we want.
        for mount in &self.mount_points {
            let file = File::open(mount).map_err(|e| {
                WriterError::new(ErrorClass::Nonretryable, format!("cannot open `{}`: {e}", mount.display()))
            })?;
            // SAFETY: as in `thaw`.
            if unsafe { libc::ioctl(file.as_raw_fd(), FITHAW as _, 0) } != 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EINVAL) {
                    return Err(WriterError::new(
                        ErrorClass::Nonretryable,
                        format!("cannot thaw `{}`: {error}", mount.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "fsfreeze"
    }

    fn freeze_timeout(&self) -> Duration {
        self.freeze_timeout
    }

    fn handle(&mut self, phase: Phase, _deadline: Instant) -> Result<(), WriterError> {
        match phase {
            Phase::Identify => self.check(),
            Phase::Freeze => {
                for mount in self.mount_points.clone() {
                    let file = File::open(&mount).map_err(|e| {
                        WriterError::new(ErrorClass::Nonretryable, format!("cannot open `{}`: {e}", mount.display()))
                    })?;
                    if let Err(error) = self.guard(&mount) {
                        let _ = self.thaw();
                        return Err(error);
                    }
                    // SAFETY: FIFREEZE takes no argument through the pointer; `file` is an open
                    // directory on the filesystem to freeze.
                    if unsafe { libc::ioctl(file.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
                        let error = std::io::Error::last_os_error();
                        let _ = self.thaw();
                        return Err(WriterError::new(
                            ErrorClass::Nonretryable,
                            format!("cannot freeze `{}`: {error}", mount.display()),
                        ));
                    }
                    self.frozen.push((mount, file));
                }
                Ok(())
            }
            Phase::Thaw | Phase::Abort => self.thaw(),
            Phase::PrepareBackup | Phase::PrepareSnapshot | Phase::PostSnapshot | Phase::BackupComplete => Ok(()),
        }
    }
}

impl Drop for FsfreezeWriter {
    fn drop(&mut self) {
        // Never leave a filesystem frozen, whatever happened.
        let _ = self.thaw();
    }
}
