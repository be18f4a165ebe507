//! The readers: open each file sent by the walker (the live twin when it still is one), cut it
//! into chunks, and send the new ones to the sealers.

use super::sealer::BlobJob;
use super::Shared;
use crate::content::{cut_stream, ChunkBytes, Cutter, Extents, Helpers, Stream};
use crate::id::Id;
use crate::meta::ctime_ns;
use crate::pack::BlobKind;
use crate::repo::Repository;
use crate::tree::FileContent;
use crossbeam_channel::{Receiver, Sender};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub(super) struct FileJob {
    pub(super) path: PathBuf,
    /// The live file to read instead, if it is still what `path` holds.
    pub(super) live: Option<LiveFile>,
    pub(super) size: u64,
    pub(super) maybe_sparse: bool,
    pub(super) reply: Sender<std::io::Result<(FileContent, u64)>>,
}

/// A live file and the identity it must have, before and after it is read, to stand for the
/// snapshot's.
pub(super) struct LiveFile {
    pub(super) path: PathBuf,
    pub(super) device: u64,
    pub(super) inode: u64,
    pub(super) ctime_ns: i64,
    pub(super) size: u64,
}

impl LiveFile {
    fn matches(&self, meta: &std::fs::Metadata) -> bool {
        meta.is_file()
            && meta.dev() == self.device
            && meta.ino() == self.inode
            && ctime_ns(meta) == self.ctime_ns
            && meta.size() == self.size
    }
}

pub(super) fn reader(shared: &Shared<'_>, jobs: Receiver<FileJob>, blobs: Sender<BlobJob>) {
    let cutter = Cutter { gear: shared.repo.gear(), key: shared.repo.key() };
    let waiting = shared.helpers.waiting();
    loop {
        // A segment of a big file another reader is on comes first: that reader waits for it.
        let job = crossbeam_channel::select_biased! {
            recv(waiting) -> segment => {
                if let Ok(segment) = segment {
                    segment.help(cutter);
                }
                continue;
            }
            recv(jobs) -> job => match job {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        if shared.abort.load(Ordering::Relaxed) {
            return;
        }
        let result = read_file(shared, &job, &blobs);
        if let Ok((_, size)) = &result {
            shared.files_read.fetch_add(1, Ordering::Relaxed);
            shared.bytes_read.fetch_add(*size, Ordering::Relaxed);
            shared.progress.file_done(*size);
        }
        let _ = job.reply.send(result);
    }
}

pub(crate) fn open_source(path: &Path) -> std::io::Result<File> {
    let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOATIME).bits() as i32;
    match std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) {
        // O_NOATIME needs ownership or CAP_FOWNER.
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
            std::fs::OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32).open(path)
        }
        other => other,
    }
}

fn read_file(shared: &Shared<'_>, job: &FileJob, blobs: &Sender<BlobJob>) -> std::io::Result<(FileContent, u64)> {
    if let Some(live) = &job.live {
        // The live file, if it is what the copy holds before and after the read; else the copy.
        if let Ok(file) = open_source(&live.path) {
            if file.metadata().is_ok_and(|meta| live.matches(&meta)) {
                let read = read_open_file(shared, &file, job, blobs);
                if read.is_ok() && file.metadata().is_ok_and(|meta| live.matches(&meta)) {
                    return read;
                }
            }
        }
    }
    read_open_file(shared, &open_source(&job.path)?, job, blobs)
}

fn read_open_file(
    shared: &Shared<'_>,
    file: &File,
    job: &FileJob,
    blobs: &Sender<BlobJob>,
) -> std::io::Result<(FileContent, u64)> {
    let mut ids = Vec::new();
    let helpers = Some(&shared.helpers);
    let (extents, read) = chunk_file(shared.repo, file, job.size, job.maybe_sparse, helpers, |id, chunk| {
        ids.push(id);
        if shared.saver.reserve(id) && blobs.send(BlobJob { kind: BlobKind::Data, id, data: chunk.to_vec()? }).is_err()
        {
            return Err(std::io::Error::other("the backup was stopped"));
        }
        Ok(true)
    })?;
    let size = match &extents {
        Some(_) => file.metadata()?.size(),
        None => read,
    };
    Ok((FileContent { blobs: ids, extents }, size))
}

/// Cuts a file's content (only its data extents when it may be sparse) into chunks, and calls
/// `each` with every chunk's blob id and bytes until it returns false. Returns the data extents
/// (for a sparse file) and the bytes read. With `helpers`, idle readers cut parts of a big file.
pub(crate) fn chunk_file(
    repo: &Repository,
    file: &File,
    size: u64,
    maybe_sparse: bool,
    helpers: Option<&Helpers>,
    each: impl FnMut(Id, ChunkBytes<'_>) -> std::io::Result<bool>,
) -> std::io::Result<(Option<Extents>, u64)> {
    let extents = if maybe_sparse { sysstate_fs::data_extents(file, size)? } else { None };
    let stream = Stream::new(file, extents.as_deref());
    let read = cut_stream(Cutter { gear: repo.gear(), key: repo.key() }, &stream, size, helpers, each)?;
    Ok((extents, read))
}
