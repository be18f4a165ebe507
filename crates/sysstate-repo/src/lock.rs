//! Repository leases: `locks/<random id>` files that name their owner and expire when the
//! owner is gone.
//!
//! Backups, restores and checks take shared leases, so several may run at once; prune takes an
//! exclusive one. A lease is stale when its owner ran on this host and the process is gone (or
//! the pid now belongs to another process, told apart by its start time), or when it was not
//! refreshed for [`STALE_AFTER`]. Stale leases are removed by whoever finds them.

use crate::backend::{Backend, FileKind};
use crate::error::{RepoError, Result};
use crate::id::Id;
use serde::{Deserialize, Serialize};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
pub use sysstate_types::time::now_ns;

/// A lease not refreshed for this long is stale whatever its host.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

/// The content of a lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LeaseInfo {
    /// Host name of the owner.
    pub host: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22), against pid reuse.
    pub start_ticks: Option<u64>,
    /// What it runs (`backup`, `prune`, …).
    pub command: String,
    /// When it took the lease, ns since the epoch.
    pub since_ns: i64,
    /// When it last refreshed the lease.
    pub refreshed_ns: i64,
    /// Exclusive (prune) or shared.
    pub exclusive: bool,
}

impl LeaseInfo {
    /// `pid 4242 (`backup`) on host `h` since 2026-…`.
    pub fn describe(&self) -> String {
        format!(
            "pid {} (`{}`) on host `{}` since {}{}",
            self.pid,
            self.command,
            self.host,
            sysstate_types::time::format_utc(self.since_ns),
            if self.exclusive { ", exclusive" } else { "" }
        )
    }

    /// True when the lease's owner is gone: a process of this host that no longer runs, or a
    /// lease of another host not refreshed for 30 minutes.
    pub fn is_stale(&self, now_ns: i64, this_host: &str) -> bool {
        if self.host == this_host {
            return !process_alive(self.pid, self.start_ticks);
        }
        now_ns - self.refreshed_ns > STALE_AFTER.as_nanos() as i64
    }
}

/// The start time of a process, or `None` when it does not exist.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// True when `pid` runs and, if `start_ticks` is given, is the same process.
pub fn process_alive(pid: u32, start_ticks: Option<u64>) -> bool {
    match (process_start_ticks(pid), start_ticks) {
        (None, _) => false,
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
    }
}

/// The host name.
pub fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// The lease of a command that only reads.
#[derive(Debug)]
pub enum ReadLease {
    /// A shared lease, released on drop.
    Held(Lease),
    /// None, and why: the command reads without telling others.
    Without(String),
}

impl ReadLease {
    /// Why there is no lease, if there is none.
    pub fn without(&self) -> Option<String> {
        match self {
            ReadLease::Held(_) => None,
            ReadLease::Without(why) => Some(why.clone()),
        }
    }
}

/// A held lease; released on drop.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<dyn Backend>,
    name: String,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

/// The leases in the repository, with their file names.
pub fn list_leases(backend: &dyn Backend) -> Result<Vec<(String, Option<LeaseInfo>)>> {
    let mut out = Vec::new();
    for (name, _) in backend.list(FileKind::Lock)? {
        let info = match backend.read(FileKind::Lock, &name) {
            Ok(bytes) => serde_json::from_slice(&bytes).ok(),
            Err(error) if error.kind == crate::backend::ErrorKind::NotFound => continue,
            Err(error) => return Err(error.into()),
        };
        out.push((name, info));
    }
    Ok(out)
}

impl Lease {
    /// Takes a lease, removing stale ones on the way. Fails with [`RepoError::Locked`] naming
    /// the holder when an exclusive lease is held (or, for an exclusive lease, any lease).
    /// A shared lease for a command that only reads (restore, check, copy's source): none when
    /// `no_lock` asks for none, or when the repository is read-only (a write-protected disk, a
    /// read-only mount: what disaster recovery reads from) — an exclusive lease held by another
    /// process is still refused.
    pub fn for_reading(backend: Arc<dyn Backend>, command: &str, no_lock: bool) -> Result<ReadLease> {
        if no_lock {
            return Ok(ReadLease::Without("`--no-lock` was given".into()));
        }
        match Self::acquire(backend, false, command) {
            Ok(lease) => Ok(ReadLease::Held(lease)),
            Err(RepoError::Backend(error)) if error.kind == crate::backend::ErrorKind::Permission => {
                Ok(ReadLease::Without(format!("the repository cannot be written ({})", error.message)))
            }
            Err(error) => Err(error),
        }
    }

    pub fn acquire(backend: Arc<dyn Backend>, exclusive: bool, command: &str) -> Result<Lease> {
        let host = host_name();
        let pid = std::process::id();
        let now = now_ns();
        let info = LeaseInfo {
            host: host.clone(),
            pid,
            start_ticks: process_start_ticks(pid),
            command: command.to_string(),
            since_ns: now,
            refreshed_ns: now,
            exclusive,
        };
        Self::check_conflicts(&*backend, &info, None)?;
        let name = Id::random().to_hex();
        backend.write(FileKind::Lock, &name, &serde_json::to_vec(&info).expect("lease encodes"))?;
        // Another process may have written its lease between our check and our write: check
        // again now that ours is visible, and back off if there is a conflict.
        if let Err(error) = Self::check_conflicts(&*backend, &info, Some(&name)) {
            let _ = backend.remove(FileKind::Lock, &name);
            return Err(error);
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let refresher = {
            let backend = backend.clone();
            let name = name.clone();
            let mut info = info;
            std::thread::Builder::new()
                .name("sysstate-lease".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH_EVERY) {
                        info.refreshed_ns = now_ns();
                        if let Err(error) =
                            backend.write(FileKind::Lock, &name, &serde_json::to_vec(&info).expect("lease encodes"))
                        {
                            tracing::warn!(%error, "could not refresh the repository lease");
                        }
                    }
                })
                .map_err(|source| RepoError::Io { path: "lease refresher thread".into(), source })?
        };
        // Failpoint for the tests: a real process holding a real lease for a while.
        if let Some(secs) = sysstate_types::failpoint("HOLD_LEASE_SECS") {
            std::thread::sleep(Duration::from_secs(secs));
        }
        Ok(Lease { backend, name, stop: Some(stop), refresher: Some(refresher) })
    }

    fn check_conflicts(backend: &dyn Backend, ours: &LeaseInfo, our_name: Option<&str>) -> Result<()> {
        let now = now_ns();
        for (name, info) in list_leases(backend)? {
            if Some(name.as_str()) == our_name {
                continue;
            }
            let Some(info) = info else { continue };
            if info.is_stale(now, &ours.host) {
                tracing::warn!(lease = %name, holder = %info.describe(), "removing a stale repository lease");
                backend.remove(FileKind::Lock, &name)?;
                continue;
            }
            if info.exclusive || ours.exclusive {
                return Err(RepoError::Locked { location: backend.location(), holder: Box::new(info) });
            }
        }
        Ok(())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(refresher) = self.refresher.take() {
            let _ = refresher.join();
        }
        if let Err(error) = self.backend.remove(FileKind::Lock, &self.name) {
            tracing::warn!(%error, "could not release the repository lease");
        }
    }
}
