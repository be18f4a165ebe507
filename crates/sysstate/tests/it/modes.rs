//! What sysstate creates — the repository, key files, the state and runtime folders, logs — is
//! its owner's only, whatever umask it was started with.

use crate::support::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Every entry under `dir` (and `dir`) that its group or others may use, with its mode. A
/// shadow copy's tree keeps the modes of what it copies: the private folders above it guard it.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() || path.parent().is_some_and(|p| p.ends_with("shadow/base/tree")) {
            continue;
        }
        if meta.mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", path.display(), meta.mode() & 0o7777));
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn what_sysstate_creates_is_private_whatever_the_umask() {
    for umask in [0o000, 0o022] {
        let mut sandbox = Sandbox::new().with_data_component();
        sandbox.passphrase = None; // a new repository gets a generated key file
        let root = sandbox.path("root");
        make_tree(&root.join("data"), 10, 2);
        let mut command = sandbox.command(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
        use std::os::unix::process::CommandExt;
        // SAFETY: umask(2) only, between fork and exec.
        unsafe {
            command.pre_exec(move || {
                rustix::process::umask(rustix::fs::Mode::from_raw_mode(umask));
                Ok(())
            });
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "umask {umask:03o}: {}", text(&output.stderr));
        let keys = sandbox.path("state/keys");
        assert!(keys.read_dir().unwrap().next().is_some(), "a key file was made");
        for dir in [Path::new(&sandbox.target), &sandbox.path("state"), &sandbox.path("run")] {
            let loose = open_to_others(dir);
            assert!(loose.is_empty(), "under umask {umask:03o}, open to others: {loose:#?}");
        }
    }
}

/// A state directory others can write is refused before anything is read or written.
#[test]
fn a_backup_refuses_a_state_directory_others_can_write() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 3);
    sandbox.backup_data(&root);
    let state = sandbox.path("state");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let output = sandbox.run_code(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("error[state-dir-permission]") && stderr.contains("can be written by others (mode 777)"),
        "{stderr}"
    );
    assert!(stderr.contains("chmod 700"), "{stderr}");
    assert_job_failed(&sandbox, "state-dir-permission");
}
