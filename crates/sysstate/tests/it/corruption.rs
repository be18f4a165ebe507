use crate::support::*;
use std::path::Path;

#[test]
fn a_flipped_byte_is_found_named_and_the_rest_restores() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 400, 3);
    let version = sandbox.backup_data(&root);
    sandbox.ok(&["check", "--read-data"]);

    // Flip one byte inside the first blob of the largest pack.
    let mut packs: Vec<_> = walk_files(&sandbox.path("repo/data"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = packs.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();

    // The structure is intact, so a plain check passes; reading the data finds it.
    sandbox.ok(&["check"]);
    let report = sandbox.json(&["check", "--read-data"], 2);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert_eq!(report["damaged-packs"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["damaged-packs"][0], name);
    assert_eq!(report["damaged-versions"][0].as_str().unwrap(), &version[..8]);
    let damaged: Vec<String> = report["damaged-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().split_once(':').unwrap().1.to_string())
        .collect();
    assert!(!damaged.is_empty());
    let output = sandbox.run(&["check", "--read-data"]);
    assert!(text(&output.stderr).contains("error[repository-corrupt]"), "{}", text(&output.stderr));
    // The check ran as a job that failed, with its event.
    assert_job_failed(&sandbox, "repository-corrupt");
    assert_eq!(sandbox.json(&["job", "--previous", "1"], 0)[0]["kind"], "check");
    assert!(text(&output.stderr).contains(&name[..8]), "the message names the pack: {}", text(&output.stderr));

    // Restore: the damaged files are reported, every other file comes back whole.
    let to = sandbox.path("restored");
    // The restore fails (the version cannot be given back whole) and names every damaged file,
    // with --quiet too; none of them is left half written.
    let output = sandbox.run_code(&["restore", "--to", to.to_str().unwrap(), "--quiet"], 2);
    let restore_job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!((restore_job["kind"].as_str(), restore_job["state"].as_str()), (Some("restore"), Some("failed")));
    assert_eq!(restore_job["error"]["code"], "repository-corrupt", "{restore_job}");
    let stderr = text(&output.stderr);
    for file in &damaged {
        assert!(stderr.contains(file.as_str()), "restore did not name {file}: {stderr}");
        assert!(!to.join(file.trim_start_matches('/')).exists(), "{file} was left half written");
    }
    let original = snapshot(&root.join("data"));
    let restored = snapshot(&to.join("data"));
    let mut checked = 0;
    for (path, entry) in &original {
        if entry.kind == "dir" || damaged.iter().any(|d| Path::new(d) == Path::new("/data").join(path)) {
            continue;
        }
        assert_eq!(restored.get(path), Some(entry), "{} differs", path.display());
        checked += 1;
    }
    assert!(checked > 300, "only {checked} files compared");
}

/// Every regular file under `dir`, sorted.
pub fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}
