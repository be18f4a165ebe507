//! Reads that fit a remote medium: the blobs a restore is about to need, announced in the order
//! it will need them, fetched ahead by a few threads with one ranged request per run of
//! neighbouring blobs of a pack (a whole pack when most of it is wanted), each opened and
//! checked as soon as its bytes are in, and handed out as they are asked for. Downloading,
//! opening and writing overlap; what is fetched but not yet taken is bounded.
//!
//! A blob whose fetch failed, or that was never announced, is read the ordinary way
//! ([`Repository::read_blob`]) when it is taken, so a failure is reported exactly as without
//! the fetcher (damage stays damage, naming the blob and pack).

use crate::error::Result;
use crate::id::Id;
use crate::repo::Repository;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

/// Neighbouring blobs of a pack whose gap is at most this are read with one request: a gap
/// costs less to read than a round trip does.
const COALESCE_GAP: u64 = 512 * 1024;
/// A request reads at most this much (more when one blob is larger): a whole pack, mostly.
/// Blobs are opened as their bytes arrive, so a long request delays nothing; cut into 4 MiB
/// requests, a pack's 1 MiB blocks at the cuts were read twice by Garage.
const MAX_RUN: u64 = 16 << 20;
/// With the blob first in line, the fetch takes the blobs of its pack announced up to this many
/// places behind it.
const LOOKAHEAD: u64 = 4096;

/// A pack's blobs to fetch, sorted by offset, and whether the fetch goes past the bound.
type Batch = (Id, Vec<(Id, crate::pack::PackEntry)>, bool);

/// Where blobs come from when files are written: the repository itself, or a [`Fetcher`] that
/// reads ahead.
pub trait BlobSource: Sync {
    /// Blob `id`, opened and checked.
    fn blob(&self, id: &Id) -> Result<Vec<u8>>;
    /// The blobs announced that will not be taken after all (a file given up).
    fn release(&self, ids: &[Id]) {
        let _ = ids;
    }
}

impl BlobSource for Repository {
    fn blob(&self, id: &Id) -> Result<Vec<u8>> {
        self.read_blob(id)
    }
}

/// A blob fetched and not yet taken as often as it was announced.
#[derive(Debug)]
enum Fetched {
    /// Opened and checked.
    Ready(Arc<Vec<u8>>),
    /// Its fetch failed: taking it reads it the ordinary way, which reports the failure.
    Failed,
}

#[derive(Debug, Default)]
struct State {
    /// Announced, not yet fetched, in order of need: sequence → (blob, pack).
    queue: BTreeMap<u64, (Id, Id)>,
    /// The same, by blob and by pack.
    queued: HashMap<Id, u64>,
    by_pack: HashMap<Id, BTreeSet<u64>>,
    /// Where each announced blob stands and how often it is still wanted.
    wanted: HashMap<Id, usize>,
    /// Being fetched.
    in_flight: HashSet<Id>,
    /// Fetched, waiting to be taken.
    fetched: HashMap<Id, Fetched>,
    /// Bytes (of plaintext) fetched or being fetched and not yet taken.
    ahead: u64,
    /// Takers waiting for a blob still in the queue: one fetch at a time goes on past the bound
    /// for them (what is ahead may be blobs only later files take).
    starving: usize,
    /// That one fetch past the bound is under way.
    overdraft: bool,
    /// Sealed bytes announced and not yet fetched.
    queued_bytes: u64,
    /// Fetchers waiting for work, and the blobs takers wait for (with how many wait): a change
    /// wakes the side that waits for it, and only when someone does (a wake-up is a system
    /// call, and waking every thread for every blob took a fifth of a restore's CPU in the
    /// scheduler).
    idle_fetchers: usize,
    awaited: HashMap<Id, usize>,
    /// Fetching has begun (see [`Fetcher::start`]).
    started: bool,
    next: u64,
    closed: bool,
}

/// Fetching begins once this much is announced, or when [`Fetcher::start`] is called: reading
/// the first blobs the moment they are announced would read each pack a few blobs at a time.
const START_BYTES: u64 = 32 << 20;

/// Reads blobs ahead for a restore. Use: [`announce`](Self::announce) each file's blobs before
/// it is written, run [`fetch`](Self::fetch) on a few threads, [`blob`](BlobSource::blob) to take
/// them, [`close`](Self::close) when no file is left to write.
#[derive(Debug)]
pub struct Fetcher<'r> {
    repo: &'r Repository,
    state: Mutex<State>,
    /// The fetchers wait on it for work: blobs announced, room under the bound, a starving taker.
    work: Condvar,
    /// The takers wait on it for blobs.
    arrived: Condvar,
    /// The most fetched ahead and not yet taken.
    limit: u64,
}

impl<'r> Fetcher<'r> {
    /// A fetcher for `repo` (its index loaded) that keeps at most `limit` bytes ahead.
    pub fn new(repo: &'r Repository, limit: u64) -> Self {
        Fetcher { repo, state: Mutex::default(), work: Condvar::new(), arrived: Condvar::new(), limit }
    }

    /// The blobs of a file about to be written, in order.
    pub fn announce(&self, ids: &[Id]) {
        let index = self.repo.index();
        let mut state = self.state.lock().expect("fetcher lock");
        for id in ids {
            // A blob the index lacks is not fetched: taking it reads it, which reports it.
            let Some(location) = index.get(id) else { continue };
            let wanted = state.wanted.entry(*id).or_insert(0);
            *wanted += 1;
            if *wanted > 1 {
                continue; // queued, in flight or fetched already: one fetch serves every use
            }
            let sequence = state.next;
            state.next += 1;
            state.queued_bytes += u64::from(location.entry.length);
            state.queue.insert(sequence, (*id, location.pack));
            state.queued.insert(*id, sequence);
            state.by_pack.entry(location.pack).or_default().insert(sequence);
        }
        let wake = state.idle_fetchers > 0 && (state.started || state.queued_bytes >= START_BYTES);
        drop(state);
        if wake {
            self.work.notify_one();
        }
    }

    /// Lets the fetchers begin before [`START_BYTES`] are announced: the walk is over, or it
    /// waits for the writers. Call it before anything can wait for a taker (a full channel to
    /// the writers): until then takers wait for the fetchers, which wait for this.
    pub fn start(&self) {
        self.state.lock().expect("fetcher lock").started = true;
        self.work.notify_all();
    }

    /// No more will be announced or taken: the fetchers end once their requests are done.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("fetcher lock");
        state.closed = true;
        state.queue.clear();
        state.queued.clear();
        state.by_pack.clear();
        drop(state);
        self.work.notify_all();
        self.arrived.notify_all();
    }

    /// A fetcher thread's work: until [`close`](Self::close), take the blob first in line and
    /// the blobs of its pack announced soon after it, read them with as few ranged requests as
    /// their gaps allow, open them and hand them out.
    pub fn fetch(&self) {
        let mut buffer = Vec::new();
        while let Some((pack, blobs, overdraft)) = self.next_batch() {
            for run in coalesce(blobs) {
                self.fetch_run(&pack, run, &mut buffer);
            }
            if overdraft {
                let mut state = self.state.lock().expect("fetcher lock");
                state.overdraft = false;
                let wake = state.idle_fetchers > 0 && state.starving > 0;
                drop(state);
                if wake {
                    self.work.notify_one();
                }
            }
        }
    }

    /// The next pack to read from, its blobs sorted by offset, and whether this fetch goes past
    /// the bound; `None` when closed.
    fn next_batch(&self) -> Option<Batch> {
        let mut state = self.state.lock().expect("fetcher lock");
        let overdraft = loop {
            if state.closed {
                return None;
            }
            if state.queued_bytes >= START_BYTES {
                state.started = true;
            }
            if state.started && !state.queue.is_empty() {
                if state.ahead < self.limit {
                    break false;
                }
                if state.starving > 0 && !state.overdraft {
                    state.overdraft = true;
                    break true;
                }
            }
            state.idle_fetchers += 1;
            state = self.work.wait(state).expect("fetcher lock");
            state.idle_fetchers -= 1;
        };
        let (&first, &(_, pack)) = state.queue.iter().next().expect("not empty");
        let sequences: Vec<u64> = state.by_pack[&pack].range(first..first + LOOKAHEAD).copied().collect();
        let index = self.repo.index();
        let mut blobs = Vec::with_capacity(sequences.len());
        for sequence in sequences {
            let (id, _) = state.queue.remove(&sequence).expect("queued");
            state.queued.remove(&id);
            let entry = index.get(&id).expect("announced blobs are indexed").entry;
            state.ahead += u64::from(entry.raw_length);
            state.queued_bytes -= u64::from(entry.length);
            state.in_flight.insert(id);
            blobs.push((id, entry));
        }
        let State { queue, by_pack, .. } = &mut *state;
        let left = by_pack.get_mut(&pack).expect("queued");
        left.retain(|sequence| queue.contains_key(sequence));
        if left.is_empty() {
            by_pack.remove(&pack);
        }
        blobs.sort_by_key(|(_, entry)| entry.offset);
        Some((pack, blobs, overdraft))
    }

    /// Reads one run of neighbouring blobs with one request, opening and handing out each blob
    /// as soon as its bytes are in: the first are written while the rest are on their way.
    /// `buffer` holds the bytes of the blob being received (a fetcher keeps it from run to run,
    /// so its memory is reused).
    fn fetch_run(&self, pack: &Id, run: Vec<(Id, crate::pack::PackEntry)>, buffer: &mut Vec<u8>) {
        let start = u64::from(run[0].1.offset);
        let end = run.iter().map(|(_, e)| u64::from(e.offset) + u64::from(e.length)).max().expect("a run has blobs");
        // `buffer` holds the run's bytes from `held` on; `next` is the first blob not opened.
        buffer.clear();
        let (mut held, mut next) = (start, 0);
        let streamed = self.repo.backend().read_range_streamed(
            crate::backend::FileKind::Pack,
            &pack.to_hex(),
            start,
            end - start,
            &mut |piece| {
                buffer.extend_from_slice(piece);
                let (mut opened, mut done) = (Vec::new(), 0);
                while let Some((id, entry)) = run.get(next) {
                    let (offset, length) = (u64::from(entry.offset), entry.length as usize);
                    let Some(at) = offset.checked_sub(held).map(|at| at as usize) else {
                        // It overlaps a blob opened before it (a hostile or damaged index): it is
                        // read again when taken, which reports it.
                        opened.push((*id, u64::from(entry.raw_length), Fetched::Failed));
                        next += 1;
                        continue;
                    };
                    let Some(sealed) = buffer.get_mut(at..at + length) else { break };
                    let fetched = match self.repo.open_blob_in_place(pack, entry, sealed) {
                        Ok(plain) => Fetched::Ready(Arc::new(plain)),
                        Err(_) => Fetched::Failed,
                    };
                    opened.push((*id, u64::from(entry.raw_length), fetched));
                    next += 1;
                    done = done.max(at + length);
                }
                // What lies before the end of the blobs opened is no longer needed.
                buffer.drain(..done);
                held += done as u64;
                if !opened.is_empty() {
                    self.hand_out(opened);
                }
            },
        );
        // A failed or short read fails the blobs not received: each is read the ordinary way
        // when taken, which reports the failure.
        drop(streamed);
        if next < run.len() {
            self.hand_out(
                run[next..].iter().map(|(id, entry)| (*id, u64::from(entry.raw_length), Fetched::Failed)).collect(),
            );
        }
    }

    /// Blobs opened (or failed), each with its plaintext length, for the takers.
    fn hand_out(&self, opened: Vec<(Id, u64, Fetched)>) {
        let mut state = self.state.lock().expect("fetcher lock");
        let full = state.ahead >= self.limit;
        let takers = opened.iter().any(|(id, _, _)| state.awaited.contains_key(id));
        for (id, length, fetched) in opened {
            state.in_flight.remove(&id);
            if state.wanted.contains_key(&id) {
                state.fetched.insert(id, fetched);
            } else {
                state.ahead -= length; // released while it was fetched
            }
        }
        let room = full && state.ahead < self.limit && state.idle_fetchers > 0;
        drop(state);
        if takers {
            self.arrived.notify_all();
        }
        if room {
            self.work.notify_all();
        }
    }

    /// One use of `id` is over: the blob goes once its last use is. True when that made room
    /// under the bound for a fetcher that waits for it.
    fn used(&self, state: &mut State, id: &Id) -> bool {
        let full = state.ahead >= self.limit;
        self.forget_use(state, id);
        full && state.ahead < self.limit && state.idle_fetchers > 0
    }

    fn forget_use(&self, state: &mut State, id: &Id) {
        let Some(wanted) = state.wanted.get_mut(id) else { return };
        *wanted -= 1;
        if *wanted > 0 {
            return;
        }
        state.wanted.remove(id);
        let index = self.repo.index();
        let entry = index.get(id).map(|location| location.entry);
        if state.fetched.remove(id).is_some() {
            state.ahead -= entry.map_or(0, |entry| u64::from(entry.raw_length));
        } else if let Some(sequence) = state.queued.remove(id) {
            // Still queued: it need not be fetched at all.
            state.queued_bytes -= entry.map_or(0, |entry| u64::from(entry.length));
            if let Some((_, pack)) = state.queue.remove(&sequence) {
                if let Some(left) = state.by_pack.get_mut(&pack) {
                    left.remove(&sequence);
                    if left.is_empty() {
                        state.by_pack.remove(&pack);
                    }
                }
            }
        }
    }
}

impl BlobSource for Fetcher<'_> {
    fn blob(&self, id: &Id) -> Result<Vec<u8>> {
        let mut state = self.state.lock().expect("fetcher lock");
        let (mut waiting, mut awaiting) = (false, false);
        let found = loop {
            match state.fetched.get(id) {
                Some(Fetched::Ready(data)) => break Some(data.clone()),
                Some(Fetched::Failed) => break None,
                None if state.in_flight.contains(id) => {}
                None if !state.queued.contains_key(id) => break None,
                None if !waiting => {
                    // Queued: ask the fetchers to go on for it whatever is ahead.
                    waiting = true;
                    state.starving += 1;
                    if state.idle_fetchers > 0 {
                        self.work.notify_one();
                    }
                }
                None => {}
            }
            if !awaiting {
                awaiting = true;
                *state.awaited.entry(*id).or_default() += 1;
            }
            state = self.arrived.wait(state).expect("fetcher lock");
        };
        if waiting {
            state.starving -= 1;
        }
        if awaiting {
            match state.awaited.get_mut(id) {
                Some(count) if *count > 1 => *count -= 1,
                _ => {
                    state.awaited.remove(id);
                }
            }
        }
        let room = self.used(&mut state, id);
        drop(state);
        if room {
            self.work.notify_all();
        }
        match found {
            // The last use takes the bytes without a copy.
            Some(data) => Ok(Arc::try_unwrap(data).unwrap_or_else(|shared| (*shared).clone())),
            None => self.repo.read_blob(id),
        }
    }

    fn release(&self, ids: &[Id]) {
        let mut state = self.state.lock().expect("fetcher lock");
        let mut room = false;
        for id in ids {
            room |= self.used(&mut state, id);
        }
        drop(state);
        if room {
            self.work.notify_all();
        }
    }
}

/// Splits blobs sorted by offset into runs whose gaps are at most [`COALESCE_GAP`] and whose
/// length is at most [`MAX_RUN`].
fn coalesce(blobs: Vec<(Id, crate::pack::PackEntry)>) -> Vec<Vec<(Id, crate::pack::PackEntry)>> {
    let mut runs: Vec<Vec<(Id, crate::pack::PackEntry)>> = Vec::new();
    let (mut start, mut end) = (0u64, 0u64);
    for (id, entry) in blobs {
        let offset = u64::from(entry.offset);
        let blob_end = offset + u64::from(entry.length);
        match runs.last_mut() {
            Some(run) if offset <= end + COALESCE_GAP && blob_end - start <= MAX_RUN => run.push((id, entry)),
            _ => {
                runs.push(vec![(id, entry)]);
                start = offset;
            }
        }
        end = end.max(blob_end);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use crate::keys::KdfParams;
    use crate::pack::BlobKind;
    use crate::saver::BlobSaver;

    /// A repository holding `count` blobs of a few KiB each; their ids and contents, in order.
    fn repository(dir: &std::path::Path, count: usize) -> (Repository, Vec<(Id, Vec<u8>)>) {
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let repo = Repository::init(Arc::new(LocalBackend::new(dir)), b"pass", cheap).unwrap();
        let saver = BlobSaver::new(&repo);
        let blobs: Vec<(Id, Vec<u8>)> = (0..count)
            .map(|i| {
                let data: Vec<u8> = (0..3000 + i * 7).map(|n| (n * 31 + i * 17) as u8).collect();
                let id = repo.key().blob_id(&data);
                assert!(saver.reserve(id));
                saver.store(BlobKind::Data, id, &data).unwrap();
                (id, data)
            })
            .collect();
        saver.finish().unwrap();
        (repo, blobs)
    }

    /// Takes every blob of `files` (each a list of blob indexes) on two writer threads while
    /// three fetchers read ahead under `limit`; returns what was taken, by file.
    fn restore(repo: &Repository, blobs: &[(Id, Vec<u8>)], files: &[Vec<usize>], limit: u64) -> Vec<Vec<Vec<u8>>> {
        let fetcher = Fetcher::new(repo, limit);
        let taken = Mutex::new(vec![Vec::new(); files.len()]);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| fetcher.fetch());
            }
            let (send, receive) = crossbeam_channel::bounded::<usize>(4);
            let writers: Vec<_> = (0..2)
                .map(|_| {
                    let (receive, fetcher, taken) = (receive.clone(), &fetcher, &taken);
                    scope.spawn(move || {
                        for file in receive {
                            let data: Vec<Vec<u8>> =
                                files[file].iter().map(|&b| fetcher.blob(&blobs[b].0).unwrap()).collect();
                            taken.lock().unwrap()[file] = data;
                        }
                    })
                })
                .collect();
            for (n, file) in files.iter().enumerate() {
                let ids: Vec<Id> = file.iter().map(|&b| blobs[b].0).collect();
                fetcher.announce(&ids);
                // As the restore does: the writers being that far behind, fetching begins.
                if let Err(crossbeam_channel::TrySendError::Full(n)) = send.try_send(n) {
                    fetcher.start();
                    send.send(n).unwrap();
                }
            }
            fetcher.start();
            drop(send);
            for writer in writers {
                writer.join().unwrap();
            }
            fetcher.close();
        });
        taken.into_inner().unwrap()
    }

    #[test]
    fn every_blob_is_handed_out_as_often_as_it_is_announced_even_under_a_tiny_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, blobs) = repository(dir.path(), 200);
        repo.load_index().unwrap();
        // Files sharing blobs, out of pack order, one blob twice in a file.
        let files: Vec<Vec<usize>> =
            (0..60).map(|f| vec![(f * 7) % 200, (f * 13 + 5) % 200, (f * 7) % 200, 199 - f]).collect();
        for limit in [1, 64 << 10, 64 << 20] {
            let taken = restore(&repo, &blobs, &files, limit);
            for (file, data) in files.iter().zip(&taken) {
                let expected: Vec<Vec<u8>> = file.iter().map(|&b| blobs[b].1.clone()).collect();
                assert_eq!(data, &expected, "limit {limit}");
            }
        }
    }

    #[test]
    fn blobs_received_in_pieces_are_handed_out_whole_and_a_read_cut_short_fails_only_what_it_lacked() {
        let dir = tempfile::tempdir().unwrap();
        let (_, blobs) = repository(dir.path(), 120);
        let files: Vec<Vec<usize>> = (0..40).map(|f| vec![f * 3, f * 3 + 1, f * 3 + 2, (f * 11) % 120]).collect();
        // Pieces smaller than a blob, about one, and larger than several; then reads that drop
        // after 10,000 bytes: what they lacked is read again when taken.
        for (piece, fail_after) in [(7, None), (2999, None), (100_000, None), (1000, Some(10_000))] {
            let backend = crate::backend::testing::Dribbling::new(dir.path(), piece, fail_after);
            let repo = Repository::open(Arc::new(backend), b"pass").unwrap();
            repo.load_index().unwrap();
            let taken = restore(&repo, &blobs, &files, 64 << 10);
            for (file, data) in files.iter().zip(&taken) {
                let expected: Vec<Vec<u8>> = file.iter().map(|&b| blobs[b].1.clone()).collect();
                assert_eq!(data, &expected, "pieces of {piece}, failing after {fail_after:?}");
            }
        }
    }

    #[test]
    fn a_blob_a_hostile_index_lays_over_one_already_opened_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (_, blobs) = repository(dir.path(), 10);
        // Pieces of 7 bytes: the blob before it is opened, and its bytes let go, before the
        // impostor's turn comes.
        let backend = crate::backend::testing::Dribbling::new(dir.path(), 7, None);
        let repo = Repository::open(Arc::new(backend), b"pass").unwrap();
        repo.load_index().unwrap();
        let real = repo.index().get(&blobs[3].0).unwrap();
        let impostor = Id::from_hex(&"7a".repeat(32)).unwrap();
        let entry = crate::pack::PackEntry { id: impostor, offset: real.entry.offset + 10, ..real.entry };
        repo.index_add(&crate::index::IndexFile {
            packs: vec![crate::index::IndexPack { pack: real.pack, blobs: vec![entry] }],
            ..Default::default()
        });
        let fetcher = Fetcher::new(&repo, 1 << 20);
        fetcher.announce(&[blobs[3].0, impostor, blobs[4].0]);
        fetcher.start();
        std::thread::scope(|scope| {
            scope.spawn(|| fetcher.fetch());
            assert_eq!(fetcher.blob(&blobs[3].0).unwrap(), blobs[3].1);
            let error = fetcher.blob(&impostor).unwrap_err();
            assert_eq!(error.code(), sysstate_types::ErrorCode::RepositoryCorrupt, "{error}");
            assert!(error.to_string().contains(&impostor.short()), "{error}");
            assert_eq!(fetcher.blob(&blobs[4].0).unwrap(), blobs[4].1);
            fetcher.close();
        });
    }

    #[test]
    fn a_blob_never_announced_or_damaged_is_read_the_ordinary_way_and_reported_so() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, blobs) = repository(dir.path(), 10);
        repo.load_index().unwrap();
        let fetcher = Fetcher::new(&repo, 1 << 20);
        // Never announced: read directly.
        assert_eq!(fetcher.blob(&blobs[3].0).unwrap(), blobs[3].1);
        // A damaged pack: the fetch fails to open the blob, taking it reports the damage.
        let location = repo.index().get(&blobs[4].0).unwrap();
        let path = dir.path().join(crate::backend::FileKind::Pack.path(&location.pack.to_hex()));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[location.entry.offset as usize + 20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        fetcher.announce(&[blobs[4].0, blobs[5].0]);
        fetcher.start();
        std::thread::scope(|scope| {
            scope.spawn(|| fetcher.fetch());
            let error = fetcher.blob(&blobs[4].0).unwrap_err();
            assert_eq!(error.code(), sysstate_types::ErrorCode::RepositoryCorrupt, "{error}");
            assert!(error.to_string().contains(&blobs[4].0.short()), "{error}");
            assert_eq!(fetcher.blob(&blobs[5].0).unwrap(), blobs[5].1);
            // Released blobs are neither kept nor fetched.
            fetcher.announce(&[blobs[6].0, blobs[7].0]);
            fetcher.release(&[blobs[6].0, blobs[7].0]);
            fetcher.close();
        });
        let state = fetcher.state.lock().unwrap();
        assert!(state.fetched.is_empty() && state.wanted.is_empty(), "{state:?}");
    }
}
