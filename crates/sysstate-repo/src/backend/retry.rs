use super::{Backend, ErrorKind, FileKind, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Retries transient failures with exponential backoff (0.1 s, 0.2 s, … 3.2 s: 7 tries over
/// about 6 s), and counts requests and retries so that a job can say how many there were: a
/// retry that succeeds is not silent (see [`RequestCounts`]). The object store client's own
/// retries are off, so every retry is one of these.
#[derive(Debug)]
pub struct RetryBackend {
    inner: Arc<dyn Backend>,
    tries: u32,
}

/// Requests made to every repository's storage by this process, and how many were tries again
/// after a passing fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// Requests, each try counted.
    pub requests: u64,
    /// Of them, tries again after a passing fault.
    pub retried: u64,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static RETRIED: AtomicU64 = AtomicU64::new(0);

impl RequestCounts {
    /// The counts so far (a job takes them when it starts and when it ends; the difference is
    /// its own while it is the process's only job).
    pub fn now() -> RequestCounts {
        RequestCounts { requests: REQUESTS.load(Ordering::Relaxed), retried: RETRIED.load(Ordering::Relaxed) }
    }

    /// What was counted since `earlier`.
    pub fn since(self, earlier: RequestCounts) -> RequestCounts {
        RequestCounts {
            requests: self.requests.saturating_sub(earlier.requests),
            retried: self.retried.saturating_sub(earlier.retried),
        }
    }
}

impl RetryBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        RetryBackend { inner, tries: 7 }
    }

    fn retry<T>(&self, mut operation: impl FnMut() -> Result<T>) -> Result<T> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            match operation() {
                Err(error) if error.kind == ErrorKind::Transient && attempt < self.tries => {
                    tracing::warn!("a passing fault, tried again in {} ms (try {attempt}): {error}", delay.as_millis());
                    RETRIED.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl Backend for RetryBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }
    fn create(&self) -> Result<()> {
        self.retry(|| self.inner.create())
    }
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        self.retry(|| self.inner.list(kind))
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        self.retry(|| self.inner.read(kind, name))
    }
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        self.retry(|| self.inner.read_range(kind, name, offset, length))
    }
    fn read_range_streamed(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        // A try again goes on from the first byte not given yet.
        let mut given = 0;
        self.retry(|| {
            self.inner.read_range_streamed(kind, name, offset + given, length - given, &mut |piece| {
                given += piece.len() as u64;
                sink(piece)
            })
        })
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.retry(|| self.inner.write(kind, name, data))
    }
    fn write_shared(&self, kind: FileKind, name: &str, data: bytes::Bytes) -> Result<()> {
        self.retry(|| self.inner.write_shared(kind, name, data.clone()))
    }
    fn create_repository(&self, files: &[super::NewFile<'_>]) -> Result<bool> {
        self.retry(|| self.inner.create_repository(files))
    }

    fn clean_temporaries(&self, older_than: std::time::Duration, dry_run: bool) -> Result<Vec<String>> {
        self.retry(|| self.inner.clean_temporaries(older_than, dry_run))
    }

    fn signed_read_url(&self, kind: FileKind, name: &str, valid_for: std::time::Duration) -> Result<Option<String>> {
        self.inner.signed_read_url(kind, name, valid_for)
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.retry(|| self.inner.remove(kind, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::testing::Dribbling;

    #[test]
    fn a_streamed_read_that_drops_goes_on_from_the_first_byte_not_given() {
        let dir = tempfile::tempdir().unwrap();
        let dribbling = Arc::new(Dribbling::new(dir.path(), usize::MAX, Some(1000)));
        *dribbling.drops.lock().unwrap() = 2;
        dribbling.create().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|n| (n * 7) as u8).collect();
        dribbling.write(FileKind::Pack, "ab", &data).unwrap();
        let retry = RetryBackend::new(dribbling.clone());
        let mut got = Vec::new();
        retry.read_range_streamed(FileKind::Pack, "ab", 500, 9000, &mut |piece| got.extend_from_slice(piece)).unwrap();
        assert_eq!(got, data[500..9500]);
        // Each try again asked only for what was missing.
        assert_eq!(*dribbling.asked.lock().unwrap(), [(500, 9000), (1500, 8000), (2500, 7000)]);
    }
}
