use crate::support::*;
use std::path::Path;
use std::process::Command;

#[test]
fn backup_restore_round_trip_and_unchanged_files_are_not_read() {
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 300, 1);
    let first = sandbox.backup_data(&root);

    // Nothing changed: no file is read again.
    let again = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
    assert_eq!(again["stats"]["files-read"], 0, "{again}");
    assert_eq!(again["stats"]["files-unchanged"], 300);

    // Change three files and add one: exactly those are read.
    for i in [3, 50, 120] {
        let path = std::fs::read_dir(root.join(format!("data/d{}/e{}", i % 7, i % 3)))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(path, format!("changed {i}")).unwrap();
    }
    std::fs::write(root.join("data/new-file"), b"new").unwrap();
    let changed = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
    assert_eq!(changed["stats"]["files-read"], 4, "{changed}");
    let latest = changed["version"].as_str().unwrap().to_string();

    let versions = sandbox.json(&["versions"], 0);
    assert_eq!(versions.as_array().unwrap().len(), 3);
    assert_eq!(
        versions[2]["parent"].as_str(),
        again["version"].as_str(),
        "the newest version's parent is the one before it"
    );

    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--version", &latest[..8], "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));

    // The first version is still there, whole.
    let old = sandbox.path("restored-old");
    sandbox.ok(&["restore", "--version", &first, "--to", old.to_str().unwrap()]);
    assert!(!old.join("data/new-file").exists());
    assert_eq!(snapshot(&old.join("data")).len(), snapshot(&root.join("data")).len() - 1);

    let items = sandbox.json(&["items", "--version", "latest"], 0);
    let paths: Vec<&str> = items["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"/data/new-file"), "{paths:?}");
}

#[test]
fn default_components_are_detected_on_a_fake_root() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("root");
    for (path, content) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/fstab", "UUID=1 / ext4 defaults 0 1\n"),
        ("etc/systemd/system/multi-user.target.wants/x.service", "[Unit]\n"),
        ("etc/default/grub", "GRUB_TIMEOUT=5\n"),
        ("boot/vmlinuz-6.1", "kernel"),
        ("boot/grub/grub.cfg", "menuentry\n"),
        ("boot/efi/EFI/debian/grubx64.efi", "efi binary"),
        ("var/lib/dpkg/status", "Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4\nMaintainer: x\nDescription: base\n"),
        ("var/spool/cron/crontabs/root", "* * * * * true\n"),
    ] {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }
    let report = sandbox.json(&["backup", "--root", root.to_str().unwrap()], 0);
    let names: Vec<&str> =
        report["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["boot", "efi", "config", "accounts", "packages", "bootloader", "disk-layout", "systemd", "cron"]
    );
    // The job history names what the job covered, not "none" for "the config's".
    let job = &sandbox.json(&["job", "--previous", "1"], 0)[0];
    assert_eq!(job["components"], serde_json::json!(names), "{job:#}");

    // `boot` leaves the ESP to `efi`, which restores it on its own.
    let to = sandbox.path("boot-only");
    sandbox.ok(&["restore", "--component", "boot", "--to", to.to_str().unwrap()]);
    assert!(to.join("boot/vmlinuz-6.1").exists());
    assert!(!to.join("boot/efi/EFI").exists(), "the boot component must not carry the ESP");
    // The package selection is generated from dpkg's database and restores with `packages`.
    let packages = report["components"].as_array().unwrap().iter().find(|c| c["name"] == "packages").unwrap();
    assert_eq!(packages["generated"][0]["command"][0], "dpkg", "{packages}");
    assert_eq!(packages["generated"][0]["status"], 0, "{packages}");
    let to = sandbox.path("packages-only");
    sandbox.ok(&["restore", "--component", "packages", "--to", to.to_str().unwrap()]);
    let selections = std::fs::read_to_string(to.join(".sysstate-generated/packages/dpkg-selections.txt")).unwrap();
    assert!(selections.starts_with("base-files") && selections.contains("install"), "{selections}");
    assert!(to.join("var/lib/dpkg/status").exists());
    let to = sandbox.path("efi-only");
    sandbox.ok(&["restore", "--component", "efi", "--to", to.to_str().unwrap()]);
    assert_eq!(std::fs::read(to.join("boot/efi/EFI/debian/grubx64.efi")).unwrap(), b"efi binary");
    assert!(!to.join("etc").exists());
}

#[test]
fn a_system_state_backup_of_this_machine() {
    // The README's main job, into a temp target, on the embedded defaults.
    let sandbox = Sandbox::new();
    let report = sandbox.json(&["backup"], 0);
    let names: Vec<&str> =
        report["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"config"), "{names:?}");
    assert!(report["stats"]["files"].as_u64().unwrap() > 10);
    // The disk layout is captured from commands, each with its command and status.
    let disk =
        report["components"].as_array().unwrap().iter().find(|c| c["name"] == "disk-layout").expect("disk-layout");
    let lsblk = disk["generated"].as_array().unwrap().iter().find(|g| g["file"] == "lsblk.json").expect("lsblk output");
    assert_eq!(lsblk["status"], 0, "{lsblk}");
    assert_eq!(lsblk["command"][0], "lsblk");
    sandbox.ok(&["check", "--read-data"]);
}

/// Every default component is listed with exactly the paths that exist on this machine.
#[test]
fn each_default_component_is_detected_on_this_machine() {
    let sandbox = Sandbox::new();
    let listed = sandbox.json(&["components"], 0);
    let listed = listed.as_array().unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for name in ["boot", "efi", "config", "accounts", "packages", "bootloader", "disk-layout", "systemd", "cron"] {
        let component = listed.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("{name} is not listed"));
        for path in component["paths"].as_array().unwrap() {
            assert!(Path::new(path.as_str().unwrap()).exists(), "{name}: {path} is listed present");
        }
        for path in component["missing"].as_array().unwrap() {
            assert!(!Path::new(path.as_str().unwrap()).exists(), "{name}: {path} is listed missing");
        }
    }
    let find = |name: &str| listed.iter().find(|c| c["name"] == name).unwrap().clone();
    assert_eq!(find("config")["paths"], serde_json::json!(["/etc"]));
    assert!(find("accounts")["paths"].as_array().unwrap().contains(&"/etc/passwd".into()));
    assert!(find("packages")["paths"].as_array().unwrap().contains(&"/var/lib/dpkg".into()), "a Debian machine");
    // The ESP is the vfat mount the mount table shows, if any.
    let esp_mounted =
        mountinfo.lines().any(|l| l.contains(" - vfat ") && (l.contains(" /boot/efi ") || l.contains(" /efi ")));
    assert_eq!(!find("efi")["paths"].as_array().unwrap().is_empty(), esp_mounted, "{mountinfo}");
}

/// The disk layout keeps the description of every LUKS header (`cryptsetup luksDump`).
#[test]
fn the_disk_layout_describes_each_luks_header() {
    if !require(
        "root, loop devices and cryptsetup",
        is_root() && Path::new("/dev/loop-control").exists() && Path::new("/sbin/cryptsetup").exists(),
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    let image = sandbox.path("luks.img");
    std::fs::File::create(&image).unwrap().set_len(32 << 20).unwrap();
    let output = Command::new("losetup").args(["-f", "--show"]).arg(&image).output().unwrap();
    let device = text(&output.stdout).trim().to_string();
    assert!(device.starts_with("/dev/loop"), "{}", text(&output.stderr));
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(device.clone());
    let key = sandbox.path("key");
    std::fs::write(&key, "not a real secret").unwrap();
    let status = Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .arg(&device)
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let _ = Command::new("udevadm").args(["settle"]).status();
    let report = sandbox.json(&["backup", "--component", "disk-layout"], 0);
    let disk = &report["components"][0];
    let name = format!("luks-{}.txt", device.trim_start_matches("/dev/"));
    let luks = disk["generated"].as_array().unwrap().iter().find(|g| g["file"] == name.as_str());
    let luks = luks.unwrap_or_else(|| panic!("no {name} in {disk}"));
    assert_eq!(luks["status"], 0, "{luks}");
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--component", "disk-layout", "--to", to.to_str().unwrap()]);
    let dump = std::fs::read_to_string(to.join(".sysstate-generated/disk-layout").join(&name)).unwrap();
    assert!(dump.contains("LUKS header information"), "{dump}");
}

#[test]
fn a_new_target_without_passphrase_gets_a_key_file_in_the_state_dir() {
    let mut sandbox = Sandbox::new().with_data_component();
    sandbox.passphrase = None;
    let root = sandbox.path("root");
    make_tree(&root.join("data"), 5, 2);
    let output = sandbox.ok(&["backup", "--root", root.to_str().unwrap(), "--component", "data"]);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Keep a copy of that file"), "{stderr}");
    let keys: Vec<_> = std::fs::read_dir(sandbox.path("state/keys")).unwrap().map(|e| e.unwrap()).collect();
    assert_eq!(keys.len(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(keys[0].metadata().unwrap().permissions().mode() & 0o777, 0o600);
    // The same state dir opens the repository again without a passphrase.
    sandbox.ok(&["versions"]);
}

#[test]
fn several_backups_write_into_one_repository_at_once() {
    let sandbox = Sandbox::new().with_data_component();
    let roots: Vec<_> = (0..3).map(|i| sandbox.path(&format!("root{i}"))).collect();
    for (i, root) in roots.iter().enumerate() {
        // Shared files (same seed) dedup across the three; each also has its own.
        make_tree(&root.join("data/shared"), 40, 21);
        make_tree(&root.join("data/own"), 40, 100 + i as u64);
    }
    // Create the repository first, so the three race only on writing into it.
    let empty = sandbox.path("empty");
    std::fs::create_dir_all(empty.join("data")).unwrap();
    sandbox.backup_data(&empty);
    // Start all three, then wait for them: they write into the repository at the same time.
    let running: Vec<_> = roots
        .iter()
        .map(|root| {
            sandbox
                .command(&["backup", "--root", root.to_str().unwrap(), "--component", "data", "--json", "--wait", "2m"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ids: Vec<String> = running
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "a concurrent backup failed");
            let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            value["version"].as_str().unwrap().to_string()
        })
        .collect();
    sandbox.ok(&["check", "--read-data"]);
    for (root, id) in roots.iter().zip(&ids) {
        let to = sandbox.path(&format!("restore-{}", &id[..8]));
        sandbox.ok(&["restore", "--version", id, "--to", to.to_str().unwrap()]);
        assert_same(&snapshot(&root.join("data")), &snapshot(&to.join("data")));
    }
}

/// A real Debian root (debootstrap minbase, made by scripts/test.sh) backed up with `--root` and
/// restored into another folder: every file, directory, symlink and device with its owner,
/// mode, times, extended attributes, hardlinks and holes.
#[test]
fn a_debootstrapped_debian_round_trips_with_all_metadata() {
    let minbase = std::env::var_os("SYSSTATE_TEST_MINBASE").map(std::path::PathBuf::from);
    let Some(minbase) = minbase.filter(|m| m.join("etc/debian_version").exists()) else {
        require("a debootstrap minbase tree in SYSSTATE_TEST_MINBASE (scripts/test.sh makes it)", false);
        return;
    };
    if !require("root (the tree's owners)", is_root()) {
        return;
    }
    let sandbox = Sandbox::new();
    std::fs::write(sandbox.path("config.toml"), "[[component]]\nname = \"system\"\npaths = [\"/\"]\n").unwrap();
    let root = minbase.to_str().unwrap();
    let report = sandbox.json(&["backup", "--root", root, "--component", "system"], 0);
    assert!(report["stats"]["files"].as_u64().unwrap() > 5000, "{}", report["stats"]);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--component", "system", "--to", to.to_str().unwrap()]);
    assert_same(&snapshot(&minbase), &snapshot(&to));
}

/// Files big enough for the readers to cut in segments (64 MiB of data and more; see
/// `content.rs`) — one dense, one sparse with three 30 MiB extents — come back byte for byte and
/// hole for hole, and after a 4 KiB edit in one of them, the next backup stores only the chunks
/// around the edit: the cuts the idle reader took from segments are the file's own, as they were
/// when the whole file was cut. (With one core there is no idle reader: the file is cut in
/// passing.)
#[test]
fn big_files_cut_in_segments_round_trip_and_deduplicate() {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let sandbox = Sandbox::new().with_data_component();
    let root = sandbox.path("root");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut rng = Rng(77);
    let mut dense = Vec::new();
    for i in 0..80 {
        dense.extend(if i % 3 == 0 { rng.bytes(MIB as usize) } else { rng.text(MIB as usize) });
    }
    std::fs::write(data.join("big.bin"), &dense).unwrap();
    let sparse = std::fs::File::create(data.join("sparse.img")).unwrap();
    sparse.set_len(3 * 46 * MIB).unwrap();
    for extent in 0..3 {
        sparse.write_all_at(&rng.bytes(30 * MIB as usize), (extent * 46 + 16) * MIB).unwrap();
    }
    drop(sparse);

    // The same entries; the sparse file's holes where they were (ext4 counts the blocks of its
    // extent tree in the allocation, so the restored file's may differ by a block or two).
    let restored_as_it_is = |to: &Path| {
        let (mut expected, mut actual) = (snapshot(&data), snapshot(&to.join("data")));
        let name = Path::new("sparse.img");
        let (kept, restored) =
            (expected.get_mut(name).unwrap().sparse_blocks.take(), actual.get_mut(name).unwrap().sparse_blocks.take());
        let (kept, restored) = (kept.expect("the source is sparse"), restored.expect("the holes were filled"));
        assert!(kept.abs_diff(restored) <= 2, "{restored} allocated 64 KiB blocks, {kept} in the source");
        assert_same(&expected, &actual);
    };
    sandbox.backup_data(&root);
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    restored_as_it_is(&to);

    // One file changed at a time, so that the other reader is idle and cuts segments.
    for (name, at) in [("big.bin", 50 * MIB), ("sparse.img", (2 * 46 + 30) * MIB)] {
        // Closed before the backup, which would refuse a file open for writing.
        std::fs::OpenOptions::new().write(true).open(data.join(name)).unwrap().write_all_at(&[0x55; 4096], at).unwrap();
        let changed = sandbox.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
        assert_eq!(changed["stats"]["files-read"], 1, "{changed}");
        let added = changed["stats"]["bytes-added"].as_u64().unwrap();
        assert!(added < 16 * MIB, "{added} bytes added for a 4 KiB edit of {name}: {changed}");
    }
    let to = sandbox.path("restored-changed");
    sandbox.ok(&["restore", "--to", to.to_str().unwrap()]);
    restored_as_it_is(&to);
}
