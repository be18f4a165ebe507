//! The `copy` provider, and `reflink`, which clones each file's extents instead of copying them.

use super::{Commit, CommitError, CommitRequest, Origin, Provider, SETTLED};
use crate::error::ShadowError;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Whether a copy clones files' extents (`FICLONE`) instead of copying their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflink {
    /// Always copy bytes (`copy`).
    Never,
    /// Clone where the filesystem can, copy elsewhere (`auto`).
    Try,
    /// Clone or fail (`reflink`).
    Require,
}

/// Copies (or clones) each entry into a mirrored tree in shadow storage, with all its metadata.
///
/// With `previous` in the request (the identities a base copy at `dest` was made from), `dest`
/// is refreshed in place: an entry whose live identity, type, size and mtime are what the base
/// holds is kept as it is; everything else is copied again, and entries that went away are
/// removed. The freeze then costs a `stat` of each unchanged file instead of a copy — or, with
/// the directories the change journal saw change since the base was refreshed
/// ([`CommitRequest::changed`]), a `stat` of the entries of those directories only.
#[derive(Debug, Clone, Copy)]
pub struct CopyProvider {
    /// Whether to clone.
    pub reflink: Reflink,
}

impl Provider for CopyProvider {
    fn name(&self) -> &'static str {
        match self.reflink {
            Reflink::Never => "copy",
            Reflink::Try => "auto",
            Reflink::Require => "reflink",
        }
    }

    fn precopy(&self, request: &CommitRequest<'_>) -> Option<Result<Commit, CommitError>> {
        Some(self.commit(request))
    }

    fn commit(&self, request: &CommitRequest<'_>) -> Result<Commit, CommitError> {
        copy_tree(request, self.reflink)
    }
}

struct Copier<'a> {
    req: &'a CommitRequest<'a>,
    reflink: Reflink,
    out: Commit,
    links: HashMap<(u64, u64), PathBuf>,
    dirs: Vec<(PathBuf, std::fs::Metadata)>,
    reflink_works: HashMap<u64, bool>,
    /// Entries whose ctime is later than this (ns since the epoch) are unsettled when copied.
    settled_before_ns: i64,
    /// Refreshing only what the journal named: `out.origins` starts as the base's, and what is
    /// removed from the copy is removed from it.
    incremental: bool,
    /// Refreshing only what the journal named: (device, inode) of multiply-linked files met or
    /// removed, and those the journal saw relinked, whose other names' ctimes changed without
    /// an event in their directories.
    linked: std::collections::HashSet<(u64, u64)>,
    /// The request's `forced`, relative to the root.
    forced: std::collections::HashSet<&'a Path>,
    /// Refreshing only what the journal named: the entries looked at so far (relative), each
    /// looked at once.
    met: std::collections::HashSet<PathBuf>,
    /// Entries made in or removed from the copy so far: whether looking at one changed its folder.
    edits: u64,
    /// The threads that copy files while the walk goes on (none with one core: each file is
    /// copied as it is met).
    pool: Option<Pool>,
    /// What the copying threads share with the walk.
    shared: Arc<Shared>,
    /// Files handed to the pool and not yet copied (relative paths), and how many of them each
    /// folder holds: what the walk does there must wait for them.
    queued_at: std::collections::HashSet<PathBuf>,
    queued_in: HashMap<PathBuf, usize>,
}

/// A commit by copying (or cloning) entries into a mirrored tree: the walk on this thread,
/// the files' copies on a pool of threads while it goes on.
fn copy_tree(req: &CommitRequest<'_>, reflink: Reflink) -> Result<Commit, CommitError> {
    let shared = Arc::new(Shared::default());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let pool = (cores > 1).then(|| Pool::start(scope, cores.min(COPY_THREADS_MAX), req, reflink, &shared));
        walk_and_copy(req, reflink, pool, Arc::clone(&shared))
    })
}

fn walk_and_copy(
    req: &CommitRequest<'_>,
    reflink: Reflink,
    pool: Option<Pool>,
    shared: Arc<Shared>,
) -> Result<Commit, CommitError> {
    let (root, dest) = (req.root, req.dest);
    let incremental = req.changed.is_some() && req.previous.is_some();
    let mut copier = Copier {
        req,
        reflink,
        out: Commit::default(),
        links: HashMap::new(),
        dirs: Vec::new(),
        reflink_works: HashMap::new(),
        settled_before_ns: sysstate_types::time::now_ns() - SETTLED.as_nanos() as i64,
        incremental,
        linked: req.relinked.iter().copied().filter(|_| incremental).collect(),
        forced: req.forced.iter().map(|f| f.strip_prefix("/").unwrap_or(f)).collect(),
        met: Default::default(),
        edits: 0,
        pool,
        shared,
        queued_at: Default::default(),
        queued_in: HashMap::new(),
    };
    if incremental {
        copier.out.origins = req.previous.cloned().unwrap_or_default(); // shared until changed
        copier.out.touched = Some(Vec::new());
    } else {
        copier.out.origins_changed = true; // made anew
    }
    std::fs::create_dir_all(dest).map_err(|e| CommitError::Io(ShadowError::io(dest, e)))?;
    let mut done: Vec<&Path> = Vec::new();
    for path in req.paths {
        let relative = path.strip_prefix("/").unwrap_or(path);
        if done.iter().any(|d| relative.starts_with(d)) {
            continue; // nested in a path already copied
        }
        done.push(relative);
        // The folders above the path, with their metadata.
        let mut above = PathBuf::new();
        for component in relative.parent().into_iter().flat_map(|p| p.components()) {
            above.push(component);
            let target = dest.join(&above);
            if copier.dirs.iter().any(|(d, _)| *d == above) {
                continue;
            }
            let meta = std::fs::symlink_metadata(root.join(&above))
                .map_err(|e| CommitError::Io(ShadowError::io(root.join(&above), e)))?;
            if !std::fs::symlink_metadata(&target).is_ok_and(|t| t.is_dir()) {
                copier.remove(&target)?;
                std::fs::create_dir(&target).map_err(|e| copier.io_error(&target, e))?;
            }
            copier.note_origin(&above, &meta);
            copier.dirs.push((above.clone(), meta));
        }
        match std::fs::symlink_metadata(root.join(relative)) {
            // The journal names the directories below that changed.
            Ok(meta) if incremental && copier.same_dir(relative, &meta) => copier.dir_itself(relative, meta),
            Ok(meta) => copier.entry(relative, meta)?,
            // Gone from the live system: a base copy must not keep what it held of it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => copier.remove(&dest.join(relative))?,
            Err(e) => return Err(CommitError::Io(ShadowError::io(root.join(relative), e))),
        }
    }
    if let Some(changed) = req.changed.filter(|_| incremental) {
        for dir in changed {
            let relative = dir.strip_prefix("/").unwrap_or(dir);
            if done.iter().any(|d| relative.starts_with(d)) && !copier.skipped(relative) {
                copier.refresh_dir(relative)?;
            }
        }
    }
    // A full walk met every forced file already; a refresh by the journal looks at those it
    // did not. What the copy before it copied is not looked at again: a change since shows in
    // the journal's take (its folder is named), and one made in the tick it was copied in,
    // which its times may not show, is forced by `settle_by_journal` (its `unsettled`).
    for path in req.forced.iter().filter(|_| incremental) {
        let relative = path.strip_prefix("/").unwrap_or(path);
        if done.iter().any(|d| relative.starts_with(d)) && !copier.skipped(relative) {
            copier.look_again(relative)?;
        }
    }
    if incremental {
        copier.copy_queued()?;
        copier.relink()?;
    }
    copier.copy_queued()?;
    // Past the deadline is past it, however little there was to look at.
    copier.check_limits()?;
    // Folders last, deepest first: creating their entries changed their times. Files read
    // live or not: a read of the copy after the freeze meets the folders above a file looked
    // at again without the commit looking at them (the random test found one made 0700).
    let started = Instant::now();
    copier.dirs.sort_by(|a, b| sysstate_fs::path_order(&a.0, &b.0));
    copier.dirs.dedup_by(|a, b| a.0 == b.0);
    let folders = copier.dirs.len();
    for (relative, meta) in std::mem::take(&mut copier.dirs).iter().rev() {
        if let Err(error) = apply_dir_metadata(&root.join(relative), &dest.join(relative), meta) {
            if std::fs::symlink_metadata(root.join(relative)).is_ok() {
                return Err(CommitError::Io(ShadowError::io(dest.join(relative), error)));
            }
            // Gone while it was copied: left out, as if it had gone before.
            let shown = Path::new("/").join(relative);
            copier.remove(&dest.join(relative))?;
            copier.forget_under(&shown);
        }
    }
    tracing::debug!(folders, ms = started.elapsed().as_millis() as u64, "copied folders' metadata set");
    copier.out.root = dest.to_path_buf();
    copier.out.bytes = copier.shared.bytes.load(std::sync::atomic::Ordering::Relaxed);
    Ok(std::mem::take(&mut copier.out))
}

impl Copier<'_> {
    /// True when `relative` is in a path copied elsewhere (another group's, shadow storage).
    fn skipped(&self, relative: &Path) -> bool {
        self.req.skip.iter().any(|s| relative.starts_with(s.strip_prefix("/").unwrap_or(s)))
    }

    /// True when the base copy holds `relative` as a directory made from the live directory
    /// `live` is (the same inode): the journal then says what changed inside it.
    fn same_dir(&self, relative: &Path, live: &std::fs::Metadata) -> bool {
        let previous = self.req.previous.and_then(|p| p.get(Path::new("/").join(relative).as_path()));
        live.is_dir()
            && previous.is_some_and(|p| (p.device, p.inode) == (live.dev(), live.ino()))
            && std::fs::symlink_metadata(self.req.dest.join(relative)).is_ok_and(|c| c.is_dir())
    }

    /// Removes from the copy's folder `target` the entries gone from the live one, whose
    /// entries are `names` (sorted).
    fn remove_gone(&mut self, target: &Path, names: &[std::ffi::OsString]) -> Result<(), CommitError> {
        if target.strip_prefix(self.req.dest).is_ok_and(|folder| self.queued_in.contains_key(folder)) {
            self.copy_queued()?;
        }
        let gone: Vec<_> = std::fs::read_dir(target)
            .map_err(|e| CommitError::Io(ShadowError::io(target, e)))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|name| names.binary_search(name).is_err())
            .collect();
        for name in gone {
            self.remove(&target.join(name))?;
        }
        Ok(())
    }

    /// An entry looked at outside the folders the journal named, once: compared with the base,
    /// copied again when it changed (or is forced), its folder's times taken again.
    fn look_again(&mut self, relative: &Path) -> Result<(), CommitError> {
        if self.met.contains(relative) {
            return Ok(());
        }
        let Ok(meta) = std::fs::symlink_metadata(self.req.root.join(relative)) else { return Ok(()) };
        self.out.looked_again.push(Path::new("/").join(relative));
        if self.same_dir(relative, &meta) {
            // Its own metadata; its entries are the journal's to name.
            self.dir_itself(relative, meta);
            return Ok(());
        }
        let edits = self.edits;
        self.entry(relative, meta)?;
        if self.edits != edits {
            self.parent_touched(relative);
        }
        Ok(())
    }

    /// The folder of an entry copied again or removed on its own (not while its folder was gone
    /// through): its times and identity are taken again, since changing it moved the copy's.
    fn parent_touched(&mut self, relative: &Path) {
        let Some(parent) = relative.parent().filter(|p| !p.as_os_str().is_empty()) else { return };
        if let Ok(meta) = std::fs::symlink_metadata(self.req.root.join(parent)) {
            self.note_origin(parent, &meta);
            self.dirs.push((parent.to_path_buf(), meta));
        }
    }

    /// A directory the base holds already: its own metadata now, not its entries.
    fn dir_itself(&mut self, relative: &Path, meta: std::fs::Metadata) {
        self.note_origin(relative, &meta);
        self.dirs.push((relative.to_path_buf(), meta));
    }

    /// A directory the journal named: its own metadata and each of its entries as they are
    /// now — entries gone are removed, files compared and copied again when they changed,
    /// folders new or replaced copied whole; folders the base holds already are entered only
    /// when the journal named them too. When the journal named the entries that changed in
    /// it, only those are looked at.
    fn refresh_dir(&mut self, relative: &Path) -> Result<(), CommitError> {
        let source = self.req.root.join(relative);
        let Ok(meta) = std::fs::symlink_metadata(&source) else { return Ok(()) }; // gone: its parent was named
        if !meta.is_dir() {
            return Ok(());
        }
        if !self.same_dir(relative, &meta) {
            // New or replaced since the base: copied whole (its parent was named too).
            return self.entry(relative, meta);
        }
        self.dir_itself(relative, meta);
        let target = self.req.dest.join(relative);
        let named = self.req.names.and_then(|names| names.get(&Path::new("/").join(relative)));
        let names = match named {
            Some(named) => named.clone(),
            None => {
                let names = live_names(&source)?;
                self.remove_gone(&target, &names)?;
                names
            }
        };
        for name in names {
            let child = relative.join(&name);
            match std::fs::symlink_metadata(self.req.root.join(&child)) {
                Ok(child_meta) if self.same_dir(&child, &child_meta) => self.dir_itself(&child, child_meta),
                Ok(child_meta) => self.entry(&child, child_meta)?,
                // Gone from the live folder (a name the journal named, or one gone since the
                // folder was listed): gone from the copy.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.remove(&target.join(&name))?,
                Err(e) => return Err(CommitError::Io(ShadowError::io(self.req.root.join(&child), e))),
            }
        }
        self.check_limits()
    }

    /// Every name of a multiply-linked file copied again or removed: a link made or removed
    /// through one name changes the inode's ctime and link count under all of them, with an
    /// event only in the folder of the name used.
    fn relink(&mut self) -> Result<(), CommitError> {
        if self.linked.is_empty() {
            return Ok(());
        }
        // One pass over every origin (twice the base's entries): a sorted list of the few files
        // looked for is searched faster than a hashed set.
        let mut linked: Vec<(u64, u64)> = self.linked.iter().copied().collect();
        linked.sort_unstable();
        let mut names: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
        for (path, origin) in self.req.previous.into_iter().flat_map(|p| p.iter()).chain(self.out.origins.iter()) {
            if linked.binary_search(&(origin.device, origin.inode)).is_ok() {
                names.entry((origin.device, origin.inode)).or_default().push(path.to_path_buf());
            }
        }
        for paths in names.values_mut() {
            paths.sort();
            paths.dedup();
            // Each name looked at again, as it is now (a name may be gone, or another file).
            for path in paths.iter() {
                self.look_again(path.strip_prefix("/").unwrap_or(path))?;
            }
        }
        Ok(())
    }

    fn io_error(&self, path: &Path, error: std::io::Error) -> CommitError {
        write_error(path, error, self.shared.written())
    }

    /// Forgets the origins of `shown` and everything below it.
    fn forget_under(&mut self, shown: &Path) {
        retain_origins(&mut self.out.origins, self.out.touched.as_mut(), |path, _| !path.starts_with(shown));
        self.out.origins_changed = true;
    }

    /// A live file the caller reads before the freeze (see [`CommitRequest::contents`]): kept
    /// where the copy holds it as it is (by its origin, which moves with every change), else its
    /// origin marked out of date; the copy itself is not looked at.
    fn file_read_live(&mut self, relative: &Path, source: &Path, meta: &std::fs::Metadata) -> Result<(), CommitError> {
        self.note_provider(source, meta.dev());
        let before = self.origin_of(relative);
        if before == Some(Origin::of(meta)) && !self.forced.contains(relative) {
            return self.check_limits();
        }
        self.note_renamed_over(before, meta);
        if self.incremental && meta.nlink() > 1 {
            // A file with other names changed under them too: those are looked at again.
            self.linked.insert((meta.dev(), meta.ino()));
        }
        self.note_stale_origin(relative, meta);
        self.check_limits()
    }

    /// What the base's record says the copy holds at `relative`.
    fn origin_of(&self, relative: &Path) -> Option<Origin> {
        self.out.origins.get(Path::new("/").join(relative).as_path()).copied()
    }

    /// A name that stands for another file now than `before` (renamed over): the file it stood
    /// for lost a link, with an event only in this folder; its other names are looked at.
    fn note_renamed_over(&mut self, before: Option<Origin>, meta: &std::fs::Metadata) {
        if !self.incremental {
            return;
        }
        if let Some(before) = before.filter(|b| (b.device, b.inode) != (meta.dev(), meta.ino()) && b.links != 1) {
            self.linked.insert((before.device, before.inode));
        }
    }

    /// Notes the provider that copies (or would copy) the files of `device`.
    fn note_provider(&mut self, source: &Path, device: u64) {
        if !self.out.used.contains_key(&device) {
            let provider = self.provider_on(source, device);
            self.out.used.insert(device, provider);
        }
    }

    /// Notes that what the copy holds at `relative` (perhaps nothing) is not the live file
    /// `meta`: its origin names the live file, so that its other names are found by it, with a
    /// ctime no file has, so that whatever meets it copies it again.
    fn note_stale_origin(&mut self, relative: &Path, meta: &std::fs::Metadata) {
        self.set_origin(relative, Origin { ctime_ns: STALE_CTIME, ..Origin::of(meta) });
    }

    fn note_origin(&mut self, relative: &Path, meta: &std::fs::Metadata) {
        self.set_origin(relative, Origin::of(meta));
    }

    /// Records `origin` as what the copy holds at `relative`, noting the change.
    fn set_origin(&mut self, relative: &Path, origin: Origin) {
        let shown = Path::new("/").join(relative);
        if self.out.origins.get(shown.as_path()) != Some(&origin) {
            if let Some(touched) = &mut self.out.touched {
                touched.push(shown.clone());
            }
            Arc::make_mut(&mut self.out.origins).insert(shown.into(), origin);
            self.out.origins_changed = true;
        }
    }

    /// Counts what an entry added to shadow storage: its allocated bytes.
    fn charge(&mut self, path: &Path) -> Result<(), CommitError> {
        let bytes = std::fs::symlink_metadata(path).map(|m| m.blocks() * 512).unwrap_or(0);
        self.shared.bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.out.files += 1;
        self.check_limits()
    }

    /// The budget, the deadline and the stop flag, checked after every entry.
    fn check_limits(&mut self) -> Result<(), CommitError> {
        limits(self.req, self.shared.written())
    }

    /// Removes whatever stands at `target` in the copy, counting the bytes freed; refreshing
    /// only what the journal named, forgets the origins of what it held.
    fn remove(&mut self, target: &Path) -> Result<(), CommitError> {
        self.copy_queued_at(target, false)?;
        let Ok(meta) = std::fs::symlink_metadata(target) else { return Ok(()) };
        if meta.is_dir() {
            self.copy_queued_at(target, true)?;
        }
        self.forget_copied(target, &meta);
        if !self.req.contents && !meta.is_dir() {
            // Read live before the freeze: a copy whose origin is forgotten is compared (and
            // here removed) by whatever meets it next; removing it now was a quarter of the copy
            // before the freeze.
            return Ok(());
        }
        self.remove_tree(target, &meta)
    }

    /// Refreshing only what the journal named: forgets the origins of what the copy holds at
    /// `target` (`meta`), which is about to be removed, and marks the other names of its files
    /// to be looked at again.
    fn forget_copied(&mut self, target: &Path, meta: &std::fs::Metadata) {
        if !self.incremental {
            return;
        }
        let Ok(relative) = target.strip_prefix(self.req.dest) else { return };
        let shown = Path::new("/").join(relative);
        if meta.is_dir() {
            // A file in it with other names elsewhere lost one (a folder moved away is copied
            // anew where it went, and its files are not the same names): those names are
            // looked at again.
            let linked = &mut self.linked;
            retain_origins(&mut self.out.origins, self.out.touched.as_mut(), |path, origin| {
                let inside = path.starts_with(&shown);
                if inside && origin.links != 1 && path != shown.as_path() {
                    linked.insert((origin.device, origin.inode));
                }
                !inside
            });
            self.out.origins_changed = true;
            return;
        }
        let removed = if self.out.origins.contains_key(shown.as_path()) {
            Arc::make_mut(&mut self.out.origins).remove(shown.as_path())
        } else {
            None
        };
        if let (Some(touched), Some(_)) = (&mut self.out.touched, removed) {
            touched.push(shown);
        }
        self.out.origins_changed |= removed.is_some();
        // Other names may share the file whatever counts its copy or its origin hold (a link
        // made since through a folder not refreshed yet): they are looked at again (one look
        // through the origins).
        if let Some(origin) = removed {
            self.linked.insert((origin.device, origin.inode));
        }
    }

    fn remove_tree(&mut self, target: &Path, meta: &std::fs::Metadata) -> Result<(), CommitError> {
        self.edits += 1;
        if meta.is_dir() {
            for entry in std::fs::read_dir(target).map_err(|e| CommitError::Io(ShadowError::io(target, e)))?.flatten() {
                if let Ok(inner) = entry.metadata() {
                    self.remove_tree(&entry.path(), &inner)?;
                }
            }
            std::fs::remove_dir(target).map_err(|e| CommitError::Io(ShadowError::io(target, e)))?;
        } else {
            std::fs::remove_file(target).map_err(|e| CommitError::Io(ShadowError::io(target, e)))?;
        }
        if meta.nlink() <= 1 {
            self.out.freed += meta.blocks() * 512;
        }
        Ok(())
    }

    /// True when the base copy already holds this live entry as it is now.
    fn unchanged(&self, relative: &Path, live: &std::fs::Metadata, copied: &std::fs::Metadata) -> bool {
        let Some(previous) = self.req.previous else { return false };
        if self.forced.contains(relative) {
            return false;
        }
        previous.get(Path::new("/").join(relative).as_path()) == Some(&Origin::of(live))
            && live.file_type() == copied.file_type()
            && (live.is_dir()
                || (live.size() == copied.size()
                    && live.mtime() == copied.mtime()
                    && live.mtime_nsec() == copied.mtime_nsec()))
    }

    /// Copies (or keeps) one entry, a folder with everything in it. An entry that goes away
    /// while it is copied — everything runs during the copy before the freeze, and processes
    /// that are not writers during the freeze too — is left out, as if it had gone before.
    fn entry(&mut self, relative: &Path, meta: std::fs::Metadata) -> Result<(), CommitError> {
        if self.incremental {
            self.met.insert(relative.to_path_buf());
        }
        match self.copy_entry(relative, meta) {
            Err(CommitError::Io(error))
                if std::fs::symlink_metadata(self.req.root.join(relative))
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
            {
                tracing::debug!(%error, path = %relative.display(), "went away while it was copied");
                let shown = Path::new("/").join(relative);
                self.remove(&self.req.dest.join(relative))?;
                self.forget_under(&shown);
                self.dirs.retain(|(dir, _)| !dir.starts_with(relative));
                Ok(())
            }
            other => other,
        }
    }

    fn copy_entry(&mut self, relative: &Path, meta: std::fs::Metadata) -> Result<(), CommitError> {
        if self.req.skip.iter().any(|s| s.strip_prefix("/").unwrap_or(s) == relative) {
            return Ok(());
        }
        let source = self.req.root.join(relative);
        let target = self.req.dest.join(relative);
        let file_type = meta.file_type();
        if file_type.is_file() && !self.req.contents {
            return self.file_read_live(relative, &source, &meta);
        }
        // Met again (a folder copied whole and named too): compared with the copy made first.
        self.copy_queued_at(&target, false)?;
        let copied = std::fs::symlink_metadata(&target).ok();
        self.note_renamed_over(self.origin_of(relative), &meta);
        let keep = copied.as_ref().is_some_and(|copied| self.unchanged(relative, &meta, copied));
        if self.incremental && file_type.is_file() && meta.nlink() > 1 && !keep {
            self.linked.insert((meta.dev(), meta.ino()));
        }
        self.note_origin(relative, &meta);
        if file_type.is_dir() {
            // A folder is kept when it is one already; its entries are compared one by one.
            let existed = copied.as_ref().is_some_and(|c| c.is_dir());
            if !existed {
                self.remove(&target)?;
                self.note_origin(relative, &meta); // removing forgot it
                std::fs::create_dir(&target).map_err(|e| self.io_error(&target, e))?;
                self.edits += 1;
            }
            self.dirs.push((relative.to_path_buf(), meta));
            let names = live_names(&source)?;
            if existed {
                self.remove_gone(&target, &names)?;
            }
            for name in names {
                let child = relative.join(&name);
                match std::fs::symlink_metadata(self.req.root.join(&child)) {
                    Ok(child_meta) => self.entry(&child, child_meta)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(CommitError::Io(ShadowError::io(self.req.root.join(&child), e))),
                }
            }
            return if existed { self.check_limits() } else { self.charge(&target) };
        }
        if keep {
            if file_type.is_file() {
                self.note_provider(&source, meta.dev());
            }
            if file_type.is_file() && meta.nlink() > 1 {
                self.links.entry((meta.dev(), meta.ino())).or_insert(target);
            }
            return self.check_limits();
        }
        // Removed and made anew, not written over: the old copy's pages are seldom cached, and
        // writing over a file reads each page it does not cover whole (its last) first — a
        // read per changed file, which made the agent's 2%-changed backup a fifth slower.
        // A file's copy is made by the threads that copy the queue; the old copy, when it is
        // not a folder, is removed there too.
        let mut replaces = None;
        if let Some(copied) = copied.as_ref() {
            if file_type.is_file() && !copied.is_dir() {
                self.forget_copied(&target, copied);
                replaces = Some(if copied.nlink() <= 1 { copied.blocks() * 512 } else { 0 });
                self.edits += 1;
            } else {
                self.remove(&target)?;
            }
            self.note_origin(relative, &meta); // removing forgot it
        }
        if Origin::of(&meta).ctime_ns >= self.settled_before_ns {
            self.out.unsettled.push(Path::new("/").join(relative));
        }
        self.edits += 1;
        if file_type.is_file() {
            let linked = meta.nlink() > 1;
            if linked {
                // The name copied first, unless it is this one (met again) or was removed since.
                // A refresh by the journal copies each name on its own: the names it meets
                // may be linked in the copy to names it does not look at, whose copies are
                // older (versions record the live link count, not the copy's).
                let first = self.links.get(&(meta.dev(), meta.ino())).filter(|first| **first != target);
                if let Some(first) = first.filter(|_| !self.incremental).cloned() {
                    // The first name must be there to be linked to.
                    self.copy_queued_at(&first, false)?;
                    if let Some(freed) = replaces {
                        std::fs::remove_file(&target).map_err(|e| CommitError::Io(ShadowError::io(&target, e)))?;
                        self.out.freed += freed;
                    }
                    match std::fs::hard_link(&first, &target) {
                        Ok(()) => return Ok(()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(self.io_error(&target, e)),
                    }
                }
                self.links.insert((meta.dev(), meta.ino()), target.clone());
            }
            let clone = self.clones(meta.dev());
            return self.queue(QueuedFile { relative: relative.to_path_buf(), meta, replaces, clone });
        } else if file_type.is_symlink() {
            let link = std::fs::read_link(&source).map_err(|e| CommitError::Io(ShadowError::io(&source, e)))?;
            std::os::unix::fs::symlink(link, &target).map_err(|e| self.io_error(&target, e))?;
        } else if file_type.is_socket() {
            self.out.skipped.push((
                Path::new("/").join(relative),
                "is a socket: skipped (sockets are recreated by the programs that own them)".into(),
            ));
            return Ok(());
        } else {
            let kind = if file_type.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else if file_type.is_block_device() {
                rustix::fs::FileType::BlockDevice
            } else {
                rustix::fs::FileType::Fifo
            };
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                kind,
                rustix::fs::Mode::from_raw_mode(meta.mode() & 0o777),
                meta.rdev(),
            )
            .map_err(|e| self.io_error(&target, e.into()))?;
        }
        apply_metadata(&source, &target, &meta).map_err(|e| CommitError::Io(ShadowError::io(&target, e)))?;
        self.charge(&target)
    }

    /// Which provider copies files of `device` here: `reflink` when cloning `source` into
    /// shadow storage works (tried once per device), else `copy`. For the record of a commit
    /// that kept every file it met.
    fn provider_on(&mut self, source: &Path, device: u64) -> &'static str {
        if self.reflink == Reflink::Never {
            return "copy";
        }
        // Beside the copy's tree, not in it: a file made and removed in a folder of the copy
        // would move the folder's times.
        let probe = self.req.dest.with_file_name(".sysstate-reflink-probe");
        let works = *self.reflink_works.entry(device).or_insert_with(|| {
            let cloned = File::open(source).and_then(|input| {
                let output = File::create(&probe)?;
                rustix::fs::ioctl_ficlone(&output, &input).map_err(std::io::Error::from)
            });
            let _ = std::fs::remove_file(&probe);
            cloned.is_ok()
        });
        if works {
            "reflink"
        } else {
            "copy"
        }
    }

    /// True when a file on `device` is to be cloned (as far as is known yet).
    fn clones(&self, device: u64) -> bool {
        self.reflink != Reflink::Never && *self.reflink_works.get(&device).unwrap_or(&true)
    }

    /// Waits for the queued files' copies when one is at `target` (or `below` it, a folder):
    /// what is done there next must find them made.
    fn copy_queued_at(&mut self, target: &Path, below: bool) -> Result<(), CommitError> {
        let Ok(relative) = target.strip_prefix(self.req.dest) else { return Ok(()) };
        let queued = match below {
            false => self.queued_at.contains(relative),
            true => self.queued_in.keys().any(|folder| folder.starts_with(relative)),
        };
        if queued {
            self.copy_queued()?;
        }
        Ok(())
    }

    /// Hands a file to the pool, or copies it now without one; takes in what the pool copied
    /// meanwhile.
    fn queue(&mut self, file: QueuedFile) -> Result<(), CommitError> {
        let Some(pool) = &mut self.pool else {
            let outcome = copy_queued_file(self.req, self.reflink, &file, &self.shared).map(Some);
            return self.copied(file, outcome).and_then(|()| self.check_limits());
        };
        self.queued_at.insert(file.relative.clone());
        *self.queued_in.entry(parent_of(&file.relative)).or_default() += 1;
        pool.pending += 1;
        // The threads are gone only when one panicked: the scope's join reports it.
        let _ = pool.jobs.send(file);
        while let Some((file, outcome)) = self.pool.as_mut().and_then(Pool::try_done) {
            self.copied(file, outcome)?;
        }
        self.check_limits()
    }

    /// Waits for every file handed to the pool to be copied.
    fn copy_queued(&mut self) -> Result<(), CommitError> {
        while let Some((file, outcome)) = self.pool.as_mut().and_then(Pool::done) {
            self.copied(file, outcome)?;
        }
        self.check_limits()
    }

    /// Takes in what copying a queued file did.
    fn copied(&mut self, file: QueuedFile, outcome: Outcome) -> Result<(), CommitError> {
        if self.pool.is_some() {
            self.queued_at.remove(&file.relative);
            let folder = parent_of(&file.relative);
            if let Some(count) = self.queued_in.get_mut(&folder) {
                *count -= 1;
                if *count == 0 {
                    self.queued_in.remove(&folder);
                }
            }
        }
        match outcome {
            // Skipped after another failed, which the walk meets too.
            Ok(None) => Ok(()),
            Ok(Some(copied)) => {
                self.out.files += 1;
                self.out.freed += copied.freed;
                self.out.used.insert(file.meta.dev(), copied.used);
                if file.clone {
                    self.reflink_works.insert(file.meta.dev(), copied.used == "reflink");
                }
                Ok(())
            }
            Err(error) if went_away(self.req, &file.relative, &error) => {
                tracing::debug!(?error, path = %file.relative.display(), "went away while it was copied");
                self.remove(&self.req.dest.join(&file.relative))?;
                self.forget_under(&Path::new("/").join(&file.relative));
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// Keeps the origins `keep` says to keep, noting those it removes in `touched` (if given).
fn retain_origins(
    origins: &mut super::Origins,
    mut touched: Option<&mut Vec<PathBuf>>,
    mut keep: impl FnMut(&Path, &Origin) -> bool,
) {
    Arc::make_mut(origins).retain(|path, origin| {
        let kept = keep(path, origin);
        if let (false, Some(touched)) = (kept, touched.as_mut()) {
            touched.push(path.to_path_buf());
        }
        kept
    });
}

/// The folder a relative path is in ("" for one at the top).
fn parent_of(relative: &Path) -> PathBuf {
    relative.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// What the copying threads share with the walk.
#[derive(Default)]
struct Shared {
    /// Bytes allocated in shadow storage so far.
    bytes: std::sync::atomic::AtomicU64,
    /// Set when a copy failed or the walk stopped: the threads copy nothing more.
    failed: std::sync::atomic::AtomicBool,
    /// Devices where a clone failed: not tried again.
    unclonable: std::sync::Mutex<Vec<u64>>,
}

impl Shared {
    fn written(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Threads that copy the files the walk queues, while it goes on: a refresh spends most of its
/// time in the calls that remove, make, fill and label each file, each waiting on the
/// filesystem.
struct Pool {
    jobs: std::sync::mpsc::SyncSender<QueuedFile>,
    done: std::sync::mpsc::Receiver<(QueuedFile, Outcome)>,
    /// Files sent and not yet received back.
    pending: usize,
    shared: Arc<Shared>,
}

impl Pool {
    fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        threads: usize,
        req: &'scope CommitRequest<'_>,
        reflink: Reflink,
        shared: &Arc<Shared>,
    ) -> Pool {
        use std::sync::atomic::Ordering;
        let (jobs, queue) = std::sync::mpsc::sync_channel::<QueuedFile>(QUEUE_MAX);
        let (report, done) = std::sync::mpsc::channel();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for _ in 0..threads {
            let (queue, report, shared) = (Arc::clone(&queue), report.clone(), Arc::clone(shared));
            scope.spawn(move || {
                // A copy is made with its live file's permission bits, not given them by a
                // chmod after (the process's private umask took the group's and others' off
                // every copy).
                sysstate_fs::exact_modes_in_this_thread();
                loop {
                    let next = queue.lock().expect("copy queue lock").recv();
                    let Ok(file) = next else { break };
                    // Not copied once one failed: the walk stops with that failure.
                    let outcome = match shared.failed.load(Ordering::Relaxed) {
                        true => Ok(None),
                        false => copy_queued_file(req, reflink, &file, &shared)
                            .and_then(|copied| limits(req, shared.written()).map(|()| Some(copied))),
                    };
                    if outcome.as_ref().is_err_and(|error| !went_away(req, &file.relative, error)) {
                        shared.failed.store(true, Ordering::Relaxed);
                    }
                    if report.send((file, outcome)).is_err() {
                        break;
                    }
                }
            });
        }
        Pool { jobs, done, pending: 0, shared: Arc::clone(shared) }
    }

    /// The next file copied, waiting for it; none when none is pending.
    fn done(&mut self) -> Option<(QueuedFile, Outcome)> {
        if self.pending == 0 {
            return None;
        }
        let done = self.done.recv().ok()?;
        self.pending -= 1;
        Some(done)
    }

    /// The next file copied, if one is.
    fn try_done(&mut self) -> Option<(QueuedFile, Outcome)> {
        let done = self.done.try_recv().ok()?;
        self.pending -= 1;
        Some(done)
    }
}

impl Drop for Pool {
    /// The walk is over, done or failed: what is still queued is not copied.
    fn drop(&mut self) {
        self.shared.failed.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many files the walk queues ahead of the copying threads.
const QUEUE_MAX: usize = 4096;

/// The most threads that copy files at once.
const COPY_THREADS_MAX: usize = 8;

/// A regular file queued to be copied by the [`Pool`].
struct QueuedFile {
    /// Its path, relative to the root (and to the copy's).
    relative: PathBuf,
    /// The live file's metadata when it was met.
    meta: std::fs::Metadata,
    /// The copy held a file there before, to be removed first (the bytes that frees).
    replaces: Option<u64>,
    /// Whether its extents are to be cloned.
    clone: bool,
}

/// The ctime of the origin of a file whose copy is out of date (see
/// [`CommitRequest::contents`]): no live file has it.
const STALE_CTIME: i64 = i64::MIN;

/// What became of a queued file: copied, not copied after another failed (`None`), or failed.
type Outcome = Result<Option<CopiedFile>, CommitError>;

/// What copying a queued file made.
struct CopiedFile {
    /// Bytes freed by removing the copy it replaces.
    freed: u64,
    /// `reflink` or `copy`.
    used: &'static str,
}

/// True when `error` copying `relative` is only that the live entry went away meanwhile:
/// everything runs during the copy before the freeze, and processes that are not writers
/// during the freeze too. It is left out, as if it had gone before.
fn went_away(req: &CommitRequest<'_>, relative: &Path, error: &CommitError) -> bool {
    matches!(error, CommitError::Io(_))
        && std::fs::symlink_metadata(req.root.join(relative)).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// The budget (against `bytes` allocated so far), the deadline and the stop flag.
fn limits(req: &CommitRequest<'_>, bytes: u64) -> Result<(), CommitError> {
    if bytes > req.budget {
        return Err(CommitError::Budget(bytes));
    }
    if Instant::now() > req.deadline {
        return Err(CommitError::Timeout);
    }
    if req.interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(CommitError::Interrupted);
    }
    Ok(())
}

/// A failure to write `path` in shadow storage: [`CommitError::NoSpace`] when it is full (with
/// the `bytes` written so far).
fn write_error(path: &Path, error: std::io::Error, bytes: u64) -> CommitError {
    if error.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
        CommitError::NoSpace(bytes)
    } else {
        CommitError::Io(ShadowError::io(path, error))
    }
}

/// Copies (or clones) a queued file into a new file in the copy, with its metadata, removing
/// the copy it replaces first, and counts the bytes it allocated in `shared`.
fn copy_queued_file(
    req: &CommitRequest<'_>,
    reflink: Reflink,
    file: &QueuedFile,
    shared: &Shared,
) -> Result<CopiedFile, CommitError> {
    let written = || shared.written();
    let unclonable = &shared.unclonable;
    let (source, target) = (req.root.join(&file.relative), req.dest.join(&file.relative));
    let mut freed = 0;
    if let Some(replaced) = file.replaces {
        match std::fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CommitError::Io(ShadowError::io(&target, e)))
            }
            _ => freed = replaced,
        }
    }
    let flags = (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOATIME).bits() as i32;
    let input = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(&source)
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&source)
        })
        .map_err(|e| CommitError::Io(ShadowError::io(&source, e)))?;
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(file.meta.mode() & 0o777)
        .open(&target)
        .map_err(|e| write_error(&target, e, written()))?;
    let mut used = "copy";
    let device = file.meta.dev();
    if file.clone && !unclonable.lock().expect("clone lock").contains(&device) {
        match rustix::fs::ioctl_ficlone(&output, &input) {
            Ok(()) => used = "reflink",
            Err(error) if reflink == Reflink::Require => {
                return Err(CommitError::Unsupported(source, error.to_string()));
            }
            Err(_) => unclonable.lock().expect("clone lock").push(device),
        }
    }
    if used == "copy" {
        match copy_data(&input, &output, &file.meta, req.interrupted) {
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => Err(CommitError::Interrupted),
            other => other.map_err(|e| write_error(&target, e, written())),
        }?;
    }
    let copy =
        apply_file_metadata(&input, &output, &file.meta).map_err(|e| CommitError::Io(ShadowError::io(&target, e)))?;
    // A clone shares its extents with the live file: it allocates nothing.
    if used == "copy" {
        shared.bytes.fetch_add(copy.blocks() * 512, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(CopiedFile { freed, used })
}

/// The names in the live folder `source`, sorted.
fn live_names(source: &Path) -> Result<Vec<std::ffi::OsString>, CommitError> {
    let mut names: Vec<_> = std::fs::read_dir(source)
        .map_err(|e| CommitError::Io(ShadowError::io(source, e)))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    Ok(names)
}

/// How much of a file is copied between two looks at the stop flag: a signal stops the copy of
/// a large file within a fraction of a second, not at its end.
const STOP_CHECK_BYTES: u64 = 16 << 20;

/// An interruption of a copy by the stop flag.
fn stopped() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::Interrupted, "stopped by a signal")
}

/// Copies content, keeping holes as holes; `stop` ends it early (an `Interrupted` error).
fn copy_data(
    input: &File,
    output: &File,
    meta: &std::fs::Metadata,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    let size = meta.size();
    let extents = if meta.blocks() * 512 < size { sysstate_fs::data_extents(input, size)? } else { None };
    let Some(extents) = extents else {
        // In the kernel where it can (copy_file_range), a slice at a time.
        let mut copied = 0u64;
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(stopped());
            }
            match rustix::fs::copy_file_range(input, None, output, None, STOP_CHECK_BYTES as usize) {
                Ok(0) => return Ok(()),
                Ok(n) => copied += n as u64,
                // Not between these files (older kernels, some filesystems): by hand.
                Err(_) if copied == 0 => break,
                Err(error) => return Err(error.into()),
            }
        }
        return copy_by_hand(input, output, &[(0, size)], stop).and_then(|()| output.set_len(size));
    };
    copy_by_hand(input, output, &extents, stop)?;
    output.set_len(size)
}

/// Copies `extents` (offset, length) through a buffer, looking at `stop` between slices.
fn copy_by_hand(
    input: &File,
    output: &File,
    extents: &[(u64, u64)],
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buffer = vec![0u8; 1 << 20];
    let mut since_look = 0u64;
    for &(start, length) in extents {
        let mut at = start;
        while at < start + length {
            if since_look >= STOP_CHECK_BYTES {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(stopped());
                }
                since_look = 0;
            }
            let want = buffer.len().min((start + length - at) as usize);
            let n = input.read_at(&mut buffer[..want], at)?;
            if n == 0 {
                break;
            }
            output.write_all_at(&buffer[..n], at)?;
            at += n as u64;
            since_look += n as u64;
        }
    }
    Ok(())
}

/// The metadata of `meta` (the live entry at `source`) onto `target`, an entry just made in
/// the copy (a symlink, a device, a FIFO).
fn apply_metadata(source: &Path, target: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    let is_symlink = meta.file_type().is_symlink();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::lchown(target, Some(meta.uid()), Some(meta.gid()))?;
    }
    // After chown, which clears file capabilities.
    sysstate_fs::write_xattrs(target, &sysstate_fs::read_xattrs(source)?, is_symlink)?;
    if !is_symlink {
        std::fs::set_permissions(target, std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777))?;
    }
    rustix::fs::utimensat(rustix::fs::CWD, target, &times_of(meta), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// The metadata of the live folder `source` (`meta`) onto its copy `target`, through one
/// descriptor (see [`set_metadata`]): a folder the refresh met is mostly as it was, and setting
/// its owner, mode and attributes again walked its path five times and wrote its inode for
/// nothing. It loses the attributes the live folder no longer has.
fn apply_dir_metadata(source: &Path, target: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    use rustix::fs::OFlags;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = File::from(rustix::fs::open(target, flags, rustix::fs::Mode::empty())?);
    let held = sysstate_fs::read_file_xattrs(&dir)?;
    set_metadata(&dir, &dir.metadata()?, meta, sysstate_fs::read_xattrs(source)?, &held)
}

/// Owner, extended attributes, mode and times of `meta` onto the copy `copy` (now as `current`,
/// holding the attributes `held`), each set only where it differs but for the times: `xattrs`
/// (sorted) replace `held` (sorted).
fn set_metadata(
    copy: &File,
    current: &std::fs::Metadata,
    meta: &std::fs::Metadata,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    held: &[(Vec<u8>, Vec<u8>)],
) -> std::io::Result<()> {
    let chowned = rustix::process::geteuid().is_root() && (current.uid(), current.gid()) != (meta.uid(), meta.gid());
    if chowned {
        std::os::unix::fs::fchown(copy, Some(meta.uid()), Some(meta.gid()))?;
    }
    // After chown, which clears file capabilities.
    for (name, _) in held {
        if xattrs.binary_search_by(|(n, _)| n.cmp(name)).is_err() {
            match rustix::fs::fremovexattr(copy, std::ffi::OsStr::from_bytes(name)) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                // The label the storage's security module gives every file it makes: a new
                // copy keeps it too.
                Err(_) if name == b"security.selinux" => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    let differ: Vec<_> = xattrs.into_iter().filter(|x| held.binary_search(x).is_err()).collect();
    sysstate_fs::write_file_xattrs(copy, &differ)?;
    // A chown may have cleared mode bits (set-user-ID): the mode is set again after one.
    if chowned || current.mode() & 0o7777 != meta.mode() & 0o7777 {
        rustix::fs::fchmod(copy, rustix::fs::Mode::from_raw_mode(meta.mode() & 0o7777))?;
    }
    Ok(rustix::fs::futimens(copy, &times_of(meta))?)
}

/// The access and modification times of `meta`, to set on a copy.
fn times_of(meta: &std::fs::Metadata) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: meta.atime(), tv_nsec: meta.atime_nsec() },
        last_modification: rustix::fs::Timespec { tv_sec: meta.mtime(), tv_nsec: meta.mtime_nsec() },
    }
}

/// [`apply_metadata`] for a file just made and written (`output`) from `input`: through their
/// descriptors, not five walks of their paths per file copied, and the owner and mode set only
/// where the new file's differ (it is made with the live file's permission bits; see
/// [`set_metadata`]). Returns the copy's metadata at the end, for the bytes it holds.
fn apply_file_metadata(input: &File, output: &File, meta: &std::fs::Metadata) -> std::io::Result<std::fs::Metadata> {
    let made = output.metadata()?;
    let xattrs = sysstate_fs::read_file_xattrs(input)?;
    let labelled = !xattrs.is_empty();
    set_metadata(output, &made, meta, xattrs, &[])?;
    // Attributes too large for the inode take a block of their own.
    if labelled {
        output.metadata()
    } else {
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::AtomicBool;

    fn commit(live: &Path, dest: &Path, previous: Option<&super::super::Origins>) -> Commit {
        let never = AtomicBool::new(false);
        let paths = [PathBuf::from("/data")];
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        CopyProvider { reflink: Reflink::Never }
            .commit(&CommitRequest { previous, ..CommitRequest::whole(live, &paths, dest, deadline, &never) })
            .unwrap()
    }

    #[test]
    fn a_refreshed_copy_loses_what_the_live_entries_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (live, dest) = (dir.path().join("live"), dir.path().join("copy"));
        let data = live.join("data");
        std::fs::create_dir_all(data.join("folder")).unwrap();
        std::fs::write(data.join("file"), vec![7u8; 20_000]).unwrap();
        std::fs::write(data.join("twin"), "two names").unwrap();
        std::fs::hard_link(data.join("twin"), data.join("folder/twin")).unwrap();
        for (path, name) in
            [(data.join("file"), "user.kept"), (data.join("file"), "user.gone"), (data.join("folder"), "user.gone")]
        {
            rustix::fs::lsetxattr(&path, name, b"v", rustix::fs::XattrFlags::empty()).unwrap();
        }
        // Changes from before the copy, settled: the copy trusts them.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for name in ["file", "twin", "folder"] {
            std::fs::File::open(data.join(name)).unwrap().set_modified(old).unwrap();
        }
        std::thread::sleep(SETTLED);
        let first = commit(&live, &dest, None);
        // The file shrinks and loses an attribute and permission bits; the twin changes through
        // one name; the folder loses an attribute.
        std::fs::write(data.join("file"), "short now").unwrap();
        rustix::fs::lremovexattr(data.join("file"), "user.gone").unwrap();
        std::fs::set_permissions(data.join("file"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(data.join("folder/twin"), "changed through one name").unwrap();
        rustix::fs::lremovexattr(data.join("folder"), "user.gone").unwrap();
        commit(&live, &dest, Some(&first.settled_origins()));
        for name in ["file", "twin", "folder/twin", "folder"] {
            let (l, c) = (data.join(name), dest.join("data").join(name));
            if l.is_file() {
                assert_eq!(std::fs::read(&c).unwrap(), std::fs::read(&l).unwrap(), "{name}");
            }
            assert_eq!(sysstate_fs::read_xattrs(&c).unwrap(), sysstate_fs::read_xattrs(&l).unwrap(), "{name}");
            let (lm, cm) = (std::fs::symlink_metadata(&l).unwrap(), std::fs::symlink_metadata(&c).unwrap());
            assert_eq!((cm.mode(), cm.len(), cm.mtime()), (lm.mode(), lm.len(), lm.mtime()), "{name}");
        }
    }

    /// The process's umask, as the kernel says (reading it by setting it would race the
    /// other tests).
    fn process_umask() -> String {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find(|l| l.starts_with("Umask:")).unwrap().to_string()
    }

    #[test]
    fn copies_have_their_files_modes_and_the_process_keeps_its_umask() {
        let dir = tempfile::tempdir().unwrap();
        let (live, dest) = (dir.path().join("live"), dir.path().join("copy"));
        let data = live.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let modes = [0o644, 0o755, 0o640, 0o600, 0o666, 0o4755, 0o2750, 0o1777];
        for (i, mode) in modes.iter().enumerate() {
            let path = data.join(format!("f{i}"));
            std::fs::write(&path, format!("{mode:o}")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        let before = process_umask();
        commit(&live, &dest, None);
        for (i, mode) in modes.iter().enumerate() {
            let copy = std::fs::symlink_metadata(dest.join(format!("data/f{i}"))).unwrap();
            assert_eq!(copy.mode() & 0o7777, *mode, "f{i}: {:o}", copy.mode());
        }
        // The copying threads' umask was their own.
        assert_eq!(process_umask(), before);
    }

    #[test]
    fn a_large_copy_stops_within_a_slice_when_asked_and_copies_whole_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let content: Vec<u8> = (0..40u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &content).unwrap();
        let meta = std::fs::metadata(&source).unwrap();
        let copy = |name: &str, stop: bool| {
            let target = dir.path().join(name);
            let output = File::create(&target).unwrap();
            let result = copy_data(&File::open(&source).unwrap(), &output, &meta, &AtomicBool::new(stop));
            (result, std::fs::metadata(&target).unwrap().len())
        };
        let (result, written) = copy("whole", false);
        result.unwrap();
        assert_eq!(std::fs::read(dir.path().join("whole")).unwrap(), content);
        assert_eq!(written, 40 << 20);
        let (result, written) = copy("stopped", true);
        assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::Interrupted);
        assert!(written < 40 << 20, "the copy went on after the stop: {written} bytes");
        // A sparse file's data, by hand: the same.
        let sparse = dir.path().join("sparse");
        let file = File::create(&sparse).unwrap();
        file.set_len(200 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &content, 100 << 20).unwrap();
        let meta = std::fs::metadata(&sparse).unwrap();
        let output = File::create(dir.path().join("sparse-stopped")).unwrap();
        let result = copy_data(&File::open(&sparse).unwrap(), &output, &meta, &AtomicBool::new(true));
        assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::Interrupted);
    }
}
