//! Creating a repository is deliberate and atomic: `sysstate init`, and a first backup only
//! where a repository belongs; of concurrent creators one wins and the others use its
//! repository.

use crate::support::*;
use std::path::Path;

fn files_under(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    crate::corruption::walk_files(dir).len()
}

#[test]
fn eight_concurrent_first_backups_leave_one_usable_repository_every_time() {
    let rounds: usize = std::env::var("SYSSTATE_TEST_CREATION_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(50);
    let mut sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/file"), "small: the race is in the creation, not the data").unwrap();
    let root_arg = root.to_str().unwrap().to_string();
    for round in 0..rounds {
        sandbox.target = sandbox.path(&format!("repo-{round}")).display().to_string();
        // Every other round the target is an empty folder already (replaced whole by the
        // winner), else a new name.
        if round % 2 == 1 {
            std::fs::create_dir(&sandbox.target).unwrap();
        }
        let children: Vec<_> = (0..8)
            .map(|_| {
                sandbox
                    .command(&["backup", "--root", &root_arg, "--component", "data", "--wait", "5m", "--quiet"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert_eq!(output.status.code(), Some(0), "round {round}: {}", text(&output.stderr));
        }
        let repo = Path::new(&sandbox.target);
        assert_eq!(files_under(&repo.join("keys")), 1, "round {round}: the losers left their keys");
        let parent = repo.parent().unwrap();
        let staging = std::fs::read_dir(parent)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("sysstate-new"))
            .count();
        assert_eq!(staging, 0, "round {round}: a staging folder was left");
        assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 8, "round {round}");
        if round % 10 == 0 {
            sandbox.ok(&["check", "--read-data"]);
        }
        std::fs::remove_dir_all(repo).unwrap();
    }
}

#[test]
fn a_backup_creates_a_repository_only_where_one_belongs() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 2);
    let root_arg = root.to_str().unwrap();
    let backup_to = |target: &Path, code: i32| {
        let output = sandbox.run_code(
            &["--target", target.to_str().unwrap(), "backup", "--root", root_arg, "--component", "data"],
            code,
        );
        text(&output.stderr)
    };

    // A folder of other files: refused, nothing written into it.
    let documents = sandbox.path("documents");
    std::fs::create_dir_all(&documents).unwrap();
    std::fs::write(documents.join("thesis.odt"), "years of work").unwrap();
    let stderr = backup_to(&documents, 2);
    assert!(stderr.contains("invalid-input") && stderr.contains("not empty"), "{stderr}");
    assert_eq!(std::fs::read_dir(&documents).unwrap().count(), 1, "nothing was added beside the file");

    // A missing parent (a typo): refused, nothing created.
    let stderr = backup_to(&sandbox.path("bakcups/sysstate"), 2);
    assert!(stderr.contains("target-unavailable") && stderr.contains("does not exist"), "{stderr}");
    assert!(!sandbox.path("bakcups").exists());

    // Inside a repository: refused.
    let stderr = backup_to(&sandbox.path("repo"), 0);
    let _ = stderr;
    let stderr = backup_to(&sandbox.path("repo/data/nested"), 2);
    assert!(stderr.contains("inside the repository"), "{stderr}");

    // An empty folder (a freshly mounted disk has lost+found): used.
    let empty = sandbox.path("disk");
    std::fs::create_dir_all(empty.join("lost+found")).unwrap();
    backup_to(&empty, 0);
    assert!(empty.join("config").is_file() && empty.join("lost+found").is_dir());

    // `sysstate init` creates one deliberately, and refuses a second time.
    let fresh = sandbox.path("made-by-init");
    let made = sandbox.json(&["--target", fresh.to_str().unwrap(), "init"], 0);
    assert_eq!(made["id"].as_str().unwrap().len(), 64, "{made}");
    let output = sandbox.run_code(&["--target", fresh.to_str().unwrap(), "init"], 2);
    assert!(text(&output.stderr).contains("already exists"), "{}", text(&output.stderr));
    backup_to(&fresh, 0);
    assert_eq!(files_under(&fresh.join("keys")), 1, "the backup used the key init made");
}

/// Adds a line to `/etc/fstab` for as long as it lives (a machine without the file gets none
/// back).
struct FstabLine {
    line: String,
    existed: bool,
}

impl FstabLine {
    fn add(line: String) -> FstabLine {
        let existed = std::path::Path::new("/etc/fstab").exists();
        let fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
        std::fs::write("/etc/fstab", format!("{fstab}{line}\n")).unwrap();
        FstabLine { line, existed }
    }
}

impl Drop for FstabLine {
    fn drop(&mut self) {
        let fstab = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
        let kept: String = fstab.lines().filter(|l| *l != self.line).map(|l| format!("{l}\n")).collect();
        let _ = if kept.is_empty() && !self.existed {
            std::fs::remove_file("/etc/fstab")
        } else {
            std::fs::write("/etc/fstab", kept)
        };
    }
}

#[test]
fn a_backup_never_creates_a_repository_under_a_mount_point_that_is_not_mounted() {
    if !require("root (to edit /etc/fstab)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 2);
    let mount = sandbox.path("usb");
    std::fs::create_dir_all(&mount).unwrap();
    let _line = FstabLine::add(format!("LABEL=sysstate-test-backups {} ext4 noauto,nofail 0 2", mount.display()));
    let target = mount.join("sysstate");
    let output = sandbox.run_code(
        &["--target", target.to_str().unwrap(), "backup", "--root", root.to_str().unwrap(), "--component", "data"],
        2,
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("target-unavailable"), "{stderr}");
    assert!(stderr.contains(&format!("`{}`", mount.display())) && stderr.contains("not mounted"), "{stderr}");
    assert!(!target.exists(), "nothing was written beneath the mount point");
    assert_job_failed(&sandbox, "target-unavailable");
}

/// A read-only repository (what disaster recovery reads from) is listed, restored from and
/// checked, without a lease and saying so; an exclusive lease in it still stops a reader.
#[test]
fn a_read_only_repository_is_restored_from_and_checked_without_a_lease() {
    if !require("root (to mount)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 30, 12);
    sandbox.backup_data(&root);
    let mount = sandbox.path("read-only");
    std::fs::create_dir_all(&mount).unwrap();
    let guard = BindMount::read_only(Path::new(&sandbox.target), &mount);
    let target = mount.to_str().unwrap();
    assert_eq!(sandbox.json(&["--target", target, "versions"], 0).as_array().unwrap().len(), 1);
    sandbox.ok(&["--target", target, "items"]);
    let to = sandbox.path("restored");
    let output = sandbox.ok(&["--target", target, "restore", "--to", to.to_str().unwrap()]);
    assert!(text(&output.stderr).contains("read without a lease"), "{}", text(&output.stderr));
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    let output = sandbox.ok(&["--target", target, "check", "--read-data"]);
    assert!(text(&output.stderr).contains("cannot be written"), "{}", text(&output.stderr));
    // A backup to it fails as it must.
    let output =
        sandbox.run_code(&["--target", target, "backup", "--root", root.to_str().unwrap(), "--component", "data"], 2);
    assert!(text(&output.stderr).contains("target-permission"), "{}", text(&output.stderr));
    drop(guard);

    // `--no-lock` on a writable repository: no lease is written, and it says so.
    let locks = Path::new(&sandbox.target).join("locks");
    let output = sandbox.ok(&["--no-lock", "check"]);
    assert!(text(&output.stderr).contains("--no-lock"), "{}", text(&output.stderr));
    assert_eq!(std::fs::read_dir(&locks).unwrap().count(), 0);

    // An exclusive lease (a prune elsewhere) in a read-only repository still stops a reader.
    let lease = serde_json::json!({
        "host": "another-host", "pid": 1, "start-ticks": 1, "command": "prune",
        "since-ns": sysstate_now_ns(), "refreshed-ns": sysstate_now_ns(), "exclusive": true,
    });
    std::fs::write(locks.join("ab".repeat(32)), lease.to_string()).unwrap();
    let _guard = BindMount::read_only(Path::new(&sandbox.target), &mount);
    let output = sandbox.run_code(&["--target", target, "restore", "--to", sandbox.path("r2").to_str().unwrap()], 2);
    assert!(text(&output.stderr).contains("repository-locked"), "{}", text(&output.stderr));
}

fn sysstate_now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}
