use super::{ErrorClass, Phase, Stop, Writer, WriterError};
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A writer that holds the lock files an application's own tools take before they change its
/// data, so the data is never copied mid-transaction:
///
/// - `dpkg`: `/var/lib/dpkg/lock-frontend` and `/var/lib/dpkg/lock`, as apt and dpkg take them;
/// - `accounts`: `/etc/.pwd.lock`, as `lckpwdf(3)` (passwd, useradd, chpasswd …) takes it.
///
/// Both are POSIX write locks on the whole file. The locks are taken at prepare-snapshot —
/// waiting up to the prepare timeout for a holder to finish — and held until thaw. A holder that
/// does not let go in time fails the shadow set with `writer-retryable`, naming it.
#[derive(Debug)]
pub struct LockFileWriter {
    name: String,
    kind: &'static str,
    files: Vec<PathBuf>,
    prepare_timeout: Duration,
    freeze_timeout: Duration,
    held: Vec<File>,
    stop: Stop,
}

impl LockFileWriter {
    /// The `dpkg` writer for a root.
    pub fn dpkg(name: &str, root: &std::path::Path, prepare_timeout: Duration, freeze_timeout: Duration) -> Self {
        let files = ["var/lib/dpkg/lock-frontend", "var/lib/dpkg/lock"].iter().map(|f| root.join(f)).collect();
        LockFileWriter {
            name: name.into(),
            kind: "dpkg",
            files,
            prepare_timeout,
            freeze_timeout,
            held: Vec::new(),
            stop: Stop::default(),
        }
    }

    /// The `accounts` writer for a root.
    pub fn accounts(name: &str, root: &std::path::Path, prepare_timeout: Duration, freeze_timeout: Duration) -> Self {
        LockFileWriter {
            name: name.into(),
            kind: "accounts",
            files: vec![root.join("etc/.pwd.lock")],
            prepare_timeout,
            freeze_timeout,
            held: Vec::new(),
            stop: Stop::default(),
        }
    }

    fn acquire(&mut self, deadline: Instant) -> Result<(), WriterError> {
        let deadline = deadline.min(Instant::now() + self.prepare_timeout);
        let started = Instant::now();
        for path in &self.files {
            // The tools create their lock files when missing, with these modes.
            let file =
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(
                    |e| {
                        WriterError::new(
                            ErrorClass::Nonretryable,
                            format!("cannot open the lock file `{}`: {e}", path.display()),
                        )
                    },
                )?;
            loop {
                match rustix::fs::fcntl_lock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => break,
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::ACCESS) if Instant::now() < deadline => {
                        if !self.stop.pause() {
                            self.held.clear();
                            return Err(Stop::error(format_args!("waiting for the lock on `{}`", path.display())));
                        }
                    }
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::ACCESS) => {
                        self.held.clear();
                        let holders = sysstate_fs::file_lockers(path).unwrap_or_default();
                        let who = match holders.first() {
                            Some(holder) => format!("pid {} (`{}`)", holder.pid, holder.command),
                            None => "another process".into(),
                        };
                        return Err(WriterError::new(
                            ErrorClass::Retryable,
                            format!(
                                "`{}` is locked by {who}; waited {} ms for it",
                                path.display(),
                                started.elapsed().as_millis()
                            ),
                        ));
                    }
                    Err(error) => {
                        self.held.clear();
                        return Err(WriterError::new(
                            ErrorClass::Nonretryable,
                            format!("cannot lock `{}`: {error}", path.display()),
                        ));
                    }
                }
            }
            self.held.push(file);
        }
        Ok(())
    }
}

impl Writer for LockFileWriter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        self.kind
    }

    fn freeze_timeout(&self) -> Duration {
        self.freeze_timeout
    }

    fn set_stop(&mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Stop::new(stop);
    }

    fn handle(&mut self, phase: Phase, deadline: Instant) -> Result<(), WriterError> {
        match phase {
            Phase::PrepareSnapshot => self.acquire(deadline),
            // Closing the files releases the locks.
            Phase::Thaw | Phase::Abort | Phase::BackupComplete => {
                self.held.clear();
                Ok(())
            }
            Phase::Identify | Phase::PrepareBackup | Phase::Freeze | Phase::PostSnapshot => Ok(()),
        }
    }
}
