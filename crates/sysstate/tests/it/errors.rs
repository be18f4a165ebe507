//! The error codes of the repository layer, each provoked by its real condition.

use crate::support::*;
use std::process::Command;

fn stderr_has_code(output: &std::process::Output, code: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("error[{code}]")), "expected error[{code}]: {stderr}");
    assert!(stderr.contains("  cause: ") && stderr.contains("  resolution: "), "{stderr}");
}

#[test]
fn wrong_passphrase() {
    let mut sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 6);
    sandbox.backup_data(&root);
    sandbox.passphrase = Some("wrong".into());
    let output = sandbox.run(&["versions"]);
    stderr_has_code(&output, "wrong-passphrase");
    assert!(text(&output.stderr).contains(&sandbox.target), "names the repository");
    let value = sandbox.json(&["versions"], 2);
    assert_eq!(value["error"]["code"], "wrong-passphrase");
    assert_eq!(value["error"]["event-id"], 1035);
    // As a backup job: the job, the event, and the doctor's diagnosis.
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    stderr_has_code(&output, "wrong-passphrase");
    assert_job_failed(&sandbox, "wrong-passphrase");
}

#[test]
fn target_unavailable() {
    let sandbox = Sandbox::new();
    let output = sandbox.run(&["versions", "--target", "/nonexistent/sysstate-target"]);
    stderr_has_code(&output, "target-unavailable");
    assert!(text(&output.stderr).contains("/nonexistent/sysstate-target"));
    // An object store nobody listens on.
    let output = dead_s3(&mut sandbox.command(&["versions", "--target", "s3://nobody/x"])).output().unwrap();
    stderr_has_code(&output, "target-unavailable");
    // As a backup job, diagnosed with the target named.
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 9);
    let args = ["backup", "--root", root.to_str().unwrap(), "--component", "data", "--target", "s3://nobody/x"];
    let output = dead_s3(&mut sandbox.command(&args)).output().unwrap();
    stderr_has_code(&output, "target-unavailable");
    assert_job_failed(&sandbox, "target-unavailable");
    let diagnosis = assert_diagnosed(&sandbox, "target-unavailable");
    assert!(diagnosis["specifics"][0].as_str().unwrap().contains("s3://nobody/x"), "{diagnosis:#}");
}

/// The state directory on a read-only filesystem: the job cannot even be recorded, so the
/// failure is `state-dir-permission` on stderr, and the doctor's state-dir checks name it.
#[test]
fn state_dir_permission_on_a_read_only_state_dir() {
    if !require("root (mounts a read-only tmpfs)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 10);
    let state = Tmpfs::mount(&sandbox.path("state"), "ro,mode=0700,size=1m");
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    let report: serde_json::Value =
        serde_json::from_slice(&sandbox.run(&["doctor", "--no-validate", "--json"]).stdout).unwrap();
    drop(state);
    stderr_has_code(&output, "state-dir-permission");
    let writable = report["checks"].as_array().unwrap().iter().find(|c| c["id"] == "state-dir.writable").unwrap();
    assert_eq!(writable["status"], "failed", "{report:#}");
    assert_eq!(writable["code"], "state-dir-permission", "{writable}");
    assert!(writable["found"].as_str().unwrap().contains("Read-only file system"), "{writable}");
    assert!(writable["resolution"].as_str().unwrap().contains("read-write"), "{writable}");
}

#[test]
fn component_missing_and_unknown_config_keys() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    // A component the machine lacks (the ESP not mounted) is a failure the doctor diagnoses.
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "efi"]);
    stderr_has_code(&output, "component-missing");
    assert!(text(&output.stderr).contains("/boot/efi"), "{}", text(&output.stderr));
    assert_job_failed(&sandbox, "component-missing");
    // A mistyped name is refused at once, and is no standing failure: the doctor, which still
    // sees the efi failure, does not add the typo to it.
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "nope"]);
    stderr_has_code(&output, "component-missing");
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let diagnosed: Vec<&str> =
        report["diagnoses"].as_array().unwrap().iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert!(diagnosed.iter().all(|m| !m.contains("`nope`")), "{diagnosed:?}");
    assert_eq!(diagnosed.len(), 1, "{diagnosed:?}");

    std::fs::write(sandbox.path("config.toml"), "[backup]\ntarget = \"/x\"\ncompnents = [\"config\"]\n").unwrap();
    let output = sandbox.run(&["versions"]);
    stderr_has_code(&output, "invalid-input");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("compnents") && stderr.contains("config.toml") && stderr.contains("line 3"), "{stderr}");
}

#[test]
fn target_full_keeps_earlier_versions() {
    if !require("root (mounts a small tmpfs as a full target)", is_root()) {
        return;
    }
    let mut sandbox = Sandbox::new().with_data_component();
    let mount = Tmpfs::mount(&sandbox.path("small"), "size=2m");
    sandbox.target = mount.0.join("repo").display().to_string();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 8);
    std::fs::write(root.join("data/small"), b"small").unwrap();
    let first = sandbox.backup_data(&root);
    let expected = snapshot(&root.join("data"));
    let mut rng = Rng(3);
    std::fs::write(root.join("data/too-big"), rng.bytes(6 << 20)).unwrap();
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    stderr_has_code(&output, "target-full");
    assert_job_failed(&sandbox, "target-full");
    assert!(text(&output.stderr).contains(&sandbox.target), "names the target: {}", text(&output.stderr));
    // Make room for the check's lease; the earlier version is intact.
    let to = sandbox.path("restored");
    sandbox.run_code(&["check"], 0);
    sandbox.ok(&["restore", "--version", &first, "--to", to.to_str().unwrap()]);
    assert_same(&expected, &snapshot(&to.join("data")));
}

#[test]
fn target_permission_on_a_read_only_target() {
    if !require("root (remounts a tmpfs read-only)", is_root()) {
        return;
    }
    let mut sandbox = Sandbox::new().with_data_component();
    let mount = Tmpfs::mount(&sandbox.path("ro"), "size=20m");
    sandbox.target = mount.0.join("repo").display().to_string();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 9);
    sandbox.backup_data(&root);
    assert!(Command::new("mount").args(["-o", "remount,ro"]).arg(&mount.0).status().unwrap().success());
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    stderr_has_code(&output, "target-permission");
    assert_job_failed(&sandbox, "target-permission");
}

#[test]
fn repository_locked_names_the_holder_and_a_dead_holder_is_taken_over() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 10);
    sandbox.backup_data(&root);
    // A real prune holding its exclusive lease (the failpoint pauses it after taking it).
    let mut holder = sandbox.command(&["prune"]).env("SYSSTATE_FAILPOINT_HOLD_LEASE_SECS", "30").spawn().unwrap();
    let locks = sandbox.path("repo/locks");
    for _ in 0..100 {
        if std::fs::read_dir(&locks).map(|d| d.count()).unwrap_or(0) > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    stderr_has_code(&output, "repository-locked");
    assert_job_failed(&sandbox, "repository-locked");
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&format!("pid {}", holder.id())) && stderr.contains("`prune`"), "{stderr}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    // Its lease names a dead process on this host: the next command takes over.
    sandbox.ok(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    assert_eq!(std::fs::read_dir(&locks).unwrap().count(), 0);
}

#[test]
fn restore_destination_names_the_path_and_creates_nothing() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 21);
    sandbox.backup_data(&root);
    // A file where the destination's parent should be: the restore cannot create its root.
    let blocker = sandbox.path("blocker");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let to = blocker.join("restored");
    let output = sandbox.run(&["restore", "--to", to.to_str().unwrap()]);
    stderr_has_code(&output, "restore-destination");
    assert!(text(&output.stderr).contains(to.to_str().unwrap()), "names the destination: {}", text(&output.stderr));
    assert_eq!(std::fs::read(&blocker).unwrap(), b"not a directory", "the file in the way is untouched");
    assert_job_failed(&sandbox, "restore-destination");
}

#[test]
fn provider_unsupported_when_reflink_cannot_clone_the_volume() {
    if !require("root (mounts a tmpfs, which has no reflinks, as the backed-up volume)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let volume = Tmpfs::mount(&sandbox.path("volume"), "size=8m");
    let root = volume.0.join("root");
    make_tree(&root.join("data"), 3, 22);
    let config = std::fs::read_to_string(sandbox.path("config.toml")).unwrap();
    std::fs::write(sandbox.path("config.toml"), format!("{config}\n[shadow]\nprovider = \"reflink\"\n")).unwrap();
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    stderr_has_code(&output, "provider-unsupported");
    assert!(text(&output.stderr).contains("reflink"), "names the provider: {}", text(&output.stderr));
    assert_job_failed(&sandbox, "provider-unsupported");
    // With `auto` the same backup works.
    std::fs::write(sandbox.path("config.toml"), format!("{config}\n[shadow]\nprovider = \"auto\"\n")).unwrap();
    sandbox.backup_data(&root);
}

/// A component's path removed after it was chosen and before the shadow copy (here by a writer's
/// freeze command): the backup fails and saves no version that would lack it, and the doctor
/// says the path is gone.
#[test]
fn component_incomplete_when_a_path_goes_away_before_the_copy() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 8);
    make_tree(&root.join("gone"), 5, 9);
    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "[[component]]\nname = \"data\"\npaths = [\"/data\"]\n\n[[component]]\nname = \"gone\"\npaths = [\"/gone\"]\n\n[[writer]]\nname = \"remover\"\nkind = \"command\"\nfreeze = [\"rm\", \"-rf\", \"{}\"]\n",
            root.join("gone").display()
        ),
    )
    .unwrap();
    let output =
        sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data", "--component", "gone"]);
    stderr_has_code(&output, "component-incomplete");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("`/gone` (component `gone`)") && stderr.contains("no version was saved"), "{stderr}");
    assert_job_failed(&sandbox, "component-incomplete");
    assert_eq!(sandbox.json(&["versions"], 0).as_array().map(Vec::len), Some(0), "a version that lies was saved");
    let diagnosis = assert_diagnosed(&sandbox, "component-incomplete");
    assert!(diagnosis["specifics"][0].as_str().unwrap().contains("now it is gone"), "{diagnosis:#}");
    assert!(diagnosis["cause"].as_str().unwrap().contains("removed"), "{diagnosis:#}");
}

/// `sysstate items | head -1`: the reader goes away after a line; sysstate finishes without a
/// panic (it exited 101 on the broken pipe).
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3000, 17);
    sandbox.backup_data(&root);
    let mut child = sandbox
        .command(&["items"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    assert!(!first.is_empty());
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}

/// Output to a full disk (`2>/dev/full`, or a log file on a full filesystem): the failure is
/// still the job's, with its exit code and its job record, not a panic about printing (it
/// exited 101 and the record said nothing of why).
#[test]
fn output_to_a_full_disk_is_not_a_panic() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 19);
    sandbox.backup_data(&root);
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    // A failure, printed to a full stderr: the repository at the target is not there.
    let output = sandbox
        .command(&[
            "restore",
            "--target",
            sandbox.path("nothing-here").to_str().unwrap(),
            "--to",
            sandbox.path("unused").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stdout));
    assert_job_failed(&sandbox, "target-unavailable");
    // A success whose summary goes to a full stdout, its warnings to a full stderr.
    let restored = sandbox.path("restored");
    let output = sandbox
        .command(&["restore", "--to", restored.to_str().unwrap(), "--json"])
        .stdout(full())
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(restored.join("data").is_dir(), "the restore did not happen");
}

/// The state directory's filesystem is full: the job database cannot record the job. The
/// code is the state directory's, but the message says full, not a permission, and the doctor
/// shows the space.
#[test]
fn a_full_state_directory_is_called_full_not_a_permission() {
    if !require("root (mount a small tmpfs)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 20);
    let state = sandbox.path("state");
    let _tmpfs = Tmpfs::mount(&state, "size=4m,mode=0700");
    sandbox.backup_data(&root);
    // Fill what is left, as a runaway log would.
    let mut filler = std::fs::File::create(state.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[7u8; 65536]).is_ok() {}
    drop(filler);
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("error[state-dir-permission]") && stderr.contains("is full"), "{stderr}");
    assert!(stderr.contains(&format!("df -h {}", state.display())), "{stderr}");
    assert!(!stderr.contains("writable by the service user"), "{stderr}");
    // The doctor sees the space.
    let output = sandbox.run(&["doctor", "--no-validate", "--json"]);
    let doctor: serde_json::Value = serde_json::from_slice(&output.stdout).expect("the doctor's report is JSON");
    let space = doctor["checks"].as_array().unwrap().iter().find(|c| c["id"] == "state-dir.space");
    assert!(space.is_some_and(|c| c["status"] != "ok"), "{doctor:#}");
}

/// An absurd `--threads` is refused with the limit, not a panic.
#[test]
fn too_many_threads_are_refused() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 18);
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--threads", "100000"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at most 256") && !stderr.contains("panicked"), "{stderr}");
}

/// A user who is not root is told that the permission refused is root's to give.
#[test]
fn a_permission_refused_to_a_user_who_is_not_root_says_root_is_expected() {
    if !require("root (to run a command as nobody)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 1);
    sandbox.backup_data(&root);
    // The sandbox's folders may be entered by nobody; the repository stays root's (0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // nobody's own state and runtime folders, in a folder nobody may write.
    let own = tempfile::tempdir().unwrap();
    std::fs::set_permissions(own.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command = sandbox.command(&["versions"]);
    command.env("SYSSTATE_STATE_DIR", own.path().join("state")).env("SYSSTATE_RUNTIME_DIR", own.path().join("run"));
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = command.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))).collect();
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .args(args)
        .envs(envs)
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Permission denied") && stderr.contains("note: sysstate runs as uid 65534"), "{stderr}");
}
