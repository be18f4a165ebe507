use super::{Backend, ErrorKind, FileKind, Result};
use std::sync::Arc;
use std::time::Duration;

/// Retries transient failures with exponential backoff (0.1 s, 0.2 s, … up to 5 tries).
#[derive(Debug)]
pub struct RetryBackend {
    inner: Arc<dyn Backend>,
    tries: u32,
}

impl RetryBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        RetryBackend { inner, tries: 5 }
    }

    fn retry<T>(&self, mut operation: impl FnMut() -> Result<T>) -> Result<T> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match operation() {
                Err(error) if error.kind == ErrorKind::Transient && attempt < self.tries => {
                    tracing::warn!(%error, attempt, "transient backend error, retrying");
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
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.retry(|| self.inner.write(kind, name, data))
    }
    fn create_repository(&self, files: &[super::NewFile<'_>]) -> Result<bool> {
        self.retry(|| self.inner.create_repository(files))
    }

    fn clean_temporaries(&self, older_than: std::time::Duration, dry_run: bool) -> Result<Vec<String>> {
        self.retry(|| self.inner.clean_temporaries(older_than, dry_run))
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        self.retry(|| self.inner.remove(kind, name))
    }
}
