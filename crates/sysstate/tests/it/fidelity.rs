use crate::support::*;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

fn sh(script: &str) {
    let status = Command::new("sh").arg("-ec").arg(script).status().unwrap();
    assert!(status.success(), "failed: {script}");
}

/// Every kind of metadata the issue lists, made with the system's own tools.
fn make_rich_tree(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    let d = data.display();
    sh(&format!(
        "cd {d}
         printf 'hello' > plain
         chown 1234:5678 plain
         printf 'x' > setuid && chmod 4755 setuid
         mkdir sticky && chmod 1777 sticky
         mkdir setgid-dir && chmod 2775 setgid-dir
         printf 'acl' > with-acl && setfacl -m u:4321:rw- -m g:8765:r-- with-acl
         mkdir acl-dir && setfacl -d -m u:4321:rwx acl-dir && setfacl -m u:4321:r-x acl-dir
         printf 'cap' > with-cap && setcap cap_net_bind_service,cap_net_raw+ep with-cap
         printf 'xattr' > with-xattr && setfattr -n user.sysstate -v 'value with spaces' with-xattr && setfattr -n user.empty with-xattr
         printf 'shared' > link-a && ln link-a link-b && mkdir sub && ln link-a sub/link-c
         mknod null-dev c 1 3 && chmod 0620 null-dev
         mknod loop-dev b 7 200
         mkfifo pipe && chmod 0604 pipe
         ln -s /etc/hostname abs-link
         ln -s ../../../../escape rel-link
         truncate -s 100M sparse && printf 'middle' | dd of=sparse bs=1 seek=50000000 conv=notrunc status=none && printf 'end' | dd of=sparse bs=1 seek=104857597 conv=notrunc status=none
         truncate -s 10M all-hole
         touch -h -d '2001-02-03 04:05:06.123456789' abs-link
         touch -d '1999-12-31 23:59:59.5' plain"
    ));
    // Non-UTF-8 names and symlink targets.
    let bad_name = data.join(std::ffi::OsStr::from_bytes(b"caf\xe9-\xff"));
    std::fs::write(&bad_name, b"latin-1 name").unwrap();
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(b"target-\xfe\xfd"), data.join("bad-target")).unwrap();
    // A socket is skipped with a warning.
    let _socket = std::os::unix::net::UnixListener::bind(data.join("socket")).unwrap();
    std::mem::forget(_socket);
}

#[test]
fn all_metadata_survives_backup_and_restore() {
    if !require("root (chown, mknod, setcap)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_rich_tree(&root.join("data"));
    let report = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 1);
    let warnings = report["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0]["message"].as_str().unwrap().contains("socket"), "{warnings:?}");
    // The warning is an event of the job (entry-skipped), and the doctor explains it.
    let job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!(job["state"], "succeeded-with-warnings", "{job}");
    let events = sandbox.json(&["events", "--job", job["id"].as_str().unwrap(), "--level", "warning"], 0);
    let event = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["code"] == "entry-skipped")
        .unwrap_or_else(|| panic!("{events:#}"));
    assert!(event["message"].as_str().unwrap().contains("/data/socket"), "{event}");
    let doctor = sandbox.json(&["doctor", "--no-validate"], 0);
    let notice = doctor["notices"].as_array().unwrap().iter().find(|n| n["code"] == "entry-skipped");
    assert!(notice.is_some_and(|n| !n["resolution"].as_str().unwrap().is_empty()), "{doctor:#}");

    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    let mut expected = snapshot(&root.join("data"));
    expected.remove(Path::new("socket"));
    let actual = snapshot(&to.join("data"));
    assert_same(&expected, &actual);

    // Spot checks, so a bug in the comparison cannot hide a loss.
    let get = |name: &str| actual.get(Path::new(name)).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(get("setuid").mode, 0o4755);
    assert_eq!(get("sticky").mode, 0o1777);
    assert_eq!((get("plain").uid, get("plain").gid), (1234, 5678));
    assert!(get("with-cap").xattrs.iter().any(|(n, _)| n == b"security.capability"));
    assert!(get("with-acl").xattrs.iter().any(|(n, _)| n == b"system.posix_acl_access"));
    assert!(get("acl-dir").xattrs.iter().any(|(n, _)| n == b"system.posix_acl_default"));
    assert_eq!(get("link-b").hardlink_of.as_deref(), Some(Path::new("link-a")));
    assert_eq!(get("sub/link-c").hardlink_of.as_deref(), Some(Path::new("link-a")));
    assert_eq!(get("null-dev").kind, "char");
    assert_eq!(get("pipe").kind, "fifo");
    let sparse = get("sparse");
    assert!(sparse.sparse_blocks.unwrap() < 10, "holes were filled: {sparse:?}");
    assert_eq!(get("all-hole").sparse_blocks, Some(0));
    assert_eq!(get("bad-target").link.as_deref(), Some(&b"target-\xfe\xfd"[..]));
    assert!(actual.contains_key(Path::new(std::ffi::OsStr::from_bytes(b"caf\xe9-\xff"))));
    let getcap = Command::new("getcap").arg(to.join("data/with-cap")).output().unwrap();
    assert!(text(&getcap.stdout).contains("cap_net_bind_service,cap_net_raw=ep"), "{}", text(&getcap.stdout));
}

/// A re-backup takes the extended attributes and symlink targets of untouched entries from the
/// parent version; entries whose metadata changed (which moves their ctime) are read again.
#[test]
fn metadata_changes_between_backups_are_seen_and_untouched_metadata_is_kept() {
    if !require("root (chown, mknod, setcap)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_rich_tree(&root.join("data"));
    sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 1);
    let d = root.join("data");
    sh(&format!(
        "cd {}
         setfattr -x user.empty with-xattr && setfattr -n user.sysstate -v changed with-xattr
         setfacl -b with-acl
         setcap -r with-cap
         ln -sfn /etc/changed abs-link
         setfattr -n user.added -v on link-a",
        d.display()
    ));
    let again = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 1);
    // Content is read again where ctime moved: with-xattr, with-acl, with-cap and the three
    // names of link-a; the other five files are not.
    assert_eq!(again["stats"]["files-read"], 6, "{again}");
    assert_eq!(again["stats"]["files-unchanged"], 5, "{again}");

    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    let mut expected = snapshot(&d);
    expected.remove(Path::new("socket"));
    let actual = snapshot(&to.join("data"));
    assert_same(&expected, &actual);

    let get = |name: &str| actual.get(Path::new(name)).unwrap_or_else(|| panic!("{name} missing"));
    let names = |name: &str| get(name).xattrs.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names("with-xattr"), vec![b"user.sysstate".to_vec()]);
    assert!(get("with-xattr").xattrs.iter().any(|(_, v)| v == b"changed"));
    assert!(!names("with-acl").contains(&b"system.posix_acl_access".to_vec()));
    assert!(!names("with-cap").contains(&b"security.capability".to_vec()));
    assert_eq!(get("abs-link").link.as_deref(), Some(&b"/etc/changed"[..]));
    assert!(names("link-b").contains(&b"user.added".to_vec()), "a hardlink shares the inode's attributes");
    // Untouched entries kept what they had, taken from the first version.
    assert!(names("acl-dir").contains(&b"system.posix_acl_default".to_vec()));
    assert_eq!(get("bad-target").link.as_deref(), Some(&b"target-\xfe\xfd"[..]));
    assert_eq!(get("setuid").mode, 0o4755);
}
