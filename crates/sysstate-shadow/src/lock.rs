//! The machine's shadow-set lock: one shadow set at a time, like VSS.
//!
//! `<runtime>/shadow-set.lock` is held with `flock(LOCK_EX)` and holds its holder's JSON. The
//! kernel drops a flock when its process dies, so a dead holder never blocks anyone; its JSON is
//! still in the file, which is how a take-over is noticed and reported.

use crate::error::ShadowError;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LockHolder {
    /// Its pid.
    pub pid: u32,
    /// Its command line.
    pub command: String,
    /// Its job id, if it runs one.
    pub job: Option<String>,
    /// Since when, ns since the epoch.
    pub since_ns: i64,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} (`{}`)", self.pid, self.command)?;
        if let Some(job) = &self.job {
            write!(f, ", job {job}")?;
        }
        write!(f, ", since {}", sysstate_types::time::format_utc(self.since_ns))
    }
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct ShadowSetLock {
    file: File,
    path: PathBuf,
}

/// The lock file in a runtime directory.
pub fn lock_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("shadow-set.lock")
}

/// The current holder, if the lock is held (for `sysstate providers` and the doctor).
pub fn current_holder(runtime_dir: &Path) -> Option<LockHolder> {
    let mut file = File::open(lock_path(runtime_dir)).ok()?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => None,
        Err(_) => {
            let mut text = String::new();
            file.read_to_string(&mut text).ok()?;
            serde_json::from_str(&text).ok()
        }
    }
}

impl ShadowSetLock {
    /// Takes the lock, waiting up to `wait` for a holder to finish. Returns the lock and, when
    /// the file named a holder that is gone, that holder (taken over).
    pub fn acquire(
        runtime_dir: &Path,
        holder: &LockHolder,
        wait: Option<Duration>,
    ) -> Result<(ShadowSetLock, Option<LockHolder>), ShadowError> {
        std::fs::create_dir_all(runtime_dir).map_err(|e| ShadowError::io(runtime_dir, e))?;
        let path = lock_path(runtime_dir);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| ShadowError::io(&path, e))?;
        let until = wait.map(|w| Instant::now() + w);
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    if until.is_some_and(|u| Instant::now() < u) {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let current = serde_json::from_str(&text).unwrap_or(LockHolder {
                        pid: 0,
                        command: "unknown (the lock file names nobody)".into(),
                        job: None,
                        since_ns: 0,
                    });
                    return Err(ShadowError::InProgress(current));
                }
                Err(error) => return Err(ShadowError::io(&path, error.into())),
            }
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let previous: Option<LockHolder> = serde_json::from_str(&text).ok();
        let json = serde_json::to_vec(holder).expect("holders encode");
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(&json))
            .and_then(|_| file.flush())
            .map_err(|e| ShadowError::io(&path, e))?;
        Ok((ShadowSetLock { file, path }, previous))
    }
}

impl Drop for ShadowSetLock {
    fn drop(&mut self) {
        // Empty the file first, so a reader that finds it unlocked does not see a stale holder.
        let _ = self.file.set_len(0);
        let _ = rustix::fs::flock(&self.file, rustix::fs::FlockOperation::Unlock);
        tracing::debug!(path = %self.path.display(), "shadow-set lock released");
    }
}
