//! The damage matrix: for each kind of repository file — config, key, index, manifest, pack
//! header, pack data — a flipped byte, a truncation, a deletion and a stray file beside it. Each
//! case asserts what `versions`, the restore of an intact and of the hit version, `backup` and
//! `check --read-data` do; then follows the repairs `check` names, runs a new backup, and
//! requires a clean `check --read-data` and every live file restorable.
//!
//! One repository is made once (a first version, then a second that adds files: the second's
//! index file, manifest and packs are what is hit, so the first stays intact) and copied for
//! each case.

use crate::corruption::walk_files;
use crate::support::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository made once, and what the second backup wrote.
struct Template {
    sandbox: Sandbox,
    first: String,
    second: String,
    /// The second backup's index file, manifest and largest pack (repository-relative).
    index: String,
    manifest: String,
    pack: String,
}

fn template() -> &'static Template {
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let sandbox = Sandbox::new().with_data_component();
        let root = sandbox.path("root");
        make_tree(&root.join("data/old"), 120, 5);
        let first = sandbox.backup_data(&root);
        let before = relative_files(&sandbox);
        make_tree(&root.join("data/new"), 80, 6);
        let second = sandbox.backup_data(&root);
        let added: Vec<String> = relative_files(&sandbox).into_iter().filter(|f| !before.contains(f)).collect();
        let index = added.iter().find(|f| f.starts_with("index/")).unwrap().clone();
        let manifest = format!("versions/{second}");
        assert!(added.contains(&manifest), "{added:?}");
        let pack = added
            .iter()
            .filter(|f| f.starts_with("data/"))
            .max_by_key(|f| std::fs::metadata(Path::new(&sandbox.target).join(f)).unwrap().len())
            .unwrap()
            .clone();
        Template { sandbox, first, second, index, manifest, pack }
    })
}

/// The repository's files, repository-relative, without leases.
fn relative_files(sandbox: &Sandbox) -> Vec<String> {
    let repo = Path::new(&sandbox.target);
    walk_files(repo)
        .into_iter()
        .map(|f| f.strip_prefix(repo).unwrap().display().to_string())
        .filter(|f| !f.starts_with("locks/"))
        .collect()
}

/// A copy of the template's sandbox (repository, state, live root) for one case.
fn copy() -> Sandbox {
    let template = template();
    let sandbox = Sandbox::new().with_data_component();
    let status = std::process::Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(template.sandbox.dir.path())
        .arg(sandbox.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    sandbox
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Harm {
    Flip,
    Truncate,
    Delete,
    Stray,
}

const HARMS: [Harm; 4] = [Harm::Flip, Harm::Truncate, Harm::Delete, Harm::Stray];

/// Harms `file` (repository-relative); a flip at `at` bytes from the start (negative: from the
/// end). A stray file is put beside it.
fn harm(sandbox: &Sandbox, file: &str, how: Harm, at: i64) {
    let path = Path::new(&sandbox.target).join(file);
    match how {
        Harm::Flip => {
            let mut bytes = std::fs::read(&path).unwrap();
            let at = if at < 0 { bytes.len() as i64 + at } else { at } as usize;
            bytes[at] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
        }
        Harm::Truncate => {
            let length = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(length * 2 / 3).unwrap();
        }
        Harm::Delete => std::fs::remove_file(&path).unwrap(),
        Harm::Stray => std::fs::write(path.parent().unwrap().join("stray"), b"not a repository file\n").unwrap(),
    }
}

/// Exit codes expected of `versions`, the restore of the intact first version and of the hit
/// second one, `backup`, and `check --read-data`.
#[derive(Debug, Clone, Copy)]
struct Expect {
    versions: i32,
    intact: i32,
    hit: i32,
    backup: i32,
    check: i32,
}

/// Runs the case and returns the sandbox for the after-repair part.
fn case(what: &str, file: &str, how: Harm, at: i64, expect: Expect) -> Sandbox {
    let template = template();
    let sandbox = copy();
    harm(&sandbox, file, how, at);
    let context = format!("{what}, {how:?}");
    let root = sandbox.path("root");
    let code = |args: &[&str]| {
        let output = sandbox.run(args);
        (output.status.code().unwrap(), text(&output.stderr))
    };

    let (versions, stderr) = code(&["versions"]);
    assert_eq!(versions, expect.versions, "{context}: versions: {stderr}");
    if expect.versions == 1 {
        assert!(stderr.contains("sysstate repair"), "{context}: the warning names the repair: {stderr}");
    }

    let intact_to = sandbox.path("intact");
    let (intact, stderr) = code(&["restore", "--version", &template.first, "--to", intact_to.to_str().unwrap()]);
    assert_eq!(intact, expect.intact, "{context}: restore of the intact version: {stderr}");
    if intact < 2 {
        let restored = snapshot(&intact_to.join("data"));
        assert_eq!(restored, snapshot_without_new(&root.join("data")), "{context}: the intact version");
    }

    let hit_to = sandbox.path("hit");
    let (hit, stderr) = code(&["restore", "--version", &template.second, "--to", hit_to.to_str().unwrap()]);
    assert_eq!(hit, expect.hit, "{context}: restore of the hit version: {stderr}");
    if hit < 2 {
        assert_eq!(snapshot(&hit_to.join("data")), snapshot(&root.join("data")), "{context}: the hit version");
    } else {
        assert!(stderr.contains("repository-corrupt") || stderr.contains("invalid-input"), "{context}: {stderr}");
        // What was restored is whole: no file is left half written under its name.
        assert_restored_whole(&hit_to, &root, &context);
    }

    let repo_files_before = relative_files(&sandbox);
    let (backup, stderr) = code(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    assert_eq!(backup, expect.backup, "{context}: backup: {stderr}");
    if backup == 2 {
        assert!(stderr.contains("repository-corrupt"), "{context}: {stderr}");
        let after = relative_files(&sandbox);
        assert!(
            after.iter().all(|f| repo_files_before.contains(f) || f.starts_with("data/")),
            "{context}: a refused backup wrote {:?}",
            after.iter().filter(|f| !repo_files_before.contains(f)).collect::<Vec<_>>()
        );
        assert!(!after.iter().any(|f| f == "config") || repo_files_before.iter().any(|f| f == "config"));
    }

    let output = sandbox.run(&["check", "--read-data", "--json"]);
    assert_eq!(output.status.code(), Some(expect.check), "{context}: check: {}", text(&output.stderr));
    sandbox
}

/// The live `data` tree without `data/new` (what the first version holds).
fn snapshot_without_new(data: &Path) -> std::collections::BTreeMap<PathBuf, Entry> {
    snapshot(data).into_iter().filter(|(path, _)| !path.starts_with("new")).collect()
}

/// Every file restored under `to` has the live file's content.
fn assert_restored_whole(to: &Path, root: &Path, context: &str) {
    let data = to.join("data");
    if !data.exists() {
        return;
    }
    for file in walk_files(&data) {
        let relative = file.strip_prefix(to).unwrap();
        assert!(
            std::fs::read(&file).unwrap() == std::fs::read(root.join(relative)).unwrap(),
            "{context}: `{}` was restored with other content",
            relative.display()
        );
    }
}

/// Runs the repairs `check` names, then a backup; then `check --read-data` is clean and the
/// newest version restores the whole live tree.
/// `hit_survives`: the hit version is still there after the repair (a manifest that cannot be
/// read is removed by it; everything else of the hit version is mended).
fn repair_and_verify(sandbox: &Sandbox, what: &str, hit_survives: bool) {
    let report = sandbox.json(&["check", "--read-data"], 2);
    let repairs: Vec<String> =
        report["repairs"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    assert!(!repairs.is_empty(), "{what}: check names no repair: {report:#}");
    for repair in &repairs {
        let Some(part) = repair.strip_prefix("sysstate repair ") else {
            assert!(repair.starts_with("sysstate backup"), "{what}: {repair}");
            continue;
        };
        // The dry run changes nothing; the repair then ends with what it could not mend as
        // warnings at most.
        let before = relative_files(sandbox);
        sandbox.run(&["repair", part, "--dry-run"]);
        assert_eq!(relative_files(sandbox), before, "{what}: `repair {part} --dry-run` changed the repository");
        let output = sandbox.run(&["repair", part]);
        assert!(output.status.code().unwrap() < 2, "{what}: repair {part}: {}", text(&output.stderr));
    }
    let root = sandbox.path("root");
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    assert_eq!(output.status.code(), Some(0), "{what}: backup after {repairs:?}: {}", text(&output.stderr));
    let report = sandbox.json(&["check", "--read-data"], 0);
    assert!(report["errors"].as_array().unwrap().is_empty(), "{what}: {report:#}");
    let to = sandbox.path("after-repair");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_eq!(snapshot(&to.join("data")), snapshot(&root.join("data")), "{what}: the newest version after repair");
    // And the hit version is whole again: blobs are found by content.
    let hit = sandbox.path("hit-after-repair");
    let args = ["restore", "--version", &template().second, "--to", hit.to_str().unwrap()];
    if hit_survives {
        sandbox.ok(&args);
        assert_eq!(snapshot(&hit.join("data")), snapshot(&root.join("data")), "{what}: the hit version after repair");
    } else {
        let output = sandbox.run_code(&args, 2);
        assert!(text(&output.stderr).contains("does not exist"), "{what}: {}", text(&output.stderr));
    }
}

const CLEAN: Expect = Expect { versions: 0, intact: 0, hit: 0, backup: 0, check: 0 };
const UNUSABLE: Expect = Expect { versions: 2, intact: 2, hit: 2, backup: 2, check: 2 };

#[test]
fn a_damaged_config_stops_every_command_with_its_name_and_is_never_recreated() {
    for how in HARMS {
        let expect = if how == Harm::Stray { CLEAN } else { UNUSABLE };
        let sandbox = case("config", "config", how, 20, expect);
        if how != Harm::Stray {
            let output = sandbox.run(&["versions"]);
            assert!(text(&output.stderr).contains("config"), "{how:?}: {}", text(&output.stderr));
            // The doctor tells this cause from damaged data.
            let diagnosis = assert_diagnosed(&sandbox, "repository-corrupt");
            assert!(diagnosis["cause"].as_str().unwrap().contains("`config`"), "{how:?}: {diagnosis:#}");
        }
    }
}

#[test]
fn a_damaged_key_file_is_named_and_never_taken_for_a_wrong_passphrase() {
    let key = relative_files(&template().sandbox).into_iter().find(|f| f.starts_with("keys/")).unwrap();
    for how in HARMS {
        let expect = if how == Harm::Stray { CLEAN } else { UNUSABLE };
        let sandbox = case("key", &key, how, 40, expect);
        if how != Harm::Stray {
            let stderr = text(&sandbox.run(&["versions"]).stderr);
            assert!(stderr.contains("repository-corrupt") && stderr.contains("key"), "{how:?}: {stderr}");
            assert!(!stderr.contains("wrong-passphrase"), "{how:?}: {stderr}");
        }
    }
}

#[test]
fn a_damaged_index_file_is_passed_over_and_rebuilt_from_the_packs() {
    let template = template();
    for how in HARMS {
        let expect = match how {
            Harm::Flip | Harm::Truncate => Expect { versions: 1, intact: 1, hit: 2, backup: 1, check: 2 },
            Harm::Delete => Expect { versions: 0, intact: 0, hit: 2, backup: 0, check: 2 },
            Harm::Stray => Expect { versions: 1, intact: 1, hit: 1, backup: 1, check: 2 },
        };
        let sandbox = case("index", &template.index, how, 100, expect);
        repair_and_verify(&sandbox, &format!("index, {how:?}"), true);
    }
}

#[test]
fn a_damaged_manifest_is_passed_over_and_dropped_by_repair() {
    let template = template();
    for how in HARMS {
        let expect = match how {
            Harm::Flip | Harm::Truncate => Expect { versions: 1, intact: 1, hit: 2, backup: 1, check: 2 },
            Harm::Delete => CLEAN_BUT_GONE,
            Harm::Stray => Expect { versions: 1, intact: 1, hit: 1, backup: 1, check: 2 },
        };
        let sandbox = case("manifest", &template.manifest, how, 60, expect);
        if how != Harm::Delete {
            // A flipped or cut manifest is removed; a stray file beside it leaves it whole.
            repair_and_verify(&sandbox, &format!("manifest, {how:?}"), how == Harm::Stray);
        }
    }
}

/// A deleted manifest: the version is gone (asking for it is a mistake), everything else works.
const CLEAN_BUT_GONE: Expect = Expect { versions: 0, intact: 0, hit: 2, backup: 0, check: 0 };

#[test]
fn a_damaged_pack_header_is_found_by_reading_and_its_blobs_are_moved() {
    let template = template();
    for how in HARMS {
        let expect = match how {
            // The index still says where every blob is: only reading the pack finds the damage.
            Harm::Flip => Expect { versions: 0, intact: 0, hit: 0, backup: 0, check: 2 },
            // A third of the pack cut: blobs are lost with the header.
            Harm::Truncate | Harm::Delete => Expect { versions: 0, intact: 0, hit: 2, backup: 0, check: 2 },
            // A stray file in `data/` is a leftover: a warning, removed by prune.
            Harm::Stray => Expect { versions: 0, intact: 0, hit: 0, backup: 0, check: 1 },
        };
        // A flip 20 bytes before the end lies in the sealed header.
        let sandbox = case("pack header", &template.pack, how, -20, expect);
        if how != Harm::Stray {
            repair_and_verify(&sandbox, &format!("pack header, {how:?}"), true);
        }
    }
}

#[test]
fn damaged_pack_data_fails_the_hit_restore_and_is_stored_again_after_repair() {
    let template = template();
    let sandbox = case(
        "pack data",
        &template.pack,
        Harm::Flip,
        100,
        Expect { versions: 0, intact: 0, hit: 2, backup: 0, check: 2 },
    );
    assert_job_failed_kind(&sandbox);
    repair_and_verify(&sandbox, "pack data", true);
}

/// The newest job is the failed check; the restore of the hit version before it failed too.
fn assert_job_failed_kind(sandbox: &Sandbox) {
    let jobs = sandbox.json(&["job", "--previous", "5"], 0);
    let restore = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "restore" && j["state"] == "failed")
        .unwrap_or_else(|| panic!("no failed restore: {jobs:#}"));
    assert_eq!(restore["error"]["code"], "repository-corrupt", "{restore:#}");
}

#[test]
fn swapped_manifest_names_are_found_and_put_back() {
    let template = template();
    let sandbox = copy();
    let versions = Path::new(&sandbox.target).join("versions");
    let (first, second) = (versions.join(&template.first), versions.join(&template.second));
    let (a, b) = (std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());
    std::fs::write(&first, &b).unwrap();
    std::fs::write(&second, &a).unwrap();
    // Neither is taken for the other: both are passed over, and check names the repair.
    let output = sandbox.run_code(&["versions"], 1);
    assert_eq!(text(&output.stderr).matches("sysstate repair versions").count(), 2, "{}", text(&output.stderr));
    let to = sandbox.path("wrong");
    sandbox.run_code(&["restore", "--version", &template.first, "--to", to.to_str().unwrap()], 2);
    let report = sandbox.json(&["check", "--read-data"], 2);
    assert_eq!(report["repairs"], serde_json::json!(["sysstate repair versions"]), "{report:#}");
    let repaired = sandbox.json(&["repair", "versions"], 0);
    assert_eq!(repaired["renamed"].as_array().unwrap().len(), 2, "{repaired:#}");
    sandbox.ok(&["check", "--read-data"]);
    // Each id gives its own version back.
    let root = sandbox.path("root");
    let to = sandbox.path("first");
    sandbox.ok(&["restore", "--version", &template.first, "--to", to.to_str().unwrap()]);
    assert_eq!(snapshot(&to.join("data")), snapshot_without_new(&root.join("data")));
    let to = sandbox.path("second");
    sandbox.ok(&["restore", "--version", &template.second, "--to", to.to_str().unwrap()]);
    assert_eq!(snapshot(&to.join("data")), snapshot(&root.join("data")));
    // Restoring onto a file is a clear error.
    let file = sandbox.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let output = sandbox.run_code(&["restore", "--to", file.to_str().unwrap()], 2);
    assert!(
        text(&output.stderr).contains("restore-destination") && text(&output.stderr).contains("not a folder"),
        "{}",
        text(&output.stderr)
    );
}
