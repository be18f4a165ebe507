//! A hostile or corrupt repository must not make restore write outside the restore root.

use crate::support::*;
use std::path::Path;
use sysstate_repo::keys::KdfParams;
use sysstate_repo::pack::BlobKind;
use sysstate_repo::saver::BlobSaver;
use sysstate_repo::tree::{FileContent, Node, NodeKind, Tree};
use sysstate_repo::version::{ComponentRecord, Version, VersionStats};
use sysstate_repo::{Id, Repository};

fn node(name: &[u8], kind: NodeKind) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        user: None,
        group: None,
        atime_ns: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        inode: 1,
        device: 1,
        links: 1,
        size: 5,
        xattrs: vec![],
    }
}

/// Writes a version whose root tree is `build`'s, with blobs stored through the real saver.
fn hostile_version(sandbox: &Sandbox, build: impl FnOnce(&dyn Fn(BlobKind, Vec<u8>) -> Id) -> Tree) -> String {
    let backend = sysstate_repo::backend::open_target(&sandbox.target).unwrap();
    let repo = if Repository::exists(&*backend).unwrap() {
        Repository::open(backend, b"correct horse").unwrap()
    } else {
        Repository::init(backend, b"correct horse", KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 })
            .unwrap()
    };
    repo.load_index().unwrap();
    let saver = BlobSaver::new(&repo);
    let store = |kind: BlobKind, data: Vec<u8>| {
        let id = repo.key().blob_id(&data);
        if saver.reserve(id) {
            saver.store(kind, id, &data).unwrap();
        }
        id
    };
    let mut root = build(&store);
    let root_id = store(BlobKind::Tree, root.encode());
    saver.finish().unwrap();
    let version = Version {
        time_ns: sysstate_repo::lock::now_ns(),
        host: "attacker".into(),
        root_path: "/".into(),
        tree: root_id,
        components: vec![ComponentRecord {
            name: "data".into(),
            paths: vec!["/data".into()],
            missing: vec![],
            generated: vec![],
        }],
        parent: None,
        tags: vec![],
        stats: VersionStats::default(),
        program: "hostile".into(),
        shadow: None,
        system: None,
        extra: Default::default(),
    };
    repo.save_version(&version).unwrap().to_hex()
}

fn file(store: &dyn Fn(BlobKind, Vec<u8>) -> Id, name: &[u8]) -> Node {
    let blob = store(BlobKind::Data, b"owned".to_vec());
    node(name, NodeKind::File(FileContent { blobs: vec![blob], extents: None }))
}

#[test]
fn dot_dot_and_slash_names_are_refused() {
    let sandbox = Sandbox::new();
    let version = hostile_version(&sandbox, |store| {
        let inner = store(BlobKind::Tree, Tree { nodes: vec![file(store, b"escaped")] }.encode());
        let nested =
            store(BlobKind::Tree, Tree { nodes: vec![file(store, b"../../escaped-too"), file(store, b"ok")] }.encode());
        Tree {
            nodes: vec![
                node(b"..", NodeKind::Dir { subtree: inner }),
                node(b"data", NodeKind::Dir { subtree: nested }),
            ],
        }
    });
    let outer = sandbox.path("outer");
    let to = outer.join("restore");
    let output = sandbox.run(&["restore", "--version", &version, "--to", to.to_str().unwrap()]);
    assert_ne!(output.status.code(), Some(0), "a hostile tree restored without a word: {}", text(&output.stderr));
    assert!(text(&output.stderr).contains("unsafe entry name"), "{}", text(&output.stderr));
    assert!(!outer.join("escaped").exists());
    assert!(!sandbox.path("escaped-too").exists());
    assert!(!outer.join("escaped-too").exists());
    let entries: Vec<_> = walk(&outer);
    assert!(entries.iter().all(|p| p.starts_with(&to)), "written outside the root: {entries:?}");
}

#[test]
fn a_symlink_never_leads_restore_outside_the_root() {
    let sandbox = Sandbox::new();
    let outside = sandbox.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let outside_text = outside.display().to_string();
    // Version 1: `data` is a symlink to a directory outside the root; `lib` a relative one.
    let first = hostile_version(&sandbox, |_| Tree {
        nodes: vec![
            node(b"data", NodeKind::Symlink { target: outside_text.as_bytes().to_vec() }),
            node(b"lib", NodeKind::Symlink { target: b"../outside".to_vec() }),
        ],
    });
    // Version 2: `data` and `lib` are directories with files in them.
    let second = hostile_version(&sandbox, |store| {
        let inner = store(BlobKind::Tree, Tree { nodes: vec![file(store, b"planted")] }.encode());
        Tree {
            nodes: vec![
                node(b"data", NodeKind::Dir { subtree: inner }),
                node(b"lib", NodeKind::Dir { subtree: inner }),
            ],
        }
    });
    let to = sandbox.path("restore");
    sandbox.ok(&["restore", "--version", &first, "--to", to.to_str().unwrap()]);
    assert!(std::fs::symlink_metadata(to.join("data")).unwrap().file_type().is_symlink());
    // Restoring over it must replace the symlinks, not follow them.
    sandbox.run(&["restore", "--version", &second, "--to", to.to_str().unwrap()]);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "restore wrote through a symlink");
    assert_eq!(std::fs::read(to.join("data/planted")).unwrap(), b"owned");
    assert!(std::fs::symlink_metadata(to.join("lib")).unwrap().is_dir());
}

#[test]
fn a_hardlink_cannot_point_outside_the_root() {
    let sandbox = Sandbox::new();
    let outside = sandbox.path("secret");
    std::fs::write(&outside, b"secret").unwrap();
    // Two nodes claim one inode; the first is a symlink to the secret, the second a file.
    let version = hostile_version(&sandbox, |store| {
        let mut link = node(b"a", NodeKind::Symlink { target: outside.display().to_string().into_bytes() });
        link.links = 2;
        let mut second = file(store, b"b");
        second.links = 2;
        let mut third = file(store, b"c");
        third.links = 2;
        Tree { nodes: vec![link, second, third] }
    });
    let to = sandbox.path("restore");
    sandbox.run(&["restore", "--version", &version, "--to", to.to_str().unwrap()]);
    assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    assert_eq!(std::fs::read(to.join("c")).unwrap(), b"owned", "c is a hardlink of b, restored inside");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&outside).unwrap().nlink(), 1, "something linked to the file outside");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
    }
    out
}

/// A crafted tree nested 100,000 levels deep (no filesystem holds one: no path that deep fits
/// in PATH_MAX) is refused as damage by every command that walks trees, and none of them
/// overflows its stack; a tree as deep as the limit allows is read.
#[test]
fn a_tree_nested_too_deep_is_refused_cleanly_by_every_walk() {
    let sandbox = Sandbox::new();
    let chain = |store: &dyn Fn(BlobKind, Vec<u8>) -> Id, levels: usize| {
        let mut subtree = store(BlobKind::Tree, Tree { nodes: vec![file(store, b"bottom")] }.encode());
        for _ in 0..levels {
            subtree = store(BlobKind::Tree, Tree { nodes: vec![node(b"a", NodeKind::Dir { subtree })] }.encode());
        }
        Tree { nodes: vec![node(b"data", NodeKind::Dir { subtree })] }
    };
    let deep = hostile_version(&sandbox, |store| chain(store, 100_000));
    let to = sandbox.path("restore");
    let copy = sandbox.path("copy");
    let attempts: [&[&str]; 5] = [
        &["check"],
        &["items", "--version", &deep],
        &["restore", "--version", &deep, "--to", to.to_str().unwrap()],
        &["copy", "--to", copy.to_str().unwrap(), "--version", &deep],
        &["prune", "--dry-run"],
    ];
    for args in attempts {
        let output = sandbox.run(args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "`sysstate {}` ended {:?}: {stderr}", args.join(" "), output.status);
        assert!(
            stderr.contains("repository-corrupt") && stderr.contains("deeper than 1024"),
            "`sysstate {}`: {stderr}",
            args.join(" ")
        );
    }
    // 1,000 levels are within the limit: read, listed and restored.
    let fine = hostile_version(&sandbox, |store| chain(store, 1_000));
    let items = sandbox.json(&["items", "--version", &fine], 0);
    assert_eq!(items["entries"].as_array().unwrap().len(), 1_002, "data, 1000 levels and the file");
    let to = sandbox.path("restore-fine");
    sandbox.ok(&["restore", "--version", &fine, "--to", to.to_str().unwrap()]);
}
