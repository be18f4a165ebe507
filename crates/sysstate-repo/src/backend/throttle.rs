//! A bandwidth limit on writes (replication to a vault in work hours): each write starts no
//! sooner than the bytes before it, at the limit in force when they were sent, would have taken.
//! Leases are not held back: a refresh waiting behind packs at a low limit could let the lease
//! look abandoned.

use super::{Backend, FileKind, Result};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bytes per second allowed now (`None`: no limit), asked before every write.
pub type Limit = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// A backend whose writes are paced to a [`Limit`]; everything else passes through.
pub struct ThrottledBackend {
    inner: Arc<dyn Backend>,
    limit: Limit,
    /// When the bytes written so far have had their time.
    free_at: Mutex<Instant>,
}

impl std::fmt::Debug for ThrottledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottledBackend").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl ThrottledBackend {
    /// `inner`, its writes paced to `limit`.
    pub fn new(inner: Arc<dyn Backend>, limit: Limit) -> ThrottledBackend {
        ThrottledBackend { inner, limit, free_at: Mutex::new(Instant::now()) }
    }

    /// Waits for `length` bytes' turn.
    fn pace(&self, length: usize) {
        let Some(rate) = (self.limit)().filter(|rate| *rate > 0) else { return };
        let wait = {
            let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = (*free_at).max(now);
            *free_at = start + Duration::from_secs_f64(length as f64 / rate as f64);
            // The first bytes of a burst go at once; each write after waits for those before it.
            start - now
        };
        std::thread::sleep(wait);
    }
}

impl Backend for ThrottledBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> Result<()> {
        self.inner.create()
    }
    fn create_repository(&self, files: &[super::NewFile<'_>]) -> Result<bool> {
        self.inner.create_repository(files)
    }
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.inner.read_range(kind, name, offset, length)
    }
    fn read_range_streamed(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        self.inner.read_range_streamed(kind, name, offset, length, sink)
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        if kind != FileKind::Lock {
            self.pace(data.len());
        }
        self.inner.write(kind, name, data)
    }
    fn write_shared(&self, kind: FileKind, name: &str, data: bytes::Bytes) -> Result<()> {
        if kind != FileKind::Lock {
            self.pace(data.len());
        }
        self.inner.write_shared(kind, name, data)
    }
    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.inner.remove(kind, name)
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    fn clean_temporaries(&self, older_than: Duration, dry_run: bool) -> Result<Vec<String>> {
        self.inner.clean_temporaries(older_than, dry_run)
    }
    fn signed_read_url(&self, kind: FileKind, name: &str, valid_for: Duration) -> Result<Option<String>> {
        self.inner.signed_read_url(kind, name, valid_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_paced_to_the_limit_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Backend> = Arc::new(super::super::LocalBackend::new(dir.path()));
        inner.create().unwrap();
        let limited = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = limited.clone();
        let backend = ThrottledBackend::new(
            inner,
            Arc::new(move || flag.load(std::sync::atomic::Ordering::Relaxed).then_some(1 << 20)),
        );
        let started = Instant::now();
        for n in 0..4 {
            backend.write(FileKind::Index, &format!("i{n}"), &vec![n as u8; 256 << 10]).unwrap();
        }
        // Four quarters of a MiB at 1 MiB/s: the last starts 0.75 s after the first.
        assert!(started.elapsed() >= Duration::from_millis(700), "{:?}", started.elapsed());
        limited.store(false, std::sync::atomic::Ordering::Relaxed);
        let unlimited = Instant::now();
        for n in 4..8 {
            backend.write(FileKind::Index, &format!("i{n}"), &vec![n as u8; 256 << 10]).unwrap();
        }
        assert!(unlimited.elapsed() < Duration::from_millis(500), "{:?}", unlimited.elapsed());
        // A lease is never held back, even behind a burst.
        limited.store(true, std::sync::atomic::Ordering::Relaxed);
        backend.write(FileKind::Index, "burst", &vec![0u8; 4 << 20]).unwrap();
        let lease = Instant::now();
        backend.write(FileKind::Lock, "lease", b"held").unwrap();
        assert!(lease.elapsed() < Duration::from_millis(500), "{:?}", lease.elapsed());
    }
}
