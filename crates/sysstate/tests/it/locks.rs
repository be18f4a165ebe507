//! `component-locked`: a process holding a lock on, or writing to, a component's file.

use crate::support::*;
use std::path::Path;
use std::process::{Child, Command};

fn fake_root(sandbox: &Sandbox) -> std::path::PathBuf {
    let root = sandbox.path("root");
    for (path, content) in
        [("boot/vmlinuz", "kernel"), ("boot/efi/EFI/debian/grubx64.efi", "efi binary"), ("etc/hostname", "box\n")]
    {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    root
}

/// Runs python3 `code` with `file` as argv[1], once it said it is ready.
fn hold(sandbox: &Sandbox, code: &str, file: &Path) -> Child {
    let ready = sandbox.path("ready");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new("python3")
        .args(["-c", &format!("import fcntl, sys, time\n{code}\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n")])
        .arg(file)
        .arg(&ready)
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ready.exists() {
        assert!(std::time::Instant::now() < until, "the holder never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

fn locked(sandbox: &Sandbox, root: &Path, component: &str, file: &str, holder: &Child, how: &str) {
    let output = sandbox.run(&["backup", "--root", root.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let expected = format!(
        "error[component-locked]: component `{component}` is locked: `{file}` is held by pid {} (`",
        holder.id()
    );
    assert!(stderr.contains(&expected), "expected {expected:?} in: {stderr}");
    assert!(stderr.contains(how), "{stderr}");
    let named = stderr.lines().next().unwrap();
    assert!(
        named.contains("python3 -c import fcntl, sys, time f = open(sys.argv[1]"),
        "the holder's command is not named on one line: {named}"
    );
    assert_job_failed(sandbox, "component-locked");
    let diagnosis = assert_diagnosed(sandbox, "component-locked");
    let specifics = diagnosis["specifics"].to_string();
    assert!(specifics.contains(&format!("held by pid {}", holder.id())), "{diagnosis:#}");
    assert!(specifics.contains("still runs now"), "the holder still runs: {diagnosis:#}");
    // The refused backup created no repository at its (new) target.
    assert!(!Path::new(&sandbox.target).join("config").exists(), "a refused backup created the repository");
}

#[test]
fn a_process_holding_a_lock_on_the_esp_is_named() {
    let sandbox = Sandbox::new();
    let root = fake_root(&sandbox);
    let mut holder = hold(
        &sandbox,
        "f = open(sys.argv[1])\nfcntl.flock(f, fcntl.LOCK_EX)",
        &root.join("boot/efi/EFI/debian/grubx64.efi"),
    );
    locked(&sandbox, &root, "efi", "/boot/efi/EFI/debian/grubx64.efi", &holder, "holds a lock on it");
    // `sysstate components` shows the lock and who holds it; the other components are free.
    let components = sandbox.json(&["components", "--root", root.to_str().unwrap()], 0);
    let find = |name: &str| components.as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap();
    let efi = find("efi");
    assert!(efi["lock-state"].as_str().unwrap().contains(&format!("locked by pid {}", holder.id())), "{efi}");
    assert_eq!(efi["paths"][0], "/boot/efi");
    assert_eq!(efi["files"], 1);
    assert_eq!(find("boot")["lock-state"], "free");
    assert_eq!(find("cron")["lock-state"], "not on this machine");
    holder.kill().unwrap();
    holder.wait().unwrap();
    sandbox.ok(&["backup", "--root", root.to_str().unwrap()]);
}

#[test]
fn a_process_writing_to_a_component_file_is_named() {
    let sandbox = Sandbox::new();
    let root = fake_root(&sandbox);
    let mut holder = hold(&sandbox, "f = open(sys.argv[1], 'a')", &root.join("etc/hostname"));
    locked(&sandbox, &root, "config", "/etc/hostname", &holder, "has it open for writing");
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn lock_check_false_opts_a_component_out() {
    let sandbox = Sandbox::new();
    let root = fake_root(&sandbox);
    std::fs::write(
        sandbox.path("config.toml"),
        "[[component]]\nname = \"efi\"\npaths = [\"/boot/efi\"]\nlock-check = false\n",
    )
    .unwrap();
    let mut holder = hold(
        &sandbox,
        "f = open(sys.argv[1])\nfcntl.flock(f, fcntl.LOCK_EX)",
        &root.join("boot/efi/EFI/debian/grubx64.efi"),
    );
    sandbox.ok(&["backup", "--root", root.to_str().unwrap()]);
    holder.kill().unwrap();
    holder.wait().unwrap();
}
