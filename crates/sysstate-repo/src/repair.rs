//! `repair` (think `restic repair index|packs|snapshots`, `borg check --repair`): each part
//! mends one kind of damage `check` finds, and says what it cannot mend. Every part runs under
//! an exclusive lease (taken by the caller), plans before it writes, and writes in the order of
//! `docs/FORMAT.md` — new files first, then the removal of what they replace — so a repair that
//! is killed leaves the repository no worse than it found it.
//!
//! - [`index`]: a new index from the packs' own headers (a lost or damaged index file, packs
//!   an index does not list);
//! - [`blobs`]: every indexed pack read; the intact blobs of a damaged pack moved to new packs
//!   and the damaged blobs taken out of the index, so that the next backup stores their data
//!   again (blobs are named by their content: every version that names a blob is whole again
//!   once any backup stores that content again);
//! - [`versions`]: manifests stored under the wrong name put back under their own, damaged
//!   manifests and stray files in `versions/` removed.

use crate::backend::{ErrorKind, FileKind};
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::pack::{header_start, open_header, PackEntry, TRAILER_LENGTH};
use crate::repo::Repository;
use crate::saver::BlobSaver;
use crate::version::Version;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blobs per index file that `repair index` writes.
const BLOBS_PER_INDEX: usize = 100_000;

/// How many packs are read at once: reads of pack tails are small and latency-bound (object
/// storage), so more are in flight than there are cores.
const READERS: usize = 16;

/// What `repair index` found and (unless a dry run) did.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IndexRepair {
    /// Packs whose header was read.
    pub packs: usize,
    /// Blobs in the new index.
    pub blobs: usize,
    /// Packs that no readable index file listed before: their blobs are found again.
    pub packs_found: Vec<String>,
    /// Packs whose header cannot be read: `pack: why`. Their blobs stay indexed where an old
    /// index file listed them (`sysstate repair blobs` then moves them); otherwise they are lost.
    pub unreadable: Vec<String>,
    /// Index files replaced by the new ones (damaged ones among them).
    pub replaced: Vec<String>,
    /// Files in `index/` or `data/` that are not repository files, removed.
    pub strays: Vec<String>,
    /// Index files written.
    pub written: usize,
    /// True when nothing was changed.
    pub dry_run: bool,
}

/// Rebuilds the index from the packs' headers: one read of each pack's tail, several at once.
pub fn index(repo: &Repository, dry_run: bool, progress: &dyn crate::Progress) -> Result<IndexRepair> {
    let mut report = IndexRepair { dry_run, ..IndexRepair::default() };
    let (old_files, old_packs) = read_index_files(repo, &mut report.strays)?;
    let mut stored = Vec::new();
    for (name, size) in repo.backend().list(FileKind::Pack)? {
        match Id::from_hex(&name) {
            Some(id) => stored.push((id, size)),
            None => report.strays.push(FileKind::Pack.path(&name)),
        }
    }
    stored.sort();
    let headers = read_headers(repo, &stored, progress);
    let mut packs = Vec::new();
    for ((pack, _), header) in stored.iter().zip(headers) {
        let blobs = match header {
            Ok(blobs) => blobs,
            Err(why) => {
                report.unreadable.push(format!("{}: {why}", pack.short()));
                match old_packs.get(pack) {
                    Some(blobs) => blobs.clone(),
                    None => continue,
                }
            }
        };
        if !old_packs.contains_key(pack) {
            report.packs_found.push(pack.to_hex());
        }
        report.blobs += blobs.len();
        packs.push(IndexPack { pack: *pack, blobs });
    }
    report.packs = stored.len();
    report.replaced = old_files.iter().map(|name| format!("index/{name}")).collect();
    if dry_run {
        return Ok(report);
    }
    let superseded: Vec<Id> = old_files.iter().filter_map(|name| Id::from_hex(name)).collect();
    let written = write_index(repo, packs, superseded)?;
    report.written = written.len();
    for name in &old_files {
        if !Id::from_hex(name).is_some_and(|id| written.contains(&id)) {
            repo.backend().remove(FileKind::Index, name)?;
        }
    }
    for stray in &report.strays {
        remove_stray(repo, stray)?;
    }
    repo.load_index()?;
    Ok(report)
}

/// Packs and their blobs, as index files list them.
type IndexedPacks = HashMap<Id, Vec<PackEntry>>;

/// Every file in `index/` (hex names; other names are strays) and the packs the readable ones
/// list, each with every entry any of them gives it (a pack listed twice, by concurrent
/// backups, once), in pack order.
fn read_index_files(repo: &Repository, strays: &mut Vec<String>) -> Result<(Vec<String>, IndexedPacks)> {
    let mut files = Vec::new();
    let mut packs: HashMap<Id, Vec<PackEntry>> = HashMap::new();
    for (name, _) in repo.backend().list(FileKind::Index)? {
        if Id::from_hex(&name).is_none() {
            strays.push(FileKind::Index.path(&name));
            continue;
        }
        match repo.read_index_file(&name) {
            Ok(file) => {
                for pack in file.packs {
                    packs.entry(pack.pack).or_default().extend(pack.blobs);
                }
            }
            Err(RepoError::Corrupt { .. }) => {}
            Err(RepoError::Backend(error)) if error.kind == ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        }
        files.push(name);
    }
    for entries in packs.values_mut() {
        entries.sort_by_key(|e| (e.offset, e.id));
        entries.dedup();
    }
    Ok((files, packs))
}

/// Reads the headers of `packs` (name, size) from their tails, [`READERS`] at a time; each
/// result says why a header cannot be read.
fn read_headers(
    repo: &Repository,
    packs: &[(Id, u64)],
    progress: &dyn crate::Progress,
) -> Vec<std::result::Result<Vec<PackEntry>, String>> {
    let done = AtomicU64::new(0);
    in_parallel(packs, READERS, |(pack, size)| {
        let header = read_header_of(repo, pack, *size);
        progress.bytes(done.fetch_add(1, Ordering::Relaxed) + 1, packs.len() as u64);
        header
    })
}

/// `work` on every item, `threads` at a time; the results in the items' order.
fn in_parallel<T: Sync, R: Send>(items: &[T], threads: usize, work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let result = work(item);
                *results[i].lock().expect("result lock") = Some(result);
            });
        }
    });
    results.into_iter().map(|r| r.into_inner().expect("result lock").expect("every item done")).collect()
}

/// A pack's header, read from its tail: one request for the last 16 KiB, which holds the header
/// of a pack of up to about 200 blobs, and a second when it is longer.
fn read_header_of(repo: &Repository, pack: &Id, size: u64) -> std::result::Result<Vec<PackEntry>, String> {
    const FIRST_READ: u64 = 16 * 1024;
    let name = pack.to_hex();
    let read = |offset: u64, length: u64| {
        repo.backend().read_range(FileKind::Pack, &name, offset, length).map_err(|e| e.message)
    };
    let tail_length = size.min(FIRST_READ);
    let tail = read(size - tail_length, tail_length)?;
    if (tail.len() as u64) < tail_length || tail.len() < TRAILER_LENGTH {
        return Err(format!("shorter than listed ({} bytes)", size));
    }
    let start = header_start(&tail[tail.len() - TRAILER_LENGTH..], size).map_err(|e| e.to_string())?;
    let header_end = size - TRAILER_LENGTH as u64;
    let sealed = if start >= size - tail_length {
        tail[(start - (size - tail_length)) as usize..tail.len() - TRAILER_LENGTH].to_vec()
    } else {
        read(start, header_end - start)?
    };
    open_header(repo.key(), &sealed, start).map_err(|e| e.to_string())
}

/// Writes `packs` as index files of at most [`BLOBS_PER_INDEX`] blobs, the first superseding
/// `superseded`; returns their names.
fn write_index(repo: &Repository, packs: Vec<IndexPack>, superseded: Vec<Id>) -> Result<HashSet<Id>> {
    let mut written = HashSet::new();
    let mut batch = IndexFile { packs: Vec::new(), supersedes: superseded };
    let mut blobs = 0;
    let mut flush = |batch: &mut IndexFile| -> Result<()> {
        let bytes = batch.encode(repo.key());
        let name = Id::of_stored(&bytes);
        repo.backend().write(FileKind::Index, &name.to_hex(), &bytes)?;
        written.insert(name);
        *batch = IndexFile::default();
        Ok(())
    };
    for pack in packs {
        blobs += pack.blobs.len();
        batch.packs.push(pack);
        if blobs >= BLOBS_PER_INDEX {
            flush(&mut batch)?;
            blobs = 0;
        }
    }
    // The last one is written when it holds packs, or when it is the first and so supersedes
    // the old files (an empty repository's damaged index is replaced by an empty one).
    if !batch.packs.is_empty() || !batch.supersedes.is_empty() {
        flush(&mut batch)?;
    }
    Ok(written)
}

fn remove_stray(repo: &Repository, path: &str) -> Result<()> {
    let (kind, name) = match path.split_once('/') {
        Some(("index", name)) => (FileKind::Index, name),
        Some(("versions", name)) => (FileKind::Version, name),
        Some(("data", rest)) => (FileKind::Pack, rest.rsplit('/').next().unwrap_or(rest)),
        _ => return Ok(()),
    };
    Ok(repo.backend().remove(kind, name)?)
}

/// What `repair blobs` found and (unless a dry run) did.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlobRepair {
    /// Packs read.
    pub packs: usize,
    /// Bytes read.
    pub bytes_read: u64,
    /// Damaged packs (`pack: what`): their intact blobs moved to new packs, the packs removed.
    pub damaged: Vec<String>,
    /// Blobs moved out of damaged packs.
    pub salvaged: usize,
    /// Blobs lost (damaged, with no intact copy in another pack), by short id: taken out of the
    /// index, so the next backup stores their content again.
    pub lost: Vec<String>,
    /// Versions that lack data until a backup stores it again.
    pub versions_lacking: Vec<String>,
    /// `version:/path` of each file that lacks data.
    pub files_lacking: Vec<String>,
    /// True when nothing was changed.
    pub dry_run: bool,
}

/// One indexed pack as read.
enum PackState {
    Sound,
    /// Damaged: what is wrong, and the intact entries with their sealed bytes.
    Damaged(String, Vec<(PackEntry, Vec<u8>)>),
}

/// Reads every indexed pack and takes damaged blobs out of the index (see the module).
pub fn blobs(repo: &Repository, dry_run: bool, progress: &dyn crate::Progress) -> Result<BlobRepair> {
    let mut report = BlobRepair { dry_run, ..BlobRepair::default() };
    if let Some(damaged) = repo.damaged().into_iter().find(|d| d.object.starts_with("index/")) {
        return Err(RepoError::Corrupt {
            location: repo.location(),
            object: damaged.object,
            detail: format!("{}: run `sysstate repair index` before `sysstate repair blobs`", damaged.detail),
        });
    }
    let mut strays = Vec::new();
    // Every index file was read whole by `load_index` above (none is damaged): read once more
    // here, file by file, to keep each pack's entries.
    let (old_files, indexed) = read_index_files(repo, &mut strays)?;
    let mut names: Vec<Id> = indexed.keys().copied().collect();
    names.sort();
    let states = read_packs(repo, &names, &indexed, &mut report, progress);

    // Blobs with an intact copy in some sound pack need no salvage.
    let mut sound_blobs: HashSet<Id> = HashSet::new();
    for (pack, state) in names.iter().zip(&states) {
        if matches!(state, PackState::Sound) {
            sound_blobs.extend(indexed[pack].iter().map(|e| e.id));
        }
    }
    let saver = BlobSaver::new(repo);
    let mut salvaged: HashSet<Id> = HashSet::new();
    let mut lost: HashSet<Id> = HashSet::new();
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    for (pack, state) in names.iter().zip(states) {
        match state {
            PackState::Sound => kept.push(IndexPack { pack: *pack, blobs: indexed[pack].clone() }),
            PackState::Damaged(what, intact) => {
                report.damaged.push(format!("{}: {what}", pack.short()));
                removed.push(*pack);
                for (entry, sealed) in &intact {
                    if !sound_blobs.contains(&entry.id) && salvaged.insert(entry.id) && !dry_run {
                        saver.add_sealed(entry.kind, entry.id, sealed, entry.raw_length, entry.compressed)?;
                    }
                }
                let intact: HashSet<Id> = intact.iter().map(|(e, _)| e.id).collect();
                lost.extend(indexed[pack].iter().map(|e| e.id).filter(|id| !intact.contains(id)));
            }
        }
    }
    lost.retain(|id| !sound_blobs.contains(id) && !salvaged.contains(id));
    report.salvaged = salvaged.len();
    let mut lost_names: Vec<String> = lost.iter().map(Id::short).collect();
    lost_names.sort();
    report.lost = lost_names;
    if !dry_run && !removed.is_empty() {
        saver.finish()?;
        let superseded: Vec<Id> = old_files.iter().filter_map(|n| Id::from_hex(n)).collect();
        let written = write_index(repo, kept, superseded)?;
        for name in &old_files {
            if !Id::from_hex(name).is_some_and(|id| written.contains(&id)) {
                repo.backend().remove(FileKind::Index, name)?;
            }
        }
        for pack in &removed {
            repo.backend().remove(FileKind::Pack, &pack.to_hex())?;
        }
        repo.load_index()?;
    }
    let (versions, files) = crate::check::versions_lacking(repo, if dry_run { lost } else { HashSet::new() })?;
    report.versions_lacking = versions;
    report.files_lacking = files;
    Ok(report)
}

/// Reads the indexed packs `names`, several at once, and checks each blob the index lists.
fn read_packs(
    repo: &Repository,
    names: &[Id],
    indexed: &HashMap<Id, Vec<PackEntry>>,
    report: &mut BlobRepair,
    progress: &dyn crate::Progress,
) -> Vec<PackState> {
    let sizes: HashMap<String, u64> =
        repo.backend().list(FileKind::Pack).map(|l| l.into_iter().collect()).unwrap_or_default();
    let total: u64 = names.iter().filter_map(|p| sizes.get(&p.to_hex())).sum();
    let done = AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    let states = in_parallel(names, threads, |pack| {
        let (state, read) = check_pack(repo, pack, &indexed[pack]);
        progress.bytes(done.fetch_add(read, Ordering::Relaxed) + read, total);
        state
    });
    report.packs = names.len();
    report.bytes_read = done.into_inner();
    states
}

/// Reads one pack and checks the blobs the index lists in it; returns its state and the bytes
/// read.
fn check_pack(repo: &Repository, pack: &Id, entries: &[PackEntry]) -> (PackState, u64) {
    let bytes = match repo.backend().read(FileKind::Pack, &pack.to_hex()) {
        Ok(bytes) => bytes,
        Err(error) if error.kind == ErrorKind::NotFound => {
            return (PackState::Damaged("missing from `data/`".into(), Vec::new()), 0)
        }
        Err(error) => return (PackState::Damaged(format!("cannot be read: {}", error.message), Vec::new()), 0),
    };
    let mut problems = Vec::new();
    if Id::of_stored(&bytes) != *pack {
        problems.push("its content does not match its name".to_string());
    }
    let mut intact = Vec::new();
    let mut bad = 0;
    for entry in entries {
        let sealed = bytes.get(entry.offset as usize..entry.offset as usize + entry.length as usize);
        match sealed.filter(|sealed| repo.open_blob(pack, entry, sealed).is_ok()) {
            Some(sealed) => intact.push((*entry, sealed.to_vec())),
            None => bad += 1,
        }
    }
    if bad > 0 {
        problems.push(format!("{bad} of its {} blobs are damaged", entries.len()));
    }
    let read = bytes.len() as u64;
    if problems.is_empty() {
        (PackState::Sound, read)
    } else {
        (PackState::Damaged(problems.join("; "), intact), read)
    }
}

/// What `repair versions` found and (unless a dry run) did.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VersionRepair {
    /// Manifests stored under another name, put back under their own: `old → new`.
    pub renamed: Vec<String>,
    /// Files removed from `versions/`: `name: why`.
    pub removed: Vec<String>,
    /// True when nothing was changed.
    pub dry_run: bool,
}

/// Puts manifests stored under the wrong name back under their own and removes the rest of what
/// cannot be read as a version.
pub fn versions(repo: &Repository, dry_run: bool) -> Result<VersionRepair> {
    let mut report = VersionRepair { dry_run, ..VersionRepair::default() };
    let mut remove = Vec::new();
    // Misnamed manifests that decode: (name, true name, bytes).
    let mut misnamed: Vec<(String, String, Vec<u8>)> = Vec::new();
    for (name, _) in repo.backend().list(FileKind::Version)? {
        let Some(id) = Id::from_hex(&name) else {
            report.removed.push(format!("{name}: not a version file name"));
            remove.push(name);
            continue;
        };
        let bytes = match repo.backend().read(FileKind::Version, &name) {
            Ok(bytes) => bytes,
            Err(error) if error.kind == ErrorKind::NotFound => continue,
            Err(error) => return Err(error.into()),
        };
        let named = Id::of_stored(&bytes);
        match (named == id, Version::decode(repo.key(), &bytes)) {
            (true, Ok(_)) => {}
            (false, Ok(_)) => {
                report.renamed.push(format!("{} → {}", id.short(), named.short()));
                misnamed.push((name, named.to_hex(), bytes));
            }
            (true, Err(error)) => {
                report.removed.push(format!("{}: {error}", id.short()));
                remove.push(name);
            }
            (false, Err(error)) => {
                report.removed.push(format!("{}: its content does not match its name, and {error}", id.short()));
                remove.push(name);
            }
        }
    }
    if dry_run {
        return Ok(report);
    }
    for name in &remove {
        repo.backend().remove(FileKind::Version, name)?;
    }
    // Each manifest is written under its own name before the misnamed file goes, unless that
    // name is itself taken by a misnamed file (two names swapped): those are moved last, each
    // removed just before it is written again.
    let taken: HashSet<String> = misnamed.iter().map(|(name, _, _)| name.clone()).collect();
    let (swapped, free): (Vec<_>, Vec<_>) = misnamed.into_iter().partition(|(_, to, _)| taken.contains(to));
    for (name, to, bytes) in free {
        repo.backend().write(FileKind::Version, &to, &bytes)?;
        repo.backend().remove(FileKind::Version, &name)?;
    }
    for (name, _, _) in &swapped {
        repo.backend().remove(FileKind::Version, name)?;
    }
    for (_, to, bytes) in &swapped {
        repo.backend().write(FileKind::Version, to, bytes)?;
    }
    Ok(report)
}

/// Drops the versions whose names start with one of `specs`, readable or not (a damaged
/// manifest is dropped by its name); each spec must name exactly one. Returns the full names.
pub fn forget_by_name(
    repo: &Repository,
    specs: &[String],
    protected: &HashSet<Id>,
    dry_run: bool,
) -> Result<Vec<String>> {
    let names: Vec<String> = repo.backend().list(FileKind::Version)?.into_iter().map(|(name, _)| name).collect();
    let mut chosen = Vec::new();
    for spec in specs {
        let spec = spec.to_ascii_lowercase();
        let matching: Vec<&String> = names.iter().filter(|n| !spec.is_empty() && n.starts_with(&spec)).collect();
        match matching.as_slice() {
            [one] if Id::from_hex(one).is_some_and(|id| protected.contains(&id)) => {
                return Err(RepoError::Invalid(format!(
                    "version {spec} is protected: `sysstate unprotect {spec}` first"
                )))
            }
            [one] => chosen.push((*one).clone()),
            [] => {
                return Err(RepoError::VersionNotFound(format!(
                    "version `{spec}` does not exist in `{}`: `sysstate versions` lists them",
                    repo.location()
                )))
            }
            _ => {
                return Err(RepoError::VersionNotFound(format!(
                    "version prefix `{spec}` is ambiguous: give more digits"
                )))
            }
        }
    }
    if !dry_run {
        for name in &chosen {
            repo.backend().remove(FileKind::Version, name)?;
        }
    }
    Ok(chosen)
}
