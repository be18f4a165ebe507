//! Where repository files live: a small [`Backend`] trait, the local directory backend, object
//! storage through `object_store`, and a retry decorator.
//!
//! Every backend keeps the same promises, checked by one conformance suite: a write is atomic
//! and durable when it returns; an existing file is never replaced by other bytes (a mismatch is
//! reported as corruption), except lock files, which are leases and are refreshed in place.

mod local;
mod new_target;
mod object;
mod retry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod throttle;
pub mod vault;

pub use local::LocalBackend;
pub use object::ObjectBackend;
pub use retry::{RequestCounts, RetryBackend};
pub use throttle::{Limit, ThrottledBackend};

use std::fmt;
use std::sync::Arc;

/// The kinds of file in a repository, each in its own folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// `config`: the repository's frozen parameters (one file).
    Config,
    /// `keys/`: the master key wrapped per passphrase.
    Key,
    /// `data/xx/`: pack files.
    Pack,
    /// `index/`: index files.
    Index,
    /// `versions/`: version manifests.
    Version,
    /// `locks/`: leases.
    Lock,
    /// `protected/`: one empty file per protected version, named by its id.
    Protection,
    /// `vault/`: a vault's own records (hosts, owners of versions, soft deletions, policy), one
    /// small file each; hosts never reach them (`sysstate-vault`).
    VaultRecord,
    /// `vault-added/`: which host added each pack (`PACK~HOST`, empty), for the vault's report
    /// of what each host stores; hosts never reach them.
    VaultAddition,
}

impl FileKind {
    /// Every kind that has a folder of its own (all but the config): a repository's layout.
    pub const FOLDERS: [FileKind; 8] = [
        FileKind::Key,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Version,
        FileKind::Lock,
        FileKind::Protection,
        FileKind::VaultRecord,
        FileKind::VaultAddition,
    ];

    /// The folder name.
    pub fn dir(self) -> &'static str {
        match self {
            FileKind::Config => "",
            FileKind::Key => "keys",
            FileKind::Pack => "data",
            FileKind::Index => "index",
            FileKind::Version => "versions",
            FileKind::Lock => "locks",
            FileKind::Protection => "protected",
            FileKind::VaultRecord => "vault",
            FileKind::VaultAddition => "vault-added",
        }
    }

    /// The path of a file of this kind relative to the repository root.
    pub fn path(self, name: &str) -> String {
        match self {
            FileKind::Config => "config".to_string(),
            FileKind::Pack => format!("data/{}/{}", &name[..name.len().min(2)], name),
            _ => format!("{}/{}", self.dir(), name),
        }
    }
}

/// How a backend operation failed; callers decide what to retry and what to tell the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file does not exist.
    NotFound,
    /// A passing fault (timeout, connection reset, 5xx, EINTR): worth a retry.
    Transient,
    /// The target has no space left.
    NoSpace,
    /// Access is denied, or the target is read-only.
    Permission,
    /// The target itself cannot be reached or does not exist.
    Unavailable,
    /// An existing file holds other bytes than the ones written under its name, or fewer than
    /// a read of it needs (it was truncated).
    Mismatch,
    /// The target is no place for a new repository (a folder of other files, inside another
    /// repository).
    Unsuitable,
    /// A vault refused the request: what a host may not do (delete, overwrite, read another
    /// host's versions), or a token it does not know.
    Forbidden,
    /// A vault did not answer, or its certificate is not the one pinned.
    VaultUnreachable,
    /// Anything else; retrying will not help.
    Permanent,
}

/// A failed backend operation, naming the file and the target.
#[derive(Debug, thiserror::Error)]
#[error("{operation} `{path}` on `{location}`: {message}")]
pub struct BackendError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// `read`, `write`, `list`, `remove`.
    pub operation: &'static str,
    /// The repository-relative path.
    pub path: String,
    /// The target's location.
    pub location: String,
    /// The underlying message.
    pub message: String,
}

impl BackendError {
    /// Classifies an I/O error.
    pub fn from_io(operation: &'static str, path: String, location: String, error: &std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match (error.kind(), error.raw_os_error()) {
            (Io::NotFound, _) => ErrorKind::NotFound,
            // Only reads of a whole range meet the end of a file: the file was truncated.
            (Io::UnexpectedEof, _) => ErrorKind::Mismatch,
            (_, Some(code)) if code == rustix::io::Errno::NOSPC.raw_os_error() => ErrorKind::NoSpace,
            (_, Some(code)) if code == rustix::io::Errno::DQUOT.raw_os_error() => ErrorKind::NoSpace,
            (_, Some(code)) if code == rustix::io::Errno::ROFS.raw_os_error() => ErrorKind::Permission,
            (Io::PermissionDenied, _) => ErrorKind::Permission,
            (Io::Interrupted | Io::TimedOut | Io::WouldBlock, _) => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        };
        BackendError { kind, operation, path, location, message: error.to_string() }
    }
}

/// [`Backend::read_range`] gathered from [`Backend::read_range_streamed`], for the backends
/// whose reads stream. The room reserved up front is bounded: `length` may come from a
/// damaged or hostile index.
fn gather_range(backend: &dyn Backend, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(length.min(16 << 20) as usize);
    backend.read_range_streamed(kind, name, offset, length, &mut |piece| bytes.extend_from_slice(piece))?;
    Ok(bytes)
}

/// Hands `piece` to `sink`, but never more than `length` bytes in all (whatever a store
/// answers); `given` counts what was handed.
fn give(piece: &[u8], given: &mut u64, length: u64, sink: &mut dyn FnMut(&[u8])) {
    let piece = &piece[..piece.len().min(length.saturating_sub(*given) as usize)];
    *given += piece.len() as u64;
    sink(piece);
}

/// Result of backend operations.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Storage for repository files. Implementations are blocking and thread-safe.
pub trait Backend: Send + Sync + fmt::Debug {
    /// A human-readable location (`/var/backups/sysstate`, `s3://bucket/prefix`).
    fn location(&self) -> String;
    /// Makes sure the target's place exists (a local folder and its layout; a bucket answers).
    fn create(&self) -> Result<()>;
    /// Creates a new repository of `files` (its config and first key) so that no one sees part
    /// of it: `Ok(true)` when this call made it, `Ok(false)` when a repository stands there
    /// already (another creator won a race; nothing of this call is left). The default, for
    /// object stores: the key first, then the config, read back to see whose it is.
    fn create_repository(&self, files: &[NewFile<'_>]) -> Result<bool> {
        create_config_last(self, files)
    }
    /// Names and sizes of the files of one kind.
    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>>;
    /// The whole file.
    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>>;
    /// `length` bytes from `offset`.
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>>;
    /// [`read_range`](Backend::read_range) handing the bytes to `sink` as they arrive, in
    /// order and in pieces of any size, so that a reader works on the first while the rest are
    /// on their way (and keeps no copy of the whole). `Ok` when all `length` bytes were given;
    /// after an error `sink` may have had some of them. The default reads the range whole.
    fn read_range_streamed(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        sink(&self.read_range(kind, name, offset, length)?);
        Ok(())
    }
    /// Stores a file atomically and durably. An existing file with the same bytes is success; with
    /// other bytes it is an [`ErrorKind::Mismatch`] (but for locks, which are replaced).
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()>;
    /// [`write`](Backend::write) of bytes the caller gives up: an object store sends them
    /// without a copy (a pack is 8 MiB).
    fn write_shared(&self, kind: FileKind, name: &str, data: bytes::Bytes) -> Result<()> {
        self.write(kind, name, &data)
    }
    /// Deletes a file; a missing file is success.
    fn remove(&self, kind: FileKind, name: &str) -> Result<()>;
    /// True when every request is a round trip over a network (object storage): such a
    /// repository is read through a local cache and with many requests in flight.
    fn is_remote(&self) -> bool {
        false
    }
    /// A URL that reads this one file without credentials, for `valid_for` (GET, `Range`
    /// allowed): an object store signs one; `None` where the storage cannot.
    fn signed_read_url(&self, _kind: FileKind, _name: &str, _valid_for: std::time::Duration) -> Result<Option<String>> {
        Ok(None)
    }
    /// The temporary files (`.tmp-*`) of writes that never finished, older than `older_than`
    /// (repository-relative paths); removed unless `dry_run`. Object stores have none: an
    /// upload is atomic.
    fn clean_temporaries(&self, _older_than: std::time::Duration, _dry_run: bool) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// Creates a repository of `files` in place: its place, then every file but the config, then
/// the config, written only if absent and read back to see whose it is. A creator that lost
/// removes its own files. `Ok(true)` when this call made the repository.
fn create_config_last<B: Backend + ?Sized>(backend: &B, files: &[NewFile<'_>]) -> Result<bool> {
    backend.create()?;
    if !backend.list(FileKind::Config)?.is_empty() {
        return Ok(false);
    }
    let (config, others): (Vec<&NewFile<'_>>, Vec<&NewFile<'_>>) =
        files.iter().partition(|file| file.kind == FileKind::Config);
    for file in &others {
        backend.write(file.kind, file.name, file.data)?;
    }
    let mut won = true;
    for file in config {
        won = match backend.write(file.kind, file.name, file.data) {
            Ok(()) => backend.read(file.kind, file.name)? == file.data,
            Err(error) if error.kind == ErrorKind::Mismatch => false,
            Err(error) => return Err(error),
        };
    }
    if !won {
        for file in &others {
            backend.remove(file.kind, file.name)?;
        }
    }
    Ok(won)
}

/// One file of a new repository.
#[derive(Debug, Clone, Copy)]
pub struct NewFile<'a> {
    /// Its kind.
    pub kind: FileKind,
    /// Its name.
    pub name: &'a str,
    /// Its bytes.
    pub data: &'a [u8],
}

/// Opens the repository behind a vault, with this host's credentials.
pub fn open_vault(credentials: &vault::VaultCredentials) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(RetryBackend::new(Arc::new(vault::VaultBackend::open(credentials)?))))
}

/// Opens a target that is a folder or an object store's URL (a vault's needs credentials:
/// [`open_vault`]).
pub fn open_target(target: &str) -> Result<Arc<dyn Backend>> {
    open_target_with(target, &[])
}

/// [`open_target`], with settings for an object store that win over the environment's: pairs
/// named as the environment variables are (`AWS_ENDPOINT`, `AZURE_STORAGE_ACCOUNT_KEY`, …).
pub fn open_target_with(target: &str, settings: &[(String, String)]) -> Result<Arc<dyn Backend>> {
    let backend: Arc<dyn Backend> = if target.contains("://") {
        Arc::new(ObjectBackend::open_with(target, settings)?)
    } else {
        Arc::new(LocalBackend::new(target))
    };
    Ok(Arc::new(RetryBackend::new(backend)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_store_that_answers_more_than_was_asked_gives_only_what_was_asked() {
        let (mut given, mut got) = (0, Vec::new());
        for piece in [&[1u8, 2, 3][..], &[4, 5, 6, 7], &[8, 9]] {
            super::give(piece, &mut given, 5, &mut |bytes| got.extend_from_slice(bytes));
        }
        assert_eq!((given, got), (5, vec![1, 2, 3, 4, 5]));
    }
}
