//! Secrets stay in sysstate: no program it runs sees a passphrase (and each gets the umask
//! sysstate was started with); an empty passphrase is refused; a passphrase file given on the
//! command line wins over the environment.

use crate::support::*;
use std::path::Path;

/// Writes an executable script.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A writer's command, a generated component's tool (`dpkg`) and the package step of an
/// in-place restore (`chroot … apt-get`) each dump their environment: none holds the passphrase.
#[test]
fn no_program_sysstate_runs_sees_the_passphrase() {
    let mut sandbox = Sandbox::new();
    sandbox.passphrase = Some("secret-sentinel-4242".into());
    let (bin, dumps, root) = (sandbox.path("bin"), sandbox.path("dumps"), sandbox.path("root"));
    for dir in [&bin, &dumps, &root.join("var/lib/dpkg")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let real_dpkg = ["/usr/bin/dpkg", "/bin/dpkg"].into_iter().find(|p| Path::new(p).exists()).expect("dpkg");
    script(&bin.join("dpkg"), &format!("env > {}/dpkg.env\nexec {real_dpkg} \"$@\"", dumps.display()));
    script(&bin.join("chroot"), &format!("env > {}/chroot.env", dumps.display()));
    let status = "Package: vim\nStatus: install ok installed\nArchitecture: amd64\nVersion: 9\nMaintainer: x\nDescription: editor\n";
    std::fs::write(root.join("var/lib/dpkg/status"), status).unwrap();
    std::fs::write(
        sandbox.path("config.toml"),
        format!(
            "[[writer]]\nname = \"dump\"\nkind = \"command\"\nfreeze = [\"/bin/sh\", \"-c\", \"env > {0}/writer.env; umask > {0}/writer.umask\"]\n",
            dumps.display()
        ),
    )
    .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let root_arg = root.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut command = sandbox.command(args);
        command.env("PATH", &path);
        use std::os::unix::process::CommandExt;
        // SAFETY: umask(2) only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
                Ok(())
            });
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "sysstate {args:?}: {}", text(&output.stderr));
    };
    run(&["backup", "--root", root_arg, "--component", "packages"]);
    run(&["restore", "--in-place", "--apply-packages", "--root", root_arg, "--component", "packages"]);
    for dump in ["writer", "dpkg", "chroot"] {
        let env = std::fs::read_to_string(dumps.join(format!("{dump}.env")))
            .unwrap_or_else(|e| panic!("{dump} did not run: {e}"));
        assert!(env.contains("PATH="), "{dump}: {env}");
        assert!(!env.contains("secret-sentinel-4242"), "{dump} saw the passphrase:\n{env}");
    }
    // The programs get back the umask sysstate was started with, not its own 077.
    let umask = std::fs::read_to_string(dumps.join("writer.umask")).unwrap();
    assert_eq!(umask.trim(), "0022", "the writer's umask");
}

#[test]
fn an_empty_passphrase_is_refused_and_nothing_is_created() {
    let mut sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 1);
    sandbox.passphrase = Some(String::new());
    let output = sandbox.run_code(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error[invalid-input]") && stderr.contains("`SYSSTATE_PASSPHRASE` is empty"), "{stderr}");
    assert!(!Path::new(&sandbox.target).exists(), "a repository protected by nothing was made");
    let file = sandbox.path("empty-passphrase");
    std::fs::write(&file, "\n").unwrap();
    sandbox.passphrase = None;
    let output = sandbox.run_code(
        &[
            "backup",
            "--root",
            root.to_str().unwrap(),
            "--component",
            "data",
            "--passphrase-file",
            file.to_str().unwrap(),
        ],
        2,
    );
    assert!(text(&output.stderr).contains("is empty"), "{}", text(&output.stderr));
    assert!(!Path::new(&sandbox.target).exists());
}

#[test]
fn a_passphrase_file_given_wins_over_the_environment() {
    let mut sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 1);
    let file = sandbox.path("passphrase");
    std::fs::write(&file, "from the file\n").unwrap();
    let file_arg = file.to_str().unwrap();
    sandbox.passphrase = Some("from the environment".into());
    sandbox.ok(&["backup", "--root", root.to_str().unwrap(), "--component", "data", "--passphrase-file", file_arg]);
    // The repository was made with the file's passphrase: the file opens it, the environment
    // alone does not.
    sandbox.ok(&["versions", "--passphrase-file", file_arg]);
    let output = sandbox.run_code(&["versions"], 2);
    assert!(text(&output.stderr).contains("error[wrong-passphrase]"), "{}", text(&output.stderr));
}

/// A key sysstate generated is found by the repository it opens, however the target is written:
/// with a trailing slash, relative, or a copy of the repository elsewhere.
#[test]
fn a_generated_key_is_found_by_the_repository_not_by_how_its_path_is_written() {
    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.passphrase = None;
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 4);
    let output = sandbox.ok(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    let note = text(&output.stderr);
    let keys: Vec<String> = std::fs::read_dir(sandbox.path("state/keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("repository-"), "the key is filed by repository id: {keys:?}");
    assert!(note.contains(&keys[0]) && note.contains("--passphrase-file"), "{note}");

    let slash = format!("{}/", sandbox.target);
    sandbox.ok(&["versions", "--target", &slash]);
    let relative = sandbox.command(&["versions", "--target", "repo"]).current_dir(sandbox.dir.path()).output().unwrap();
    assert!(relative.status.success(), "{}", text(&relative.stderr));
    let copy = sandbox.path("copied");
    assert!(std::process::Command::new("cp").arg("-a").arg(&sandbox.target).arg(&copy).status().unwrap().success());
    sandbox.ok(&["versions", "--target", copy.to_str().unwrap()]);
}

/// A passphrase file that is not there, a damaged key file and a wrong passphrase are three
/// different errors.
#[test]
fn a_missing_passphrase_file_a_damaged_key_and_a_wrong_passphrase_are_told_apart() {
    let mut sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 3, 5);
    sandbox.backup_data(&root);

    let missing = sandbox.path("no-such-file");
    let output = sandbox.run_code(&["versions", "--passphrase-file", missing.to_str().unwrap()], 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error[invalid-input]") && stderr.contains("cannot read the passphrase file"), "{stderr}");

    sandbox.passphrase = Some("not the passphrase".into());
    let output = sandbox.run_code(&["versions"], 2);
    assert!(text(&output.stderr).contains("error[wrong-passphrase]"), "{}", text(&output.stderr));

    let keys = Path::new(&sandbox.target).join("keys");
    for key in std::fs::read_dir(&keys).unwrap() {
        std::fs::write(key.unwrap().path(), b"{ damaged").unwrap();
    }
    sandbox.passphrase = Some("correct horse".into());
    let output = sandbox.run_code(&["versions"], 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error[repository-corrupt]") && stderr.contains("key file is damaged"), "{stderr}");
}
