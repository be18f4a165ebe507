//! Generated components: command output captured into the version, each with its command, exit
//! status and stderr — what a bare-metal restore needs besides files (the package selection,
//! the partition tables, the boot entries). Outputs live in the version under
//! `/.sysstate-generated/<component>/`. A missing tool is recorded, not a failure.

use std::path::{Path, PathBuf};

/// Where generated outputs appear in a version.
pub const GENERATED_DIR: &str = "/.sysstate-generated";

/// sysstate's own description of the disk layout, in the `disk-layout` component's folder.
pub const LAYOUT_FILE: &str = "layout.json";

/// One captured command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Generated {
    /// The file in the version.
    pub file: String,
    /// The command.
    pub command: Vec<String>,
    /// Its exit status; `None` when it could not run (not installed).
    pub status: Option<i32>,
    /// Its stderr (or why it could not run).
    pub stderr: String,
}

/// True when `program` (a name, or a path) can be run: found in `PATH`, `/usr/sbin` or `/sbin`
/// (root's tools, missing from some service managers' `PATH`).
pub fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(program).is_file())
        })
        .unwrap_or(false)
}

fn run(dir: &Path, file: &str, command: &[&str], out: &mut Vec<Generated>) {
    let record = |status, stderr: String| Generated {
        file: file.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        status,
        stderr,
    };
    if !installed(command[0]) {
        out.push(record(None, format!("`{}` is not installed", command[0])));
        return;
    }
    match sysstate_fs::command(command[0]).args(&command[1..]).env("LC_ALL", "C").output() {
        Ok(output) => {
            let _ = std::fs::write(dir.join(file), &output.stdout);
            out.push(record(output.status.code(), String::from_utf8_lossy(&output.stderr).trim().to_string()));
        }
        Err(error) => out.push(record(None, error.to_string())),
    }
}

/// Runs the generators of `component` for the system at `root` into `dir`. The disk layout and
/// boot entries describe the running machine, so they are taken only when `root` is `/`.
pub fn generate(component: &str, root: &Path, dir: &Path) -> Vec<Generated> {
    let mut out = Vec::new();
    let live = root == Path::new("/");
    if std::fs::create_dir_all(dir).is_err() {
        return out;
    }
    match component {
        "packages" => {
            let admin = root.join("var/lib/dpkg");
            if admin.join("status").exists() {
                let admindir = format!("--admindir={}", admin.display());
                run(dir, "dpkg-selections.txt", &["dpkg", &admindir, "--get-selections"], &mut out);
                if live {
                    run(dir, "apt-manual.txt", &["apt-mark", "showmanual"], &mut out);
                }
            }
            if root.join("var/lib/rpm").exists() {
                let rpm_root = format!("--root={}", root.display());
                run(dir, "rpm-packages.txt", &["rpm", &rpm_root, "-qa"], &mut out);
            }
        }
        "disk-layout" => {
            // sysstate's own description, which a recovery reads, for `/` and for `--root`.
            let layout = crate::layout::describe(root);
            let written = serde_json::to_vec_pretty(&layout).expect("layouts encode");
            let written = std::fs::write(dir.join(LAYOUT_FILE), written);
            out.push(Generated {
                file: LAYOUT_FILE.into(),
                command: vec!["sysstate".into(), "(disk layout)".into(), root.display().to_string()],
                status: Some(if written.is_ok() { 0 } else { 1 }),
                stderr: match written {
                    Ok(()) => layout.notes.join("; "),
                    Err(error) => error.to_string(),
                },
            });
            if live {
                live_disk_layout(dir, &mut out);
            } else {
                // The partition tables of the root's disks, as `sfdisk` takes them back.
                for disk in layout.disks.iter().filter(|d| !d.table.is_empty()) {
                    let name = disk.device.trim_start_matches("/dev/").replace('/', "-");
                    run(dir, &format!("sfdisk-{name}.txt"), &["sfdisk", "--dump", &disk.device], &mut out);
                }
            }
        }
        "bootloader" if live && (Path::new("/sys/firmware/efi").exists() || installed("efibootmgr")) => {
            run(dir, "efibootmgr.txt", &["efibootmgr", "-v"], &mut out);
        }
        _ => {}
    }
    let _ = std::fs::write(dir.join("commands.json"), serde_json::to_vec_pretty(&out).expect("records encode"));
    out
}

/// The raw outputs of the running machine's disk tools, beside `layout.json`: what an
/// administrator reads, and what a layout element sysstate does not describe yet keeps.
fn live_disk_layout(dir: &Path, out: &mut Vec<Generated>) {
    run(dir, "lsblk.json", &["lsblk", "-J", "-O"], out);
    run(dir, "blkid.txt", &["blkid"], out);
    run(dir, "findmnt.json", &["findmnt", "-J"], out);
    let disks = sysstate_fs::command("lsblk")
        .args(["-dnpro", "NAME,TYPE,PTTYPE"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // Only disks with a partition table: sfdisk fails on the others (zram, whole-disk
    // filesystems), which is not a problem worth a warning.
    let partitioned = disks.lines().filter_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        (fields.len() == 3 && fields[1] == "disk" && !fields[2].is_empty()).then_some(fields[0])
    });
    for disk in partitioned {
        let name = disk.trim_start_matches("/dev/").replace('/', "-");
        run(dir, &format!("sfdisk-{name}.txt"), &["sfdisk", "--dump", disk], out);
    }
    if Path::new("/proc/mdstat").exists() && installed("mdadm") {
        run(dir, "mdadm.txt", &["mdadm", "--detail", "--scan"], out);
    }
    if installed("lvm") {
        run(dir, "lvm.json", &["lvm", "fullreport", "--reportformat", "json"], out);
    }
    // A LUKS header lost is the data lost: keep each one's description (keyslots,
    // cipher, UUID) beside the layout. The header itself is `cryptsetup
    // luksHeaderBackup`'s job, kept off backups on purpose: it opens with old keys.
    // blkid probes the devices itself; lsblk's FSTYPE needs udev's database.
    let devices = sysstate_fs::command("blkid")
        .args(["-t", "TYPE=crypto_LUKS", "-o", "device"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for device in devices.lines().filter(|l| l.starts_with("/dev/")) {
        let name = device.trim_start_matches("/dev/").replace('/', "-");
        run(dir, &format!("luks-{name}.txt"), &["cryptsetup", "luksDump", device], out);
    }
}
