//! Storing blobs: dedup against the index and this session, compress, seal, pack, and write
//! packs and index files in the order that keeps the repository consistent (packs → index;
//! the caller writes the version last).

use crate::backend::FileKind;
use crate::crypto::Label;
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::pack::{BlobKind, PackBuilder, PACK_TARGET_SIZE};
use crate::repo::Repository;
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// zstd level. Measured on a 1 GB copy of /usr/share, /usr/include and /usr/bin (52,000 files,
/// `bench/run --corpus system`): level 3 made a 364 MB repository and took about 0.8 s more CPU than
/// level 2 (373 MB); level 1 saved another 0.3 s for 386 MB. Compression is most of a first
/// backup's CPU on two cores, and level 2 keeps the repository within 1.5% of restic's.
pub const ZSTD_LEVEL: i32 = 2;
/// Blobs smaller than this are stored uncompressed (the frame overhead eats the gain).
const MIN_COMPRESS: usize = 64;
/// Write an index file after this many packs, to bound the memory of a long backup.
const PACKS_PER_INDEX: usize = 256;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    /// A sealer thread's buffers: the compressed payload, and the sealed blob. Reused from blob to
    /// blob, so storing a blob allocates nothing once they have grown to the largest chunk.
    static BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Compresses `data` into `out` (replacing what it held); true when that made it smaller by at
/// least 1/32, else `out` is to be ignored and `data` stored as it is.
fn compress_into(data: &[u8], out: &mut Vec<u8>) -> bool {
    if data.len() < MIN_COMPRESS {
        return false;
    }
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    let compressed = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor =
            cell.get_or_insert_with(|| zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd level 2 is valid"));
        compressor.compress_to_buffer(data, out).ok()
    });
    compressed.is_some_and(|length| length < data.len() - data.len() / 32)
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompresses a blob of `raw_length` bytes, with this thread's decompression context (making
/// one costs more than decompressing a small tree blob).
pub fn decompress(data: &[u8], raw_length: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(decompressor) => decompressor,
            None => cell.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(data, raw_length)
    })
}

/// Counters of what a saver wrote.
#[derive(Debug, Default)]
pub struct SaverStats {
    /// Blobs added.
    pub blobs: AtomicU64,
    /// Plaintext bytes of blobs added.
    pub raw_bytes: AtomicU64,
    /// Bytes of packs written.
    pub stored_bytes: AtomicU64,
}

/// Stores blobs into a repository; shared by the threads of one operation.
#[derive(Debug)]
pub struct BlobSaver<'r> {
    repo: &'r Repository,
    pending: Mutex<HashSet<Id>>,
    data_pack: Mutex<PackBuilder>,
    tree_pack: Mutex<PackBuilder>,
    written: Mutex<Vec<IndexPack>>,
    /// Uploads packs in the background to a remote repository.
    uploader: Option<Uploader>,
    /// What was written.
    pub stats: SaverStats,
}

/// Packs uploaded at most this many at a time (and one more waiting), so that sealing goes on
/// while they travel: up to `(UPLOADS + 1) × PACK_TARGET_SIZE` more in memory. On two cores
/// two did as well as four: a first backup of 394 MB to Garage took 2.2–3.1 s with two and
/// 2.2–2.6 s with four (three runs each; sealing, not the network, is the bound there).
const UPLOADS: usize = 2;

/// A pack handed to an upload thread: its name, bytes and entries.
type Upload = (Id, Vec<u8>, Vec<crate::pack::PackEntry>);
/// An upload that ended: the pack's name, entries and size, or why it failed.
type Uploaded = (Id, Vec<crate::pack::PackEntry>, u64, crate::backend::Result<()>);

/// Threads that write packs to a remote repository while the sealers go on, each upload retried
/// by the backend like any write. A pack enters the index only once its upload succeeded.
#[derive(Debug)]
struct Uploader {
    send: Mutex<Option<crossbeam_channel::Sender<Upload>>>,
    done: crossbeam_channel::Receiver<Uploaded>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Uploader {
    fn new(backend: std::sync::Arc<dyn crate::backend::Backend>) -> Uploader {
        let (send, work) = crossbeam_channel::bounded::<Upload>(1);
        let (report, done) = crossbeam_channel::unbounded::<Uploaded>();
        let threads = (0..UPLOADS)
            .map(|n| {
                let (work, report, backend) = (work.clone(), report.clone(), backend.clone());
                std::thread::Builder::new()
                    .name(format!("upload-{n}"))
                    .spawn(move || {
                        for (name, bytes, blobs) in work {
                            // Tests stop a replication midway: a pack takes this long to go.
                            if let Some(delay) = sysstate_types::failpoint::<u64>("UPLOAD_DELAY_MS") {
                                std::thread::sleep(std::time::Duration::from_millis(delay));
                            }
                            let length = bytes.len() as u64;
                            let written = backend.write_shared(FileKind::Pack, &name.to_hex(), bytes.into());
                            let _ = report.send((name, blobs, length, written));
                        }
                    })
                    .expect("threads start")
            })
            .collect();
        Uploader { send: Mutex::new(Some(send)), done, threads: Mutex::new(threads) }
    }

    /// Waits for every upload to end.
    fn join(&self) {
        drop(self.send.lock().expect("send lock").take());
        for thread in std::mem::take(&mut *self.threads.lock().expect("threads lock")) {
            let _ = thread.join();
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.join();
    }
}

impl<'r> BlobSaver<'r> {
    /// A saver for `repo` (whose index must be loaded).
    pub fn new(repo: &'r Repository) -> Self {
        BlobSaver {
            repo,
            pending: Mutex::new(HashSet::new()),
            data_pack: Mutex::default(),
            tree_pack: Mutex::default(),
            written: Mutex::new(Vec::new()),
            uploader: repo.backend().is_remote().then(|| Uploader::new(repo.backend().clone())),
            stats: SaverStats::default(),
        }
    }

    /// Claims `id` for storing: true when neither the repository nor this saver has it yet.
    pub fn reserve(&self, id: Id) -> bool {
        if self.repo.index().contains(&id) {
            return false;
        }
        self.pending.lock().expect("pending lock").insert(id)
    }

    /// Compresses, seals and packs a blob claimed with [`reserve`](Self::reserve).
    pub fn store(&self, kind: BlobKind, id: Id, plaintext: &[u8]) -> Result<()> {
        BUFFERS.with(|cell| {
            let (compressed, sealed) = &mut *cell.borrow_mut();
            let is_compressed = compress_into(plaintext, compressed);
            sealed.clear();
            sealed.resize(crate::crypto::NONCE_LEN, 0);
            sealed.extend_from_slice(if is_compressed { compressed } else { plaintext });
            self.repo.key().seal_in_place(Label::Blob, sealed);
            self.stats.blobs.fetch_add(1, Ordering::Relaxed);
            self.stats.raw_bytes.fetch_add(plaintext.len() as u64, Ordering::Relaxed);
            self.add_sealed(kind, id, sealed, plaintext.len() as u32, is_compressed)
        })
    }

    /// Packs an already sealed blob (prune copies blobs without re-sealing them).
    pub fn add_sealed(&self, kind: BlobKind, id: Id, sealed: &[u8], raw_length: u32, compressed: bool) -> Result<()> {
        let packer = match kind {
            BlobKind::Data => &self.data_pack,
            BlobKind::Tree => &self.tree_pack,
        };
        // Close the pack before a blob would push it past the target size, so a pack's buffer
        // never grows beyond the size it was allocated with.
        let full = {
            let mut pack = packer.lock().expect("pack lock");
            let closed =
                (!pack.is_empty() && pack.len() + sealed.len() > PACK_TARGET_SIZE).then(|| std::mem::take(&mut *pack));
            pack.add(kind, id, sealed, raw_length, compressed);
            closed
        };
        match full {
            Some(pack) => self.write_pack(pack),
            None => Ok(()),
        }
    }

    fn write_pack(&self, pack: PackBuilder) -> Result<()> {
        let (name, bytes, blobs) = pack.finish(self.repo.key());
        self.send_pack(name, bytes, blobs)
    }

    /// True when the repository or this saver has blob `id`.
    pub fn has(&self, id: &Id) -> bool {
        self.repo.index().contains(id) || self.pending.lock().expect("pending lock").contains(id)
    }

    /// Takes a whole pack as it is, from a repository of the same key (replication sends packs
    /// without opening and sealing their blobs again): its blobs are claimed, the pack written
    /// (unless `bytes` is `None`: the repository has the file already, from a replication that
    /// was stopped before it was indexed), then indexed.
    pub fn add_pack(&self, name: Id, bytes: Option<Vec<u8>>, entries: Vec<crate::pack::PackEntry>) -> Result<()> {
        self.pending.lock().expect("pending lock").extend(entries.iter().map(|entry| entry.id));
        match bytes {
            Some(bytes) => self.send_pack(name, bytes, entries),
            None => self.pack_written(name, entries, 0),
        }
    }

    fn send_pack(&self, name: Id, bytes: Vec<u8>, blobs: Vec<crate::pack::PackEntry>) -> Result<()> {
        if blobs.iter().any(|blob| blob.kind == BlobKind::Tree) {
            // A copy that never reaches the repository is not in its index, and goes from the
            // cache at the next load of the index.
            self.repo.cache_written(crate::cache::Cached::Pack, &name, &bytes);
        }
        if let Some(uploader) = &self.uploader {
            self.uploaded(uploader, false)?;
            let send = uploader.send.lock().expect("send lock").clone();
            if let Some(send) = send {
                if send.send((name, bytes, blobs)).is_ok() {
                    return Ok(());
                }
            }
            return Err(RepoError::Corrupt {
                location: self.repo.location(),
                object: "backup session".into(),
                detail: "the upload threads ended early".into(),
            });
        }
        self.repo.backend().write(FileKind::Pack, &name.to_hex(), &bytes)?;
        self.pack_written(name, blobs, bytes.len() as u64)
    }

    /// Takes in the uploads that ended (all of them, waiting, when `all`): each pack goes to
    /// the index; the first failure is returned.
    fn uploaded(&self, uploader: &Uploader, all: bool) -> Result<()> {
        if all {
            uploader.join();
        }
        while let Ok((name, blobs, length, written)) = uploader.done.try_recv() {
            written?;
            self.pack_written(name, blobs, length)?;
        }
        Ok(())
    }

    /// Pack `name` is stored: its blobs go to the next index file.
    fn pack_written(&self, name: Id, blobs: Vec<crate::pack::PackEntry>, length: u64) -> Result<()> {
        self.stats.stored_bytes.fetch_add(length, Ordering::Relaxed);
        let batch = {
            let mut written = self.written.lock().expect("written lock");
            written.push(IndexPack { pack: name, blobs });
            (written.len() >= PACKS_PER_INDEX).then(|| std::mem::take(&mut *written))
        };
        match batch {
            Some(packs) => self.write_index(packs).map(|_| ()),
            None => Ok(()),
        }
    }

    fn write_index(&self, packs: Vec<IndexPack>) -> Result<Option<Id>> {
        if packs.is_empty() {
            return Ok(None);
        }
        let file = IndexFile { packs, supersedes: Vec::new() };
        let bytes = file.encode(self.repo.key());
        let name = Id::of_stored(&bytes);
        self.repo.backend().write(FileKind::Index, &name.to_hex(), &bytes)?;
        self.repo.cache_written(crate::cache::Cached::Index, &name, &bytes);
        self.repo.index_written(name, &file);
        let mut pending = self.pending.lock().expect("pending lock");
        for pack in &file.packs {
            for blob in &pack.blobs {
                pending.remove(&blob.id);
            }
        }
        Ok(Some(name))
    }

    /// Writes the packs still open and the index of everything written. After this returns,
    /// every stored blob is readable and a version referring to them may be saved.
    pub fn finish(&self) -> Result<()> {
        for packer in [&self.data_pack, &self.tree_pack] {
            let pack = std::mem::take(&mut *packer.lock().expect("pack lock"));
            if !pack.is_empty() {
                self.write_pack(pack)?;
            }
        }
        if let Some(uploader) = &self.uploader {
            self.uploaded(uploader, true)?;
        }
        let packs = std::mem::take(&mut *self.written.lock().expect("written lock"));
        self.write_index(packs)?;
        if !self.pending.lock().expect("pending lock").is_empty() {
            return Err(RepoError::Corrupt {
                location: self.repo.location(),
                object: "backup session".into(),
                detail: "blobs were reserved but never stored".into(),
            });
        }
        Ok(())
    }
}
