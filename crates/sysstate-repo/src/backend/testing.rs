//! The backend conformance suite (restic's `internal/backend/test`): the promises every
//! [`Backend`] keeps, as one function a new backend's tests call with a fresh, empty place.
//! Compiled for this crate's tests and, with the `testing` feature, for other crates'.

use super::{Backend, ErrorKind, FileKind};
use std::sync::Arc;

/// Runs every check against `backend`, which must point at a place that does not exist yet or
/// is empty; it is left empty. Panics naming the promise broken.
pub fn conformance(backend: Arc<dyn Backend>) {
    backend.create().expect("create() makes a new place");
    backend.create().expect("create() on an existing place is success");
    empty_place_lists_nothing(&*backend);
    written_bytes_read_back(&*backend);
    same_bytes_again_succeed_other_bytes_mismatch(&*backend);
    locks_are_refreshed_in_place(&*backend);
    missing_files(&*backend);
    kinds_do_not_mix(&*backend);
    listing_passes_a_page(&*backend);
    a_new_repository_appears_whole_once(&*backend);
    names_with_signs_list_as_written(&*backend);
    for kind in FileKind::FOLDERS.into_iter().chain([FileKind::Config]) {
        assert!(backend.list(kind).unwrap().is_empty(), "{kind:?}: the suite left files behind");
    }
}

/// A directory whose streamed reads come in pieces of `piece` bytes and, `drops` times, stop
/// with a passing fault once `cut` bytes of a read are given (a dropped connection): what the
/// tests of readers over a network need. It records each streamed read asked for.
#[derive(Debug)]
pub struct Dribbling {
    /// Where the bytes are.
    pub inner: super::LocalBackend,
    /// The size of each piece given (at least 1).
    pub piece: usize,
    /// Where a read that drops stops.
    pub cut: Option<u64>,
    /// How many reads still drop.
    pub drops: std::sync::Mutex<u32>,
    /// (offset, length) of every streamed read, in order.
    pub asked: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Dribbling {
    /// Reads of `dir` in pieces of `piece` bytes, every one dropping after `cut` bytes.
    pub fn new(dir: &std::path::Path, piece: usize, cut: Option<u64>) -> Dribbling {
        let inner = super::LocalBackend::new(dir);
        Dribbling { inner, piece, cut, drops: std::sync::Mutex::new(u32::MAX), asked: Default::default() }
    }
}

impl Backend for Dribbling {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> super::Result<()> {
        self.inner.create()
    }
    fn list(&self, kind: FileKind) -> super::Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }
    fn read(&self, kind: FileKind, name: &str) -> super::Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> super::Result<Vec<u8>> {
        self.inner.read_range(kind, name, offset, length)
    }
    fn read_range_streamed(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> super::Result<()> {
        self.asked.lock().unwrap().push((offset, length));
        let bytes = self.inner.read_range(kind, name, offset, length)?;
        let mut drops = self.drops.lock().unwrap();
        let cut = match self.cut {
            Some(cut) if *drops > 0 && (cut as usize) < bytes.len() => {
                *drops -= 1;
                cut as usize
            }
            _ => bytes.len(),
        };
        for piece in bytes[..cut].chunks(self.piece) {
            sink(piece);
        }
        if cut < bytes.len() {
            return Err(super::BackendError {
                kind: ErrorKind::Transient,
                operation: "read",
                path: kind.path(name),
                location: self.location(),
                message: "the connection dropped".into(),
            });
        }
        Ok(())
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> super::Result<()> {
        self.inner.write(kind, name, data)
    }
    fn remove(&self, kind: FileKind, name: &str) -> super::Result<()> {
        self.inner.remove(kind, name)
    }
}

const KINDS: [FileKind; 5] = [FileKind::Pack, FileKind::Index, FileKind::Version, FileKind::Key, FileKind::Lock];

fn empty_place_lists_nothing(backend: &dyn Backend) {
    for kind in KINDS.into_iter().chain([FileKind::Config]) {
        assert!(backend.list(kind).unwrap().is_empty(), "{kind:?} not empty in a new place");
    }
}

fn written_bytes_read_back(backend: &dyn Backend) {
    let name = "ab".repeat(32);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    backend.write(FileKind::Pack, &name, &data).unwrap();
    assert_eq!(backend.read(FileKind::Pack, &name).unwrap(), data, "a pack reads back");
    assert_eq!(backend.read_range(FileKind::Pack, &name, 1000, 10).unwrap(), &data[1000..1010], "a range");
    assert_eq!(backend.read_range(FileKind::Pack, &name, 99_990, 10).unwrap(), &data[99_990..], "the last bytes");
    let mut streamed = Vec::new();
    backend
        .read_range_streamed(FileKind::Pack, &name, 1000, 90_000, &mut |piece| streamed.extend_from_slice(piece))
        .unwrap();
    assert!(streamed == data[1000..91_000], "a range streamed holds the range's bytes");
    let past_the_end = backend.read_range_streamed(FileKind::Pack, &name, 99_990, 20, &mut |_| {});
    assert!(past_the_end.is_err(), "a range streamed past the end is an error");
    assert_eq!(backend.list(FileKind::Pack).unwrap(), vec![(name.clone(), data.len() as u64)], "listed with its size");
    // An empty file is a file.
    backend.write(FileKind::Index, "empty", b"").unwrap();
    assert_eq!(backend.read(FileKind::Index, "empty").unwrap(), b"");
    assert_eq!(backend.list(FileKind::Index).unwrap(), vec![("empty".to_string(), 0)]);
    backend.remove(FileKind::Index, "empty").unwrap();
    backend.remove(FileKind::Pack, &name).unwrap();
    assert!(backend.list(FileKind::Pack).unwrap().is_empty(), "a removed pack is gone");
}

/// The vault's records are named with `~` (`u~HASH~TIME~RANDOM`), which an object store keeps
/// percent-encoded: a name lists, reads and goes as it was written.
fn names_with_signs_list_as_written(backend: &dyn Backend) {
    let name = format!("u~{}~1700000000000000000~x", "ef".repeat(32));
    backend.write(FileKind::VaultRecord, &name, b"{}").unwrap();
    assert_eq!(backend.list(FileKind::VaultRecord).unwrap(), vec![(name.clone(), 2)], "listed as written");
    assert_eq!(backend.read(FileKind::VaultRecord, &name).unwrap(), b"{}", "read by the name listed");
    backend.remove(FileKind::VaultRecord, &name).unwrap();
    assert!(backend.list(FileKind::VaultRecord).unwrap().is_empty(), "removed by the name listed");
}

fn same_bytes_again_succeed_other_bytes_mismatch(backend: &dyn Backend) {
    let name = "cd".repeat(32);
    backend.write(FileKind::Pack, &name, b"the bytes").unwrap();
    backend.write(FileKind::Pack, &name, b"the bytes").expect("the same bytes again are success");
    let error = backend.write(FileKind::Pack, &name, b"other").unwrap_err();
    assert_eq!(error.kind, ErrorKind::Mismatch, "{error}");
    assert_eq!(backend.read(FileKind::Pack, &name).unwrap(), b"the bytes", "a mismatch keeps the file's bytes");
    backend.remove(FileKind::Pack, &name).unwrap();
}

fn locks_are_refreshed_in_place(backend: &dyn Backend) {
    backend.write(FileKind::Lock, "l1", b"one").unwrap();
    backend.write(FileKind::Lock, "l1", b"two").unwrap();
    assert_eq!(backend.read(FileKind::Lock, "l1").unwrap(), b"two", "a lease is refreshed in place");
    backend.remove(FileKind::Lock, "l1").unwrap();
}

fn missing_files(backend: &dyn Backend) {
    let error = backend.read(FileKind::Index, "missing").unwrap_err();
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    let error = backend.read_range(FileKind::Pack, &"ef".repeat(32), 0, 10).unwrap_err();
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    backend.remove(FileKind::Index, "missing").expect("removing a missing file is success");
}

fn kinds_do_not_mix(backend: &dyn Backend) {
    backend.write(FileKind::Config, "config", b"{}").unwrap();
    assert_eq!(backend.list(FileKind::Config).unwrap(), vec![("config".to_string(), 2)]);
    for (index, kind) in KINDS.into_iter().enumerate() {
        backend.write(kind, &format!("{index:02}").repeat(32), b"x").unwrap();
    }
    for (index, kind) in KINDS.into_iter().enumerate() {
        let listed = backend.list(kind).unwrap();
        assert_eq!(listed, vec![(format!("{index:02}").repeat(32), 1)], "{kind:?} lists only its own files");
        backend.remove(kind, &listed[0].0).unwrap();
    }
    backend.remove(FileKind::Config, "config").unwrap();
}

/// More files than an object store lists in one page (1,000 for S3).
fn listing_passes_a_page(backend: &dyn Backend) {
    let names: Vec<String> = (0..1_005).map(|i| format!("{i:04}")).collect();
    std::thread::scope(|scope| {
        for part in names.chunks(128) {
            scope.spawn(move || part.iter().for_each(|name| backend.write(FileKind::Lock, name, b"lease").unwrap()));
        }
    });
    let mut listed: Vec<String> = backend.list(FileKind::Lock).unwrap().into_iter().map(|(name, _)| name).collect();
    listed.sort();
    assert_eq!(listed, names, "every file is listed, past the first page");
    std::thread::scope(|scope| {
        for part in names.chunks(128) {
            scope.spawn(move || part.iter().for_each(|name| backend.remove(FileKind::Lock, name).unwrap()));
        }
    });
}

fn a_new_repository_appears_whole_once(backend: &dyn Backend) {
    use super::NewFile;
    let files = |key: &'static str, config: &'static [u8]| {
        [
            NewFile { kind: FileKind::Key, name: key, data: b"a key" },
            NewFile { kind: FileKind::Config, name: "config", data: config },
        ]
    };
    assert!(backend.create_repository(&files("k1", b"first")).unwrap(), "the first creator makes it");
    assert!(!backend.create_repository(&files("k2", b"second")).unwrap(), "a second one finds it");
    assert_eq!(backend.read(FileKind::Config, "config").unwrap(), b"first");
    assert_eq!(backend.list(FileKind::Key).unwrap(), vec![("k1".to_string(), 5)], "the loser left nothing");
    backend.remove(FileKind::Key, "k1").unwrap();
    backend.remove(FileKind::Config, "config").unwrap();
}

#[cfg(test)]
mod tests {
    use super::conformance;
    use crate::backend::open_target;

    /// A URL from `scripts/services.sh`, or `None` (a failure under `SYSSTATE_TEST_REQUIRE=all`).
    fn service(var: &str, what: &str) -> Option<String> {
        let url = std::env::var(var).ok();
        if url.is_none() {
            assert!(
                std::env::var("SYSSTATE_TEST_REQUIRE").as_deref() != Ok("all"),
                "this test needs {what} ({var} from scripts/services.sh), and SYSSTATE_TEST_REQUIRE=all says it must run"
            );
            eprintln!("skipped: this test needs {what} ({var} from scripts/services.sh)");
        }
        url
    }

    fn unique(url: &str) -> String {
        format!("{url}/conformance-{}", crate::Id::random().short())
    }

    #[test]
    fn local_backend_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance(open_target(dir.path().join("repo").to_str().unwrap()).unwrap());
    }

    #[test]
    fn s3_backend_conforms_on_garage() {
        if let Some(url) = service("SYSSTATE_TEST_S3_URL", "Garage") {
            conformance(open_target(&unique(&url)).unwrap());
        }
    }

    #[test]
    fn azure_backend_conforms_on_azurite() {
        if let Some(url) = service("SYSSTATE_TEST_AZURE_URL", "Azurite") {
            conformance(open_target(&unique(&url)).unwrap());
        }
    }
}
