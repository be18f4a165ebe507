//! One conformance suite for every backend: the local directory, Garage (S3) and Azurite
//! (Azure Blob); then a whole backup and restore through each object store.

use crate::support::*;
use std::sync::Arc;
use sysstate_repo::backend::{open_target, Backend, ErrorKind, FileKind};

fn conformance(backend: Arc<dyn Backend>) {
    backend.create().unwrap();
    for kind in [FileKind::Pack, FileKind::Index, FileKind::Version, FileKind::Key, FileKind::Lock] {
        assert!(backend.list(kind).unwrap().is_empty(), "{kind:?} not empty in a new place");
    }
    let name = "ab".repeat(32);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    backend.write(FileKind::Pack, &name, &data).unwrap();
    assert_eq!(backend.read(FileKind::Pack, &name).unwrap(), data);
    assert_eq!(backend.read_range(FileKind::Pack, &name, 1000, 10).unwrap(), &data[1000..1010]);
    assert_eq!(backend.list(FileKind::Pack).unwrap(), vec![(name.clone(), data.len() as u64)]);
    // The same bytes again: fine. Other bytes under the same name: a mismatch, and the file
    // keeps its bytes.
    backend.write(FileKind::Pack, &name, &data).unwrap();
    let error = backend.write(FileKind::Pack, &name, b"other").unwrap_err();
    assert_eq!(error.kind, ErrorKind::Mismatch, "{error}");
    assert_eq!(backend.read(FileKind::Pack, &name).unwrap(), data);
    // Locks are leases: refreshed in place.
    backend.write(FileKind::Lock, "l1", b"one").unwrap();
    backend.write(FileKind::Lock, "l1", b"two").unwrap();
    assert_eq!(backend.read(FileKind::Lock, "l1").unwrap(), b"two");
    // Missing files.
    let error = backend.read(FileKind::Index, "missing").unwrap_err();
    assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
    backend.remove(FileKind::Index, "missing").unwrap();
    // Kinds do not mix, and config is one file.
    backend.write(FileKind::Config, "config", b"{}").unwrap();
    assert_eq!(backend.list(FileKind::Config).unwrap(), vec![("config".to_string(), 2)]);
    assert!(backend.list(FileKind::Index).unwrap().is_empty());
    for (kind, file) in [(FileKind::Pack, name.as_str()), (FileKind::Lock, "l1"), (FileKind::Config, "config")] {
        backend.remove(kind, file).unwrap();
    }
    assert!(backend.list(FileKind::Pack).unwrap().is_empty());
    assert!(backend.list(FileKind::Config).unwrap().is_empty());
}

fn unique(prefix: &str) -> String {
    format!("{prefix}/{}", sysstate_repo::Id::random().short())
}

#[test]
fn local_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(open_target(dir.path().join("repo").to_str().unwrap()).unwrap());
}

fn object_url(var: &str, what: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    require(what, url.is_some()).then(|| url.unwrap())
}

#[test]
fn s3_backend_conforms_on_garage() {
    let Some(url) = object_url("SYSSTATE_TEST_S3_URL", "Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)") else {
        return;
    };
    conformance(open_target(&unique(&url)).unwrap());
}

#[test]
fn azure_backend_conforms_on_azurite() {
    let Some(url) = object_url("SYSSTATE_TEST_AZURE_URL", "Azurite (SYSSTATE_TEST_AZURE_URL from scripts/services.sh)")
    else {
        return;
    };
    conformance(open_target(&unique(&url)).unwrap());
}

fn round_trip(url: &str) {
    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.target = unique(url);
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 60, 14);
    sandbox.backup_data(&root);
    std::fs::write(root.join("data/more"), b"more").unwrap();
    let second = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
    assert_eq!(second["stats"]["files-read"], 1);
    sandbox.ok(&["check", "--read-data"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    sandbox.json(&["forget", "--keep-last", "1"], 0);
    sandbox.ok(&["prune"]);
    sandbox.ok(&["check", "--read-data"]);
}

#[test]
fn backup_and_restore_through_garage() {
    let Some(url) = object_url("SYSSTATE_TEST_S3_URL", "Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)") else {
        return;
    };
    round_trip(&url);
}

#[test]
fn backup_and_restore_through_azurite() {
    let Some(url) = object_url("SYSSTATE_TEST_AZURE_URL", "Azurite (SYSSTATE_TEST_AZURE_URL from scripts/services.sh)")
    else {
        return;
    };
    round_trip(&url);
}
