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
