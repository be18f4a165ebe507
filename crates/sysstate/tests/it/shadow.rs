//! The shadow copy service end to end: every error it can end a backup with, provoked for real.

use crate::support::*;
use std::path::Path;
use std::time::{Duration, Instant};

const DATA: &str = "[[component]]\nname = \"data\"\npaths = [\"/data\"]\n";

/// A sandbox with the `data` component, `extra` config, and a small tree to back up.
fn setup(extra: &str) -> (Sandbox, std::path::PathBuf) {
    let sandbox = Sandbox::new();
    let config = format!("{DATA}{}", extra.replace("@", sandbox.dir.path().to_str().unwrap()));
    std::fs::write(sandbox.path("config.toml"), config).unwrap();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 20, 31);
    (sandbox, root)
}

fn backup_args(root: &Path) -> Vec<String> {
    ["backup", "--root", root.to_str().unwrap(), "--component", "data"].iter().map(|s| s.to_string()).collect()
}

/// Starts a backup of `root` whose provider commit takes `ms`, so its writers stay frozen that long.
fn backup_held_in_commit(sandbox: &Sandbox, root: &Path, ms: u64) -> std::process::Child {
    let args = backup_args(root);
    sandbox
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", ms.to_string())
        .spawn()
        .unwrap()
}

/// Sends `signal` to `child` and reaps it.
fn signal(child: &mut std::process::Child, signal: rustix::process::Signal) -> std::process::ExitStatus {
    rustix::process::kill_process(rustix::process::Pid::from_child(child), signal).unwrap();
    child.wait().unwrap()
}

fn run_backup(sandbox: &Sandbox, root: &Path) -> std::process::Output {
    let args = backup_args(root);
    sandbox.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn expect_code(output: &std::process::Output, code: &str) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "expected failure with {code}: {stderr}");
    assert!(stderr.contains(&format!("error[{code}]")), "expected error[{code}]: {stderr}");
    stderr
}

/// After a success, only the base copy that the next backup refreshes stays in storage.
fn assert_only_base(storage: &Path) {
    let left: Vec<String> = std::fs::read_dir(storage)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|name| name == "base"), "shadow copies left behind: {left:?}");
}

/// After a failure, no shadow copy may be left behind in the sandbox's storage.
fn assert_storage_empty(sandbox: &Sandbox) {
    let storage = sandbox.path("state/shadow");
    let left: Vec<_> =
        std::fs::read_dir(&storage).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "shadow copies left behind: {left:?}");
}

fn writer_state(sandbox: &Sandbox, name: &str) -> serde_json::Value {
    let writers = sandbox.json(&["writers"], 0);
    writers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no writer {name}: {writers}"))
}

#[test]
fn a_successful_backup_reads_the_shadow_copy_and_records_the_set() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"touch\", \"@/frozen\"]\nthaw = [\"touch\", \"@/thawed\"]\n",
    );
    // A copy of an entry made in the tick it changed in is not trusted next time: let it settle.
    std::thread::sleep(Duration::from_millis(2100));
    let report = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
    assert!(sandbox.path("frozen").exists() && sandbox.path("thawed").exists());
    let versions = sandbox.json(&["versions"], 0);
    let shadow = &versions[0]["shadow"];
    assert_eq!(shadow["writers"][0]["name"], "app", "{shadow}");
    assert_eq!(shadow["writers"][0]["result"], "ok");
    assert!(shadow["freeze-window-ms"].is_u64() && shadow["commit-ms"].is_u64(), "{shadow}");
    assert!(shadow["providers"].as_object().unwrap().values().all(|p| p == "copy" || p == "reflink"), "{shadow}");
    assert_eq!(writer_state(&sandbox, "app")["state"], "stable");
    assert_only_base(&sandbox.path("state/shadow"));
    // The copy records the live files' identities: nothing is read again next time, and the
    // base copy is refreshed without copying anything.
    let again = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
    assert_eq!(again["stats"]["files-read"], 0, "{again}");
    assert_eq!(report["stats"]["files"], again["stats"]["files-unchanged"]);
    let versions = sandbox.json(&["versions"], 0);
    assert_eq!(versions[1]["shadow"]["files"], 0, "an unchanged tree was copied again: {}", versions[1]["shadow"]);
    assert_eq!(versions[1]["shadow"]["precopied-files"], 0, "{}", versions[1]["shadow"]);
    // A change, an addition and a removal reach the copy, and only they are copied: before the
    // freeze, which copies nothing again (the journal named nothing since, so the two files
    // copied in the tick they changed in are as they were copied).
    let changed = std::fs::read_dir(root.join("data/d0/e0")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&changed, b"changed").unwrap();
    std::fs::write(root.join("data/added"), b"added").unwrap();
    let removed = std::fs::read_dir(root.join("data/d1/e1")).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(&removed).unwrap();
    let third = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
    assert_eq!(third["stats"]["files-read"], 2, "{third}");
    let versions = sandbox.json(&["versions"], 0);
    assert_eq!(versions[2]["shadow"]["precopied-files"], 2, "{}", versions[2]["shadow"]);
    assert_eq!(versions[2]["shadow"]["files"], 0, "{}", versions[2]["shadow"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

/// The base copy is brought up to date before the freeze, while everything runs; the freeze
/// copies only what changed since (here the file the writer writes as it freezes) and what was
/// copied too recently to trust its ctime. The version holds the content of the freeze.
#[test]
fn the_base_copy_is_made_before_the_freeze_which_copies_only_what_changed_since() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"echo frozen > @/root/data/app.db\"]\nthaw = [\"true\"]\n",
    );
    std::fs::write(root.join("data/app.db"), "running\n").unwrap();
    std::thread::sleep(Duration::from_millis(2100)); // the tree settles
    std::fs::write(root.join("data/fresh"), "just written\n").unwrap();
    let report = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
    let shadow = &sandbox.json(&["versions"], 0)[0]["shadow"];
    let entries = report["stats"]["files"].as_u64().unwrap();
    assert!(shadow["precopied-files"].as_u64().unwrap() >= entries, "{shadow} (entries: {entries})");
    assert!(shadow["precopy-ms"].is_u64(), "{shadow}");
    // app.db changed in the freeze; `fresh` was copied in the tick it was written.
    assert_eq!(shadow["files"], 2, "the freeze copied more than what changed: {shadow}");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(to.join("data/app.db")).unwrap(), "frozen\n");
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    // Next time, what was copied in the tick it changed in (`fresh`, app.db) is copied again
    // before the freeze, and the freeze copies only the file the writer wrote again.
    std::thread::sleep(Duration::from_millis(2100));
    sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
    let shadow = &sandbox.json(&["versions"], 0)[1]["shadow"];
    assert_eq!(shadow["precopied-files"], 2, "{shadow}");
    assert_eq!(shadow["files"], 1, "{shadow}");
    assert_only_base(&sandbox.path("state/shadow"));
}

/// An entry changed in the tick its version was taken in is read again next time, although its
/// ctime has not moved since: it could have changed again in that tick, after the copy, without
/// the ctime moving. Here the writer writes a file as it freezes.
#[test]
fn an_entry_changed_as_the_parent_was_taken_is_read_again() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"echo frozen >> @/root/data/app.db\"]\nthaw = [\"true\"]\n",
    );
    let args = backup_args(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = sandbox.json(&args, 0);
    assert_eq!(first["stats"]["files-read"], first["stats"]["files"], "{first}");
    std::fs::write(sandbox.path("config.toml"), DATA).unwrap();
    let second = sandbox.json(&args, 0);
    assert_eq!(second["stats"]["files-read"], 1, "only app.db, written in the first freeze, is read again: {second}");
    let third = sandbox.json(&args, 0);
    assert_eq!(third["stats"]["files-read"], 0, "{third}");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

#[test]
fn a_writer_frozen_past_its_window_is_writer_timeout_and_is_thawed() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"slowdb\"\nkind = \"command\"\nfreeze = [\"sleep\", \"3\"]\nthaw = [\"touch\", \"@/thawed\"]\nfreeze-timeout = \"500ms\"\n",
    );
    let started = Instant::now();
    let output = run_backup(&sandbox, &root);
    let stderr = expect_code(&output, "writer-timeout");
    assert_job_failed(&sandbox, "writer-timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "the freeze was not cut at its window");
    let diagnosis = assert_diagnosed(&sandbox, "writer-timeout");
    let specifics = diagnosis["specifics"].to_string();
    for needle in
        ["writer `slowdb` was frozen", "its window is 500 ms", "what took the time", "pressure then", "pressure now"]
    {
        assert!(specifics.contains(needle), "the diagnosis lacks {needle:?}: {diagnosis:#}");
    }
    for needle in ["`slowdb`", "500 ms", "frozen for", "system pressure", "load "] {
        assert!(stderr.contains(needle), "the message lacks {needle:?}: {stderr}");
    }
    assert!(sandbox.path("thawed").exists(), "the writer was not thawed");
    let state = writer_state(&sandbox, "slowdb");
    assert_eq!(state["state"], "failed-at-freeze", "{state}");
    assert!(state["last-error"].as_str().unwrap().contains("500 ms"), "{state}");
    assert_storage_empty(&sandbox);
    assert_eq!(
        sandbox.json(&["versions"], 0).as_array().map(|a| a.len()).unwrap_or(0),
        0,
        "no version from a failed set"
    );
}

fn process_writer(sandbox: &Sandbox, behaviour: &str) -> String {
    let script = sandbox.path("writer.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile read -r line; do\n  case \"$line\" in\n{behaviour}\n  esac\n  echo '{{\"result\":\"ok\"}}'\ndone\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "[[writer]]\nname = \"proc\"\nkind = \"process\"\ncommand = [\"{}\"]\nfreeze-timeout = \"5s\"\n",
        script.display()
    )
}

#[test]
fn a_process_writer_killed_mid_freeze_is_writer_not_responding() {
    let (sandbox, root) = setup("");
    let writer = process_writer(&sandbox, "    *'\"freeze\"'*) kill -9 $$ ;;");
    std::fs::write(sandbox.path("config.toml"), format!("{DATA}{writer}")).unwrap();
    let output = run_backup(&sandbox, &root);
    let stderr = expect_code(&output, "writer-not-responding");
    assert_job_failed(&sandbox, "writer-not-responding");
    assert!(stderr.contains("`proc`") && stderr.contains("freeze"), "{stderr}");
    assert_eq!(writer_state(&sandbox, "proc")["state"], "failed-at-freeze");
    assert_storage_empty(&sandbox);
}

/// What writers' programs print on stderr is in the job's log, line by line, with the writer's
/// name: a process writer's for as long as it runs, a command writer's for each command.
#[test]
fn writers_output_goes_to_the_job_log() {
    let (sandbox, root) = setup("");
    let process = process_writer(&sandbox, "    *prepare-backup*) echo 'checkpoint started' >&2 ;;");
    let command = "[[writer]]\nname = \"cmd\"\nkind = \"command\"\nfreeze = [\"/bin/sh\", \"-c\", \"echo 'tables locked' >&2\"]\n";
    std::fs::write(sandbox.path("config.toml"), format!("{DATA}{process}{command}")).unwrap();
    let output = run_backup(&sandbox, &root);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let jobs = sandbox.json(&["job", "--previous", "1"], 0);
    let log = std::fs::read_to_string(jobs[0]["log-path"].as_str().expect("the job has a log")).unwrap();
    assert!(log.contains("writer `proc`: checkpoint started"), "{log}");
    assert!(log.contains("writer `cmd`: tables locked"), "{log}");
}

/// The other classes a writer can reply with, each its own code, job error, event and diagnosis.
#[test]
fn a_process_writer_replying_each_error_class_fails_with_its_code() {
    for (class, code) in [
        ("nonretryable", "writer-nonretryable"),
        ("out-of-resources", "writer-out-of-resources"),
        ("inconsistent", "writer-inconsistent"),
    ] {
        let (sandbox, root) = setup("");
        let reply = format!(
            "    *prepare-backup*) echo '{{\"result\":\"error\",\"class\":\"{class}\",\"message\":\"the {class} condition\"}}'; continue ;;"
        );
        let writer = process_writer(&sandbox, &reply);
        std::fs::write(sandbox.path("config.toml"), format!("{DATA}{writer}")).unwrap();
        let stderr = expect_code(&run_backup(&sandbox, &root), code);
        assert!(stderr.contains(&format!("the {class} condition")), "{stderr}");
        assert_job_failed(&sandbox, code);
    }
}

#[test]
fn a_process_writer_replying_retryable_is_writer_retryable() {
    let (sandbox, root) = setup("");
    let writer = process_writer(
        &sandbox,
        "    *prepare-backup*) echo '{\"result\":\"error\",\"class\":\"retryable\",\"message\":\"database busy, checkpoint running\"}'; continue ;;",
    );
    std::fs::write(sandbox.path("config.toml"), format!("{DATA}{writer}")).unwrap();
    let stderr = expect_code(&run_backup(&sandbox, &root), "writer-retryable");
    assert_job_failed(&sandbox, "writer-retryable");
    assert!(stderr.contains("database busy, checkpoint running"), "{stderr}");
    assert_eq!(writer_state(&sandbox, "proc")["state"], "failed-at-prepare-backup");
    let json = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 2);
    assert_eq!(json["error"]["code"], "writer-retryable");
    assert_eq!(json["error"]["event-id"], 1002);
}

fn wait_for(path: &Path) {
    let until = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < until, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_shadow_set_fails_naming_the_first_and_a_dead_holder_is_taken_over() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"slow\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"touch @/frozen; sleep 4\"]\nfreeze-timeout = \"20s\"\n",
    );
    let args = backup_args(&root);
    let mut first = sandbox.command(&args.iter().map(String::as_str).collect::<Vec<_>>()).spawn().unwrap();
    wait_for(&sandbox.path("frozen"));
    let stderr = expect_code(&run_backup(&sandbox, &root), "shadow-set-in-progress");
    assert_job_failed(&sandbox, "shadow-set-in-progress");
    assert!(stderr.contains(&format!("pid {}", first.id())) && stderr.contains("backup"), "{stderr}");
    let diagnosis = assert_diagnosed(&sandbox, "shadow-set-in-progress");
    assert!(diagnosis["specifics"][0].as_str().unwrap().contains(&format!("pid {}", first.id())), "{diagnosis:#}");
    assert!(diagnosis["cause"].as_str().unwrap().contains("Another backup"), "the holder still runs: {diagnosis:#}");
    // From another process: the first backup is the running job, frozen on its writer.
    let running = sandbox.json(&["job"], 0);
    let running = running
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["pid"] == first.id())
        .cloned()
        .unwrap_or_else(|| panic!("the running job is not shown: {running}"));
    assert_eq!(running["state"], "running");
    assert_eq!(running["current-operation"], "freezing writers", "{running}");
    assert!(stderr.contains(running["id"].as_str().unwrap()), "the holder's job id is not named: {stderr}");
    // The holder dies: its lock goes with it, and the next set takes over.
    first.kill().unwrap();
    first.wait().unwrap();
    std::fs::write(sandbox.path("config.toml"), DATA).unwrap();
    let output = sandbox
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("SYSSTATE_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("took over the shadow-set lock"), "{}", text(&output.stderr));
    let warnings = sandbox.json(&["events", "--level", "warning"], 0);
    assert!(
        warnings
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == "shadow-set-in-progress" && e["message"].as_str().unwrap().contains("took over")),
        "no take-over event: {warnings}"
    );
}

#[test]
fn a_commit_past_commit_timeout_is_commit_timeout() {
    let (sandbox, root) = setup("[shadow]\ncommit-timeout = \"1s\"\n");
    let args = backup_args(&root);
    let output = sandbox
        .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "1500")
        .output()
        .unwrap();
    let stderr = expect_code(&output, "commit-timeout");
    assert_job_failed(&sandbox, "commit-timeout");
    assert!(stderr.contains("1000 ms") && stderr.contains("commit"), "{stderr}");
    let diagnosis = assert_diagnosed(&sandbox, "commit-timeout");
    assert!(
        diagnosis["specifics"][0].as_str().unwrap().contains("`shadow.commit-timeout` is 1000 ms"),
        "{diagnosis:#}"
    );
    assert_storage_empty(&sandbox);
}

/// The mount point holding `path`: shadow storage set `for` it applies to the sandbox.
fn mount_of(path: &Path) -> String {
    let output = std::process::Command::new("findmnt").args(["-n", "-o", "TARGET", "-T"]).arg(path).output().unwrap();
    text(&output.stdout).trim().to_string()
}

/// The copy before the freeze fits in shadow storage, but what a writer writes as it freezes
/// does not: the commit in the freeze stops at the limit, the writer is thawed, nothing is left
/// in storage, and the next backup (without that write) succeeds.
#[test]
fn shadow_storage_filled_during_the_freeze_is_shadow_storage_full() {
    let (sandbox, root) = setup("");
    let mount = mount_of(&root);
    let tree_bytes: u64 =
        crate::corruption::walk_files(&root.join("data")).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    let limit = tree_bytes + (1 << 20);
    let late = root.join("data/late.bin");
    let config = |freeze: &str| {
        format!(
            "{DATA}[shadow]\nprovider = \"copy\"\n\n[[shadow.storage]]\nfor = \"{mount}\"\non = \"{}\"\nmax-size = \"{limit}\"\n\n[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"{freeze}\"]\nthaw = [\"touch\", \"{}\"]\n",
            sandbox.path("storage").display(),
            sandbox.path("thawed").display(),
        )
    };
    let write_late = format!("head -c 3145728 /dev/urandom > '{}'", late.display());
    std::fs::write(sandbox.path("config.toml"), config(&write_late)).unwrap();
    let output = run_backup(&sandbox, &root);
    let stderr = expect_code(&output, "shadow-storage-full");
    assert_job_failed(&sandbox, "shadow-storage-full");
    assert_diagnosed(&sandbox, "shadow-storage-full");
    assert!(stderr.contains(&format!("{limit} bytes")), "the message does not give the limit: {stderr}");
    assert!(late.exists(), "the writer's freeze did not run");
    assert!(sandbox.path("thawed").exists(), "the writer was not thawed");
    let left: Vec<_> = std::fs::read_dir(sandbox.path("storage"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "shadow copies left behind: {left:?}");
    assert_eq!(sandbox.json(&["versions"], 0).as_array().map_or(0, |v| v.len()), 0, "no version from a failed set");
    std::fs::remove_file(&late).unwrap();
    std::fs::write(sandbox.path("config.toml"), config("true")).unwrap();
    sandbox.ok(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn a_full_shadow_storage_deletes_old_persistent_copies_first_then_fails() {
    let (sandbox, root) = setup(
        "[shadow]\nprovider = \"copy\"\n\n[[shadow.storage]]\nfor = \"/\"\non = \"@/storage\"\nmax-size = \"400KiB\"\n",
    );
    let mount = mount_of(&sandbox.path("root"));
    let config = std::fs::read_to_string(sandbox.path("config.toml"))
        .unwrap()
        .replace("for = \"/\"", &format!("for = \"{mount}\""));
    std::fs::write(
        sandbox.path("config.toml"),
        format!("{config}\n[[component]]\nname = \"small\"\npaths = [\"/small\"]\n"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("small")).unwrap();
    std::fs::write(root.join("small/file"), vec![7u8; 100 * 1024]).unwrap();
    let created = sandbox.json(&["shadows", "create", "--root", root.to_str().unwrap(), "--component", "small"], 0);
    let persistent = created["id"].as_str().unwrap().to_string();
    assert_eq!(sandbox.json(&["shadows", "list"], 0).as_array().unwrap().len(), 1);
    // The data component needs far more than 400 KiB.
    let mut rng = Rng(8);
    std::fs::write(root.join("data/big"), rng.bytes(2 << 20)).unwrap();
    let output = run_backup(&sandbox, &root);
    let stderr = expect_code(&output, "shadow-storage-full");
    assert_job_failed(&sandbox, "shadow-storage-full");
    let location = sandbox.path("storage").display().to_string();
    let diagnosis = assert_diagnosed(&sandbox, "shadow-storage-full");
    assert!(diagnosis["specifics"][0].as_str().unwrap().contains(&location), "{diagnosis:#}");
    assert!(
        diagnosis["resolution"]
            .as_str()
            .unwrap()
            .starts_with(&format!("sysstate shadowstorage resize --for {mount} --on {location} --max-size ")),
        "the limit, not the volume, is too small here: {diagnosis:#}"
    );
    for needle in [mount.as_str(), location.as_str(), "400.0 KiB (409600 bytes)", "needed", "shadowstorage resize"] {
        assert!(stderr.contains(needle), "the message lacks {needle:?}: {stderr}");
    }
    // Sizes read as sizes; the error and the doctor recommend one and the same resize.
    assert!(stderr.contains(" MiB needed") || stderr.contains(" KiB needed"), "{stderr}");
    assert!(stderr.contains(diagnosis["resolution"].as_str().unwrap()), "two recommendations: {stderr}\n{diagnosis:#}");
    assert!(
        stderr.contains("shadow-storage-oldest-deleted") && stderr.contains(&persistent),
        "the older copy was not deleted first, or not said: {stderr}"
    );
    let warnings = sandbox.json(&["events", "--level", "warning", "--source", "shadow"], 0);
    assert!(
        warnings.as_array().unwrap().iter().any(|e| e["code"] == "shadow-storage-oldest-deleted"
            && e["event-id"] == 1013
            && e["message"].as_str().unwrap().contains(&persistent)),
        "no shadow-storage-oldest-deleted event naming {persistent}: {warnings}"
    );
    assert_eq!(sandbox.json(&["shadows", "list"], 0).as_array().unwrap().len(), 0, "partial copy left behind");
    // Raising the limit makes it work.
    let storage = sandbox.path("storage").display().to_string();
    sandbox.ok(&["shadowstorage", "resize", "--for", &mount, "--on", &storage, "--max-size", "64MiB"]);
    sandbox.ok(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn sigterm_during_the_freeze_thaws_the_writers() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"touch\", \"@/frozen\"]\nthaw = [\"touch\", \"@/thawed\"]\nfreeze-timeout = \"60s\"\n",
    );
    let args = backup_args(&root);
    // The commit takes 3 s, so the writer stays frozen while the signal arrives.
    let mut child = backup_held_in_commit(&sandbox, &root, 3000);
    wait_for(&sandbox.path("frozen"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!sandbox.path("thawed").exists());
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::Term).unwrap();
    // Thawed at once, not after the commit's 3 s.
    let signalled = Instant::now();
    wait_for(&sandbox.path("thawed"));
    assert!(signalled.elapsed() < Duration::from_millis(2500), "thawed only after {:?}", signalled.elapsed());
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_job_failed(&sandbox, "cancelled");
    assert_eq!(sandbox.json(&["job", "--previous", "1"], 0)[0]["state"], "cancelled");
    assert_storage_empty(&sandbox);
    // The lock is free again.
    std::fs::write(sandbox.path("config.toml"), DATA).unwrap();
    sandbox.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A filesystem on a loop device, mounted; unmounted and detached on drop.
pub(crate) struct LoopFs {
    mount: std::path::PathBuf,
    device: String,
}

impl LoopFs {
    fn new(dir: &Path, kind: &str) -> LoopFs {
        LoopFs::sized(dir, kind, 512 << 20, &[])
    }

    /// A filesystem of `bytes` (a sparse image), made with `mkfs_args` added.
    fn sized(dir: &Path, kind: &str, bytes: u64, mkfs_args: &[&str]) -> LoopFs {
        let image = dir.join(format!("{kind}.img"));
        let mount = dir.join(format!("{kind}-mnt"));
        std::fs::create_dir_all(&mount).unwrap();
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(bytes).unwrap();
        let run = |program: &str, args: &[&str]| {
            let output = std::process::Command::new(program).args(args).output().unwrap();
            assert!(output.status.success(), "{program} {args:?}: {}", text(&output.stderr));
            text(&output.stdout).trim().to_string()
        };
        let device = run("losetup", &["-f", "--show", image.to_str().unwrap()]);
        let mut args: Vec<&str> = match kind {
            "xfs" => vec!["-q", "-f", "-m", "reflink=1"],
            "ext4" => vec!["-q", "-F"],
            _ => vec!["-q", "-f"],
        };
        args.extend_from_slice(mkfs_args);
        args.push(&device);
        run(&format!("mkfs.{kind}"), &args);
        run("mount", &[&device, mount.to_str().unwrap()]);
        LoopFs { mount, device }
    }
}

/// `from` bind-mounted at `at`; unmounted on drop.
impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mount).status();
        let _ = std::process::Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn reflink_provider_on_xfs_and_btrfs_and_copy_on_ext4_loop_devices() {
    if !require(
        "root and loop devices (mkfs.xfs, mkfs.btrfs, mkfs.ext4)",
        is_root() && Path::new("/dev/loop-control").exists(),
    ) {
        return;
    }
    // `auto` on ext4 copies; the record must say so, also when the refresh kept every file.
    for (kind, provider) in [("xfs", "reflink"), ("btrfs", "reflink"), ("ext4", "auto")] {
        let sandbox = Sandbox::new();
        let fs = LoopFs::new(sandbox.dir.path(), kind);
        let root = fs.mount.join("root");
        make_tree(&root.join("data"), 400, 41);
        let storage = fs.mount.join("shadow");
        std::fs::write(
            sandbox.path("config.toml"),
            format!("{DATA}[shadow]\nprovider = \"{provider}\"\n\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n\n[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"true\"]\nthaw = [\"true\"]\n", fs.mount.display(), storage.display()),
        )
        .unwrap();
        let expected = if kind == "ext4" { "copy" } else { "reflink" };
        let report = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
        let data_bytes = report["stats"]["bytes-total"].as_u64().unwrap();
        sandbox.ok(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>());
        let versions = sandbox.json(&["versions"], 0);
        for shadow in [&versions[0]["shadow"], &versions[1]["shadow"]] {
            let providers: Vec<&str> =
                shadow["providers"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(providers, [expected], "{kind}: {shadow}");
            eprintln!(
                "{kind} {expected}: {} files, {} bytes: freeze window {} ms, commit {} ms",
                report["stats"]["files"], data_bytes, shadow["freeze-window-ms"], shadow["commit-ms"]
            );
        }
        // Reflinked extents are shared: the copy allocated almost nothing.
        let shadow = &versions[0]["shadow"];
        if expected == "reflink" {
            assert!(
                shadow["bytes"].as_u64().unwrap() < data_bytes / 4,
                "{kind}: the reflink copy took {} of {data_bytes} bytes",
                shadow["bytes"]
            );
        }
        let to = sandbox.path("restored");
        sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
        assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
        assert_only_base(&storage);
    }
}

/// A fake root with the files of the `packages` and `accounts` components.
fn system_root(sandbox: &Sandbox) -> std::path::PathBuf {
    let root = sandbox.path("sysroot");
    for (path, content) in [
        ("var/lib/dpkg/status", "Package: base-files\n"),
        ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ("etc/shadow", "root:*:1::::::\n"),
        ("etc/group", "root:x:0:\n"),
    ] {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    root
}

/// Starts a process that holds a POSIX write lock on `file` (as apt or passwd would).
fn hold_lock(sandbox: &Sandbox, file: &Path) -> std::process::Child {
    let ready = sandbox.path("lock-ready");
    let child = std::process::Command::new("python3")
        .args(["-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n"])
        .arg(file)
        .arg(&ready)
        .spawn()
        .unwrap();
    wait_for(&ready);
    child
}

/// Tries to take a POSIX write lock on `file` without waiting: true when it was free.
fn lock_is_free(file: &Path) -> bool {
    let output = std::process::Command::new("python3")
        .args(["-c", "import fcntl, sys\nf = open(sys.argv[1], 'a')\ntry:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\nexcept OSError:\n    print('busy')\n"])
        .arg(file)
        .output()
        .unwrap();
    text(&output.stdout).trim() == "free"
}

#[test]
fn the_dpkg_writer_waits_for_apt_then_names_it() {
    let sandbox = Sandbox::new();
    let root = system_root(&sandbox);
    std::fs::write(
        sandbox.path("config.toml"),
        "[[writer]]\nname = \"dpkg\"\nkind = \"dpkg\"\nprepare-timeout = \"1s\"\n",
    )
    .unwrap();
    let mut apt = hold_lock(&sandbox, &root.join("var/lib/dpkg/lock-frontend"));
    let started = Instant::now();
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "packages"]);
    let stderr = expect_code(&output, "writer-retryable");
    assert_job_failed(&sandbox, "writer-retryable");
    assert!(started.elapsed() >= Duration::from_secs(1), "did not wait for the holder");
    for needle in ["lock-frontend", &format!("pid {}", apt.id()), "python3", "waited"] {
        assert!(stderr.contains(needle), "the message lacks {needle:?}: {stderr}");
    }
    apt.kill().unwrap();
    apt.wait().unwrap();
    sandbox.ok(&["backup", "--root", root.to_str().unwrap(), "--component", "packages"]);
}

#[test]
fn the_built_in_accounts_writer_holds_the_shadow_lock_during_the_freeze() {
    let sandbox = Sandbox::new();
    let root = system_root(&sandbox);
    let lock = root.join("etc/.pwd.lock");
    let mut backup = sandbox
        .command(&["backup", "--root", root.to_str().unwrap(), "--component", "accounts"])
        .env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "2000")
        .spawn()
        .unwrap();
    // While the copy is being made, nobody else can take the lock that passwd and useradd take.
    wait_for(&lock);
    let until = Instant::now() + Duration::from_secs(5);
    while lock_is_free(&lock) {
        assert!(Instant::now() < until, "the accounts writer never took /etc/.pwd.lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(backup.wait().unwrap().success());
    assert!(lock_is_free(&lock), "the lock was not released after the backup");
    let versions = sandbox.json(&["versions"], 0);
    let writers: Vec<&str> =
        versions[0]["shadow"]["writers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(writers, ["accounts"]);
}

/// Starts `echo > file` on a filesystem; returns the child (it blocks while the fs is frozen).
fn start_write(file: &Path) -> std::process::Child {
    std::process::Command::new("sh").arg("-c").arg(format!("echo written > '{}'", file.display())).spawn().unwrap()
}

#[test]
fn fsfreeze_blocks_writes_during_the_freeze_and_the_watchdog_thaws_at_the_window() {
    if !require("root and loop devices (FIFREEZE on XFS)", is_root() && Path::new("/dev/loop-control").exists()) {
        return;
    }
    let sandbox = Sandbox::new();
    let fs = LoopFs::new(sandbox.dir.path(), "xfs");
    let root = fs.mount.join("root");
    make_tree(&root.join("data"), 30, 51);
    let config = |window: &str| {
        format!("{DATA}[[writer]]\nname = \"xfs\"\nkind = \"fsfreeze\"\nmount-points = [\"{}\"]\nfreeze-timeout = \"{window}\"\n", fs.mount.display())
    };
    let args = backup_args(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // 1. A write during the freeze waits for the thaw.
    std::fs::write(sandbox.path("config.toml"), config("30s")).unwrap();
    let mut backup = sandbox.command(&args).env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "1500").spawn().unwrap();
    let states = sandbox.path("run/writers.json");
    let until = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&states).unwrap_or_default().contains("waiting-for-thaw") {
        assert!(Instant::now() < until, "the writer never froze");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Another process sees the writer frozen, like `vssadmin list writers` during a backup.
    assert_eq!(writer_state(&sandbox, "xfs")["state"], "waiting-for-thaw");
    let mut write = start_write(&fs.mount.join("during-freeze"));
    std::thread::sleep(Duration::from_millis(400));
    assert!(write.try_wait().unwrap().is_none(), "a write went through while the filesystem was frozen");
    assert!(backup.wait().unwrap().success());
    assert!(write.wait().unwrap().success(), "the write did not complete after the thaw");

    // 2. The watchdog thaws at the window, while the commit is still running.
    std::fs::write(sandbox.path("config.toml"), config("500ms")).unwrap();
    let started = Instant::now();
    let backup = sandbox
        .command(&args)
        .env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "3000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut write = start_write(&fs.mount.join("during-window"));
    assert!(write.wait().unwrap().success());
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "thawed only after {:?}: the watchdog did not act",
        started.elapsed()
    );
    let output = backup.wait_with_output().unwrap();
    expect_code(&output, "writer-timeout");

    // 3. sysstate never freezes a filesystem it writes to itself.
    std::fs::write(sandbox.path("config.toml"), config("30s")).unwrap();
    let output = sandbox.command(&args).env("SYSSTATE_STATE_DIR", fs.mount.join("state")).output().unwrap();
    let stderr = expect_code(&output, "writer-nonretryable");
    assert!(stderr.contains("refusing to freeze") && stderr.contains("state directory"), "{stderr}");
}

#[test]
fn btrfs_provider_takes_a_read_only_snapshot_and_auto_chooses_it() {
    if !require("root and loop devices (mkfs.btrfs, btrfs-progs)", is_root() && Path::new("/dev/loop-control").exists())
    {
        return;
    }
    let sandbox = Sandbox::new();
    let fs = LoopFs::new(sandbox.dir.path(), "btrfs");
    let root = fs.mount.join("root");
    make_tree(&root.join("data"), 300, 61);
    let storage = fs.mount.join("shadow");
    for provider in ["btrfs", "auto"] {
        std::fs::write(
            sandbox.path("config.toml"),
            format!("{DATA}[shadow]\nprovider = \"{provider}\"\n\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n\n[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"true\"]\nthaw = [\"true\"]\n", fs.mount.display(), storage.display()),
        )
        .unwrap();
        let report = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
        let versions = sandbox.json(&["versions"], 0);
        let shadow = &versions.as_array().unwrap().last().unwrap()["shadow"];
        let providers: Vec<&str> =
            shadow["providers"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(providers, ["btrfs"], "{provider}: {shadow}");
        eprintln!(
            "btrfs snapshot ({provider}): {} files: freeze window {} ms, commit {} ms",
            report["stats"]["files"], shadow["freeze-window-ms"], shadow["commit-ms"]
        );
        assert_eq!(std::fs::read_dir(&storage).unwrap().count(), 0, "the snapshot was not deleted");
    }
    // The snapshot keeps inodes and ctimes and the device is mapped back: nothing was read twice.
    let versions = sandbox.json(&["versions"], 0);
    assert_eq!(versions[1]["stats"]["files-read"], 0, "{}", versions[1]["stats"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

/// A root with a small `/etc`, and a second volume (a new `kind` filesystem) mounted at its
/// `/vol`: a data volume under a root on another filesystem.
pub(crate) fn root_with_volume(sandbox: &Sandbox, kind: &str, seed: u64) -> (std::path::PathBuf, LoopFs, BindMount) {
    let root = sandbox.path("root");
    make_tree(&root.join("etc"), 20, seed);
    std::fs::create_dir_all(root.join("vol")).unwrap();
    let fs = LoopFs::new(sandbox.dir.path(), kind);
    let bind = BindMount::new(&fs.mount, &root.join("vol"));
    (root, fs, bind)
}

#[test]
fn each_volume_copies_into_its_own_shadow_storage() {
    if !require("root and loop devices (a second volume on XFS)", is_root() && Path::new("/dev/loop-control").exists())
    {
        return;
    }
    let sandbox = Sandbox::new();
    let (root, _fs, _bind) = root_with_volume(&sandbox, "xfs", 71);
    make_tree(&root.join("vol/data"), 40, 72);
    let volume = root.join("vol");
    let storage = volume.join("shadow");
    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "[[component]]\nname = \"etc\"\npaths = [\"/etc\"]\n\n[[component]]\nname = \"vol\"\npaths = [\"/vol\"]\n\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n",
            volume.display(),
            storage.display()
        ),
    )
    .unwrap();
    let args = ["backup", "--root", root.to_str().unwrap(), "--component", "etc", "--component", "vol"];
    sandbox.ok(&args);
    // The root volume's copy is in the default storage, the second volume's in its own, which
    // the copy does not contain.
    let own: serde_json::Value =
        serde_json::from_slice(&std::fs::read(storage.join("base/meta.json")).unwrap()).unwrap();
    assert_eq!(own["for-volume"], volume.display().to_string());
    assert_eq!(own["provider"], "reflink", "{own}");
    assert!(storage.join("base/tree/vol/data").is_dir());
    assert!(!storage.join("base/tree/vol/shadow").exists(), "the storage copied itself");
    assert!(sandbox.path("state/shadow/base/tree/etc").is_dir());
    assert!(
        !sandbox.path("state/shadow/base/tree/vol/data").exists(),
        "the second volume went to the root volume's storage"
    );
    let versions = sandbox.json(&["versions"], 0);
    let providers: Vec<&str> =
        versions[0]["shadow"]["providers"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(providers.contains(&"reflink") && providers.contains(&"copy"), "{providers:?}");
    // The version's record names each volume's copy and where it was, not only the root's.
    let copies: Vec<(String, String)> = versions[0]["shadow"]["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["for"].as_str().unwrap().to_string(), c["on"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(copies.len(), 2, "{}", versions[0]["shadow"]);
    assert!(
        copies.contains(&(volume.display().to_string(), storage.display().to_string())),
        "the second volume's copy is not named: {copies:?}"
    );
    assert_eq!(copies[0].1, versions[0]["shadow"]["storage"].as_str().unwrap(), "the root volume's first");
    // Nothing is read twice, and both volumes restore whole; the storage is not in the version.
    let again = sandbox.json(&args, 0);
    assert_eq!(again["stats"]["files-read"], 0, "{again}");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("etc")), &snapshot(&to.join("etc")));
    assert_same(&snapshot(&root.join("vol/data")), &snapshot(&to.join("vol/data")));
    assert!(!to.join("vol/shadow").exists(), "shadow storage was backed up");
}

#[test]
fn persistent_copies_are_listed_deleted_and_pushed_out_by_a_smaller_storage() {
    let (sandbox, root) = setup("[shadow]\nprovider = \"copy\"\n");
    let args = ["shadows", "create", "--root", root.to_str().unwrap(), "--component", "data"];
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let created = sandbox.json(&args, 0);
            std::thread::sleep(Duration::from_millis(20));
            created["id"].as_str().unwrap().to_string()
        })
        .collect();
    let list = sandbox.json(&["shadows", "list"], 0);
    let listed: Vec<&str> = list.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>(), "oldest first");
    assert!(list.as_array().unwrap().iter().all(|c| c["persistent"] == true && c["bytes"].as_u64().unwrap() > 0));
    // The copy holds the files, as they were.
    let storage = sandbox.path("state/shadow");
    assert_same(&snapshot(&root.join("data")), &snapshot(&storage.join(&ids[0]).join("tree/data")));

    sandbox.ok(&["shadows", "delete", "--oldest"]);
    sandbox.ok(&["shadows", "delete", "--id", &ids[2][..6]]);
    let left: Vec<String> = sandbox
        .json(&["shadows", "list"], 0)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, [ids[1].clone()]);
    assert!(!storage.join(&ids[0]).exists() && !storage.join(&ids[2]).exists());

    // Shrinking the storage below what is used deletes the oldest copies that no longer fit.
    let mount = std::process::Command::new("findmnt").args(["-n", "-o", "TARGET", "-T"]).arg(&root).output().unwrap();
    let mount = text(&mount.stdout).trim().to_string();
    let output = sandbox.run(&[
        "shadowstorage",
        "resize",
        "--for",
        &mount,
        "--on",
        storage.to_str().unwrap(),
        "--max-size",
        "1KiB",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("shadow-storage-oldest-deleted") && text(&output.stderr).contains(&ids[1]),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(sandbox.json(&["shadows", "list"], 0).as_array().unwrap().len(), 0);
    // The deletion is an event, and the doctor explains it.
    let report: serde_json::Value =
        serde_json::from_slice(&sandbox.run(&["doctor", "--no-validate", "--json"]).stdout).unwrap();
    let notice = report["notices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["code"] == "shadow-storage-oldest-deleted")
        .unwrap_or_else(|| panic!("no notice of the deleted copy: {report:#}"));
    assert!(notice["specifics"][0].as_str().unwrap().contains(&ids[1]), "{notice:#}");
    assert!(notice["cause"].as_str().unwrap().contains("older persistent copies"), "{notice:#}");
    let areas = sandbox.json(&["shadowstorage", "list"], 0);
    assert!(
        areas.as_array().unwrap().iter().any(|a| a["on"] == storage.to_str().unwrap() && a["max-bytes"] == 1024),
        "{areas}"
    );
    sandbox.ok(&["shadows", "delete", "--all"]);
}

/// What changes after the freeze stays out of the version. The walk takes an entry from the
/// live tree when it is untouched since the parent version, and from the copy otherwise; from a
/// btrfs snapshot it reads a file's content from the live file when that still has the
/// snapshot's inode, ctime and size. Here the writer's thaw changes, adds, removes,
/// re-permissions and sets extended attributes on entries (some untouched since the parent, some changed before the freeze too)
/// between the commit and the walk, on the first backup and on the next, and each version must
/// equal the tree as it was in the freeze — with the copy provider and with a btrfs snapshot.
#[test]
fn changes_after_the_freeze_stay_out_of_the_version() {
    let btrfs = require("root and loop devices (mkfs.btrfs)", is_root() && Path::new("/dev/loop-control").exists());
    for provider in ["copy", "btrfs"] {
        if provider == "btrfs" && !btrfs {
            continue;
        }
        let sandbox = Sandbox::new();
        let fs = (provider == "btrfs").then(|| LoopFs::new(sandbox.dir.path(), "btrfs"));
        let base = fs.as_ref().map_or(sandbox.dir.path().to_path_buf(), |fs| fs.mount.clone());
        let root = base.join("root");
        let data = root.join("data");
        make_tree(&data, 60, 81);
        std::fs::write(data.join("same-size-0"), "0123456789").unwrap();
        std::fs::write(data.join("same-size-1"), "0123456789").unwrap();
        let at_freeze = sandbox.path("at-freeze");
        // Each round's thaw changes entries the earlier rounds left alone, so that on the second
        // backup they are untouched since the parent until the thaw: a chmod moves only the
        // ctime, a same-size overwrite the ctime and the mtime.
        let after_thaw = |round: usize| {
            let (rewritten, chmodded, xattred) =
                [("d0/e0/f0.bin", "d2/e2/f2.bin", "d6/e0/f6.bin"), ("d5/e2/f5.bin", "d4/e1/f4.bin", "d6/e1/f13.bin")]
                    [round];
            [
                format!("echo after > '{}'", data.join(rewritten).display()),
                format!("printf ABCDEFGHIJ > '{}'", data.join(format!("same-size-{round}")).display()),
                format!("echo after > '{}'", data.join("changed").display()),
                format!("echo new > '{}'", data.join("new-after-thaw").display()),
                format!("rm -rf '{}'", data.join(format!("d{}", round + 1)).display()),
                format!("chmod 600 '{}'", data.join(chmodded).display()),
                format!("setfattr -n user.after -v thaw '{}'", data.join(xattred).display()),
                format!("mkdir -p '{}'", data.join("d3/dir-after-thaw").display()),
            ]
            .join("; ")
        };
        let storage = match &fs {
            Some(fs) => format!(
                "[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n",
                fs.mount.display(),
                fs.mount.join("shadow").display()
            ),
            None => String::new(),
        };
        let config = |round: usize| {
            format!(
                "{DATA}[shadow]\nprovider = \"{provider}\"\n{storage}[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"sh\", \"-c\", \"rm -rf '{0}'; cp -a '{1}' '{0}'\"]\nthaw = [\"sh\", \"-c\", \"{2}\"]\n",
                at_freeze.display(),
                data.display(),
                after_thaw(round)
            )
        };
        for round in 0..2 {
            // Changed before the freeze (and again after the thaw); the rest settles, so that
            // the snapshot's files are read from their live twins where those are unchanged.
            std::fs::write(data.join("changed"), format!("before freeze {round}\n")).unwrap();
            std::fs::write(sandbox.path("config.toml"), config(round)).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let report = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
            assert_eq!(std::fs::read_to_string(data.join("changed")).unwrap(), "after\n", "the thaw did not run");
            let providers = sandbox.json(&["versions"], 0)[round]["shadow"]["providers"].to_string();
            assert!(providers.contains(provider), "{provider}: {providers}");
            let to = sandbox.path(&format!("restored-{round}"));
            sandbox.ok(&["restore", "--to", to.to_str().unwrap(), "--version", report["version"].as_str().unwrap()]);
            let restored = std::fs::read_to_string(to.join("data/changed")).unwrap();
            assert_eq!(restored, format!("before freeze {round}\n"), "{provider}, backup {round}");
            assert_same(&snapshot(&at_freeze), &snapshot(&to.join("data")));
        }
    }
}

/// A component on another volume, below a plain folder or a btrfs subvolume of it, on btrfs, XFS
/// and ext4, with and without shadow storage of its own: every file is in the version. (The
/// folders above it were looked up in the root volume's copy, which held none of them: every
/// backup saved 0 files and said it succeeded.)
#[test]
fn a_component_on_another_volume_below_a_folder_is_backed_up_whole() {
    if !require(
        "root and loop devices (mkfs.btrfs, mkfs.xfs, mkfs.ext4)",
        is_root() && Path::new("/dev/loop-control").exists(),
    ) {
        return;
    }
    let cases = [
        ("btrfs", "small", true),
        ("btrfs", "small", false),
        ("btrfs", "subvolume/small", true),
        ("btrfs", "subvolume/small", false),
        ("xfs", "small", true),
        ("xfs", "small", false),
        ("ext4", "small", true),
        ("ext4", "small", false),
    ];
    for (kind, below, own_storage) in cases {
        let sandbox = Sandbox::new();
        let root = sandbox.path("root");
        std::fs::create_dir_all(root.join("vol")).unwrap();
        let fs = LoopFs::new(sandbox.dir.path(), kind);
        let _bind = BindMount::new(&fs.mount, &root.join("vol"));
        if below.starts_with("subvolume") {
            let made = std::process::Command::new("btrfs")
                .args(["subvolume", "create"])
                .arg(root.join("vol/subvolume"))
                .output()
                .unwrap();
            assert!(made.status.success(), "{}", text(&made.stderr));
        }
        let small = root.join("vol").join(below);
        make_tree(&small, 294, 15);
        let files = snapshot(&small).values().filter(|e| e.kind == "file").count();
        let mut config = format!("[[component]]\nname = \"small\"\npaths = [\"/vol/{below}\"]\n");
        if own_storage {
            config.push_str(&format!(
                "\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n",
                root.join("vol").display(),
                root.join("vol/shadow").display()
            ));
        }
        std::fs::write(sandbox.path("config.toml"), config).unwrap();
        let report = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "small"], 0);
        assert_eq!(report["stats"]["files"], files, "{kind} /vol/{below}, own storage {own_storage}: {report}");
        let to = sandbox.path("restored");
        sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
        assert_same(&snapshot(&small), &snapshot(&to.join("vol").join(below)));
    }
}

/// A backup killed outright (SIGKILL) while its writer is frozen: nothing thaws it then. The next
/// command that takes the shadow-set lock — here `sysstate shadows recover`, and then a backup —
/// runs its thaw and abort, deletes the dead set's copies, and says so in an event.
#[test]
fn a_set_killed_outright_is_recovered_by_the_next_one() {
    let (sandbox, root) = setup(
        "[[writer]]\nname = \"app\"\nkind = \"command\"\nfreeze = [\"touch\", \"@/frozen\"]\nthaw = [\"touch\", \"@/thawed\"]\nabort = [\"touch\", \"@/aborted\"]\nfreeze-timeout = \"60s\"\n",
    );
    let args = backup_args(&root);
    let mut child = backup_held_in_commit(&sandbox, &root, 30000);
    wait_for(&sandbox.path("frozen"));
    signal(&mut child, rustix::process::Signal::Kill);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!sandbox.path("thawed").exists(), "nothing can thaw after SIGKILL");
    let state = writer_state(&sandbox, "app")["state"].clone();
    assert!(state == "freezing" || state == "waiting-for-thaw", "{state}");

    let recovered = sandbox.json(&["shadows", "recover"], 0);
    assert_eq!(recovered["recovered"], true, "{recovered}");
    assert_eq!(recovered["thawed"], serde_json::json!(["app"]), "{recovered}");
    assert!(sandbox.path("thawed").exists() && sandbox.path("aborted").exists());
    assert_eq!(writer_state(&sandbox, "app")["state"], "stable");
    assert_storage_empty(&sandbox);
    assert_eq!(sandbox.json(&["shadows", "recover"], 0)["recovered"], false, "recovered twice");
    // The killed job's own record says what became of what it left, and who did it.
    let killed = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    let message = killed["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("is gone")
            && message.contains("`sysstate shadows recover` recovered")
            && message.contains("app"),
        "the killed job is not told: {killed:#}"
    );

    // The same by a backup that finds the dead set's lock.
    for marker in ["frozen", "thawed", "aborted"] {
        std::fs::remove_file(sandbox.path(marker)).unwrap();
    }
    let mut child = backup_held_in_commit(&sandbox, &root, 30000);
    wait_for(&sandbox.path("frozen"));
    signal(&mut child, rustix::process::Signal::Kill);
    std::fs::remove_file(sandbox.path("frozen")).unwrap();
    let output = sandbox.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(sandbox.path("aborted").exists(), "the dead set's writer was not aborted");
    // The warning on stderr, which is not a terminal here, has no colour codes.
    let stderr = text(&output.stderr);
    assert!(stderr.contains("took over the shadow-set lock") && !stderr.contains('\x1b'), "{stderr:?}");
    let warnings = sandbox.json(&["events", "--level", "warning", "--source", "shadow"], 0);
    assert!(
        warnings.as_array().unwrap().iter().any(|e| e["code"] == "shadow-set-in-progress"
            && e["message"].as_str().unwrap().contains("thawed and aborted writer(s) app")),
        "no event says what was recovered: {warnings}"
    );
    let jobs = sandbox.json(&["job", "--previous", "2"], 0);
    let (recovering, killed) = (&jobs[0], &jobs[1]);
    let message = killed["error"]["message"].as_str().unwrap_or_default();
    let by = format!("job {} recovered", recovering["id"].as_str().unwrap());
    assert!(message.contains(&by) && message.contains("app"), "the killed job is not told by {by}: {jobs:#}");
}

/// The `fsfreeze` writer's filesystem is thawed at the end of its window even when the backup is
/// killed outright: a guardian process outlives it.
#[test]
fn a_filesystem_frozen_by_a_backup_killed_outright_is_thawed_by_its_guardian() {
    if !require("root and loop devices (mkfs.xfs)", is_root() && Path::new("/dev/loop-control").exists()) {
        return;
    }
    let sandbox = Sandbox::new();
    let fs = LoopFs::new(sandbox.dir.path(), "xfs");
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 33);
    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "{DATA}[[writer]]\nname = \"freezer\"\nkind = \"fsfreeze\"\nmount-points = [\"{}\"]\nfreeze-timeout = \"2s\"\n",
            fs.mount.display()
        ),
    )
    .unwrap();
    let mut child = backup_held_in_commit(&sandbox, &root, 30000);
    // Frozen: a write blocks. Wait for the writer's state to say so.
    let until = Instant::now() + Duration::from_secs(20);
    while writer_state(&sandbox, "freezer")["state"] != "waiting-for-thaw" {
        assert!(Instant::now() < until, "the writer never froze");
        std::thread::sleep(Duration::from_millis(20));
    }
    let frozen_at = Instant::now();
    signal(&mut child, rustix::process::Signal::Kill);
    // A write completes once the guardian thaws: within the 2 s window plus a second.
    let probe = fs.mount.join("probe");
    let writer = std::thread::spawn(move || std::fs::write(probe, b"written"));
    while !writer.is_finished() {
        if frozen_at.elapsed() > Duration::from_secs(3) {
            // Thaw by hand so that the test does not hang, then fail.
            let _ = std::process::Command::new("fsfreeze").arg("--unfreeze").arg(&fs.mount).status();
            panic!("the filesystem was still frozen 3 s after the freeze (window 2 s)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    writer.join().unwrap().unwrap();
    // The next command cleans up the dead set and finds the filesystem thawed.
    sandbox.json(&["shadows", "recover"], 0);
    assert_eq!(writer_state(&sandbox, "freezer")["state"], "stable");
}

/// A set that fails after a good base copy exists (here its commit runs past
/// `shadow.commit-timeout`) keeps that base: the next backup refreshes it instead of creating
/// every file again, and its version restores whole.
#[test]
fn a_failed_set_keeps_a_good_base_copy() {
    let (sandbox, root) = setup("[shadow]\nprovider = \"copy\"\ncommit-timeout = \"1s\"\n");
    let args = backup_args(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sandbox.ok(&args);
    let base = sandbox.path("state/shadow/base");
    assert!(base.join("origins.json").is_file());
    std::fs::write(root.join("data/changed"), b"after the first backup").unwrap();
    let output = sandbox.command(&args).env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "1500").output().unwrap();
    expect_code(&output, "commit-timeout");
    assert!(base.join("origins.json").is_file() && base.join("tree/data").is_dir(), "the good base was deleted");
    let report = sandbox.json(&args, 0);
    assert!(report["stats"]["files"].as_u64().unwrap() > 20, "{report}");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

/// ext4 with the default provider (`auto`: a copy) and commit timeout: a 50,000-file component
/// backed up right after another tree of that size was deleted on the same filesystem (ext4
/// creates files slowly just after many were deleted: the copy before the freeze took longer
/// than the commit timeout, was thrown away, and the freeze then had to copy everything), then a
/// set failed on purpose, then backed up again: every backup that should succeed does.
#[test]
fn the_copy_provider_holds_up_on_ext4_with_fifty_thousand_files() {
    if !require("root and loop devices (mkfs.ext4)", is_root() && Path::new("/dev/loop-control").exists()) {
        return;
    }
    let sandbox = Sandbox::new();
    let fs = LoopFs::sized(sandbox.dir.path(), "ext4", 4 << 30, &["-N", "400000"]);
    let many = |dir: &Path, count: usize| {
        for i in 0..count {
            let sub = dir.join(format!("d{}", i % 200));
            if i < 200 {
                std::fs::create_dir_all(&sub).unwrap();
            }
            std::fs::write(sub.join(format!("f{i}")), format!("file {i}\n")).unwrap();
        }
    };
    many(&fs.mount.join("other"), 50_000);
    std::fs::remove_dir_all(fs.mount.join("other")).unwrap();
    let root = fs.mount.join("root");
    many(&root.join("data"), 50_000);
    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "{DATA}\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n",
            fs.mount.display(),
            fs.mount.join("shadow").display()
        ),
    )
    .unwrap();
    let args = backup_args(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = sandbox.json(&args, 0);
    assert_eq!(first["stats"]["files"], 50_000, "{first}");
    // A set that fails on purpose: its commit runs past the 10 s default.
    let output = sandbox.command(&args).env("SYSSTATE_FAILPOINT_COMMIT_DELAY_MS", "11000").output().unwrap();
    expect_code(&output, "commit-timeout");
    let again = sandbox.json(&args, 0);
    assert_eq!(again["stats"]["files"], 50_000, "{again}");
    let versions = sandbox.json(&["versions"], 0);
    let shadow = &versions.as_array().unwrap().last().unwrap()["shadow"];
    // The work in the freeze follows what changed, not the 50,000 files that did not: the
    // commit looks only at the folders the change journal named.
    let copy = &shadow["copies"][0];
    assert_eq!(copy["read"], "journal", "{shadow:#}");
    assert!(copy["dirs-looked-at"].as_u64().unwrap() <= 2, "{shadow:#}");
    assert!(shadow["files"].as_u64().unwrap() <= 2, "{shadow:#}");
    eprintln!(
        "ext4, 50,000 files: first backup {} ms; after the failed set: freeze window {} ms, commit {} ms, copy before the freeze {} ms",
        first["stats"]["duration-ms"], shadow["freeze-window-ms"], shadow["commit-ms"], shadow["precopy-ms"]
    );
}

/// The copy before the freeze is not bound by `shadow.commit-timeout`, which is the freeze's
/// limit: a first copy longer than it used to be thrown away, leaving the freeze to copy
/// everything, which then failed the commit too.
#[test]
fn the_copy_before_the_freeze_may_take_longer_than_the_commit_timeout() {
    // The commit of 15,000 files took 386 ms alone here and 1,036 ms once with the whole suite
    // running beside it on two cores (past a 1 s timeout). With 20,000 files and 2 s: a commit
    // of 516 ms alone, the copy before the freeze 11.6 s, on the same machine.
    let (sandbox, root) = setup("[shadow]\nprovider = \"copy\"\ncommit-timeout = \"2s\"\n");
    for i in 0..20_000 {
        let sub = root.join(format!("data/many/d{}", i % 100));
        if i < 100 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(sub.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    // Settled: a file changed in the last two seconds is copied again in the freeze.
    std::thread::sleep(Duration::from_millis(2500));
    let report = sandbox.json(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>(), 0);
    let versions = sandbox.json(&["versions"], 0);
    let shadow = &versions[0]["shadow"];
    eprintln!("20,000 files: copy before the freeze {} ms, commit {} ms", shadow["precopy-ms"], shadow["commit-ms"]);
    assert!(report["stats"]["files"].as_u64().unwrap() > 20_000, "{report}");
}

#[test]
fn writers_lists_the_built_in_writers_and_a_configured_one_replaces_its_namesake() {
    let sandbox = Sandbox::new();
    let writers = sandbox.json(&["writers"], 0);
    let names: Vec<(&str, bool)> =
        writers.as_array().unwrap().iter().map(|w| (w["name"].as_str().unwrap(), w["built-in"] == true)).collect();
    assert_eq!(names, [("dpkg", true), ("accounts", true)], "{writers:#}");
    let output = sandbox.ok(&["writers"]);
    assert!(text(&output.stdout).contains("writer `dpkg` (dpkg, built in) for packages"), "{}", text(&output.stdout));
    std::fs::write(
        sandbox.path("config.toml"),
        "[[writer]]\nname = \"accounts\"\nkind = \"command\"\nfreeze = [\"true\"]\n",
    )
    .unwrap();
    let writers = sandbox.json(&["writers"], 0);
    let names: Vec<(&str, bool)> =
        writers.as_array().unwrap().iter().map(|w| (w["name"].as_str().unwrap(), w["built-in"] == true)).collect();
    assert_eq!(names, [("dpkg", true), ("accounts", false)], "{writers:#}");
}

/// SIGINT while a large file is copied into the base copy, and while it is read: the backup
/// stops within a moment in both (it went on to the end of the file before: 23 s and 30 s were
/// seen), cancelled, nothing stored.
#[test]
fn a_signal_stops_a_backup_at_once_in_the_base_copy_and_in_the_reading() {
    let (sandbox, root) = setup("[shadow]\nprovider = \"copy\"\n");
    // Incompressible and not repeating, so reading it is real work (zeros would be one blob).
    let big = root.join("data/big.img");
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("head -c 512M /dev/urandom > '{}'", big.display())])
        .status()
        .unwrap();
    assert!(status.success());
    for phase in ["bringing the base copy up to date", "reading shadow copies"] {
        let _ = std::fs::remove_dir_all(sandbox.path("state"));
        let args = backup_args(&root);
        let mut child = sandbox.command(&args.iter().map(String::as_str).collect::<Vec<_>>()).spawn().unwrap();
        let logs = sandbox.path("state/logs");
        let in_phase = || {
            std::fs::read_dir(&logs).into_iter().flatten().flatten().any(|log| {
                std::fs::read_to_string(log.path())
                    .unwrap_or_default()
                    .lines()
                    .last()
                    .is_some_and(|l| l.ends_with(phase))
            })
        };
        let until = Instant::now() + Duration::from_secs(60);
        while !in_phase() {
            assert!(Instant::now() < until, "the backup never reached `{phase}`");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let asked = std::time::Instant::now();
        let status = signal(&mut child, rustix::process::Signal::Int);
        let took = asked.elapsed();
        assert_eq!(status.code(), Some(2), "{phase}: {status:?}");
        assert!(took < std::time::Duration::from_secs(3), "{phase}: the backup took {took:?} to stop");
        assert_eq!(sandbox.json(&["job", "--previous", "1"], 0)[0]["state"], "cancelled");
    }
    assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 0, "nothing was stored");
}

/// SIGINT while a writer's preparation waits — a slow `prepare` command, a writer process that
/// does not answer prepare-backup, PostgreSQL not answering `pg_backup_start`, the dpkg writer
/// waiting for apt's lock: the wait is ended and the backup stops cancelled at once, instead of
/// waiting up to the writer's timeout; a command writer's abort still runs to its end.
#[test]
fn a_signal_ends_a_writers_slow_preparation_and_its_abort_still_runs() {
    let sandbox = Sandbox::new();
    let root = system_root(&sandbox);
    make_tree(&root.join("data"), 20, 31);
    let aborted = sandbox.path("aborted");
    let hang = sandbox.path("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 60\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cases = [
        (
            "command",
            format!(
                "[[writer]]\nname = \"slow\"\nkind = \"command\"\nprepare = [\"sleep\", \"60\"]\nfreeze = [\"true\"]\nthaw = [\"true\"]\nabort = [\"touch\", \"{}\"]\n",
                aborted.display()
            ),
        ),
        ("process", process_writer(&sandbox, "    *prepare-backup*) sleep 60 ;;")),
        (
            "postgresql",
            format!(
                "[[writer]]\nname = \"pg\"\nkind = \"postgresql\"\ncommand = [\"{}\"]\ndata-directory = \"/data\"\n",
                hang.display()
            ),
        ),
        ("dpkg", "[[writer]]\nname = \"dpkg\"\nkind = \"dpkg\"\nprepare-timeout = \"60s\"\n".to_string()),
    ];
    for (kind, writer) in cases {
        std::fs::write(sandbox.path("config.toml"), format!("{DATA}{writer}")).unwrap();
        let _ = std::fs::remove_file(&aborted);
        let mut apt = (kind == "dpkg").then(|| hold_lock(&sandbox, &root.join("var/lib/dpkg/lock-frontend")));
        let logs = sandbox.path("state/logs");
        let _ = std::fs::remove_dir_all(&logs);
        let args = backup_args(&root);
        let mut child = sandbox.command(&args.iter().map(String::as_str).collect::<Vec<_>>()).spawn().unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_dir(&logs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|log| std::fs::read_to_string(log.path()).unwrap_or_default().contains("preparing writers"))
        {
            assert!(Instant::now() < until, "{kind}: the backup never began preparing its writers");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let asked = Instant::now();
        let status = signal(&mut child, rustix::process::Signal::Int);
        let took = asked.elapsed();
        if let Some(apt) = apt.as_mut() {
            apt.kill().unwrap();
            apt.wait().unwrap();
        }
        assert_eq!(status.code(), Some(2), "{kind}: {status:?}");
        assert!(took < Duration::from_secs(3), "{kind}: the backup took {took:?} to stop");
        assert_eq!(sandbox.json(&["job", "--previous", "1"], 0)[0]["state"], "cancelled", "{kind}");
        if kind == "command" {
            assert!(aborted.exists(), "the writer's abort did not run");
        }
    }
}

/// Every copy `shadows list` shows can be deleted by the id it shows, the base copy a backup
/// keeps (`base`) included; the next backup makes a new one.
#[test]
fn every_listed_shadow_copy_is_deleted_by_its_listed_id_the_base_copy_too() {
    let (sandbox, root) = setup("[shadow]\nprovider = \"copy\"\n");
    sandbox.ok(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>());
    sandbox.ok(&["shadows", "create", "--root", root.to_str().unwrap(), "--component", "data"]);
    let list = sandbox.json(&["shadows", "list"], 0);
    let ids: Vec<String> = list.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert!(ids.contains(&"base".to_string()) && ids.len() == 2, "{list:#}");
    for id in &ids {
        let output = sandbox.ok(&["shadows", "delete", "--id", id]);
        assert!(text(&output.stdout).contains("deleted 1"), "{id}: {}", text(&output.stdout));
    }
    assert_eq!(sandbox.json(&["shadows", "list"], 0), serde_json::json!([]));
    assert!(!sandbox.path("state/shadow/base").exists(), "the base copy is still on disk");
    sandbox.ok(&backup_args(&root).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(sandbox.path("state/shadow/base").is_dir(), "the next backup made no base copy");
}

/// A data volume on btrfs under a root that is not (Debian's ext4 root, a btrfs `/srv`): `auto`
/// takes a read-only snapshot of the subvolume the component lies in — the volume's own, or one
/// nested in it — into the volume's own storage, records its entries with the live device so the
/// next backup reads only what changed, and releases it after. Paths in two subvolumes, which
/// one snapshot cannot hold, are reflinked; a snapshot left behind by a process that died gives
/// way to the next copy, whatever its provider.
#[test]
fn auto_snapshots_the_subvolume_of_a_btrfs_data_volume_under_another_root() {
    if !require("root and loop devices (mkfs.btrfs, btrfs-progs)", is_root() && Path::new("/dev/loop-control").exists())
    {
        return;
    }
    let run = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(program).args(args).output().unwrap();
        assert!(output.status.success(), "{program} {args:?}: {}", text(&output.stderr));
        text(&output.stdout)
    };
    let sandbox = Sandbox::new();
    let (root, fs, _bind) = root_with_volume(&sandbox, "btrfs", 91);
    let volume = root.join("vol");
    run("btrfs", &["-q", "subvolume", "create", volume.join("sub").to_str().unwrap()]);
    make_tree(&volume.join("data"), 200, 92);
    make_tree(&volume.join("sub/data"), 200, 93);
    let storage = volume.join("shadow");
    let config = |provider: &str, paths: &str| {
        std::fs::write(
            sandbox.path("config.toml"),
            format!(
                "[[component]]\nname = \"etc\"\npaths = [\"/etc\"]\n\n[[component]]\nname = \"vol\"\npaths = [{paths}]\n\n[shadow]\nprovider = \"{provider}\"\n\n[[shadow.storage]]\nfor = \"{}\"\non = \"{}\"\nmax-size = \"50%\"\n",
                volume.display(),
                storage.display()
            ),
        )
        .unwrap();
    };
    let args = ["backup", "--root", root.to_str().unwrap(), "--component", "etc", "--component", "vol"];
    // The volume's copy, as the version records it.
    let volume_copy = |version: &serde_json::Value| -> serde_json::Value {
        let copies = version["shadow"]["copies"].as_array().unwrap();
        copies.iter().find(|c| c["for"] == volume.display().to_string()).unwrap().clone()
    };
    let nothing_left = || {
        let subvolumes = run("btrfs", &["subvolume", "list", "-o", fs.mount.to_str().unwrap()]);
        assert!(!subvolumes.contains("shadow"), "a snapshot was left in the storage: {subvolumes}");
    };
    for (paths, snapshotted, live) in [
        ("\"/vol/data\"", "vol/data", "the volume's own subvolume"),
        ("\"/vol/sub/data\"", "vol/sub/data", "a subvolume nested in the volume"),
    ] {
        config("auto", paths);
        let first = sandbox.json(&args, 0);
        let version = &sandbox.json(&["versions"], 0).as_array().unwrap().last().unwrap().clone();
        let copy = volume_copy(version);
        assert_eq!(
            (copy["provider"].as_str(), copy["read"].as_str()),
            (Some("btrfs"), Some("snapshot")),
            "{live}: {copy}"
        );
        let root_copy = &version["shadow"]["copies"][0];
        assert_eq!(root_copy["provider"], "copy", "the ext4 root is copied: {root_copy}");
        // The snapshotted volume needs no change journal, and does not keep the root from one.
        assert!(!root_copy.to_string().contains("journal cannot start"), "{live}: {root_copy}");
        nothing_left();
        // Every file of the volume is in the version; the next backup reads only what changed.
        assert_eq!(first["stats"]["files"].as_u64().unwrap(), 220, "{live}: {}", first["stats"]);
        std::fs::write(root.join(snapshotted).join("changed"), "new").unwrap();
        let again = sandbox.json(&args, 0);
        assert_eq!(again["stats"]["files-read"], 1, "{live}: the unchanged files were read again: {}", again["stats"]);
        nothing_left();
        let to = sandbox.path(&format!("restored-{}", snapshotted.replace('/', "-")));
        sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
        assert_same(&snapshot(&root.join(snapshotted)), &snapshot(&to.join(snapshotted)));
        assert_same(&snapshot(&root.join("etc")), &snapshot(&to.join("etc")));
    }
    // Two subvolumes: one snapshot cannot hold both, so the volume is reflinked.
    config("auto", "\"/vol/data\", \"/vol/sub/data\"");
    sandbox.ok(&args);
    let version = sandbox.json(&["versions"], 0).as_array().unwrap().last().unwrap().clone();
    assert_eq!(volume_copy(&version)["provider"], "reflink", "{}", version["shadow"]);
    // A snapshot left where the base copy goes, as by a process killed after its commit: the
    // next backup's copy takes its place, by snapshot and by copy alike.
    for provider in ["auto", "copy"] {
        config(provider, "\"/vol/sub/data\"");
        let left = storage.join("base/tree/vol/sub");
        let _ = std::fs::remove_dir_all(storage.join("base"));
        std::fs::create_dir_all(left.parent().unwrap()).unwrap();
        run(
            "btrfs",
            &["-q", "subvolume", "snapshot", "-r", volume.join("sub").to_str().unwrap(), left.to_str().unwrap()],
        );
        sandbox.ok(&args);
        let version = sandbox.json(&["versions"], 0).as_array().unwrap().last().unwrap().clone();
        let expected = if provider == "auto" { "btrfs" } else { "copy" };
        assert_eq!(volume_copy(&version)["provider"], expected, "{provider}: {}", version["shadow"]);
        if provider == "copy" {
            // fanotify cannot watch a nested subvolume: its copy walks, and says why; the root's
            // copy keeps its journal.
            let copy = volume_copy(&version);
            assert_eq!(copy["read"], "walk", "{copy}");
            assert!(copy["walked-because"].as_str().unwrap().contains("not watched"), "{copy}");
            assert_eq!(version["shadow"]["copies"][0]["read"], "journal", "{}", version["shadow"]);
        }
        nothing_left();
        let to = sandbox.path(&format!("restored-after-left-{provider}"));
        sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
        assert_same(&snapshot(&root.join("vol/sub/data")), &snapshot(&to.join("vol/sub/data")));
    }
}
