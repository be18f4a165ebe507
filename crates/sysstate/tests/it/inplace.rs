//! Restore in place: dry run, the real run, undo, a run killed midway, a run that fails midway,
//! and the package set.

use crate::support::*;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// A small system tree: accounts, config files, a symlink, nested directories.
fn system_tree(root: &Path) {
    for (path, content) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"),
        ("etc/group", "root:x:0:\nalice:x:1000:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/hostname", "server-1\n"),
        ("etc/app/a.conf", "a = 1\n"),
        ("etc/app/b.conf", "b = 2\n"),
        ("etc/keep/dir/x", "x\n"),
        ("etc/zzz.conf", "last\n"),
    ] {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), content).unwrap();
    }
    std::fs::set_permissions(root.join("etc/shadow"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("hostname", root.join("etc/link")).unwrap();
}

/// Changes of every kind: content, mode, a new file and directory, a removed symlink, a
/// directory replaced by a file, an account added.
fn change_everything(root: &Path) {
    std::fs::write(root.join("etc/hostname"), "server-2\n").unwrap();
    std::fs::set_permissions(root.join("etc/app/a.conf"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(root.join("etc/new.conf"), "new\n").unwrap();
    std::fs::create_dir_all(root.join("etc/newdir")).unwrap();
    std::fs::write(root.join("etc/newdir/f"), "f\n").unwrap();
    std::fs::remove_file(root.join("etc/link")).unwrap();
    std::fs::remove_dir_all(root.join("etc/keep/dir")).unwrap();
    std::fs::write(root.join("etc/keep/dir"), "now a file\n").unwrap();
    let mut passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    passwd.push_str("mallory:x:1001:1001::/home/mallory:/bin/sh\n");
    std::fs::write(root.join("etc/passwd"), passwd).unwrap();
    std::fs::write(root.join("etc/zzz.conf"), "changed last\n").unwrap();
    let status =
        Command::new("setfattr").args(["-n", "user.origin", "-v", "changed"]).arg(root.join("etc/app/b.conf")).status();
    assert!(status.is_ok_and(|s| s.success()), "setfattr (package attr) sets a user attribute");
}

fn differences(report: &serde_json::Value) -> BTreeSet<(String, String)> {
    report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["path"].as_str().unwrap().to_string(), d["change"].as_str().unwrap().to_string()))
        .collect()
}

fn backed_up_system(sandbox: &Sandbox) -> std::path::PathBuf {
    let root = sandbox.path("root");
    system_tree(&root);
    let root_arg = root.to_str().unwrap();
    sandbox.json(&["backup", "--root", root_arg, "--component", "config", "--component", "accounts"], 0);
    root
}

/// Entries by path, with their metadata.
type Etc = std::collections::BTreeMap<std::path::PathBuf, Entry>;

/// Every entry of the root's `/etc` with its metadata, but the account lock file (the lock
/// holders', made by the backup's `accounts` writer).
fn etc(root: &Path) -> Etc {
    let mut entries = snapshot(&root.join("etc"));
    entries.remove(Path::new(".pwd.lock"));
    entries
}

/// A backed-up system changed every way after its backup: the root, `/etc` as backed up, and
/// `/etc` as changed.
fn changed_system(sandbox: &Sandbox) -> (std::path::PathBuf, Etc, Etc) {
    let root = backed_up_system(sandbox);
    let original = etc(&root);
    change_everything(&root);
    let changed = etc(&root);
    (root, original, changed)
}

#[test]
fn in_place_restore_dry_run_real_run_and_undo() {
    let sandbox = Sandbox::new();
    let (root, original, changed) = changed_system(&sandbox);
    let root_arg = root.to_str().unwrap();

    // The dry run lists every difference and changes nothing.
    let dry = sandbox.json(&["restore", "--in-place", "--dry-run", "--root", root_arg], 0);
    let expected: BTreeSet<(String, String)> = [
        ("/etc/app/a.conf", "change"),
        ("/etc/app/b.conf", "change"),
        ("/etc/hostname", "change"),
        ("/etc/keep/dir", "change"),
        ("/etc/link", "add"),
        ("/etc/new.conf", "remove"),
        ("/etc/newdir", "remove"),
        ("/etc/passwd", "change"),
        ("/etc/zzz.conf", "change"),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), c.to_string()))
    .collect();
    assert_eq!(differences(&dry), expected, "{dry}");
    let find = |path: &str| dry["differences"].as_array().unwrap().iter().find(|d| d["path"] == path).unwrap().clone();
    assert_eq!(find("/etc/app/a.conf")["what"], serde_json::json!(["mode"]));
    assert!(find("/etc/hostname")["what"].as_array().unwrap().contains(&"content".into()));
    assert_eq!(find("/etc/keep/dir")["what"], serde_json::json!(["type"]));
    assert_eq!(find("/etc/app/b.conf")["what"], serde_json::json!(["xattrs"]));
    assert_eq!(find("/etc/newdir")["entries"], 2);
    assert_eq!(dry["dry-run"], true);
    assert_same(&changed, &etc(&root));
    let listing = text(&sandbox.ok(&["restore", "--in-place", "--dry-run", "--root", root_arg]).stdout);
    assert!(listing.contains("~ /etc/app/a.conf (mode)") && listing.contains("- /etc/newdir (2 entries)"), "{listing}");

    // The real run makes the tree equal to the version, metadata included.
    let report = sandbox.json(&["restore", "--in-place", "--root", root_arg], 0);
    assert_eq!(differences(&report), expected);
    assert_same(&original, &etc(&root));
    let job = report["undo"].as_str().unwrap().to_string();
    let again = sandbox.json(&["restore", "--in-place", "--dry-run", "--root", root_arg], 0);
    assert_eq!(again["differences"], serde_json::json!([]), "nothing differs after the restore: {again}");

    // Undo puts back every byte and every piece of metadata.
    sandbox.ok(&["restore", "--undo", &job]);
    assert_same(&changed, &etc(&root));
    // A second undo is refused with the reason.
    let output = sandbox.run_code(&["restore", "--undo", &job], 2);
    assert!(text(&output.stderr).contains("already undone"), "{}", text(&output.stderr));
}

#[test]
fn in_place_restore_killed_midway_leaves_no_half_written_file_and_can_be_undone() {
    let sandbox = Sandbox::new();
    let (root, original, changed) = changed_system(&sandbox);
    let root_arg = root.to_str().unwrap();

    let output = sandbox
        .command(&["restore", "--in-place", "--root", root_arg])
        .env("SYSSTATE_FAILPOINT_KILL_AFTER_COMMITS", "3")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), None, "killed by its failpoint: {}", text(&output.stderr));

    // Every entry is either as it was or as the version has it; none is half-written.
    let now = etc(&root);
    let mut restored = 0;
    for (path, entry) in &now {
        if path.to_string_lossy().contains(".sysstate-") || entry.kind == "dir" {
            continue; // staged, complete, not yet in place; directories get their times last
        }
        let before = changed.get(path);
        let after = original.get(path);
        assert!(
            Some(entry) == before || Some(entry) == after,
            "{} is neither the old nor the restored entry: {entry:?}",
            path.display()
        );
        if Some(entry) == after && Some(entry) != before {
            restored += 1;
        }
    }
    assert!(restored >= 1, "the failpoint fires after some entries were put in place");

    // The job is seen as failed, and undo puts the system back.
    let jobs = sandbox.json(&["job", "--previous", "1"], 0);
    assert_eq!(jobs[0]["state"], "failed", "{jobs}");
    assert_eq!(jobs[0]["kind"], "restore-in-place", "{jobs}");
    let job = jobs[0]["id"].as_str().unwrap();
    assert!(jobs[0]["error"]["resolution"].as_str().unwrap().contains(&format!("sysstate restore --undo {job}")));
    sandbox.ok(&["restore", "--undo", job]);
    assert_same(&changed, &etc(&root));
}

/// A bind mount over a file makes renaming over it fail (EBUSY): the restore stops midway and
/// undoes what it did.
#[test]
fn in_place_restore_that_fails_midway_is_rolled_back() {
    if !require("root (bind-mounts over a file)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new();
    let root = backed_up_system(&sandbox);
    let root_arg = root.to_str().unwrap();
    change_everything(&root);
    let mounted = sandbox.path("mounted");
    std::fs::write(&mounted, "changed last\n").unwrap();
    let status = Command::new("mount").args(["--bind"]).arg(&mounted).arg(root.join("etc/zzz.conf")).status().unwrap();
    assert!(status.success());
    let changed = etc(&root);

    let output = sandbox.run_code(&["restore", "--in-place", "--root", root_arg], 2);
    let _ = Command::new("umount").arg(root.join("etc/zzz.conf")).status();
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error[restore-failed]") && stderr.contains("zzz.conf"), "{stderr}");
    assert!(stderr.contains("the system is as it was"), "{stderr}");
    assert_job_failed(&sandbox, "restore-failed");
    let mut now = etc(&root);
    let mut changed = changed;
    // The mount point itself is not part of the comparison (its inode is the mounted file's).
    now.remove(Path::new("zzz.conf"));
    changed.remove(Path::new("zzz.conf"));
    assert_same(&changed, &now);
}

#[test]
fn in_place_restore_of_packages_writes_the_selection_and_the_apt_commands() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("root");
    let status = "Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4\n\
                  Maintainer: x\nDescription: base\n\nPackage: vim\nStatus: install ok installed\n\
                  Architecture: amd64\nVersion: 9\nMaintainer: x\nDescription: editor\n";
    std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), status).unwrap();
    let root_arg = root.to_str().unwrap();
    sandbox.json(&["backup", "--root", root_arg, "--component", "packages"], 0);
    // vim is removed after the backup.
    std::fs::write(root.join("var/lib/dpkg/status"), format!("{}\n", status.split("\n\n").next().unwrap())).unwrap();
    let dpkg_status = std::fs::read(root.join("var/lib/dpkg/status")).unwrap();

    let report = sandbox.json(&["restore", "--in-place", "--root", root_arg, "--component", "packages"], 0);
    let packages = &report["packages"];
    assert_eq!(packages["to-install"], serde_json::json!(["vim"]), "{report}");
    assert_eq!(packages["applied"], false);
    let file = packages["selections"].as_str().unwrap();
    assert!(std::fs::read_to_string(file).unwrap().contains("vim"), "the selection list is written");
    let commands: Vec<&str> = packages["commands"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let set =
        commands.iter().position(|c| c.contains(&format!("dpkg --set-selections < {file}"))).expect("set-selections");
    // dpkg takes selections only of packages it knows: apt's list goes in first.
    let merge = commands.iter().position(|c| c.contains("apt-cache dumpavail |") && c.contains("dpkg --merge-avail"));
    assert!(merge.is_some_and(|m| m < set), "{commands:?}");
    assert_eq!(std::fs::read(root.join("var/lib/dpkg/status")).unwrap(), dpkg_status, "dpkg's database is untouched");
}

/// Holds `/etc/.pwd.lock` under `root` as `lckpwdf(3)` does (a POSIX write lock) for `seconds`.
fn hold_account_lock(sandbox: &Sandbox, root: &Path, seconds: f64) -> std::process::Child {
    let ready = sandbox.path("lock-held");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\nopen(sys.argv[2], 'w').close()\ntime.sleep(float(sys.argv[3]))",
        ])
        .arg(root.join("etc/.pwd.lock"))
        .arg(&ready)
        .arg(seconds.to_string())
        .spawn()
        .unwrap();
    while !ready.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// The account files are put in place under the account database's lock: a restore waits for a
/// holder that lets go, and one that does not fails the restore with `component-locked`,
/// naming it, with nothing changed.
#[test]
fn accounts_are_restored_under_the_account_database_lock() {
    let sandbox = Sandbox::new();
    let (root, original, changed) = changed_system(&sandbox);
    let root_arg = root.to_str().unwrap();

    // A holder that never lets go in the writer's prepare-timeout.
    std::fs::write(
        sandbox.path("config.toml"),
        "[[writer]]\nname = \"accounts\"\nkind = \"accounts\"\nprepare-timeout = \"1s\"\n",
    )
    .unwrap();
    let mut holder = hold_account_lock(&sandbox, &root, 30.0);
    let output = sandbox.run_code(&["restore", "--in-place", "--root", root_arg], 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error[component-locked]") && stderr.contains(&format!("pid {}", holder.id())), "{stderr}");
    assert_same(&changed, &etc(&root));
    assert_job_failed(&sandbox, "component-locked");
    let diagnosis = assert_diagnosed(&sandbox, "component-locked");
    assert!(diagnosis["specifics"].to_string().contains(&format!("pid {} (", holder.id())), "{diagnosis:#}");
    holder.kill().unwrap();
    holder.wait().unwrap();

    // A holder that lets go after a moment: the restore waits for it (the built-in writer's
    // prepare-timeout), then succeeds.
    std::fs::write(sandbox.path("config.toml"), "").unwrap();
    let mut holder = hold_account_lock(&sandbox, &root, 1.5);
    let started = std::time::Instant::now();
    sandbox.ok(&["restore", "--in-place", "--root", root_arg]);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "the restore did not wait for the lock");
    holder.wait().unwrap();
    assert_same(&original, &etc(&root));
}

/// The journal keeps the root as an absolute path: an in-place restore given `--root root` in one
/// folder is undone there from any other folder (whose own `root` is left alone), and an undo
/// given another root is refused.
#[test]
fn undo_works_on_the_root_the_restore_ran_on_wherever_it_is_run_from() {
    let sandbox = Sandbox::new();
    let (root, _, changed) = changed_system(&sandbox);
    assert_eq!(root, sandbox.path("root"), "the fixture's root is `root` in the sandbox");
    let elsewhere = sandbox.path("elsewhere");
    std::fs::create_dir_all(elsewhere.join("root/etc")).unwrap();
    std::fs::write(elsewhere.join("root/etc/hostname"), "another machine\n").unwrap();
    let decoy = etc(&elsewhere.join("root"));

    let run_in = |dir: &Path, args: &[&str]| sandbox.command(args).current_dir(dir).output().unwrap();
    let output = run_in(sandbox.dir.path(), &["restore", "--in-place", "--root", "root", "--json"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let job = report["undo"].as_str().unwrap().to_string();

    let output = run_in(&elsewhere, &["restore", "--undo", &job, "--root", "root"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("was of the root") && stderr.contains(&root.display().to_string()), "{stderr}");

    let output = run_in(&elsewhere, &["restore", "--undo", &job]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_same(&changed, &etc(&root));
    assert_same(&decoy, &etc(&elsewhere.join("root")));
}
