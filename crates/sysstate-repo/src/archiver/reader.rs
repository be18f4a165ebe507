//! The readers: read each file the walker sends, from where its [`Source`] opens it, cut it
//! into chunks, and send the new ones to the sealers.

use super::sealer::BlobJob;
use super::Shared;
use crate::content::{cut_stream, ChunkBytes, Cutter, Extents, Helpers, Stream};
use crate::id::Id;
use crate::pack::BlobKind;
use crate::repo::Repository;
use crate::source::Source;
use crate::tree::FileContent;
use crossbeam_channel::{Receiver, Sender};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;

/// A file to read, and where to send its content.
pub(super) struct FileJob<P> {
    /// Where the source reads it.
    pub(super) place: P,
    pub(super) size: u64,
    pub(super) maybe_sparse: bool,
    pub(super) reply: Sender<std::io::Result<(FileContent, u64)>>,
}

pub(super) fn reader<S: Source>(
    shared: &Shared<'_>,
    source: &S,
    jobs: Receiver<FileJob<S::Place>>,
    blobs: Sender<BlobJob>,
) {
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
        let result =
            source.read(&job.place, &mut |file| read_open_file(shared, file, job.size, job.maybe_sparse, &blobs));
        if let Ok((_, size)) = &result {
            shared.files_read.fetch_add(1, Ordering::Relaxed);
            shared.bytes_read.fetch_add(*size, Ordering::Relaxed);
            shared.file_done(*size);
        }
        let _ = job.reply.send(result);
    }
}

fn read_open_file(
    shared: &Shared<'_>,
    file: &File,
    size: u64,
    maybe_sparse: bool,
    blobs: &Sender<BlobJob>,
) -> std::io::Result<(FileContent, u64)> {
    let mut ids = Vec::new();
    let helpers = Some(&shared.helpers);
    let (extents, read) = chunk_file(shared.repo, file, size, maybe_sparse, helpers, |id, chunk| {
        if shared.stopping() {
            return Err(std::io::Error::other("the backup was stopped"));
        }
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
