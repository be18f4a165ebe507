//! The sealers: compress, encrypt and pack the new blobs, and write the packs.

use super::Shared;
use crate::id::Id;
use crate::pack::BlobKind;
use crossbeam_channel::Receiver;
use std::sync::atomic::Ordering;

pub(super) struct BlobJob {
    pub(super) kind: BlobKind,
    pub(super) id: Id,
    pub(super) data: Vec<u8>,
}

pub(super) fn sealer(shared: &Shared<'_>, blobs: Receiver<BlobJob>) {
    for job in blobs {
        if shared.abort.load(Ordering::Relaxed) {
            // Keep draining so senders never block on a full channel.
            continue;
        }
        if let Err(error) = shared.saver.store(job.kind, job.id, &job.data) {
            shared.fail(error);
        }
    }
}
