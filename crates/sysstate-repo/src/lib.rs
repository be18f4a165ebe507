//! The sysstate repository: format, chunking, crypto, packs, index, trees, versions, the
//! archiver and restorer, upkeep (check, forget, prune, copy), and the storage backends.
//!
//! This crate knows nothing about writers, components or terminals: it stores trees of files
//! and reads them back. Its invariants, specified in `docs/FORMAT.md`: files are written packs →
//! index → version, each atomically and durably; an existing file is never rewritten with other
//! bytes; every blob read is decrypted and checked against its id; a tree from the repository is
//! never trusted to name a path outside the restore root.

pub mod archiver;
pub mod backend;
pub mod cache;
pub mod check;
pub mod chunker;
mod content;
pub mod crypto;
mod error;
pub mod fetcher;
pub mod forget;
pub mod id;
pub mod index;
pub mod inplace;
pub mod keys;
pub mod lock;
pub mod meta;
pub mod pack;
mod progress;
pub mod prune;
pub mod repair;
pub mod replicate;
mod repo;
pub mod restorer;
pub mod saver;
pub mod source;
pub mod tree;
pub mod version;

pub use error::{RepoError, Result};
pub use id::Id;
pub use progress::{NoProgress, Progress, Warning};
pub use repo::{DamageHook, Damaged, Repository, DEFAULT_CONNECTIONS};
