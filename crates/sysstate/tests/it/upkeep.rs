use crate::support::*;

fn dir_size(dir: &std::path::Path) -> u64 {
    crate::corruption::walk_files(dir).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
}

#[test]
fn forget_and_prune_free_space_and_keep_what_is_kept() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 100, 11);
    let mut rng = Rng(5);
    for round in 0..3 {
        std::fs::write(root.join("data/changing"), rng.bytes(4 << 20)).unwrap();
        std::fs::write(root.join(format!("data/round{round}")), rng.text(10_000)).unwrap();
        sandbox.backup_data(&root);
    }
    let before = dir_size(&sandbox.path("repo/data"));
    let dry = sandbox.json(&["forget", "--keep-last", "1", "--dry-run"], 0);
    assert_eq!(dry["drop"].as_array().unwrap().len(), 2);
    assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 3, "a dry run drops nothing");
    sandbox.json(&["forget", "--keep-last", "1"], 0);
    assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 1);
    // A dry run shows the plan and changes nothing; the real run carries out that plan.
    let dry = sandbox.json(&["prune", "--dry-run"], 0);
    let planned = &dry["plan"];
    assert!(planned["blobs-unused"].as_u64().unwrap() >= 2, "{dry}");
    assert!(planned["delete"].as_array().unwrap().len() + planned["repack"].as_array().unwrap().len() > 0, "{dry}");
    assert!(dry.get("packs-deleted").is_none(), "a dry run reports nothing done: {dry}");
    assert_eq!(dir_size(&sandbox.path("repo/data")), before, "a dry run deletes nothing");
    let report = sandbox.json(&["prune"], 0);
    assert!(report["blobs-dropped"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["blobs-dropped"], planned["blobs-unused"], "{report}");
    assert_eq!(report["packs-deleted"].as_u64().unwrap() as usize, planned["delete"].as_array().unwrap().len());
    let after = dir_size(&sandbox.path("repo/data"));
    assert!(after + (6 << 20) < before, "prune freed too little: {before} -> {after}");
    sandbox.ok(&["check", "--read-data"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    // forget without a rule would drop everything: refused, and said before any passphrase is
    // asked for.
    let output = sandbox.command(&["forget"]).env_remove("SYSSTATE_PASSPHRASE").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("error[invalid-input]: forget needs"), "{}", text(&output.stderr));
}

#[test]
fn keys_can_be_added_listed_changed_and_removed() {
    let mut sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 12);
    sandbox.backup_data(&root);
    sandbox.command(&["key", "add"]).env("SYSSTATE_NEW_PASSPHRASE", "second").output().unwrap();
    let keys = sandbox.json(&["key", "list"], 0);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let first_key =
        keys.as_array().unwrap().iter().find(|k| k["current"] == true).unwrap()["id"].as_str().unwrap().to_string();
    sandbox.passphrase = Some("second".into());
    sandbox.ok(&["versions"]);
    // The key in use cannot be removed; the other can.
    sandbox.ok(&["key", "remove", &first_key[..8]]);
    sandbox.passphrase = Some("correct horse".into());
    assert_eq!(sandbox.run(&["versions"]).status.code(), Some(2), "the removed key still opens the repository");
    sandbox.passphrase = Some("second".into());
    let output = sandbox.command(&["key", "passwd"]).env("SYSSTATE_NEW_PASSPHRASE", "third").output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(sandbox.run(&["versions"]).status.code(), Some(2));
    sandbox.passphrase = Some("third".into());
    sandbox.ok(&["versions"]);
    assert_eq!(sandbox.json(&["key", "list"], 0).as_array().unwrap().len(), 1);
}

#[test]
fn copy_to_another_repository_with_its_own_key() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 80, 13);
    sandbox.backup_data(&root);
    std::fs::write(root.join("data/later"), b"later").unwrap();
    sandbox.backup_data(&root);
    let second = sandbox.path("second").display().to_string();
    let output =
        sandbox.command(&["copy", "--to", &second, "--json"]).env("SYSSTATE_TO_PASSPHRASE", "other").output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let first: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(first["mode"], "re-encrypted", "a new repository gets a key of its own: {first:#}");
    // Copying again copies nothing.
    let output =
        sandbox.command(&["copy", "--to", &second, "--json"]).env("SYSSTATE_TO_PASSPHRASE", "other").output().unwrap();
    let again: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(again["copied"].as_array().unwrap().len(), 0, "{again:#}");
    let mut other = Sandbox::new();
    other.target = second;
    other.passphrase = Some("other".into());
    assert_eq!(other.json(&["versions"], 0).as_array().unwrap().len(), 2);
    other.ok(&["check", "--read-data"]);
    let to = other.path("restored");
    other.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

/// Restore, check and prune record their progress in their job; on a terminal a progress bar
/// is drawn; with --quiet nothing but errors is printed.
#[test]
fn restore_check_and_prune_jobs_record_progress_and_quiet_prints_nothing() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 40, 7);
    let output = sandbox.ok(&["backup", "--quiet", "--root", root.to_str().unwrap(), "--component", "data"]);
    assert!(
        output.stdout.is_empty() && output.stderr.is_empty(),
        "--quiet printed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    // A first backup, with no parent to take a total from, ends with its totals filled.
    let job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!(job["kind"], "backup");
    assert_eq!(job["progress"]["files-total"], job["progress"]["files-done"], "{job}");
    assert!(job["progress"]["files-total"].as_u64().unwrap() >= 40, "{job}");
    assert!(job["progress"].get("percent").is_none(), "an ended job shows no estimate: {job}");

    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--quiet", "--to", to.to_str().unwrap()]);
    let job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!(job["kind"], "restore");
    assert_eq!(job["progress"]["files-done"], 40, "{job}");
    assert!(job["progress"]["bytes-done"].as_u64().unwrap() > 0);
    assert_eq!(job["progress"]["bytes-done"], job["progress"]["bytes-total"], "{job}");

    sandbox.ok(&["check", "--quiet", "--read-data"]);
    let job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!(job["kind"], "check");
    assert!(job["progress"]["bytes-done"].as_u64().unwrap() > 0, "{job}");
    assert_eq!(job["progress"]["bytes-done"], job["progress"]["bytes-total"], "{job}");

    // Prune: change some files, back up again, forget the first version; its pack is then
    // partly used and repacked, and the job counts the bytes it read.
    for (i, entry) in crate::corruption::walk_files(&root.join("data")).into_iter().take(5).enumerate() {
        std::fs::write(entry, format!("changed {i}")).unwrap();
    }
    sandbox.ok(&["backup", "--quiet", "--root", root.to_str().unwrap(), "--component", "data"]);
    sandbox.ok(&["forget", "--quiet", "--keep-last", "1"]);
    let pruned = sandbox.json(&["prune"], 0);
    assert!(pruned["packs-repacked"].as_u64().unwrap() > 0, "{pruned}");
    let job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!(job["kind"], "prune");
    assert!(job["progress"]["bytes-done"].as_u64().unwrap() > 0, "{job}");
    assert_eq!(job["progress"]["bytes-done"], job["progress"]["bytes-total"], "{job}");

    // A progress bar on a terminal (script(1) gives the command one).
    let command = format!(
        "{} check --read-data --target {} --config {}",
        env!("CARGO_BIN_EXE_sysstate"),
        sandbox.target,
        sandbox.path("config.toml").display()
    );
    let terminal = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("SYSSTATE_STATE_DIR", sandbox.path("state"))
        .env("SYSSTATE_PASSPHRASE", sandbox.passphrase.as_deref().unwrap())
        .env("COLUMNS", "120")
        .output()
        .unwrap();
    let shown = text(&terminal.stdout);
    assert!(terminal.status.success(), "{shown}");
    assert!(shown.contains("checking"), "no progress bar on a terminal: {shown:?}");
}

#[test]
fn prune_removes_temporary_files_left_by_killed_writes_after_an_hour_and_no_sooner() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 20, 3);
    sandbox.backup_data(&root);
    let old = sandbox.path("repo/data/00/.tmp-killed");
    let fresh = sandbox.path("repo/index/.tmp-writing");
    std::fs::write(&old, b"half a pack").unwrap();
    std::fs::write(&fresh, b"an index being written").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();

    let dry = sandbox.json(&["prune", "--dry-run"], 0);
    assert_eq!(dry["plan"]["temporaries"], serde_json::json!(["data/00/.tmp-killed"]), "{dry}");
    assert!(old.exists(), "a dry run deletes nothing");
    let report = sandbox.json(&["prune"], 0);
    assert_eq!(report["temporaries-deleted"], 1, "{report}");
    assert!(!old.exists(), "the old temporary file is gone");
    assert!(fresh.exists(), "a temporary file younger than an hour may be a write under way: kept");
}

#[test]
fn prune_refuses_while_a_lost_index_file_hides_packs_a_version_needs() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 40, 8);
    sandbox.backup_data(&root);
    let packs_before = crate::corruption::walk_files(&sandbox.path("repo/data")).len();
    for index in crate::corruption::walk_files(&sandbox.path("repo/index")) {
        std::fs::remove_file(index).unwrap();
    }
    // check names the repair, and says not to prune.
    let report = sandbox.json(&["check"], 2);
    assert_eq!(report["repairs"][0], "sysstate repair index", "{report:#}");
    let warnings = report["warnings"].to_string();
    assert!(warnings.contains("repair index") && warnings.contains("do not prune"), "{report:#}");
    assert!(!warnings.contains("`sysstate prune` removes it"), "{report:#}");
    // prune refuses and deletes nothing.
    let output = sandbox.run_code(&["prune"], 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("repository-corrupt") && stderr.contains("sysstate repair index"), "{stderr}");
    assert_eq!(crate::corruption::walk_files(&sandbox.path("repo/data")).len(), packs_before);
    // The repair finds every pack again; then the version restores whole and prune has nothing
    // to delete.
    let repaired = sandbox.json(&["repair", "index"], 0);
    assert_eq!(repaired["packs-found"].as_array().unwrap().len(), packs_before, "{repaired:#}");
    sandbox.ok(&["check", "--read-data"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    let pruned = sandbox.json(&["prune"], 0);
    assert_eq!(pruned["orphan-packs-deleted"], 0, "{pruned}");
}

/// A sandbox with components `data` and `more`, and a root holding both.
fn two_components() -> (Sandbox, std::path::PathBuf) {
    let sandbox = Sandbox::new();
    std::fs::write(
        sandbox.path("config.toml"),
        "[[component]]\nname = \"data\"\npaths = [\"/data\"]\n[[component]]\nname = \"more\"\npaths = [\"/more\"]\n",
    )
    .unwrap();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 8, 4);
    make_tree(&root.join("more"), 8, 5);
    (sandbox, root)
}

#[test]
fn latest_is_the_newest_version_holding_the_components_asked_for_and_forget_takes_ids() {
    let (sandbox, root) = two_components();
    let root_arg = root.to_str().unwrap();
    let both = sandbox.json(&["backup", "--root", root_arg, "--component", "data", "--component", "more"], 0);
    let only_more = sandbox.json(&["backup", "--root", root_arg, "--component", "more"], 0);
    // `latest` for `data` is the older version that holds it, not the newest one that does not.
    let items = sandbox.json(&["items", "-c", "data"], 0);
    assert_eq!(items["version"], both["version"], "{items}");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "-c", "data", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    assert_eq!(sandbox.json(&["items"], 0)["version"], only_more["version"]);
    // A component known to the configuration that no version holds, and a typo: both refused,
    // each for what it is.
    let output = sandbox.run_code(&["items", "-c", "cron"], 2);
    assert!(text(&output.stderr).contains("no version in"), "{}", text(&output.stderr));
    for command in
        [&["items", "-c", "confg"][..], &["versions", "-c", "confg"], &["forget", "--keep-last", "1", "-c", "confg"]]
    {
        let output = sandbox.run_code(command, 2);
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("component-missing") && stderr.contains("`confg` is not known"),
            "{command:?}: {stderr}"
        );
    }

    // `forget --version` drops one version by its id, a damaged one too.
    let first = both["version"].as_str().unwrap();
    let manifest = sandbox.path(&format!("repo/versions/{first}"));
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&manifest, bytes).unwrap();
    let output = sandbox.run_code(&["versions"], 1);
    assert!(text(&output.stderr).contains("sysstate repair versions"), "{}", text(&output.stderr));
    let output =
        sandbox.run_code(&["restore", "--version", &first[..8], "--to", sandbox.path("r2").to_str().unwrap()], 2);
    assert!(text(&output.stderr).contains("repository-corrupt"), "{}", text(&output.stderr));
    let plan = sandbox.json(&["forget", "--version", &first[..8]], 0);
    assert_eq!(plan["drop"], serde_json::json!([first]), "{plan}");
    assert!(!manifest.exists());
    assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 1);
    let output = sandbox.run_code(&["forget", "--version", "--keep-last", "1"], 2);
    assert!(!text(&output.stderr).is_empty());
}

#[test]
fn retention_applies_per_group_keeps_within_tags_and_protected_versions_and_filters() {
    let (sandbox, root) = two_components();
    let root_arg = root.to_str().unwrap();
    let backup = |components: &[&str], tags: &[&str]| {
        let mut args = vec!["backup", "--root", root_arg];
        for c in components {
            args.extend(["--component", c]);
        }
        for t in tags {
            args.extend(["--tag", t]);
        }
        sandbox.json(&args, 0)["version"].as_str().unwrap().to_string()
    };
    let full_tagged = backup(&["data", "more"], &["before-upgrade"]);
    let full = backup(&["data", "more"], &[]);
    let small = backup(&["more"], &[]);

    // keep-last 1 keeps the newest of each component set: the small backup does not push the
    // full version out.
    let plan = sandbox.json(&["forget", "--keep-last", "1", "--dry-run"], 0);
    let keep: Vec<&str> = plan["keep"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!((keep.len(), plan["drop"].as_array().unwrap().len()), (2, 1), "{plan}");
    assert!(keep.contains(&full.as_str()) && keep.contains(&small.as_str()), "{plan}");
    // One group: only the newest is kept.
    let plan = sandbox.json(&["forget", "--keep-last", "1", "--group-by", "", "--dry-run"], 0);
    assert_eq!(plan["keep"], serde_json::json!([small]), "{plan}");
    let output = sandbox.run_code(&["forget", "--keep-last", "1", "--group-by", "colour"], 2);
    assert!(text(&output.stderr).contains("`colour` is not something"), "{}", text(&output.stderr));
    // keep-tag and keep-within.
    let plan = sandbox.json(&["forget", "--keep-tag", "before-upgrade", "--dry-run"], 0);
    assert_eq!(plan["keep"], serde_json::json!([full_tagged]), "{plan}");
    let plan = sandbox.json(&["forget", "--keep-within", "1d", "--dry-run"], 0);
    assert_eq!(plan["drop"].as_array().unwrap().len(), 0, "all three are within a day: {plan}");
    // Filters: a policy applied to the versions holding `data` only leaves `small` alone.
    let plan = sandbox.json(&["forget", "--keep-last", "1", "-c", "data", "--dry-run"], 0);
    assert_eq!(plan["drop"], serde_json::json!([full_tagged]), "{plan}");
    assert_eq!(plan["keep"], serde_json::json!([full]), "{plan}");
    let listed = sandbox.json(&["versions", "--tag", "before-upgrade"], 0);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(sandbox.json(&["versions", "-c", "data"], 0).as_array().unwrap().len(), 2);

    // A protected version is kept whatever the policy, and cannot be forgotten by name.
    sandbox.ok(&["protect", &full_tagged[..8]]);
    let listed = sandbox.json(&["versions"], 0);
    assert_eq!(listed[0]["protected"], true, "{listed}");
    let plan = sandbox.json(&["forget", "--keep-last", "1", "--group-by", ""], 0);
    assert_eq!(plan["drop"], serde_json::json!([full]), "{plan}");
    let output = sandbox.run_code(&["forget", "--version", &full_tagged[..8]], 2);
    assert!(text(&output.stderr).contains("is protected"), "{}", text(&output.stderr));
    sandbox.ok(&["unprotect", &full_tagged[..8]]);
    sandbox.json(&["forget", "--version", &full_tagged[..8]], 0);
    assert_eq!(sandbox.json(&["versions"], 0).as_array().unwrap().len(), 1);
}

#[test]
fn exclude_patterns_take_absolute_paths_relative_ones_and_names() {
    let sandbox = Sandbox::new();
    std::fs::write(
        sandbox.path("config.toml"),
        "[[component]]\nname = \"data\"\npaths = [\"/data\"]\nexclude = [\"/data/cache/*\", \"data/logs/**\", \"*.tmp\"]\n",
    )
    .unwrap();
    let root = sandbox.path("root");
    for file in
        ["data/keep", "data/cache/a", "data/cache/b", "data/logs/x/y.log", "data/sub/scratch.tmp", "data/sub/kept"]
    {
        let path = root.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, file).unwrap();
    }
    sandbox.backup_data(&root);
    let items = sandbox.json(&["items"], 0);
    let files: Vec<&str> = items["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "f")
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["/data/keep", "/data/sub/kept"], "{items:#}");
}

#[test]
fn restore_dry_run_to_a_folder_lists_what_it_would_write_and_writes_nothing() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 12, 9);
    sandbox.backup_data(&root);
    let to = sandbox.path("not-yet");
    let output = sandbox.ok(&["restore", "--to", to.to_str().unwrap(), "--dry-run"]);
    let shown = text(&output.stdout);
    assert!(shown.contains("would restore") && shown.contains("nothing was written"), "{shown}");
    assert!(shown.contains(&format!("+ f {}", to.join("data").display())), "{shown}");
    assert!(!to.exists(), "a dry run created the destination");
    let plan = sandbox.json(&["restore", "--to", to.to_str().unwrap(), "--dry-run"], 0);
    assert_eq!(plan["files"], 12, "{plan}");
    assert!(!to.exists());
}

/// On a terminal (a pseudo-terminal from `script`), the progress bar is drawn while the backup
/// runs and cleared before the end: the final summary starts a line of its own, not after the
/// bar's last frame.
#[test]
fn on_a_terminal_the_summary_starts_its_own_line_after_the_bar() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    // Enough to read for the bar to be drawn a few times in a debug build.
    std::fs::create_dir_all(root.join("data")).unwrap();
    let mut rng = Rng(17);
    for i in 0..12 {
        std::fs::write(root.join(format!("data/part{i}")), rng.bytes(8 << 20)).unwrap();
    }
    let command = sandbox.command(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_str().unwrap().replace('\'', "'\\''"));
    let line: Vec<String> =
        std::iter::once(quote(command.get_program())).chain(command.get_args().map(quote)).collect();
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line.join(" "), "/dev/null"]).stdin(std::process::Stdio::null());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => script.env(key, value),
            None => script.env_remove(key),
        };
    }
    let output = script.output().unwrap();
    let shown = text(&output.stdout);
    assert!(output.status.success(), "{shown}");
    assert!(shown.contains("backing up"), "no bar was drawn on the terminal: {shown:?}");
    // What stays on the screen: of each line, what follows its last carriage return or
    // erase-line; no frame of the bar may be left, and the summary is a line of its own.
    let visible: Vec<&str> = shown
        .split('\n')
        .map(|line| {
            let line = line.trim_end_matches('\r');
            let start = [line.rfind('\r').map(|i| i + 1), line.rfind("\x1b[2K").map(|i| i + 4)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            &line[start..]
        })
        .collect();
    assert!(!visible.iter().any(|l| l.contains("backing up")), "a frame of the bar stays on the screen: {visible:#?}");
    let summary = *visible.iter().find(|l| l.starts_with("version ")).unwrap_or_else(|| panic!("{visible:#?}"));
    assert!(summary.contains("saved") && !summary.contains('\x1b'), "{summary:?}");
}
