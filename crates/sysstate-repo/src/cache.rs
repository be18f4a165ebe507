//! A local cache of a remote repository's metadata: its index files, version manifests and the
//! packs that hold trees — what a backup needs to compare with its parent and a restore to plan
//! its work, without a round trip per directory.
//!
//! ```text
//! <cache dir>/CACHEDIR.TAG
//! <cache dir>/<repository id>/index/<name>
//! <cache dir>/<repository id>/versions/<name>
//! <cache dir>/<repository id>/packs/<xx>/<name>
//! ```
//!
//! Every file is named by the hash of its bytes, as in the repository, so the cache can never
//! hold another file under a name: an index file or manifest is hashed again when read from the
//! cache, and a tree read from a cached pack is decrypted and checked against its id like any
//! blob. Whatever fails those checks is deleted and read from the repository. What the
//! repository no longer lists (another host pruned or forgot) is deleted when the listing is
//! read. The cache is bounded (the packs used least recently go first), and safe to delete at
//! any time: it is only ever a copy. A command that checks or repairs the repository reads the
//! repository itself, never the cache.

use crate::id::Id;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The kinds of file the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Index files.
    Index,
    /// Version manifests.
    Version,
    /// Packs of trees.
    Pack,
}

impl Cached {
    fn dir(self) -> &'static str {
        match self {
            Cached::Index => "index",
            Cached::Version => "versions",
            Cached::Pack => "packs",
        }
    }
}

/// The cache of one repository.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    /// Packs being downloaded: a second reader waits for the first instead of downloading again.
    fetching: Mutex<HashMap<Id, Arc<Mutex<()>>>>,
    /// Packs whose time of use was refreshed by this process (once is enough for the order).
    touched: Mutex<HashSet<Id>>,
    /// Packs this process found damaged or unreadable in the repository: not downloaded again.
    refused: Mutex<HashSet<Id>>,
    /// A scratch cache's own folder, deleted when it is dropped.
    scratch: Option<PathBuf>,
}

/// A temporary file older than this is a killed process's.
const STALE: std::time::Duration = std::time::Duration::from_secs(3600);

const TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by sysstate: a cache of repository metadata.\n\
# It can be deleted at any time. See https://bford.info/cachedir/\n";

impl Cache {
    /// The cache of repository `repository` under `base` (created, owner only), holding at most
    /// `max_bytes`.
    pub fn open(base: &Path, repository: &Id, max_bytes: u64) -> std::io::Result<Cache> {
        let dir = base.join(repository.to_hex());
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for kind in [Cached::Index, Cached::Version, Cached::Pack] {
            builder.create(dir.join(kind.dir()))?;
        }
        let tag = base.join("CACHEDIR.TAG");
        if !tag.exists() {
            std::fs::write(&tag, TAG)?;
        }
        Ok(Cache {
            dir,
            max_bytes,
            fetching: Mutex::default(),
            touched: Mutex::default(),
            refused: Mutex::default(),
            scratch: None,
        })
    }

    /// A cache for one command that must read the repository itself (a check, a repair): it
    /// starts empty under `base`, so all it holds was read from the repository by this command
    /// (and checked against its name), and it is deleted when dropped.
    pub fn scratch(base: &Path, repository: &Id) -> std::io::Result<Cache> {
        let folder = base.join(format!("scratch-{}", Id::random().short()));
        let mut cache = Cache::open(&folder, repository, u64::MAX)?;
        cache.scratch = Some(folder);
        Ok(cache)
    }

    /// Where the cache of this repository lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, kind: Cached, id: &Id) -> PathBuf {
        let name = id.to_hex();
        match kind {
            Cached::Pack => self.dir.join(kind.dir()).join(&name[..2]).join(name),
            _ => self.dir.join(kind.dir()).join(name),
        }
    }

    /// The whole file `id`, when the cache holds it whole: its bytes are hashed again, and a
    /// file that does not match its name is deleted (and `None`).
    pub fn get(&self, kind: Cached, id: &Id) -> Option<Vec<u8>> {
        let path = self.path(kind, id);
        let bytes = std::fs::read(&path).ok()?;
        if Id::of_stored(&bytes) == *id {
            return Some(bytes);
        }
        tracing::warn!("the cached `{}` does not match its name; it is read from the repository again", path.display());
        let _ = std::fs::remove_file(&path);
        None
    }

    /// Keeps `bytes` (already checked against `id`) as file `id`. The cache is a copy: a failure
    /// to write it is logged, never an error of the command.
    pub fn put(&self, kind: Cached, id: &Id, bytes: &[u8]) {
        let path = self.path(kind, id);
        if let Err(error) = write_atomically(&path, bytes) {
            tracing::warn!("cannot keep `{}` in the cache: {error}", path.display());
        }
    }

    /// Forgets file `id`.
    pub fn remove(&self, kind: Cached, id: &Id) {
        let _ = std::fs::remove_file(self.path(kind, id));
    }

    /// True when the cache holds pack `id`.
    pub fn has_pack(&self, id: &Id) -> bool {
        self.path(Cached::Pack, id).exists()
    }

    /// `length` bytes at `offset` of the cached pack `id`; `None` when it is not cached or is
    /// shorter (then it is deleted). The caller checks what it reads, as every blob is checked.
    pub fn read_range(&self, id: &Id, offset: u64, length: u64) -> Option<Vec<u8>> {
        let path = self.path(Cached::Pack, id);
        let file = std::fs::File::open(&path).ok()?;
        if self.touched.lock().expect("touched lock").insert(*id) {
            // The pack used least recently goes first when the cache is full.
            let _ = file.set_modified(std::time::SystemTime::now());
        }
        let mut buffer = vec![0; length as usize];
        match file.read_exact_at(&mut buffer, offset) {
            Ok(()) => Some(buffer),
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Held while pack `id` is downloaded, so that it is downloaded once; `None` when it was
    /// refused (see [`refuse`](Self::refuse)).
    pub fn fetching(&self, id: &Id) -> Option<Arc<Mutex<()>>> {
        if self.refused.lock().expect("refused lock").contains(id) {
            return None;
        }
        Some(self.fetching.lock().expect("fetching lock").entry(*id).or_default().clone())
    }

    /// Pack `id` in the repository does not match its name or cannot be read: this process
    /// does not try to download it again.
    pub fn refuse(&self, id: &Id) {
        self.refused.lock().expect("refused lock").insert(*id);
    }

    /// Deletes every cached file of `kind` that `keep` refuses: what the repository no longer
    /// lists. Returns how many were deleted.
    pub fn retain(&self, kind: Cached, keep: impl Fn(&Id) -> bool) -> usize {
        let mut removed = 0;
        for (id, path, _) in self.files(kind) {
            if !keep(&id) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Deletes the packs used least recently until the cache holds at most its limit (index
    /// files and manifests stay: every command needs them).
    pub fn trim(&self) {
        let kept: u64 = [Cached::Index, Cached::Version]
            .into_iter()
            .flat_map(|kind| self.files(kind))
            .map(|(_, _, meta)| meta.len())
            .sum();
        let mut packs: Vec<(std::time::SystemTime, u64, PathBuf)> = self
            .files(Cached::Pack)
            .into_iter()
            .map(|(_, path, meta)| (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len(), path))
            .collect();
        let mut total = kept + packs.iter().map(|(_, size, _)| size).sum::<u64>();
        packs.sort();
        for (_, size, path) in packs {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }

    /// The files of `kind`: id, path and metadata; files not named by an id (a write's
    /// temporary file left by a killed process, an hour old: another process sharing the
    /// cache may be writing a newer one) are deleted.
    fn files(&self, kind: Cached) -> Vec<(Id, PathBuf, std::fs::Metadata)> {
        let top = self.dir.join(kind.dir());
        let dirs: Vec<PathBuf> = match kind {
            Cached::Pack => std::fs::read_dir(&top).into_iter().flatten().flatten().map(|e| e.path()).collect(),
            _ => vec![top],
        };
        let mut out = Vec::new();
        for dir in dirs {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                match entry.file_name().to_str().and_then(Id::from_hex) {
                    Some(id) if meta.is_file() => out.push((id, path, meta)),
                    _ if meta.is_file() && meta.modified().is_ok_and(|m| m.elapsed().is_ok_and(|a| a > STALE)) => {
                        let _ = std::fs::remove_file(&path);
                    }
                    _ => {}
                }
            }
        }
        out
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(folder) = &self.scratch {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees part
/// of it (owner only).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files are in folders");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let temporary = dir.join(format!(".tmp-{}", Id::random().to_hex()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(bytes))
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_does_not_match_its_name_is_dropped_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), &Id::random(), 1 << 30).unwrap();
        let bytes = b"an index file".to_vec();
        let id = Id::of_stored(&bytes);
        cache.put(Cached::Index, &id, &bytes);
        assert_eq!(cache.get(Cached::Index, &id), Some(bytes));
        std::fs::write(cache.path(Cached::Index, &id), b"damaged").unwrap();
        assert_eq!(cache.get(Cached::Index, &id), None);
        assert!(!cache.path(Cached::Index, &id).exists(), "the damaged copy was kept");
    }

    #[test]
    fn what_the_repository_no_longer_lists_is_deleted_and_the_oldest_packs_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), &Id::random(), 2500).unwrap();
        let packs: Vec<Id> = (0..3u8)
            .map(|i| {
                let bytes = vec![i; 1000];
                let id = Id::of_stored(&bytes);
                cache.put(Cached::Pack, &id, &bytes);
                let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000 * u64::from(i) + 1);
                std::fs::File::options()
                    .write(true)
                    .open(cache.path(Cached::Pack, &id))
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
                id
            })
            .collect();
        // Reading the first makes it the most recent.
        assert_eq!(cache.read_range(&packs[0], 10, 5), Some(vec![0; 5]));
        cache.trim();
        assert!(cache.has_pack(&packs[0]) && !cache.has_pack(&packs[1]) && cache.has_pack(&packs[2]));
        assert_eq!(cache.retain(Cached::Pack, |id| *id != packs[2]), 1);
        assert!(!cache.has_pack(&packs[2]));
        // A read past the end of a cached pack (a truncated copy) drops it.
        assert_eq!(cache.read_range(&packs[0], 990, 20), None);
        assert!(!cache.has_pack(&packs[0]));
    }
}
