//! An open repository: its backend, its master key, its config and its index.

use crate::backend::{Backend, ErrorKind, FileKind, NewFile};
use crate::cache::{Cache, Cached};
use crate::chunker::{ChunkerParams, Gear};
use crate::crypto::{Label, MasterKey};
use crate::error::{RepoError, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile};
use crate::keys::{KdfParams, KeyError, KeyFile, RepoConfig, CONFIG_MAGIC, FORMAT_VERSION};
use crate::lock::{host_name, now_ns};
use crate::tree::Tree;
use crate::version::Version;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

/// A repository file passed over because it cannot be read: every command that does not need
/// it goes on without it, and says so through the repository's [`DamageHook`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Damaged {
    /// The file, repository-relative (`index/3fa2…`, `versions/91c0…`).
    pub object: String,
    /// What is wrong with it.
    pub detail: String,
    /// The command that repairs it.
    pub repair: &'static str,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is damaged ({}) and was passed over: `{}` repairs it", self.object, self.detail, self.repair)
    }
}

/// Told each damaged file once, when a command first passes over it.
#[derive(Clone)]
pub struct DamageHook(pub Arc<dyn Fn(&Damaged) + Send + Sync>);

impl std::fmt::Debug for DamageHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DamageHook")
    }
}

/// An index a process loaded, and what it was made of (see [`Repository::load_index`]).
struct LoadedIndex {
    location: String,
    repository: Id,
    files: Vec<Id>,
    index: Arc<Index>,
}

/// The indexes the process loaded last, the newest last: one for each of the last
/// [`LOADED_INDEXES_MAX`] repositories (an agent backs up to one and copies to another).
static LAST_INDEX: Mutex<Vec<LoadedIndex>> = Mutex::new(Vec::new());

const LOADED_INDEXES_MAX: usize = 4;

impl LoadedIndex {
    fn of(&self, repo: &Repository) -> bool {
        self.location == repo.location() && self.repository == repo.config.id
    }
}

/// The version manifests this process read and checked, by repository (its location and id): a
/// manifest is named by the hash of its bytes and never changes, so a long-lived process (the
/// agent, whose every backup looks for its parent among all versions) reads only those new since
/// its last listing. At most [`KEPT_VERSIONS_MAX`] in all: past it, the others go first.
static READ_VERSIONS: std::sync::LazyLock<Mutex<ReadVersions>> = std::sync::LazyLock::new(Default::default);

type ReadVersions = std::collections::HashMap<(String, Id), std::collections::HashMap<Id, Version>>;

/// About two years of hourly backups of one repository (a manifest takes a few KiB decoded).
const KEPT_VERSIONS_MAX: usize = 20_000;

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    key: MasterKey,
    key_name: String,
    config: RepoConfig,
    gear: Gear,
    index: RwLock<Arc<Index>>,
    /// Files passed over, by object: each told to the hook once.
    damaged: Mutex<BTreeMap<String, Damaged>>,
    damage_hook: Option<DamageHook>,
    /// Commands that only read take no lease (`--no-lock`).
    no_lock: bool,
    /// The local copy of a remote repository's index, manifests and tree packs.
    cache: Option<Cache>,
    /// Requests in flight at once to a remote repository (a restore's fetchers, a check's
    /// readers).
    connections: usize,
}

/// Requests in flight at once to a remote repository unless configured (`[storage]
/// connections`).
pub const DEFAULT_CONNECTIONS: usize = 8;

fn user_name() -> String {
    std::env::var("USER").unwrap_or_else(|_| format!("uid {}", rustix::process::getuid().as_raw()))
}

impl Repository {
    /// Creates a new repository at the backend with one key for `passphrase`, atomically (see
    /// [`Backend::create_repository`]): [`RepoError::AlreadyExists`] when one stands there, or
    /// another creator's appeared first.
    pub fn init(backend: Arc<dyn Backend>, passphrase: &[u8], kdf: KdfParams) -> Result<Repository> {
        let config = RepoConfig {
            magic: CONFIG_MAGIC.into(),
            version: FORMAT_VERSION,
            id: Id::random(),
            chunker: ChunkerParams::default(),
        };
        Self::create(backend, MasterKey::generate(), config, passphrase, kdf)
    }

    /// Creates a new repository at the backend with the parameters and the master key of
    /// `like`, wrapped for `passphrase`: its blob ids, chunks and seals are `like`'s, so packs go
    /// from one to the other as they are (a host's local repository made from its vault's).
    pub fn init_like(
        backend: Arc<dyn Backend>,
        like: &Repository,
        passphrase: &[u8],
        kdf: KdfParams,
    ) -> Result<Repository> {
        Self::create(backend, MasterKey::from_bytes(*like.key.bytes()), like.config.clone(), passphrase, kdf)
    }

    fn create(
        backend: Arc<dyn Backend>,
        key: MasterKey,
        config: RepoConfig,
        passphrase: &[u8],
        kdf: KdfParams,
    ) -> Result<Repository> {
        if Self::exists(&*backend)? {
            return Err(RepoError::AlreadyExists { location: backend.location() });
        }
        let key_file =
            KeyFile::wrap(&key, passphrase, kdf, &host_name(), &user_name(), now_ns()).for_repository(config.id);
        let key_name = Id::random().to_hex();
        let key_bytes = serde_json::to_vec_pretty(&key_file).expect("key encodes");
        let config_bytes = serde_json::to_vec_pretty(&config).expect("config encodes");
        let files = [
            NewFile { kind: FileKind::Key, name: &key_name, data: &key_bytes },
            NewFile { kind: FileKind::Config, name: "config", data: &config_bytes },
        ];
        if !backend.create_repository(&files)? {
            return Err(RepoError::AlreadyExists { location: backend.location() });
        }
        Ok(Repository::assemble(backend, key, key_name, config))
    }

    /// Opens the repository with `passphrase`, trying every key. Does not load the index.
    pub fn open(backend: Arc<dyn Backend>, passphrase: &[u8]) -> Result<Repository> {
        let location = backend.location();
        let config = Self::read_config(&*backend)?;
        let mut malformed = Vec::new();
        let mut foreign = Vec::new();
        let keys = backend.list(FileKind::Key)?;
        if keys.is_empty() {
            return Err(RepoError::Corrupt {
                location,
                object: "keys/".into(),
                detail: "the repository has no key file: restore one from a copy (`sysstate key add` makes copies)"
                    .into(),
            });
        }
        let key_count = keys.len();
        for (name, _) in keys {
            let bytes = backend.read(FileKind::Key, &name)?;
            let file = KeyFile::decode(&bytes);
            // A key made for another repository (a creator that lost a race and died before
            // removing it) never opens this one.
            if let Ok(KeyFile { repository: Some(id), .. }) = &file {
                if *id != config.id {
                    foreign.push(name);
                    continue;
                }
            }
            match file.and_then(|file| file.unwrap_key(passphrase)) {
                Ok(key) => return Ok(Repository::assemble(backend, key, name, config)),
                Err(KeyError::WrongPassphrase) => {}
                Err(KeyError::Malformed(detail)) => malformed.push(format!("keys/{name}: {detail}")),
            }
        }
        if malformed.is_empty() && foreign.len() == key_count {
            return Err(RepoError::Corrupt {
                location,
                object: format!("keys/{}", foreign.join(", keys/")),
                detail: "every key file belongs to another repository (its id is not this config's): the config or the keys were replaced".into(),
            });
        }
        // No key opens: a damaged key file may be the one the passphrase was for.
        if !malformed.is_empty() {
            return Err(RepoError::Corrupt {
                location,
                object: malformed.join("; "),
                detail: "the key file is damaged, and no other key opens with the passphrase given".into(),
            });
        }
        Err(RepoError::WrongPassphrase { location })
    }

    fn assemble(backend: Arc<dyn Backend>, key: MasterKey, key_name: String, config: RepoConfig) -> Repository {
        let gear = Gear::new(config.chunker, key.chunker_seed());
        Repository {
            backend,
            key,
            key_name,
            config,
            gear,
            index: RwLock::new(Arc::default()),
            damaged: Mutex::new(BTreeMap::new()),
            damage_hook: None,
            no_lock: false,
            cache: None,
            connections: DEFAULT_CONNECTIONS,
        }
    }

    /// Makes at most `connections` requests at once to a remote repository (at least one).
    pub fn with_connections(mut self, connections: usize) -> Repository {
        self.connections = connections.max(1);
        self
    }

    /// Requests in flight at once to a remote repository.
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Reads index files, manifests and trees through `cache` (see [`crate::cache`]); `None`
    /// reads the repository itself, as a check or a repair must.
    pub fn with_cache(mut self, cache: Option<Cache>) -> Repository {
        self.cache = cache;
        self
    }

    /// Keeps a file just written in the cache too (a tree pack, an index file, a manifest), so
    /// the next command does not download what this one uploaded.
    pub(crate) fn cache_written(&self, kind: Cached, id: &Id, bytes: &[u8]) {
        if let Some(cache) = &self.cache {
            cache.put(kind, id, bytes);
        }
    }

    /// Tells `hook` every damaged file a command passes over.
    pub fn with_damage_hook(mut self, hook: DamageHook) -> Repository {
        self.damage_hook = Some(hook);
        self
    }

    /// Reads without a lease when `no_lock` (`--no-lock`: a repository others must not be
    /// told about, or that a stale lease blocks).
    pub fn without_lock(mut self, no_lock: bool) -> Repository {
        self.no_lock = no_lock;
        self
    }

    /// The lease of a command that only reads: see [`crate::lock::Lease::for_reading`].
    pub fn read_lease(&self, command: &str) -> Result<crate::lock::ReadLease> {
        crate::lock::Lease::for_reading(self.backend.clone(), command, self.no_lock)
    }

    /// The damaged files passed over so far.
    pub fn damaged(&self) -> Vec<Damaged> {
        self.damaged.lock().expect("damage lock").values().cloned().collect()
    }

    /// Records a damaged file that is passed over (and tells the hook, the first time).
    fn pass_over(&self, object: String, detail: impl ToString, repair: &'static str) {
        let damaged = Damaged { object: object.clone(), detail: detail.to_string(), repair };
        let new = self.damaged.lock().expect("damage lock").insert(object, damaged.clone()).is_none();
        if let (true, Some(hook)) = (new, &self.damage_hook) {
            (hook.0)(&damaged);
        }
    }

    /// Reads and checks the config.
    pub fn read_config(backend: &dyn Backend) -> Result<RepoConfig> {
        let location = backend.location();
        let bytes = match backend.read(FileKind::Config, "config") {
            Ok(bytes) => bytes,
            Err(error) if error.kind == ErrorKind::NotFound => {
                return Err(match Self::without_config(backend)? {
                    Some(error) => error,
                    None => RepoError::NotARepository { location },
                })
            }
            Err(error) => return Err(error.into()),
        };
        let config: RepoConfig = serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
            location: location.clone(),
            object: "config".into(),
            detail: e.to_string(),
        })?;
        if config.magic != CONFIG_MAGIC {
            return Err(match Self::without_config(backend)? {
                Some(_) => RepoError::Corrupt {
                    location,
                    object: "config".into(),
                    detail: format!("its magic is `{}`, not `{CONFIG_MAGIC}`: the file was changed", config.magic),
                },
                None => RepoError::NotARepository { location },
            });
        }
        if config.version != FORMAT_VERSION {
            return Err(RepoError::UnsupportedFormat { location, version: config.version, supported: FORMAT_VERSION });
        }
        if !config.chunker.is_valid() {
            return Err(RepoError::Corrupt {
                location,
                object: "config".into(),
                detail: "invalid chunker parameters".into(),
            });
        }
        Ok(config)
    }

    /// True when the backend holds a repository config. A target that holds keys or data but
    /// no config is a damaged repository, never a place for a new one.
    pub fn exists(backend: &dyn Backend) -> Result<bool> {
        match backend.list(FileKind::Config) {
            Ok(files) if !files.is_empty() => Ok(true),
            Ok(_) => match Self::without_config(backend)? {
                Some(error) => Err(error),
                None => Ok(false),
            },
            Err(error) if error.kind == ErrorKind::Unavailable || error.kind == ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// For a target without a config: the damage, when it holds repository files all the same.
    fn without_config(backend: &dyn Backend) -> Result<Option<RepoError>> {
        for kind in [FileKind::Key, FileKind::Version, FileKind::Index, FileKind::Pack] {
            match backend.list(kind) {
                Ok(files) if !files.is_empty() => {
                    return Ok(Some(RepoError::Corrupt {
                        location: backend.location(),
                        object: "config".into(),
                        detail: format!(
                            "config missing, while `{}/` holds {} files: the repository's config was deleted or lost. Put it back from a copy (it is plain JSON and holds no secret); a new repository is never created over an old one",
                            kind.dir(),
                            files.len()
                        ),
                    }))
                }
                Ok(_) => {}
                Err(error) if error.kind == ErrorKind::NotFound || error.kind == ErrorKind::Unavailable => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(None)
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The location for messages.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// The master key.
    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    /// The name of the key file that opened this repository.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The chunker tables.
    pub fn gear(&self) -> &Gear {
        &self.gear
    }

    /// Reads every index file into memory; a damaged one is passed over (its blobs count as
    /// absent, so a backup stores them again) and told to the damage hook. Returns the names of
    /// the index files read.
    ///
    /// The process keeps the index it loaded last (the agent runs one job after another): an
    /// index file never changes (its name is its content's hash), so when every file that index
    /// was made of is still listed, it is taken as it is and only the new files are read. A
    /// file gone (a prune, a repair) makes it read everything again. (A listed file damaged in
    /// place since is then not noticed here: `check` reads every index file itself.)
    pub fn load_index(&self) -> Result<Vec<Id>> {
        let listed = self.backend.list(FileKind::Index)?;
        let listed_names: std::collections::HashSet<&str> = listed.iter().map(|(name, _)| name.as_str()).collect();
        if let Some(cache) = &self.cache {
            // Another host's prune replaced index files: their copies go.
            cache.retain(Cached::Index, |id| listed_names.contains(id.to_hex().as_str()));
        }
        let (mut index, mut names) = {
            let last = LAST_INDEX.lock().expect("last index lock");
            match last
                .iter()
                .find(|last| last.of(self) && last.files.iter().all(|f| listed_names.contains(f.to_hex().as_str())))
            {
                Some(last) => (Arc::clone(&last.index), last.files.clone()),
                None => (Arc::default(), Vec::new()),
            }
        };
        let known: std::collections::HashSet<String> = names.iter().map(Id::to_hex).collect();
        for (name, _) in listed.iter().filter(|(name, _)| !known.contains(name)) {
            match self.read_index_file(name) {
                Ok(file) => {
                    let index = Arc::make_mut(&mut index);
                    for pack in &file.packs {
                        index.add_pack(pack);
                    }
                    names.push(Id::from_hex(name).expect("read_index_file takes hex names only"));
                }
                // Deleted since the listing: a prune superseded it, its packs are in a newer one.
                Err(RepoError::Backend(error)) if error.kind == ErrorKind::NotFound => {}
                Err(RepoError::Corrupt { object, detail, .. }) => {
                    self.pass_over(object, detail, "sysstate repair index")
                }
                Err(error) => return Err(error),
            }
        }
        if let Some(cache) = &self.cache {
            let trees = index.tree_packs();
            cache.retain(Cached::Pack, |id| trees.contains(id));
            cache.trim();
        }
        let mut last = LAST_INDEX.lock().expect("last index lock");
        last.retain(|last| !last.of(self));
        if last.len() == LOADED_INDEXES_MAX {
            last.remove(0);
        }
        last.push(LoadedIndex {
            location: self.location(),
            repository: self.config.id,
            files: names.clone(),
            index: Arc::clone(&index),
        });
        drop(last);
        *self.index.write().expect("index lock") = index;
        Ok(names)
    }

    /// Reads and decodes one index file, checked against its name.
    pub fn read_index_file(&self, name: &str) -> Result<IndexFile> {
        let object = || format!("index/{name}");
        let id = Id::from_hex(name).ok_or_else(|| self.corrupt(object(), "not an index file name (64 hex digits)"))?;
        let bytes = match self.cache.as_ref().and_then(|cache| cache.get(Cached::Index, &id)) {
            Some(bytes) => bytes,
            None => {
                let bytes = self.backend.read(FileKind::Index, name)?;
                if Id::of_stored(&bytes) != id {
                    return Err(self.corrupt(object(), "its content does not match its name"));
                }
                self.cache_written(Cached::Index, &id, &bytes);
                bytes
            }
        };
        IndexFile::decode(&self.key, &bytes).map_err(|e| self.corrupt(object(), e))
    }

    /// The in-memory index.
    pub fn index(&self) -> RwLockReadGuard<'_, Arc<Index>> {
        self.index.read().expect("index lock")
    }

    /// Adds packs to the in-memory index (after writing them).
    pub fn index_add(&self, file: &IndexFile) {
        let mut index = self.index.write().expect("index lock");
        // Shared with the process's last load: this one's copy is its own from now on.
        let index = Arc::make_mut(&mut index);
        for pack in &file.packs {
            index.add_pack(pack);
        }
    }

    /// Adds the packs of index file `name`, which this process just wrote, to the in-memory
    /// index. When the index is the process's last load (see [`Repository::load_index`]), that
    /// is changed in place and names the file too, instead of the index being copied whole for
    /// a few new packs (megabytes for a large repository, at the end of every backup).
    pub(crate) fn index_written(&self, name: Id, file: &IndexFile) {
        let mut index = self.index.write().expect("index lock");
        let mut last = LAST_INDEX.lock().expect("last index lock");
        let mut last = last.iter_mut().find(|last| last.of(self) && Arc::ptr_eq(&last.index, &index));
        if let Some(last) = &mut last {
            // Its second reference, let go while the index changes.
            drop(std::mem::take(&mut last.index));
        }
        let changed = Arc::make_mut(&mut index);
        for pack in &file.packs {
            changed.add_pack(pack);
        }
        if let Some(last) = last {
            last.index = Arc::clone(&index);
            last.files.push(name);
        }
    }

    pub fn corrupt(&self, object: String, detail: impl ToString) -> RepoError {
        RepoError::Corrupt { location: self.location(), object, detail: detail.to_string() }
    }

    /// Reads, opens, decompresses and verifies one blob (a tree from the cache's copy of its
    /// pack when there is a cache).
    pub fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let location =
            self.index().get(id).ok_or_else(|| self.corrupt(format!("blob {}", id.short()), "not in the index"))?;
        if let (Some(cache), crate::pack::BlobKind::Tree) = (&self.cache, location.entry.kind) {
            if let Some(plain) = self.read_cached_tree(cache, &location) {
                return Ok(plain);
            }
        }
        let mut sealed = self.backend.read_range(
            FileKind::Pack,
            &location.pack.to_hex(),
            u64::from(location.entry.offset),
            u64::from(location.entry.length),
        )?;
        self.open_blob_in_place(&location.pack, &location.entry, &mut sealed)
    }

    /// A tree from the cache's copy of its pack, downloading the whole pack (once, checked
    /// against its name) when the cache lacks it. `None` sends the caller to the repository: a
    /// pack that does not match its name is not kept, and a cached copy whose blob does not
    /// open is deleted.
    fn read_cached_tree(&self, cache: &Cache, location: &crate::index::BlobLocation) -> Option<Vec<u8>> {
        let (pack, entry) = (&location.pack, &location.entry);
        let (offset, length) = (u64::from(entry.offset), u64::from(entry.length));
        if !cache.has_pack(pack) {
            let fetching = cache.fetching(pack)?;
            let _once = fetching.lock().expect("fetching lock");
            if !cache.has_pack(pack) {
                let bytes = self.backend.read(FileKind::Pack, &pack.to_hex()).ok();
                let Some(bytes) = bytes.filter(|bytes| Id::of_stored(bytes) == *pack) else {
                    // Damaged or unreadable: its trees are read a blob at a time, which reports
                    // the damage, and the pack is not downloaded again for each of them.
                    cache.refuse(pack);
                    return None;
                };
                cache.put(Cached::Pack, pack, &bytes);
                let sealed = bytes.get(offset as usize..(offset + length) as usize)?;
                return self.open_blob(pack, entry, sealed).ok();
            }
        }
        let mut sealed = cache.read_range(pack, offset, length)?;
        match self.open_blob_in_place(pack, entry, &mut sealed) {
            Ok(plain) => Some(plain),
            Err(_) => {
                tracing::warn!("the cached copy of pack {} is damaged; it is read from the repository", pack.short());
                cache.remove(Cached::Pack, pack);
                None
            }
        }
    }

    /// Opens a sealed blob read from `pack` and checks its id.
    pub fn open_blob(&self, pack: &Id, entry: &crate::pack::PackEntry, sealed: &[u8]) -> Result<Vec<u8>> {
        self.open_blob_in_place(pack, entry, &mut sealed.to_vec())
    }

    /// [`open_blob`](Self::open_blob) decrypting where the sealed bytes lie (they are left in no
    /// useful state): the plaintext is the one copy made.
    pub fn open_blob_in_place(&self, pack: &Id, entry: &crate::pack::PackEntry, sealed: &mut [u8]) -> Result<Vec<u8>> {
        let object = || format!("blob {} in pack {}", entry.id.short(), pack.short());
        let opened =
            self.key.open_in_place(Label::Blob, sealed).map_err(|_| self.corrupt(object(), "does not decrypt"))?;
        let plain = if entry.compressed {
            crate::saver::decompress(opened, entry.raw_length as usize)
                .map_err(|e| self.corrupt(object(), format!("does not decompress: {e}")))?
        } else {
            opened.to_vec()
        };
        if plain.len() != entry.raw_length as usize || self.key.blob_id(&plain) != entry.id {
            return Err(self.corrupt(object(), "content does not match its id"));
        }
        Ok(plain)
    }

    /// Reads a tree blob.
    pub fn read_tree(&self, id: &Id) -> Result<Tree> {
        let bytes = self.read_blob(id)?;
        Tree::decode(&bytes).map_err(|e| self.corrupt(format!("tree {}", id.short()), e))
    }

    /// True when every blob is in the index.
    pub fn has_blobs(&self, ids: &[Id]) -> bool {
        let index = self.index();
        ids.iter().all(|id| index.contains(id))
    }

    /// Every readable version, oldest first. A damaged manifest (or a stray file in
    /// `versions/`) is passed over and told to the damage hook.
    pub fn versions(&self) -> Result<Vec<(Id, Version)>> {
        let mut out = Vec::new();
        let listed = self.backend.list(FileKind::Version)?;
        if let Some(cache) = &self.cache {
            // Forgotten elsewhere: their copies go.
            let listed: std::collections::HashSet<&str> = listed.iter().map(|(name, _)| name.as_str()).collect();
            cache.retain(Cached::Version, |id| listed.contains(id.to_hex().as_str()));
        }
        let repository = (self.location(), self.config.id);
        let mut known = READ_VERSIONS.lock().expect("read versions lock").remove(&repository).unwrap_or_default();
        let mut read = std::collections::HashMap::with_capacity(listed.len());
        for (name, _) in listed {
            let Some(id) = Id::from_hex(&name) else {
                self.pass_over(
                    format!("versions/{name}"),
                    "not a version file name (64 hex digits)",
                    "sysstate repair versions",
                );
                continue;
            };
            if let Some(version) = known.remove(&id) {
                out.push((id, version.clone()));
                read.insert(id, version);
                continue;
            }
            match self.read_version(&id) {
                Ok(version) => {
                    read.insert(id, version.clone());
                    out.push((id, version));
                }
                // Forgotten since the listing.
                Err(RepoError::VersionNotFound(_)) => {}
                Err(RepoError::Corrupt { object, detail, .. }) => {
                    self.pass_over(object, detail, "sysstate repair versions")
                }
                Err(error) => return Err(error),
            }
        }
        // Those no longer listed (forgotten) are dropped with `known`.
        let mut kept = READ_VERSIONS.lock().expect("read versions lock");
        let others: usize = kept.values().map(|versions| versions.len()).sum();
        if others + read.len() > KEPT_VERSIONS_MAX {
            kept.clear();
        }
        if read.len() <= KEPT_VERSIONS_MAX {
            kept.insert(repository, read);
        }
        drop(kept);
        out.sort_by_key(|(id, version)| (version.time_ns, *id));
        Ok(out)
    }

    /// One version, checked against its name: a manifest stored under another version's name
    /// is damage, never that version.
    pub fn read_version(&self, id: &Id) -> Result<Version> {
        if let Some(bytes) = self.cache.as_ref().and_then(|cache| cache.get(Cached::Version, id)) {
            if let Ok(version) = Version::decode(&self.key, &bytes) {
                return Ok(version);
            }
        }
        let bytes = match self.backend.read(FileKind::Version, &id.to_hex()) {
            Ok(bytes) => bytes,
            Err(error) if error.kind == ErrorKind::NotFound => {
                return Err(RepoError::VersionNotFound(format!(
                    "version `{}` does not exist in `{}`",
                    id.short(),
                    self.location()
                )))
            }
            Err(error) => return Err(error.into()),
        };
        let object = || format!("versions/{}", id.to_hex());
        if Id::of_stored(&bytes) != *id {
            return Err(self.corrupt(object(), "its content does not match its name"));
        }
        let version = Version::decode(&self.key, &bytes).map_err(|e| self.corrupt(object(), e))?;
        self.cache_written(Cached::Version, id, &bytes);
        Ok(version)
    }

    /// Finds a version by `latest` or a unique hex prefix of its id.
    pub fn find_version(&self, spec: &str) -> Result<(Id, Version)> {
        self.find_version_holding(spec, &[])
    }

    /// Finds a version by a unique hex prefix of its id, or by `latest`: the newest version that
    /// holds every one of `components` (a backup of one component does not hide the full
    /// system-state version before it).
    pub fn find_version_holding(&self, spec: &str, components: &[String]) -> Result<(Id, Version)> {
        let versions = self.versions()?;
        if spec == "latest" {
            let holds = |version: &Version| components.iter().all(|c| version.components.iter().any(|h| &h.name == c));
            return versions.into_iter().rev().find(|(_, version)| holds(version)).ok_or_else(|| {
                RepoError::VersionNotFound(if components.is_empty() {
                    format!("the repository at `{}` holds no version yet", self.location())
                } else {
                    format!(
                        "no version in `{}` holds {}: `sysstate versions` lists what each holds",
                        self.location(),
                        components.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
                    )
                })
            });
        }
        let spec = spec.to_ascii_lowercase();
        let mut matches = versions.into_iter().filter(|(id, _)| id.to_hex().starts_with(&spec));
        match (matches.next(), matches.next()) {
            (Some(found), None) if !spec.is_empty() => Ok(found),
            (Some(_), Some(_)) => {
                Err(RepoError::VersionNotFound(format!("version prefix `{spec}` is ambiguous: give more digits")))
            }
            _ => {
                // A damaged manifest was passed over: say so rather than that it does not exist.
                let damaged = self.damaged().into_iter().find(|d| {
                    d.object.strip_prefix("versions/").is_some_and(|name| !spec.is_empty() && name.starts_with(&spec))
                });
                Err(match damaged {
                    Some(d) => RepoError::Corrupt {
                        location: self.location(),
                        object: d.object,
                        detail: format!("{}; `{}` drops it", d.detail, d.repair),
                    },
                    None => RepoError::VersionNotFound(format!(
                        "version `{spec}` does not exist in `{}`: `sysstate versions` lists them",
                        self.location()
                    )),
                })
            }
        }
    }

    /// Stores a version manifest. Call only after its packs and index are stored.
    pub fn save_version(&self, version: &Version) -> Result<Id> {
        let bytes = version.encode(&self.key);
        let id = Id::of_stored(&bytes);
        self.backend.write(FileKind::Version, &id.to_hex(), &bytes)?;
        self.cache_written(Cached::Version, &id, &bytes);
        Ok(id)
    }

    /// Drops version `id` (its data stays until `prune`); a protected version is refused.
    pub fn forget_version(&self, id: &Id) -> Result<()> {
        if self.protected()?.contains(id) {
            return Err(RepoError::Invalid(format!(
                "version {} is protected: `sysstate unprotect {}` first",
                id.short(),
                id.short()
            )));
        }
        self.backend.remove(FileKind::Version, &id.to_hex())?;
        if let Some(cache) = &self.cache {
            cache.remove(Cached::Version, id);
        }
        Ok(())
    }

    /// The protected versions: never forgotten until unprotected.
    pub fn protected(&self) -> Result<std::collections::HashSet<Id>> {
        match self.backend.list(FileKind::Protection) {
            Ok(files) => Ok(files.iter().filter_map(|(name, _)| Id::from_hex(name)).collect()),
            // A repository made before protection has no folder for it.
            Err(error) if error.kind == ErrorKind::NotFound => Ok(Default::default()),
            Err(error) => Err(error.into()),
        }
    }

    /// Protects version `id` (`true`), or lifts its protection.
    pub fn protect(&self, id: &Id, protect: bool) -> Result<()> {
        match protect {
            true => Ok(self.backend.write(FileKind::Protection, &id.to_hex(), b"")?),
            false => Ok(self.backend.remove(FileKind::Protection, &id.to_hex())?),
        }
    }

    /// Replaces the key in use by one for `passphrase`: the new key is written before the old
    /// one is removed, so a failure in between leaves both. Returns the new key's name.
    pub fn change_passphrase(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        let name = self.add_key(passphrase, kdf)?;
        self.backend.remove(FileKind::Key, &self.key_name)?;
        Ok(name)
    }

    /// Adds a key for `passphrase`; returns its name.
    pub fn add_key(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        let file = KeyFile::wrap(&self.key, passphrase, kdf, &host_name(), &user_name(), now_ns())
            .for_repository(self.config.id);
        let name = Id::random().to_hex();
        self.backend.write(FileKind::Key, &name, &serde_json::to_vec_pretty(&file).expect("key encodes"))?;
        Ok(name)
    }

    /// The key files.
    pub fn list_keys(&self) -> Result<Vec<(String, KeyFile)>> {
        let mut out = Vec::new();
        for (name, _) in self.backend.list(FileKind::Key)? {
            let bytes = self.backend.read(FileKind::Key, &name)?;
            let file = KeyFile::decode(&bytes).map_err(|e| self.corrupt(format!("keys/{name}"), e))?;
            out.push((name, file));
        }
        Ok(out)
    }

    /// Removes a key (never the last one, nor the one in use).
    pub fn remove_key(&self, name: &str) -> Result<()> {
        let keys = self.list_keys()?;
        let matching: Vec<_> = keys.iter().filter(|(n, _)| n.starts_with(name)).collect();
        let [(full, _)] = matching.as_slice() else {
            return Err(RepoError::VersionNotFound(format!(
                "key `{name}` matches {} keys: give a unique prefix (`sysstate key list`)",
                matching.len()
            )));
        };
        if *full == self.key_name {
            return Err(RepoError::VersionNotFound(format!(
                "key `{name}` is the key in use: open the repository with another key to remove it"
            )));
        }
        self.backend.remove(FileKind::Key, full)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    /// A key of another repository under the same passphrase (left by a creator that lost a race,
    /// or copied in) never opens this one, even when it is tried first.
    #[test]
    fn a_key_of_another_repository_never_opens_this_one() {
        let dir = tempfile::tempdir().unwrap();
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let ours = Repository::init(Arc::new(LocalBackend::new(dir.path().join("ours"))), b"same", cheap).unwrap();
        let theirs = Repository::init(Arc::new(LocalBackend::new(dir.path().join("theirs"))), b"same", cheap).unwrap();
        let foreign = theirs.backend().read(FileKind::Key, theirs.key_name()).unwrap();
        // Named to sort before ours, so it is tried first.
        ours.backend().write(FileKind::Key, &"0".repeat(64), &foreign).unwrap();
        let opened = Repository::open(ours.backend().clone(), b"same").unwrap();
        assert_eq!(opened.key_name(), ours.key_name());
        assert_eq!(opened.key().blob_id(b"x"), ours.key().blob_id(b"x"));
        // With only the foreign key left, the repository says its keys are not its own.
        ours.backend().remove(FileKind::Key, ours.key_name()).unwrap();
        let error = Repository::open(ours.backend().clone(), b"same").unwrap_err();
        assert!(error.to_string().contains("belongs to another repository"), "{error}");
    }

    /// A second load in the same process reads only the index files that are new; one gone (a
    /// prune) makes it read everything again.
    #[test]
    fn a_second_load_reads_only_new_index_files_and_all_when_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let repo = Repository::init(Arc::new(LocalBackend::new(dir.path().join("repo"))), b"p", cheap).unwrap();
        let store = |byte: u8| {
            let saver = crate::saver::BlobSaver::new(&repo);
            let data = vec![byte; 5000];
            let id = repo.key().blob_id(&data);
            assert!(saver.reserve(id));
            saver.store(crate::pack::BlobKind::Data, id, &data).unwrap();
            saver.finish().unwrap();
            id
        };
        let first = store(1);
        let open = || Repository::open(Arc::new(LocalBackend::new(dir.path().join("repo"))), b"p").unwrap();
        let one = open();
        assert_eq!(one.load_index().unwrap().len(), 1);
        let second = store(2);
        let two = open();
        let files = two.load_index().unwrap();
        assert_eq!(files.len(), 2);
        assert!(two.index().contains(&first) && two.index().contains(&second));
        // The first load's index is its own still.
        assert!(!one.index().contains(&second));
        // An index file gone: its blobs are gone from the next load.
        let gone = dir.path().join("repo").join(FileKind::Index.path(&files[0].to_hex()));
        let in_gone = two.read_index_file(&files[0].to_hex()).unwrap().packs[0].blobs[0].id;
        let kept_blob = if in_gone == first { second } else { first };
        std::fs::remove_file(gone).unwrap();
        let three = open();
        assert_eq!(three.load_index().unwrap().len(), 1);
        assert_eq!(three.index().len(), 1);
        assert!(three.index().contains(&kept_blob));
    }

    /// The index file a backup writes goes into the process's last load, which is changed in
    /// place: the next load in the process shares that index and does not read the file (here
    /// damaged since), and a load elsewhere (another process, another repository handle without
    /// it) would read it.
    #[test]
    fn the_index_a_process_writes_joins_its_last_load_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let at = dir.path().join("repo");
        Repository::init(Arc::new(LocalBackend::new(&at)), b"p", cheap).unwrap();
        let open = || Repository::open(Arc::new(LocalBackend::new(&at)), b"p").unwrap();
        let repo = open();
        repo.load_index().unwrap();
        let saver = crate::saver::BlobSaver::new(&repo);
        let data = vec![7u8; 5000];
        let id = repo.key().blob_id(&data);
        assert!(saver.reserve(id));
        saver.store(crate::pack::BlobKind::Data, id, &data).unwrap();
        saver.finish().unwrap();
        assert!(repo.index().contains(&id));
        let written = repo.backend().list(FileKind::Index).unwrap();
        assert_eq!(written.len(), 1);
        std::fs::write(at.join(FileKind::Index.path(&written[0].0)), b"damaged since").unwrap();
        let next = open();
        assert_eq!(next.load_index().unwrap().len(), 1);
        assert!(next.index().contains(&id), "the written index file was read again");
        assert!(Arc::ptr_eq(&next.index(), &repo.index()), "the index was copied");
    }

    /// A second listing in the same process reads only the manifests that are new: one read
    /// before is taken from memory (its file damaged since is not read), a forgotten one is gone,
    /// and another repository at the same place reads its own.
    #[test]
    fn a_second_listing_reads_only_new_version_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let at = dir.path().join("repo");
        let repo = Repository::init(Arc::new(LocalBackend::new(&at)), b"p", cheap).unwrap();
        let version = |hour: i64| Version::at(hour * 3600 * 1_000_000_000);
        let first = repo.save_version(&version(1)).unwrap();
        let second = repo.save_version(&version(2)).unwrap();
        let ids = |repo: &Repository| repo.versions().unwrap().into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(&repo), [first, second]);
        std::fs::write(at.join(FileKind::Version.path(&first.to_hex())), b"damaged since").unwrap();
        repo.forget_version(&second).unwrap();
        let third = repo.save_version(&version(3)).unwrap();
        let again = Repository::open(Arc::new(LocalBackend::new(&at)), b"p").unwrap();
        assert_eq!(ids(&again), [first, third], "the first manifest was read again, or the forgotten one kept");
        // A new repository where the old one was: nothing of the old one's is taken.
        std::fs::remove_dir_all(&at).unwrap();
        let new = Repository::init(Arc::new(LocalBackend::new(&at)), b"p", cheap).unwrap();
        assert!(ids(&new).is_empty());
        let fourth = new.save_version(&version(4)).unwrap();
        std::fs::write(at.join(FileKind::Version.path(&fourth.to_hex())), b"damaged").unwrap();
        assert!(ids(&new).is_empty(), "a damaged manifest never read was taken as a version");
    }

    /// A tree pack that is damaged in the repository is not cached, and not downloaded again for
    /// every tree in it: its trees are read a blob at a time, which names the damage.
    #[test]
    fn a_damaged_tree_pack_is_refused_by_the_cache_once_and_its_damage_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cheap = KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 };
        let repo = Repository::init(Arc::new(LocalBackend::new(dir.path().join("repo"))), b"p", cheap).unwrap();
        let saver = crate::saver::BlobSaver::new(&repo);
        let trees: Vec<(Id, Vec<u8>)> = (0..2u8)
            .map(|i| {
                let data = vec![i; 5000];
                let id = repo.key().blob_id(&data);
                assert!(saver.reserve(id));
                saver.store(crate::pack::BlobKind::Tree, id, &data).unwrap();
                (id, data)
            })
            .collect();
        saver.finish().unwrap();
        let cache = Cache::open(&dir.path().join("cache"), &repo.config().id, 1 << 30).unwrap();
        let repo = repo.with_cache(Some(cache));
        repo.load_index().unwrap();
        let location = repo.index().get(&trees[0].0).unwrap();
        let path = dir.path().join("repo").join(FileKind::Pack.path(&location.pack.to_hex()));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[location.entry.offset as usize + 30] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let error = repo.read_blob(&trees[0].0).unwrap_err();
        assert_eq!(error.code(), sysstate_types::ErrorCode::RepositoryCorrupt, "{error}");
        let cache = repo.cache.as_ref().unwrap();
        assert!(!cache.has_pack(&location.pack), "a damaged pack was cached");
        assert!(cache.fetching(&location.pack).is_none(), "the damaged pack would be downloaded again");
        // The intact tree in the same pack is still read (a blob at a time).
        assert_eq!(repo.read_blob(&trees[1].0).unwrap(), trees[1].1);
    }
}
