//! `sysstate doctor` and `sysstate services`: each check failing for a real cause, `--fix`, the
//! validation backup, and (through `assert_job_failed`, which every error test calls) the
//! diagnosis of every error code from the job store and the event log.

use crate::support::*;
use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check `{id}` in {report:#}"))
}

fn failed(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "failed")
        .map(|c| format!("{}: {}", c["id"], c["found"]))
        .collect()
}

#[test]
fn a_healthy_set_up_passes_every_check_and_the_validation_backup() {
    let sandbox = Sandbox::new();
    let report = sandbox.json(&["doctor"], 0);
    assert!(failed(&report).is_empty(), "{report:#}");
    let validation = check(&report, "validation.backup");
    assert_eq!(validation["status"], "ok", "{validation}");
    assert!(validation["found"].as_str().unwrap().contains("the job store shows it"), "{validation}");
    // The validation ran through the normal job path.
    let jobs = sandbox.json(&["job", "--previous", "1"], 0);
    assert_eq!(jobs[0]["kind"], "validate", "{jobs}");
    assert_eq!(jobs[0]["state"], "succeeded", "{jobs}");
    assert!(jobs[0]["version"].is_string());
    // The text form names each check and ends with the counts.
    let output = sandbox.ok(&["doctor", "--no-validate"]);
    let shown = text(&output.stdout);
    assert!(shown.contains("state-dir.mode") && shown.contains("0 failed"), "{shown}");

    let services = sandbox.json(&["services"], 0);
    let names: Vec<&str> = services.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for name in ["api", "event-log", "notifications", "coordinator", "provider copy", "writer accounts"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let api = services.as_array().unwrap().iter().find(|p| p["name"] == "api").unwrap();
    assert_eq!(api["start-type"], "always-on");
    assert!(api["status"].as_str().unwrap().starts_with("stopped"), "{api}");
    assert_eq!(api["healthy"], true, "no schedule: a stopped agent is no fault");
    let coordinator = services.as_array().unwrap().iter().find(|p| p["name"] == "coordinator").unwrap();
    assert_eq!((coordinator["start-type"].as_str(), coordinator["status"].as_str()), (Some("on-demand"), Some("idle")));
}

#[test]
fn a_state_dir_open_to_others_or_owned_by_another_user_fails_and_fix_repairs_it() {
    if !require("root (gives the state directory to another user)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new();
    let state = sandbox.path("state");
    sandbox.json(&["doctor", "--no-validate"], 0);
    assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700, "created private");

    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let mode = check(&report, "state-dir.mode");
    assert_eq!(mode["status"], "failed");
    assert!(mode["found"].as_str().unwrap().contains("0777"), "{mode}");
    assert!(mode["resolution"].as_str().unwrap().contains("sysstate doctor --fix"), "{mode}");

    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let owner = check(&report, "state-dir.owner");
    assert_eq!(owner["status"], "failed");
    assert!(owner["found"].as_str().unwrap().contains("uid 65534"), "{owner}");

    let fixed = sandbox.json(&["doctor", "--no-validate", "--fix"], 0);
    assert!(
        check(&fixed, "state-dir.owner")["fixed"].as_str().unwrap().contains("from uid 65534 to uid 0"),
        "{fixed:#}"
    );
    assert!(check(&fixed, "state-dir.mode")["fixed"].as_str().unwrap().contains("from 0777 to 0700"), "{fixed:#}");
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o700));

    let again = sandbox.json(&["doctor", "--no-validate"], 0);
    assert!(failed(&again).is_empty(), "{again:#}");
    assert!(again["checks"].as_array().unwrap().iter().all(|c| c["fixed"].is_null()), "nothing left to fix");
}

#[test]
fn an_unknown_config_key_is_a_failed_check_naming_the_key_and_the_file() {
    let sandbox = Sandbox::new();
    std::fs::write(sandbox.path("config.toml"), "[backup]\ncolour = \"blue\"\n").unwrap();
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let config = check(&report, "installation.config");
    assert_eq!(config["status"], "failed");
    let found = config["found"].as_str().unwrap();
    assert!(found.contains("colour") && found.contains("config.toml"), "{config}");
    assert!(!config["resolution"].as_str().unwrap().is_empty());
    // A value that means nothing (a mistyped provider) is refused the same way, by the doctor
    // and by every command.
    std::fs::write(sandbox.path("config.toml"), "[shadow]\nprovider = \"reflnk\"\n").unwrap();
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let config = check(&report, "installation.config");
    assert_eq!(config["status"], "failed", "{config}");
    assert!(config["found"].as_str().unwrap().contains("`reflnk` is not a provider"), "{config}");
    let output = sandbox.run_code(&["versions"], 2);
    assert!(text(&output.stderr).contains("shadow.provider"), "{}", text(&output.stderr));
    for (bad, key) in
        [("connections = 0", "storage.connections"), ("cache-max-size = \"lots\"", "storage.cache-max-size")]
    {
        std::fs::write(sandbox.path("config.toml"), format!("[storage]\n{bad}\n")).unwrap();
        let output = sandbox.run_code(&["versions"], 2);
        assert!(text(&output.stderr).contains(key), "{bad}: {}", text(&output.stderr));
    }
}

#[test]
fn a_missing_provider_tool_is_a_failed_check_with_its_resolution() {
    let sandbox = Sandbox::new();
    std::fs::write(sandbox.path("config.toml"), "[shadow]\nprovider = \"btrfs\"\n").unwrap();
    let empty = sandbox.path("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let output = sandbox.command(&["doctor", "--no-validate", "--json"]).env("PATH", &empty).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let tools = check(&report, "installation.provider-tools");
    assert_eq!(tools["status"], "failed", "{tools}");
    assert!(tools["found"].as_str().unwrap().contains("`btrfs`"), "{tools}");
    assert!(tools["resolution"].as_str().unwrap().contains("btrfs-progs"), "{tools}");
    // The generated components' missing programs are a warning, not a failure.
    assert_eq!(check(&report, "installation.component-tools")["status"], "warning");
}

#[test]
fn an_unwritable_shadow_storage_location_is_a_failed_check() {
    if !require("root (mounts a read-only tmpfs)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new();
    let ro = Tmpfs::mount(&sandbox.path("ro"), "ro,size=1m");
    std::fs::write(
        sandbox.path("config.toml"),
        format!("[[shadow.storage]]\nfor = \"/\"\non = \"{}/shadow\"\n", ro.0.display()),
    )
    .unwrap();
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let location = check(&report, "shadow-storage.location");
    assert_eq!(location["status"], "failed", "{report:#}");
    assert!(location["found"].as_str().unwrap().contains("Read-only file system"), "{location}");
    assert!(location["resolution"].as_str().unwrap().contains("[[shadow.storage]]"), "{location}");
}

#[test]
fn an_unreachable_target_is_a_failed_check() {
    let sandbox = Sandbox::new();
    let args = ["doctor", "--no-validate", "--json", "--target", "s3://sysstate-test/doctor"];
    let output = dead_s3(&mut sandbox.command(&args)).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let reachable = check(&report, "target.reachable");
    assert_eq!(reachable["status"], "failed", "{reachable}");
    assert!(reachable["found"].as_str().unwrap().contains("s3://sysstate-test/doctor"), "{reachable}");
    assert!(!reachable["resolution"].as_str().unwrap().is_empty());
}

#[test]
fn validation_fails_explained_when_the_target_is_read_only() {
    if !require("root (mounts a read-only tmpfs)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new();
    let ro = Tmpfs::mount(&sandbox.path("ro"), "ro,size=1m");
    let target = ro.0.join("repo");
    let report = sandbox.json(&["doctor", "--target", target.to_str().unwrap()], 2);
    assert_eq!(check(&report, "target.writable")["status"], "failed", "{report:#}");
    let validation = check(&report, "validation.backup");
    assert_eq!(validation["status"], "failed", "{validation}");
    let found = validation["found"].as_str().unwrap();
    assert!(found.contains("error[target-permission]") && found.contains("Read-only"), "{validation}");
    assert!(!validation["resolution"].as_str().unwrap().is_empty());
}

/// A repository whose key file others can read is a warning that names it and says how to fix it.
#[test]
fn a_repository_open_to_others_is_a_warning() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 7);
    sandbox.backup_data(&root);
    let report = sandbox.json(&["doctor", "--no-validate"], 0);
    assert_eq!(check(&report, "target.modes")["status"], "ok", "{report:#}");
    let keys = std::path::Path::new(&sandbox.target).join("keys");
    let key = std::fs::read_dir(&keys).unwrap().next().unwrap().unwrap().path();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A warning ends the doctor with exit 1.
    let report = sandbox.json(&["doctor", "--no-validate"], 1);
    let modes = check(&report, "target.modes");
    assert_eq!(modes["status"], "warning", "{modes}");
    assert!(modes["found"].as_str().unwrap().contains(&format!("`{}` (0644)", key.display())), "{modes}");
    assert!(modes["resolution"].as_str().unwrap().contains("chmod -R go-rwx"), "{modes}");
}

/// `config show` prints every key with the value commands use: the file's, or the default.
#[test]
fn config_show_prints_the_effective_configuration_with_its_defaults() {
    let sandbox = Sandbox::new();
    std::fs::write(
        sandbox.path("config.toml"),
        "[shadow]\ncommit-timeout = \"30s\"\n[[component]]\nname = \"myapp\"\npaths = [\"/opt/myapp\"]\nexclude = [\"*.tmp\"]\n",
    )
    .unwrap();
    let shown = sandbox.json(&["config", "show"], 0);
    assert_eq!(shown["shadow"]["commit-timeout"], "30s", "{shown:#}");
    assert_eq!(shown["shadow"]["provider"], "auto", "the default, filled in: {shown:#}");
    assert_eq!(shown["jobs"]["retention"], "90d");
    assert_eq!(shown["storage"], serde_json::json!({"connections": 8, "cache": true, "cache-max-size": "1GiB"}));
    assert_eq!(shown["shadow"]["storage"][0]["max-size"], "10%", "{shown:#}");
    let components = shown["component"].as_array().unwrap();
    assert!(components.iter().any(|c| c["name"] == "config" && c["built-in"] == true), "{shown:#}");
    let mine = components.iter().find(|c| c["name"] == "myapp").unwrap();
    assert_eq!((mine["built-in"].as_bool(), mine["lock-check"].as_bool()), (Some(false), Some(true)));
    assert!(shown["writer"].as_array().unwrap().iter().any(|w| w["name"] == "dpkg" && w["freeze-timeout"] == "60s"));
    // The text form is a config file that means the same.
    let output = sandbox.ok(&["config", "show"]);
    let shown_text = text(&output.stdout);
    assert!(shown_text.contains("commit-timeout = \"30s\"") && shown_text.contains("[[component]]"), "{shown_text}");
    let copy = sandbox.path("copy.toml");
    std::fs::write(&copy, &shown_text).unwrap();
    let again = sandbox.json(&["--config", copy.to_str().unwrap(), "config", "show"], 0);
    assert_eq!(again["shadow"], shown["shadow"]);
    assert_eq!(again["component"].as_array().unwrap().len(), components.len());
}

/// Completions and the manual page come from the CLI's own definition.
#[test]
fn completions_and_the_man_page_are_made_from_the_cli() {
    let sandbox = Sandbox::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = text(&sandbox.ok(&["completions", shell]).stdout);
        for word in ["repair", "protect", "keep-within", "no-lock"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let page = text(&sandbox.ok(&["man"]).stdout);
    assert!(page.contains(".TH sysstate 8") && page.contains("repair"), "{page}");
    sandbox.run_code(&["completions", "tcsh-ish"], 2);
}
