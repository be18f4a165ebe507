//! How a long operation (backup, restore, check, prune) reports how far it is and what it
//! skipped. The library never prints: the caller's [`Progress`] draws a bar, feeds the job
//! store, or both. Called from several threads.

/// One entry that could not be backed up or restored, or was skipped on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The path, as seen from the root.
    pub path: String,
    /// What happened.
    pub message: String,
}

/// Reports progress; called from several threads. Every method has a no-op default.
pub trait Progress: Send + Sync {
    /// A file's content was read (or taken from the parent), or written.
    fn file_done(&self, _bytes: u64) {}
    /// An entry was skipped or failed.
    fn warning(&self, _warning: &Warning) {}
    /// About `bytes` are to be processed in all (an estimate: the parent version's size).
    fn total(&self, _bytes: u64) {}
    /// About `files` files are to be processed in all (an estimate, as [`Progress::total`]).
    fn total_files(&self, _files: u64) {}
    /// `done` of `total` bytes are processed (operations that count bytes, not files: check,
    /// prune).
    fn bytes(&self, _done: u64, _total: u64) {}
}

/// No progress reporting.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}
