//! A whole backup and restore through each object store, Garage (S3) and Azurite (Azure Blob).
//! The backends' own promises are checked by the conformance suite in `sysstate-repo`
//! (`backend::testing`).

use crate::support::*;

fn unique(prefix: &str) -> String {
    format!("{prefix}/{}", sysstate_repo::Id::random().short())
}

fn object_url(var: &str, what: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    require(what, url.is_some()).then(|| url.unwrap())
}

fn round_trip(url: &str) {
    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.target = unique(url);
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 60, 14);
    sandbox.backup_data(&root);
    std::fs::write(root.join("data/more"), b"more").unwrap();
    let second = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
    assert_eq!(second["stats"]["files-read"], 1);
    sandbox.ok(&["check", "--read-data"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    sandbox.json(&["forget", "--keep-last", "1"], 0);
    sandbox.ok(&["prune"]);
    sandbox.ok(&["check", "--read-data"]);
}

#[test]
fn backup_and_restore_through_garage() {
    let Some(url) = object_url("SYSSTATE_TEST_S3_URL", "Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)") else {
        return;
    };
    round_trip(&url);
}

#[test]
fn backup_and_restore_through_azurite() {
    let Some(url) = object_url("SYSSTATE_TEST_AZURE_URL", "Azurite (SYSSTATE_TEST_AZURE_URL from scripts/services.sh)")
    else {
        return;
    };
    round_trip(&url);
}

/// A tree of `dirs` directories, each with a few small files, and one larger file: enough
/// directories that a backup reading its parent one request per directory would show.
fn many_dirs(root: &std::path::Path, dirs: usize) {
    let mut rng = Rng(41);
    for d in 0..dirs {
        let dir = root.join(format!("data/dir{}/sub{d}", d % 10));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..3 {
            std::fs::write(dir.join(format!("f{f}")), rng.text(2000 + f * 300)).unwrap();
        }
    }
    std::fs::write(root.join("data/large.bin"), rng.bytes(24 << 20)).unwrap();
}

/// The log of the job that ended last.
fn last_log(sandbox: &Sandbox) -> String {
    let mut logs: Vec<_> =
        std::fs::read_dir(sandbox.path("state/logs")).unwrap().flatten().map(|entry| entry.path()).collect();
    logs.sort_by_key(|path| std::fs::metadata(path).unwrap().modified().unwrap());
    std::fs::read_to_string(logs.last().expect("a job log")).unwrap()
}

/// `(requests, retried)` from a job log's storage line.
fn requests(log: &str) -> (u64, u64) {
    let line = log.lines().find(|l| l.contains("storage: ")).unwrap_or_else(|| panic!("no storage line: {log}"));
    let numbers: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect::<Vec<_>>();
    // The line begins with the time: the last two numbers are the counts.
    (numbers[numbers.len() - 2], numbers[numbers.len() - 1])
}

/// The names of one kind of file in the repository at `url`.
fn listed(url: &str, kind: sysstate_repo::backend::FileKind) -> std::collections::BTreeSet<String> {
    let backend = sysstate_repo::backend::open_target(url).unwrap();
    backend.list(kind).unwrap().into_iter().map(|(name, _)| name).collect()
}

/// The names of the files the cache holds under `dir` (its `index`, `versions` or `packs`).
fn cached(sandbox: &Sandbox, dir: &str) -> std::collections::BTreeSet<String> {
    let top = sandbox.path("state/cache");
    std::fs::read_dir(&top)
        .unwrap()
        .flatten()
        .filter(|entry| entry.path().join(dir).is_dir())
        .flat_map(|entry| crate::corruption::walk_files(&entry.path().join(dir)))
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// With a warm cache, a backup that finds nothing changed makes a handful of requests, not one
/// per directory of its parent (there were ~850 for 826 directories), and a restore reads ahead
/// with coalesced requests, far fewer than one per blob. Everything cached matches its name.
#[test]
fn a_remote_repository_is_read_through_its_cache_and_ahead() {
    let Some(url) = object_url("SYSSTATE_TEST_S3_URL", "Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)") else {
        return;
    };
    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.target = unique(&url);
    let root = sandbox.path("root");
    many_dirs(&root, 300);
    sandbox.backup_data(&root);
    let nothing = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
    assert_eq!(nothing["stats"]["files-read"], 0, "{nothing}");
    let (made, _) = requests(&last_log(&sandbox));
    eprintln!("no-change backup of 300 directories: {made} requests");
    assert!(made < 40, "a no-change backup of 300 directories made {made} requests");
    for (dir, kind) in
        [("index", sysstate_repo::backend::FileKind::Index), ("versions", sysstate_repo::backend::FileKind::Version)]
    {
        assert_eq!(cached(&sandbox, dir), listed(&sandbox.target, kind), "the cache's {dir}");
    }
    assert!(!cached(&sandbox, "packs").is_empty(), "no tree pack was cached");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    let (made, _) = requests(&last_log(&sandbox));
    // 900 small files and 24 MiB in a few packs: a handful of ranged reads, not one per file.
    eprintln!("restore of 901 files: {made} requests");
    assert!(made < 60, "a restore of 901 files made {made} requests");
}

/// Another host forgets and prunes: the first host's cache holds index files, manifests and
/// tree packs the repository no longer has. Its next backup and restore are right all the same,
/// and its cache is brought back to what the repository lists. A cache damaged on disk is
/// detected and read again, never trusted.
#[test]
fn a_cache_that_disagrees_with_the_repository_is_refreshed_never_trusted() {
    let Some(url) = object_url("SYSSTATE_TEST_S3_URL", "Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)") else {
        return;
    };
    use sysstate_repo::backend::FileKind;
    let mut first = Sandbox::new().with_data_component();
    first.target = unique(&url);
    let root = first.path("root");
    many_dirs(&root, 40);
    first.backup_data(&root);
    std::fs::write(root.join("data/dir1/changed"), "second version").unwrap();
    first.backup_data(&root);
    let stale = cached(&first, "index");

    let mut second = Sandbox::new().with_data_component();
    second.target = first.target.clone();
    second.json(&["forget", "--keep-last", "1"], 0);
    second.ok(&["prune"]);
    assert_ne!(listed(&first.target, FileKind::Index), stale, "the prune wrote no new index");

    std::fs::remove_dir_all(root.join("data/dir2")).unwrap();
    std::fs::write(root.join("data/dir3/new"), "third version").unwrap();
    first.backup_data(&root);
    let to = first.path("restored");
    first.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    assert_eq!(first.json(&["versions"], 0).as_array().unwrap().len(), 2);
    assert_eq!(cached(&first, "index"), listed(&first.target, FileKind::Index));
    assert_eq!(cached(&first, "versions"), listed(&first.target, FileKind::Version));
    let packs = listed(&first.target, FileKind::Pack);
    assert!(cached(&first, "packs").is_subset(&packs), "the cache keeps packs the prune deleted");

    // Every cached file damaged: each is found out and read again.
    let cache = first.path("state/cache");
    let mut damaged = 0;
    for path in crate::corruption::walk_files(&cache) {
        if path.file_name().unwrap() != "CACHEDIR.TAG" {
            let mut bytes = std::fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x55;
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 3, "only {damaged} cached files");
    std::fs::write(root.join("data/dir4/after"), "fourth version").unwrap();
    first.backup_data(&root);
    let to = first.path("restored-again");
    first.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    for dir in ["index", "versions"] {
        let top = std::fs::read_dir(&cache).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
        for entry in std::fs::read_dir(top.join(dir)).unwrap().flatten() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert_eq!(sysstate_repo::Id::of_stored(&bytes).to_hex(), entry.file_name().to_string_lossy(), "{dir}");
        }
    }
    // Safe to delete at any time: the next command makes it again.
    std::fs::remove_dir_all(&cache).unwrap();
    let to = first.path("restored-without-cache");
    first.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    assert_eq!(cached(&first, "index"), listed(&first.target, FileKind::Index));
    second.ok(&["check", "--read-data"]);
}

/// A proxy in front of Garage gives every fifth request a fault — a 503, a reset connection, a
/// slow answer, a body cut in half — in turn. Backups, a restore and a full check succeed, the
/// restore is whole, and the job logs say how many requests were tried again.
#[test]
fn passing_faults_of_object_storage_are_retried_and_said() {
    let Some(_) = object_url("SYSSTATE_TEST_S3_URL", "Garage (SYSSTATE_TEST_S3_URL from scripts/services.sh)") else {
        return;
    };
    let endpoint = std::env::var("AWS_ENDPOINT").expect("scripts/services.sh sets AWS_ENDPOINT with the S3 URL");
    let upstream = endpoint.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fault-proxy.py");
    let mut proxy = std::process::Command::new("python3")
        .arg(&script)
        .args([upstream.as_str(), "5", "503,reset,slow,truncate", "1.5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(proxy.stdout.take().unwrap()), &mut port).unwrap();
    let port: u16 = port.trim().parse().expect("the proxy prints its port");

    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.target = unique(&std::env::var("SYSSTATE_TEST_S3_URL").unwrap());
    sandbox.env.push(("AWS_ENDPOINT".into(), format!("http://127.0.0.1:{port}")));
    let root = sandbox.path("root");
    many_dirs(&root, 30);
    let mut retried = 0;
    sandbox.backup_data(&root);
    retried += requests(&last_log(&sandbox)).1;
    std::fs::write(root.join("data/dir1/changed"), "changed").unwrap();
    sandbox.backup_data(&root);
    retried += requests(&last_log(&sandbox)).1;
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    retried += requests(&last_log(&sandbox)).1;
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    sandbox.ok(&["check", "--read-data"]);
    retried += requests(&last_log(&sandbox)).1;
    let _ = proxy.kill();
    let output = proxy.wait_with_output().unwrap();
    let faults = text(&output.stderr);
    for kind in ["503", "reset", "slow", "truncate"] {
        assert!(faults.contains(&format!(" {kind} ")), "the proxy never gave a `{kind}`: {faults}");
    }
    // Slow answers are not retried; every other fault is.
    let expected = faults.lines().filter(|l| !l.contains(" slow ")).count() as u64;
    assert!(retried >= expected.min(3) && retried > 0, "{retried} retries counted for faults:\n{faults}");
    assert_eq!(
        sandbox
            .json(&["job", "--previous", "4"], 0)
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "succeeded")
            .count(),
        4
    );
}
