//! Recovering a machine from its system state (the recovery issue): what a version records so a
//! machine can be rebuilt from it.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(output.status.success(), "{program} {args:?}: {}", text(&output.stderr));
    text(&output.stdout)
}

/// A disk image on a loop device with its partitions' device nodes (made with `partx`: these
/// machines have no udev), mounted where the test says; undone when dropped.
struct DiskImage {
    device: String,
    mounts: Vec<PathBuf>,
}

impl DiskImage {
    fn attach(image: &Path, size: u64, table: &str) -> DiskImage {
        std::fs::File::create(image).unwrap().set_len(size).unwrap();
        let mut sfdisk =
            Command::new("sfdisk").args(["-q"]).arg(image).stdin(std::process::Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(sfdisk.stdin.as_mut().unwrap(), table.as_bytes()).unwrap();
        assert!(sfdisk.wait().unwrap().success());
        let device = run("losetup", &["-f", "--show", image.to_str().unwrap()]).trim().to_string();
        let disk = DiskImage { device, mounts: Vec::new() };
        run("partx", &["-a", &disk.device]);
        disk
    }

    fn partition(&self, number: u32) -> String {
        format!("{}p{number}", self.device)
    }

    fn mount(&mut self, number: u32, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        run("mount", &[&self.partition(number), at.to_str().unwrap()]);
        self.mounts.push(at.to_path_buf());
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        for at in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(at).status();
        }
        let _ = Command::new("partx").args(["-d", &self.device]).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn blkid(device: &str, tag: &str) -> String {
    run("blkid", &["-p", "-s", tag, "-o", "value", device]).trim().to_string()
}

/// A system on a GPT disk image (an ESP, swap, an ext4 root) backed up with `--root`: the
/// version records the disk layout a recovery needs — the table and each partition's GUID, the
/// filesystems with their UUIDs, labels and fstab mount points, swap, the ESP and the boot disk —
/// and the system it is of, read from that root and not from this machine.
#[test]
fn a_root_on_a_partitioned_disk_records_its_layout_and_system() {
    if !require(
        "root, loop devices, sfdisk, partx, mkfs.vfat",
        is_root() && Path::new("/dev/loop-control").exists() && Path::new("/sbin/mkfs.vfat").exists(),
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    let mut disk = DiskImage::attach(
        &sandbox.path("disk.img"),
        600 << 20,
        "label: gpt\n\
         size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\"\n\
         size=64MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap\n\
         type=0FC63DAF-8483-4772-8E3C-3D69D8477DE4, name=root\n",
    );
    run("mkfs.vfat", &["-n", "ESP", &disk.partition(1)]);
    run("mkswap", &["-L", "sw", &disk.partition(2)]);
    run("mkfs.ext4", &["-q", "-L", "rootfs", &disk.partition(3)]);
    let root = sandbox.path("root");
    disk.mount(3, &root);
    // The ESP stays unmounted (these machines' kernel has no vfat): its mount point comes from
    // the root's fstab, as a recovery needs it, whether it is mounted or not.
    std::fs::create_dir_all(root.join("boot/efi")).unwrap();
    let (esp, swap, rootfs) =
        (blkid(&disk.partition(1), "UUID"), blkid(&disk.partition(2), "UUID"), blkid(&disk.partition(3), "UUID"));
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/fstab"),
        format!(
            "# <file system> <mount point> <type> <options> <dump> <pass>\n\
             UUID={rootfs} / ext4 errors=remount-ro 0 1\n\
             UUID={esp} /boot/efi vfat umask=0077 0 1\n\
             UUID={swap} none swap sw 0 0\n"
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/hostname"), "imaged\n").unwrap();
    std::fs::write(root.join("boot/vmlinuz-6.1.0-99-amd64"), b"not a kernel").unwrap();
    // The root's shell, behind merged /usr's link and sh → dash, as on Debian.
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::copy("/bin/sh", root.join("usr/bin/dash")).unwrap();
    std::os::unix::fs::symlink("dash", root.join("usr/bin/sh")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();

    let root_arg = root.to_str().unwrap();
    let report =
        sandbox.json(&["backup", "--root", root_arg, "--component", "disk-layout", "--component", "config"], 0);
    let generated = report["components"].as_array().unwrap().iter().find(|c| c["name"] == "disk-layout").unwrap();
    let layout_record = generated["generated"].as_array().unwrap().iter().find(|g| g["file"] == "layout.json");
    assert_eq!(layout_record.unwrap_or_else(|| panic!("no layout.json in {generated}"))["status"], 0, "{generated}");

    // The system, from the root.
    let versions = sandbox.json(&["versions"], 0);
    let system = &versions[0]["system"];
    assert_eq!(system["distribution"], "debian", "{system}");
    assert_eq!(system["release"], "12");
    assert_eq!(system["codename"], "bookworm");
    assert_eq!(system["hostname"], "imaged");
    assert_eq!(system["kernels"], serde_json::json!(["6.1.0-99-amd64"]));
    assert_eq!(system["architecture"], if cfg!(target_arch = "x86_64") { "amd64" } else { "arm64" });
    assert!(system.get("running-kernel").is_none(), "a --root backup does not record this machine's kernel: {system}");

    // The layout, restored like any file of the version.
    let to = sandbox.path("restored");
    sandbox.ok(&["restore", "--component", "disk-layout", "--to", to.to_str().unwrap()]);
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(to.join(".sysstate-generated/disk-layout/layout.json")).unwrap())
            .unwrap();
    let table: serde_json::Value = serde_json::from_str(&run("sfdisk", &["--json", &disk.device])).unwrap();
    let table = &table["partitiontable"];
    let disks = layout["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{layout:#}");
    let d = &disks[0];
    assert_eq!(d["device"], disk.device.as_str());
    assert_eq!(d["table"], "gpt");
    assert_eq!(d["table-id"], table["id"]);
    assert_eq!(d["size-bytes"], 600u64 << 20);
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    for (recorded, real) in parts.iter().zip(table["partitions"].as_array().unwrap()) {
        for (ours, theirs) in
            [("start", "start"), ("size", "size"), ("type", "type"), ("uuid", "uuid"), ("name", "name")]
        {
            assert_eq!(recorded[ours], real[theirs], "{ours} of {recorded}");
        }
    }
    let fs = |n: u32| {
        layout["filesystems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["partition"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no filesystem on partition {n}: {layout:#}"))
    };
    assert_eq!(
        (fs(1)["type"].as_str(), fs(1)["uuid"].as_str(), fs(1)["label"].as_str()),
        (Some("vfat"), Some(esp.as_str()), Some("ESP"))
    );
    assert_eq!((fs(1)["mountpoint"].as_str(), fs(1)["options"].as_str()), (Some("/boot/efi"), Some("umask=0077")));
    assert_eq!(
        (fs(2)["type"].as_str(), fs(2)["uuid"].as_str(), fs(2)["label"].as_str()),
        (Some("swap"), Some(swap.as_str()), Some("sw"))
    );
    assert!(fs(2).get("mountpoint").is_none(), "swap is not mounted: {}", fs(2));
    assert_eq!(
        (fs(3)["type"].as_str(), fs(3)["uuid"].as_str(), fs(3)["label"].as_str()),
        (Some("ext4"), Some(rootfs.as_str()), Some("rootfs"))
    );
    assert_eq!((fs(3)["mountpoint"].as_str(), fs(3)["options"].as_str()), (Some("/"), Some("errors=remount-ro")));
    assert_eq!(layout["boot"], serde_json::json!({"firmware": "uefi", "disk": disk.device, "esp": "/boot/efi"}));
    assert_eq!(layout["stacks"], serde_json::json!([]));
    // The table as sfdisk takes it back, beside it.
    let dump = std::fs::read_to_string(
        to.join(".sysstate-generated/disk-layout")
            .join(format!("sfdisk-{}.txt", disk.device.trim_start_matches("/dev/"))),
    )
    .unwrap();
    assert!(dump.contains("label: gpt") && dump.contains(&parts[2]["uuid"].as_str().unwrap().to_string()), "{dump}");
}
