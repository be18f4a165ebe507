//! A repository written by format 1 as it was on 2026-12-01, stored in
//! `tests/fixtures/format-1/`: it must open, check clean and restore byte for byte, with every
//! piece of metadata, by every later build. A change that breaks old repositories fails here.

use crate::support::*;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-1");

/// The entries of a tree, one line each, with what restore must bring back (sparse files by
/// whether they are, not by their blocks, which depend on the filesystem).
fn describe(tree: &BTreeMap<PathBuf, Entry>) -> String {
    let mut out = String::new();
    for (path, entry) in tree {
        let xattrs: Vec<String> = entry
            .xattrs
            .iter()
            .map(|(name, value)| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(name),
                    value.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )
            })
            .collect();
        out.push_str(&format!(
            "{} {} {:o} {}:{} size={} mtime={} content={} link={} rdev={} xattrs=[{}] hardlink-of={} sparse={}\n",
            path.display(),
            entry.kind,
            entry.mode,
            entry.uid,
            entry.gid,
            entry.size,
            entry.mtime_ns,
            entry.content.map(|h| h.to_hex().to_string()).unwrap_or_default(),
            entry.link.as_deref().map(|l| String::from_utf8_lossy(l).into_owned()).unwrap_or_default(),
            entry.rdev,
            xattrs.join(","),
            entry.hardlink_of.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            entry.sparse_blocks.is_some(),
        ));
    }
    out
}

#[test]
fn a_format_1_repository_opens_checks_and_restores_byte_for_byte() {
    if !require("root (the fixture's files belong to several users)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new();
    let copied =
        std::process::Command::new("cp").args(["-a", &format!("{FIXTURE}/repo"), &sandbox.target]).status().unwrap();
    assert!(copied.success());
    let expected = std::fs::read_to_string(format!("{FIXTURE}/expected.txt")).unwrap();
    let (version, expected) = expected.split_once('\n').unwrap();

    let versions = sandbox.json(&["versions"], 0);
    assert_eq!(versions.as_array().unwrap().len(), 1, "{versions}");
    assert_eq!(versions[0]["id"], version.trim_start_matches("version "), "{versions}");
    let check = sandbox.json(&["check", "--read-data"], 0);
    assert_eq!(check["errors"].as_array().map(Vec::len), Some(0), "{check}");

    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    let restored = describe(&snapshot(&to.join("data")));
    assert_eq!(restored, expected, "the restore differs from what format 1 stored");
}

/// Made the fixture once (`cargo test -p sysstate --test it make_format_1_fixture -- --ignored`,
/// as root, with no fixture in place). Kept to show how; never run it to "fix" the test above:
/// the point of the fixture is that it was written by the old code.
#[test]
#[ignore = "writes the stored fixture; run once, by hand"]
fn make_format_1_fixture() {
    assert!(is_root(), "the fixture's files belong to several users: run as root");
    assert!(!Path::new(FIXTURE).exists(), "the fixture exists: a new format gets a new fixture");
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    let data = root.join("data");
    let file = |path: &str, content: &[u8], mode: u32, owner: (u32, u32)| {
        let path = data.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1)).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    let mut seed = 0x5eed_u64;
    let noise: Vec<u8> = (0..200_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    file("etc/hostname", b"fixture\n", 0o644, (0, 0));
    file("etc/shadow", b"root:*:20000:0:99999:7:::\n", 0o640, (0, 42));
    file("bin/tool", &noise, 0o4755, (0, 0));
    file("home/user/notes.txt", b"format 1\n", 0o600, (1000, 1000));
    file("empty", b"", 0o644, (0, 0));
    file("hard1", b"two names\n", 0o644, (0, 0));
    std::fs::hard_link(data.join("hard1"), data.join("hard2")).unwrap();
    std::os::unix::fs::symlink("etc/hostname", data.join("link")).unwrap();
    rustix::fs::mknodat(rustix::fs::CWD, data.join("fifo"), rustix::fs::FileType::Fifo, 0o644.into(), 0).unwrap();
    rustix::fs::setxattr(data.join("home/user/notes.txt"), "user.comment", b"fixture", rustix::fs::XattrFlags::empty())
        .unwrap();
    let sparse = std::fs::File::create(data.join("sparse")).unwrap();
    sparse.set_len(4 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"data in the middle", 1 << 20).unwrap();
    drop(sparse);
    std::os::unix::fs::chown(data.join("home/user"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(data.join("home/user"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // Fixed times, deepest first (setting a time inside a folder changes the folder's).
    let mut paths: Vec<PathBuf> = snapshot(&data).into_keys().map(|p| data.join(p)).collect();
    paths.push(data.clone());
    paths.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().as_bytes().iter().filter(|b| **b == b'/').count()));
    let time = rustix::fs::Timespec { tv_sec: 1_767_225_600, tv_nsec: 123_456_789 };
    for path in &paths {
        let times = rustix::fs::Timestamps { last_access: time, last_modification: time };
        rustix::fs::utimensat(rustix::fs::CWD, path, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }
    let version = sandbox.backup_data(&root);
    std::fs::create_dir_all(FIXTURE).unwrap();
    let copied =
        std::process::Command::new("cp").args(["-a", &sandbox.target, &format!("{FIXTURE}/repo")]).status().unwrap();
    assert!(copied.success());
    let _ = std::fs::remove_dir_all(format!("{FIXTURE}/repo/locks"));
    std::fs::write(format!("{FIXTURE}/expected.txt"), format!("version {version}\n{}", describe(&snapshot(&data))))
        .unwrap();
}
