//! A file's content cut into chunks: by the thread reading the file, and — for a big file — with
//! the help of idle readers.
//!
//! A FastCDC cut depends only on the bytes from the previous cut on. So a segment of a file can be
//! cut on another thread from the segment's own start: its first cuts are probably not the
//! file's, but as soon as the cuts made from the start of the file reach a boundary the segment
//! also has, every later cut of the segment is the file's own. The thread reading the file
//! (which alone calls back, in order) walks the cuts from the start, cuts again itself only up to
//! that meeting point — usually a chunk or two — and takes the segment's cuts from there. A
//! segment no helper took is cut by the reading thread in passing, with no extra work; a segment
//! that never meets the cuts from the start (a long run of one byte value cut only at the maximum
//! size, say) costs time, never a different chunk.
//!
//! Helpers keep only the cuts and the ids: the bytes of a chunk found new are read again from the
//! page cache when it is stored.

use crate::chunker::{Chunker, Gear};
use crate::crypto::MasterKey;
use crate::id::Id;
use crossbeam_channel::{Receiver, Sender};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex};

/// A sparse file's data extents: `(offset, length)`.
pub(crate) type Extents = Vec<(u64, u64)>;

/// Files with less content than two segments are cut by one thread.
const SEGMENT: u64 = 32 * 1024 * 1024;

/// The content of a file as one stream of bytes: the whole file, or its data extents one after
/// the other. Read by position, so that several threads can read one open file.
#[derive(Debug)]
pub(crate) struct Stream<'f> {
    file: &'f File,
    /// For a sparse file, its data extents.
    extents: Option<Mapped<'f>>,
}

/// Data extents, and where each starts in the stream.
#[derive(Debug)]
struct Mapped<'f> {
    extents: &'f [(u64, u64)],
    starts: Vec<u64>,
}

impl<'f> Stream<'f> {
    pub(crate) fn new(file: &'f File, extents: Option<&'f [(u64, u64)]>) -> Self {
        let extents = extents.map(|extents| {
            let starts = extents
                .iter()
                .scan(0u64, |at, &(_, length)| {
                    let start = *at;
                    *at += length;
                    Some(start)
                })
                .collect();
            Mapped { extents, starts }
        });
        Stream { file, extents }
    }

    /// The length the stream is expected to have: the file's size, or its extents' total.
    fn expected_len(&self, size: u64) -> u64 {
        match &self.extents {
            Some(mapped) => mapped.extents.iter().map(|&(_, length)| length).sum(),
            None => size,
        }
    }

    /// Reads at `position` of the stream; 0 at its end (or where the file now ends).
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<usize> {
        let Some(Mapped { extents, starts }) = &self.extents else {
            return self.file.read_at(buf, position);
        };
        let index = starts.partition_point(|&start| start <= position);
        let Some(index) = index.checked_sub(1) else { return Ok(0) };
        let (offset, length) = extents[index];
        let within = position - starts[index];
        if within >= length {
            return Ok(0);
        }
        let want = buf.len().min((length - within) as usize);
        self.file.read_at(&mut buf[..want], offset + within)
    }

    /// Reads exactly `len` bytes at `position`: a chunk cut earlier.
    fn read_exact_at(&self, position: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; len];
        let mut done = 0;
        while done < len {
            match self.read_at(&mut bytes[done..], position + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was read"));
                }
                Ok(n) => done += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(bytes)
    }

    fn reader(&self, position: u64) -> StreamReader<'_, 'f> {
        StreamReader { stream: self, position }
    }
}

/// Reads a [`Stream`] in order from a position.
struct StreamReader<'s, 'f> {
    stream: &'s Stream<'f>,
    position: u64,
}

impl Read for StreamReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

/// The bytes of a chunk: at hand, or to be read again from the stream.
pub(crate) enum ChunkBytes<'a> {
    Here(&'a [u8]),
    At(&'a Stream<'a>, u64, usize),
}

impl ChunkBytes<'_> {
    pub(crate) fn to_vec(&self) -> io::Result<Vec<u8>> {
        match *self {
            ChunkBytes::Here(bytes) => Ok(bytes.to_vec()),
            ChunkBytes::At(stream, position, len) => stream.read_exact_at(position, len),
        }
    }
}

/// What cuts a file: the repository's gear tables and blob id key.
#[derive(Clone, Copy)]
pub(crate) struct Cutter<'r> {
    pub gear: &'r Gear,
    pub key: &'r MasterKey,
}

/// Segments of big files waiting for an idle reader, shared by the readers of one backup.
#[derive(Debug)]
pub(crate) struct Helpers {
    queue: Sender<Arc<Segment>>,
    waiting: Receiver<Arc<Segment>>,
}

impl Helpers {
    pub(crate) fn new() -> Self {
        let (queue, waiting) = crossbeam_channel::unbounded();
        Helpers { queue, waiting }
    }

    /// Segments other readers are waiting for; run them with [`Segment::help`].
    pub(crate) fn waiting(&self) -> &Receiver<Arc<Segment>> {
        &self.waiting
    }
}

/// A file opened for helpers: its own descriptor and its extents.
#[derive(Debug)]
struct Shared {
    file: File,
    extents: Option<Extents>,
}

/// A part of a big file, cut from its own start by whichever thread claims it first.
#[derive(Debug)]
pub(crate) struct Segment {
    content: Arc<Shared>,
    start: u64,
    /// The segment ends with the first cut at or past `end`.
    end: u64,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug)]
enum State {
    Waiting,
    Cutting,
    /// Claimed by the file's reader, which cuts through it in order.
    Passed,
    Done(io::Result<Cuts>),
}

/// A segment's cuts in order, and whether the last one is the end of the stream.
#[derive(Debug)]
struct Cuts {
    cuts: Vec<Cut>,
    to_the_end: bool,
}

#[derive(Debug, Clone, Copy)]
struct Cut {
    position: u64,
    len: usize,
    id: Id,
}

impl Segment {
    /// Cuts the segment if no one has claimed it yet.
    pub(crate) fn help(&self, cutter: Cutter<'_>) {
        if self.claim() {
            self.cut(cutter);
        }
    }

    fn claim(&self) -> bool {
        self.claim_as(State::Cutting)
    }

    /// Claimed for the reader to cut through in order; false if a helper has it.
    fn pass(&self) -> bool {
        self.claim_as(State::Passed)
    }

    /// Moves a waiting segment to `next`; false if someone claimed it already.
    fn claim_as(&self, next: State) -> bool {
        let mut state = self.state.lock().expect("segment lock");
        let waiting = matches!(*state, State::Waiting);
        if waiting {
            *state = next;
        }
        waiting
    }

    fn is_done(&self) -> bool {
        matches!(*self.state.lock().expect("segment lock"), State::Done(_))
    }

    fn cut(&self, cutter: Cutter<'_>) {
        let result = self.cuts(cutter);
        *self.state.lock().expect("segment lock") = State::Done(result);
        self.done.notify_all();
    }

    fn cuts(&self, cutter: Cutter<'_>) -> io::Result<Cuts> {
        let stream = Stream::new(&self.content.file, self.content.extents.as_deref());
        let mut chunker = Chunker::with_size_hint(cutter.gear, stream.reader(self.start), self.end - self.start);
        let mut position = self.start;
        let mut cuts = Vec::new();
        while position < self.end {
            let Some(chunk) = chunker.next_chunk()? else {
                return Ok(Cuts { cuts, to_the_end: true });
            };
            cuts.push(Cut { position, len: chunk.len(), id: cutter.key.blob_id(chunk) });
            position += chunk.len() as u64;
        }
        Ok(Cuts { cuts, to_the_end: false })
    }

    /// Waits until whoever claimed the segment has cut it, and takes its cuts.
    fn take(&self) -> io::Result<Cuts> {
        let mut state = self.state.lock().expect("segment lock");
        loop {
            match std::mem::replace(&mut *state, State::Passed) {
                State::Done(result) => return result,
                other => *state = other,
            }
            state = self.done.wait(state).expect("segment lock");
        }
    }
}

/// Cuts the stream into chunks and calls `each` with every chunk's id and bytes, in order, until
/// it returns false. Returns the bytes cut. With `helpers`, a stream of two segments or more is
/// split for idle readers to cut parts of it.
pub(crate) fn cut_stream(
    cutter: Cutter<'_>,
    stream: &Stream<'_>,
    size: u64,
    helpers: Option<&Helpers>,
    each: impl FnMut(Id, ChunkBytes<'_>) -> io::Result<bool>,
) -> io::Result<u64> {
    cut_in_segments(cutter, stream, size, helpers, SEGMENT.max(4 * u64::from(cutter.gear.params().max_size)), each)
}

fn cut_in_segments(
    cutter: Cutter<'_>,
    stream: &Stream<'_>,
    size: u64,
    helpers: Option<&Helpers>,
    segment: u64,
    mut each: impl FnMut(Id, ChunkBytes<'_>) -> io::Result<bool>,
) -> io::Result<u64> {
    let expected = stream.expected_len(size);
    let segments = Offered(match helpers {
        Some(helpers) if expected >= 2 * segment => offer(helpers, stream, expected, segment)?,
        _ => Vec::new(),
    });
    let mut chain = Chain { cutter, stream, expected, position: 0, chunker: None, ended: false };
    for (index, segment) in segments.0.iter().enumerate() {
        // The chain cuts up to the segment (a chunk may end past its start), then meets its cuts.
        while !chain.ended && chain.position < segment.start {
            if !chain.cut_one(&mut each)? {
                return Ok(chain.position);
            }
        }
        if chain.ended {
            break;
        }
        if segment.pass() {
            continue;
        }
        // While a helper cuts this one, the reader cuts the next waiting one rather than wait.
        for later in &segments.0[index + 1..] {
            if segment.is_done() {
                break;
            }
            later.help(cutter);
        }
        let Cuts { cuts, to_the_end } = segment.take()?;
        let last_end = cuts.last().map_or(segment.start, |cut| cut.position + cut.len as u64);
        while !chain.ended && chain.position < last_end {
            match cuts.binary_search_by_key(&chain.position, |cut| cut.position) {
                Ok(meeting) => {
                    for cut in &cuts[meeting..] {
                        if !each(cut.id, ChunkBytes::At(stream, cut.position, cut.len))? {
                            return Ok(cut.position + cut.len as u64);
                        }
                    }
                    chain.jump(last_end, to_the_end);
                }
                Err(_) => {
                    if !chain.cut_one(&mut each)? {
                        return Ok(chain.position);
                    }
                }
            }
        }
    }
    while !chain.ended {
        if !chain.cut_one(&mut each)? {
            break;
        }
    }
    Ok(chain.position)
}

/// The segments of one file; those no one claimed are let go with it.
struct Offered(Vec<Arc<Segment>>);

impl Drop for Offered {
    fn drop(&mut self) {
        for segment in &self.0 {
            segment.pass();
        }
    }
}

/// Queues the segments after the first for helpers; the first is the reader's own.
fn offer(helpers: &Helpers, stream: &Stream<'_>, expected: u64, segment: u64) -> io::Result<Vec<Arc<Segment>>> {
    let content = Arc::new(Shared {
        file: stream.file.try_clone()?,
        extents: stream.extents.as_ref().map(|mapped| mapped.extents.to_vec()),
    });
    let count = expected / segment;
    let segments: Vec<Arc<Segment>> = (1..count)
        .map(|i| {
            Arc::new(Segment {
                content: content.clone(),
                start: i * segment,
                end: if i + 1 < count { (i + 1) * segment } else { u64::MAX },
                state: Mutex::new(State::Waiting),
                done: Condvar::new(),
            })
        })
        .collect();
    for segment in &segments {
        // The receiver lives in `helpers` itself, so this cannot fail.
        let _ = helpers.queue.send(segment.clone());
    }
    Ok(segments)
}

/// The cuts from the start of the stream, made by the reading thread.
struct Chain<'c, 's, 'f> {
    cutter: Cutter<'c>,
    stream: &'s Stream<'f>,
    /// The stream's expected length, to size the chunker's buffer for a small file.
    expected: u64,
    position: u64,
    /// Cutting from `position`; rebuilt after a jump.
    chunker: Option<Chunker<'c, StreamReader<'s, 'f>>>,
    ended: bool,
}

impl Chain<'_, '_, '_> {
    /// Cuts the next chunk and hands it to `each`; false when `each` wants no more.
    fn cut_one(&mut self, each: &mut impl FnMut(Id, ChunkBytes<'_>) -> io::Result<bool>) -> io::Result<bool> {
        let (cutter, stream, position) = (self.cutter, self.stream, self.position);
        let left = self.expected.saturating_sub(position);
        let chunker =
            self.chunker.get_or_insert_with(|| Chunker::with_size_hint(cutter.gear, stream.reader(position), left));
        match chunker.next_chunk()? {
            Some(chunk) => {
                self.position += chunk.len() as u64;
                each(cutter.key.blob_id(chunk), ChunkBytes::Here(chunk))
            }
            None => {
                self.ended = true;
                Ok(true)
            }
        }
    }

    /// Goes on from `position`, where a segment's cuts end.
    fn jump(&mut self, position: u64, ended: bool) {
        self.position = position;
        self.chunker = None;
        self.ended = ended;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::testing::{pseudo_random, small_gear};
    use proptest::prelude::*;
    use std::io::Write;

    /// The chunks, as one thread cuts them from the start.
    fn sequential(gear: &Gear, key: &MasterKey, data: &[u8]) -> Vec<(Id, Vec<u8>)> {
        let mut chunker = Chunker::new(gear, data);
        let mut out = Vec::new();
        while let Some(chunk) = chunker.next_chunk().unwrap() {
            out.push((key.blob_id(chunk), chunk.to_vec()));
        }
        out
    }

    /// The chunks as `cut_in_segments` hands them out, with `helpers` threads helping. With
    /// helpers, the reader waits at its first chunk until they have claimed every segment, so
    /// that it meets cuts made by others rather than cutting through on its own.
    fn in_segments(
        gear: &Gear,
        key: &MasterKey,
        file: &File,
        extents: Option<&[(u64, u64)]>,
        size: u64,
        segment: u64,
        helpers: usize,
    ) -> (Vec<(Id, Vec<u8>)>, u64) {
        let cutter = Cutter { gear, key };
        let pool = Helpers::new();
        let stream = Stream::new(file, extents);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(segment) = pool.waiting().recv_timeout(std::time::Duration::from_millis(1)) {
                            segment.help(cutter);
                        }
                    }
                });
            }
            let mut out = Vec::new();
            let cut = cut_in_segments(cutter, &stream, size, Some(&pool), segment, |id, bytes| {
                if out.is_empty() && helpers > 0 {
                    while !pool.waiting().is_empty() {
                        std::thread::yield_now();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                out.push((id, bytes.to_vec()?));
                Ok(true)
            })
            .unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (out, cut)
        })
    }

    fn file_with(data: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        file
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn segments_cut_by_helpers_give_the_chunks_one_thread_gives(
            len in 0usize..200_000,
            seed: u64,
            segment in 16_384u64..40_000,
            helpers in 0usize..3,
        ) {
            let (gear, key) = (small_gear(), MasterKey::from_bytes([3; 32]));
            let data = pseudo_random(len, seed);
            let file = file_with(&data);
            let (chunks, cut) = in_segments(&gear, &key, &file, None, len as u64, segment, helpers);
            prop_assert_eq!(cut, len as u64);
            prop_assert_eq!(chunks, sequential(&gear, &key, &data));
        }

        #[test]
        fn a_sparse_files_extents_are_cut_as_one_stream(
            seed: u64,
            lengths in proptest::collection::vec(1u64..30_000, 1..8),
            helpers in 0usize..3,
        ) {
            // Extents with a hole of 5000 bytes before each; the stream is their bytes in order.
            let (gear, key) = (small_gear(), MasterKey::from_bytes([3; 32]));
            let mut extents = Vec::new();
            let mut at = 0;
            for &length in &lengths {
                extents.push((at + 5000, length));
                at += 5000 + length;
            }
            let data = pseudo_random(at as usize, seed);
            let file = file_with(&data);
            let stream: Vec<u8> = extents.iter().flat_map(|&(offset, length)| data[offset as usize..(offset + length) as usize].to_vec()).collect();
            let (chunks, cut) = in_segments(&gear, &key, &file, Some(&extents), at, 16_384, helpers);
            prop_assert_eq!(cut, stream.len() as u64);
            prop_assert_eq!(chunks, sequential(&gear, &key, &stream));
        }
    }

    #[test]
    fn segments_that_never_meet_the_cuts_from_the_start_still_give_the_same_chunks() {
        // One byte value throughout: every cut is at the same distance from the previous one, so
        // a segment cut from its own start (not a multiple of that distance) never meets the
        // cuts from the start, and the reader cuts the whole file itself.
        let (gear, key) = (small_gear(), MasterKey::from_bytes([3; 32]));
        let data = vec![0x5a; 150_001];
        let file = file_with(&data);
        let expected = sequential(&gear, &key, &data);
        let (chunks, _) = in_segments(&gear, &key, &file, None, data.len() as u64, 20_001, 2);
        assert_eq!(chunks, expected);
    }

    #[test]
    fn a_file_that_grew_is_cut_to_its_end_and_one_that_shrank_to_its_end() {
        let (gear, key) = (small_gear(), MasterKey::from_bytes([3; 32]));
        let data = pseudo_random(120_000, 9);
        let file = file_with(&data);
        // Announced smaller than it is (it grew) and bigger (it shrank since the walk).
        for announced in [60_000, 400_000] {
            let (chunks, cut) = in_segments(&gear, &key, &file, None, announced, 16_384, 2);
            assert_eq!(cut, data.len() as u64);
            assert_eq!(chunks, sequential(&gear, &key, &data));
        }
    }

    #[test]
    fn a_stop_asked_by_the_callback_stops_the_cutting() {
        let (gear, key) = (small_gear(), MasterKey::from_bytes([3; 32]));
        let data = pseudo_random(200_000, 11);
        let file = file_with(&data);
        let stream = Stream::new(&file, None);
        let pool = Helpers::new();
        let mut seen = 0;
        let cut = cut_in_segments(Cutter { gear: &gear, key: &key }, &stream, 200_000, Some(&pool), 16_384, |_, _| {
            seen += 1;
            Ok(seen < 3)
        })
        .unwrap();
        assert_eq!(seen, 3);
        let first_three: u64 = sequential(&gear, &key, &data)[..3].iter().map(|(_, bytes)| bytes.len() as u64).sum();
        assert_eq!(cut, first_three);
    }
}
