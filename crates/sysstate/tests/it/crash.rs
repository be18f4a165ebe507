//! A backup killed with SIGKILL at any point leaves the repository checkable and every earlier
//! version restoring byte-identical.

use crate::support::*;
use std::os::unix::process::ExitStatusExt;

#[test]
fn sigkill_at_every_write_leaves_the_repository_sound() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 60, 4);
    let first = sandbox.backup_data(&root);
    let expected_first = snapshot(&root.join("data"));

    // New data: about 40 MiB of incompressible bytes, so the next backup writes several packs.
    let mut rng = Rng(99);
    for i in 0..8 {
        std::fs::write(root.join(format!("data/big{i}")), rng.bytes(5 << 20)).unwrap();
    }
    let root_arg = root.to_str().unwrap().to_string();
    let args = ["backup", "--root", &root_arg, "--component", "data"];
    let mut killed = 0;
    for limit in 1.. {
        let output =
            sandbox.command(&args).env("SYSSTATE_FAILPOINT_KILL_AFTER_WRITES", limit.to_string()).output().unwrap();
        if output.status.success() {
            // The whole write sequence fit under the limit: every point has been tried.
            break;
        }
        assert_eq!(
            output.status.signal(),
            Some(9),
            "write {limit}: not killed by the failpoint: {}",
            text(&output.stderr)
        );
        killed += 1;
        let check = sandbox.run(&["check", "--json"]);
        assert!(
            matches!(check.status.code(), Some(0 | 1)),
            "after a kill at write {limit}, check found damage: {}",
            text(&check.stdout)
        );
        let to = sandbox.path(&format!("restore-{limit}"));
        sandbox.ok(&["restore", "--version", &first, "--to", to.to_str().unwrap()]);
        assert_same(&expected_first, &snapshot(&to.join("data")));
        std::fs::remove_dir_all(&to).unwrap();
        assert!(limit < 100, "the backup never completed");
    }
    assert!(
        killed >= 5,
        "only {killed} kill points: the backup should write a lease, several packs, an index and a version"
    );

    // The interrupted runs left packs no index names; prune removes them and all stays sound.
    sandbox.ok(&["prune"]);
    sandbox.ok(&["check", "--read-data"]);
    let to = sandbox.path("restore-last");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
}

#[test]
fn sigkill_at_random_moments_leaves_the_repository_sound() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 30, 5);
    let first = sandbox.backup_data(&root);
    let expected_first = snapshot(&root.join("data"));
    let mut rng = Rng(7);
    for i in 0..6 {
        std::fs::write(root.join(format!("data/big{i}")), rng.bytes(8 << 20)).unwrap();
    }
    let root_arg = root.to_str().unwrap().to_string();
    for delay_ms in [5u64, 20, 40, 80, 120, 200, 300] {
        let mut child = sandbox.command(&["backup", "--root", &root_arg, "--component", "data"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let check = sandbox.run(&["check"]);
        assert!(matches!(check.status.code(), Some(0 | 1)), "after a kill at {delay_ms} ms: {}", text(&check.stderr));
        let to = sandbox.path(&format!("restore-{delay_ms}"));
        sandbox.ok(&["restore", "--version", &first, "--to", to.to_str().unwrap()]);
        assert_same(&expected_first, &snapshot(&to.join("data")));
    }
}
