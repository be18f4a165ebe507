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

    /// An existing disk image, attached.
    fn open(image: &Path) -> DiskImage {
        let device = run("losetup", &["-f", "--show", image.to_str().unwrap()]).trim().to_string();
        let disk = DiskImage { device, mounts: Vec::new() };
        // Without udev the kernel may not have read the table: ask it (an error when it has).
        let _ = Command::new("partx").args(["-a", &disk.device]).status();
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

    // A recovery of this version plans the same table onto a new disk, and refuses, before
    // writing anything, a disk too small, a disk that holds data, and a base of another release.
    let image = |name: &str, size: u64| {
        let path = sandbox.path(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path.to_str().unwrap().to_string()
    };
    let new = image("new.img", 600 << 20);
    let plan = sandbox.json(&["recover", "--disk", &new, "--dry-run"], 0);
    let planned = plan["plan"]["partitions"].as_array().unwrap();
    for (planned, recorded) in planned.iter().zip(parts) {
        for field in ["start", "size", "type", "uuid", "name"] {
            assert_eq!(planned[field], recorded[field], "{field} of {planned}");
        }
    }
    assert_eq!(plan["plan"]["table-id"], table["id"]);
    let made: Vec<&str> =
        plan["plan"]["filesystems"].as_array().unwrap().iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(made, ["ext4", "vfat", "swap"], "{plan:#}");
    assert!(
        plan["plan"]["filesystems"][0]["command"].as_array().unwrap().contains(&serde_json::json!(rootfs)),
        "{plan:#}"
    );
    assert_eq!(std::fs::read(&new).unwrap().iter().filter(|b| **b != 0).count(), 0, "a dry run wrote to the disk");

    let small = image("small.img", 100 << 20);
    let refused = sandbox.run_code(&["recover", "--disk", &small, "--dry-run"], 2);
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("error[recover-disk-too-small]") && stderr.contains(&format!("holds {} bytes", 100u64 << 20)),
        "{stderr}"
    );
    assert_job_failed(&sandbox, "recover-disk-too-small");

    let used = image("used.img", 600 << 20);
    run("sh", &["-c", &format!("echo 'label: gpt' | sfdisk -q {used}")]);
    let refused = sandbox.run_code(&["recover", "--disk", &used], 2);
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("error[restore-destination]") && stderr.contains("--overwrite"), "{stderr}");
    assert_job_failed(&sandbox, "restore-destination");
    sandbox.json(&["recover", "--disk", &used, "--dry-run", "--overwrite"], 0);

    // A base tarball of another release (its apt lists name the release).
    let lists = sandbox.path("tarball/var/lib/apt/lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(lists.join("deb.debian.org_debian_dists_trixie_Release"), "Suite: testing\n").unwrap();
    let tarball = sandbox.path("trixie.tgz");
    run("tar", &["-czf", tarball.to_str().unwrap(), "-C", sandbox.path("tarball").to_str().unwrap(), "var"]);
    let refused = sandbox.run_code(&["recover", "--disk", &new, "--base-tarball", tarball.to_str().unwrap()], 2);
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("error[release-mismatch]") && stderr.contains("`trixie`") && stderr.contains("`bookworm`"),
        "{stderr}"
    );
    assert_job_failed(&sandbox, "release-mismatch");
    assert_eq!(
        std::fs::read(&new).unwrap().iter().filter(|b| **b != 0).count(),
        0,
        "a refused recovery wrote to the disk"
    );

    // A step that fails on the way — a mirror that does not answer, with no base tarball — is
    // recover-failed naming the step, its command and its last lines, and leaves nothing
    // mounted or attached.
    if !require("debootstrap", Path::new("/usr/sbin/debootstrap").exists()) {
        return;
    }
    let failed = sandbox.run_code(&["recover", "--disk", &new, "--mirror", "http://127.0.0.1:9/debian"], 2);
    let stderr = text(&failed.stderr);
    assert!(
        stderr.contains("error[recover-failed]")
            && stderr.contains("recovery step `base system` failed: `debootstrap ")
            && stderr.contains("E: Failed getting release file http://127.0.0.1:9/debian"),
        "{stderr}"
    );
    assert_job_failed(&sandbox, "recover-failed");
    let staging = sandbox.path("state/recover");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(staging.to_str().unwrap()), "left mounted under {}:\n{mounts}", staging.display());
    let attached = run("losetup", &["-j", &new]);
    assert!(attached.trim().is_empty(), "the disk is still attached: {attached}");
}

/// A root on a btrfs subvolume (as Ubuntu installs it): recover does not recreate subvolumes,
/// and says so before touching the disk.
#[test]
fn a_layout_recover_cannot_rebuild_is_refused_by_name() {
    if !require(
        "root, loop devices, sfdisk, partx, mkfs.btrfs",
        is_root() && Path::new("/dev/loop-control").exists() && Path::new("/sbin/mkfs.btrfs").exists(),
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    let disk = DiskImage::attach(&sandbox.path("disk.img"), 300 << 20, "label: gpt\ntype=linux, name=root\n");
    run("mkfs.btrfs", &["-q", &disk.partition(1)]);
    let top = sandbox.path("top");
    std::fs::create_dir_all(&top).unwrap();
    run("mount", &[&disk.partition(1), top.to_str().unwrap()]);
    run("btrfs", &["-q", "subvolume", "create", top.join("@").to_str().unwrap()]);
    run("umount", &[top.to_str().unwrap()]);
    let root = sandbox.path("root");
    std::fs::create_dir_all(&root).unwrap();
    run("mount", &["-o", "subvol=@", &disk.partition(1), root.to_str().unwrap()]);
    let _unmount = Unmount(root.clone());
    let uuid = blkid(&disk.partition(1), "UUID");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/fstab"), format!("UUID={uuid} / btrfs defaults,subvol=@ 0 0\n")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=ubuntu\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\n").unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/sh", root.join("bin/sh")).unwrap();
    sandbox
        .json(&["backup", "--root", root.to_str().unwrap(), "--component", "disk-layout", "--component", "config"], 0);
    let new = sandbox.path("new.img");
    std::fs::File::create(&new).unwrap().set_len(300 << 20).unwrap();
    let refused = sandbox.run_code(&["recover", "--disk", new.to_str().unwrap(), "--dry-run"], 2);
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("error[recover-unsupported]")
            && stderr.contains("btrfs subvolume")
            && stderr.contains("subvol=@"),
        "{stderr}"
    );
    assert!(stderr.contains("sysstate restore --to"), "the refusal says what to do instead: {stderr}");
    assert_job_failed(&sandbox, "recover-unsupported");
}

/// Unmounts a folder when dropped (before the disk under it is detached).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Removes a file when dropped: each recovered image (about 800 MB) is gone when its test ends,
/// passed or failed, so the suite's peak on the disk stays near one image.
struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// UEFI firmware for QEMU (Debian's `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How a test image boots: the two kinds `scripts/boot-image.sh` builds.
#[derive(Clone, Copy, PartialEq)]
enum Firmware {
    /// GPT: ESP (1), swap (2), root (3); GRUB at the ESP's removable path; OVMF.
    Uefi,
    /// DOS label: swap (1), root (2); GRUB in the MBR; SeaBIOS.
    Bios,
}

impl Firmware {
    fn root_partition(self) -> u32 {
        match self {
            Firmware::Uefi => 3,
            Firmware::Bios => 2,
        }
    }

    /// The marker's `efi`: the ESP by type and UUID, or nothing mounted.
    fn esp(self) -> &'static str {
        match self {
            Firmware::Uefi => "vfat:5A5E-1D01",
            Firmware::Bios => "",
        }
    }
}

/// The bootable Debian of `scripts/boot-image.sh` for `firmware` (built once and cached by
/// `scripts/test.sh`: SYSSTATE_TEST_BOOT_IMAGE, SYSSTATE_TEST_BOOT_IMAGE_BIOS), when it and what
/// boots it are here.
fn boot_image(firmware: Firmware) -> Option<PathBuf> {
    let variable = match firmware {
        Firmware::Uefi => "SYSSTATE_TEST_BOOT_IMAGE",
        Firmware::Bios => "SYSSTATE_TEST_BOOT_IMAGE_BIOS",
    };
    let image = std::env::var_os(variable).map(PathBuf::from).filter(|p| p.exists());
    let tools = ["/usr/bin/qemu-system-x86_64", OVMF_CODE, OVMF_VARS, "/usr/bin/mcopy", "/usr/sbin/debootstrap"]
        .iter()
        .all(|p| Path::new(p).exists());
    let here =
        image.is_some() && base_tarball().exists() && tools && is_root() && Path::new("/dev/loop-control").exists();
    require(
        &format!("the bootable image of scripts/boot-image.sh in {variable} and its base tarball, qemu-system-x86, ovmf, mtools, debootstrap, root"),
        here,
    )
    .then(|| image.unwrap())
}

/// The debootstrap tarball the images were built from, beside the UEFI image: what a recovery
/// installs its base system from, without a mirror.
fn base_tarball() -> PathBuf {
    let image = std::env::var_os("SYSSTATE_TEST_BOOT_IMAGE").unwrap_or_default();
    PathBuf::from(format!("{}.base.tgz", Path::new(&image).display()))
}

/// What the image's marker unit printed at boot (`SYSSTATE-MARKER key=value … end`).
type Marker = std::collections::BTreeMap<String, String>;

/// Boots `image` in QEMU (TCG: no KVM here; OVMF for UEFI, QEMU's own SeaBIOS for BIOS;
/// changes discarded) with its serial console in `log`, until the machine powers itself off
/// after its marker, or `limit` seconds pass. The marker, if it came, and the seconds it took.
fn boot(image: &Path, firmware: Firmware, log: &Path, limit: u64) -> (Option<Marker>, f64) {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1024", "-no-reboot", "-nic", "none"])
        .args(["-display", "none", "-monitor", "none", "-serial", &format!("file:{}", log.display())]);
    if firmware == Firmware::Uefi {
        let vars = log.with_extension("vars");
        std::fs::copy(OVMF_VARS, &vars).unwrap();
        qemu.args(["-drive", &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}")])
            .args(["-drive", &format!("if=pflash,format=raw,file={}", vars.display())]);
    }
    let started = std::time::Instant::now();
    let mut qemu = qemu
        .args(["-drive", &format!("file={},format=raw,if=virtio,snapshot=on", image.display())])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 starts");
    while qemu.try_wait().unwrap().is_none() && started.elapsed().as_secs() < limit {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    let console = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let marker = console.lines().find_map(|l| l.trim().strip_prefix("SYSSTATE-MARKER ")).map(|l| {
        l.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    });
    (marker, started.elapsed().as_secs_f64())
}

/// The end of a console log, for a failure's message.
fn tail(log: &Path) -> String {
    let console = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Backs up the system on the disk image `image` with `--root`.
fn back_up_image(sandbox: &Sandbox, image: &Path, firmware: Firmware) {
    let mut disk = DiskImage::open(image);
    let root = sandbox.path("original-root");
    disk.mount(firmware.root_partition(), &root);
    sandbox.json(&["backup", "--root", root.to_str().unwrap()], 0);
}

/// The original machine: a copy of the cached image, backed up, and booted for its marker.
fn original(sandbox: &Sandbox, cached: &Path, firmware: Firmware) -> Marker {
    let image = sandbox.path("original.img");
    run("cp", &["--sparse=always", cached.to_str().unwrap(), image.to_str().unwrap()]);
    let _image = RemoveFile(image.clone());
    back_up_image(sandbox, &image, firmware);
    let log = sandbox.path("original.console");
    let (marker, seconds) = boot(&image, firmware, &log, 300);
    let marker = marker.unwrap_or_else(|| {
        panic!(
            "the ORIGINAL image printed no marker in {seconds:.0} s: the image or QEMU is broken, not the recovery; its console ends:\n{}",
            tail(&log)
        )
    });
    eprintln!("the original booted to its marker in {seconds:.1} s: {marker:?}");
    assert_eq!(marker["host"], "sysstate-original");
    assert_eq!(marker["account"], "tester:1000:Recovery_test");
    assert!(marker["packages"].parse::<u32>().unwrap() > 100, "{marker:?}");
    assert_eq!(marker["swap"], "0b1c3a55-5e55-4a7e-9d0c-5a5e1d000002");
    assert_eq!(marker["efi"], firmware.esp());
    assert_eq!(marker["config"].len(), 64);
    marker
}

/// The original machine, backed up and booted once for the tests that recover it (two boots
/// and two backups fewer on these 2 cores): the sandbox holding its repository, and its marker.
fn shared_original(cached: &Path) -> &'static (Sandbox, Marker) {
    static ORIGINAL: std::sync::OnceLock<(Sandbox, Marker)> = std::sync::OnceLock::new();
    ORIGINAL.get_or_init(|| {
        let sandbox = Sandbox::new();
        let marker = original(&sandbox, cached, Firmware::Uefi);
        (sandbox, marker)
    })
}

/// Recovers the latest version onto a new blank image of the original's size.
fn recover_onto(sandbox: &Sandbox, cached: &Path, name: &str, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let image = sandbox.path(name);
    std::fs::File::create(&image).unwrap().set_len(std::fs::metadata(cached).unwrap().len()).unwrap();
    let tarball = base_tarball();
    let mut args = vec!["recover", "--disk", image.to_str().unwrap(), "--base-tarball", tarball.to_str().unwrap()];
    args.extend_from_slice(extra);
    let started = std::time::Instant::now();
    let report = sandbox.json(&args, 0);
    let steps: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {:.1} s", s["name"].as_str().unwrap(), s["seconds"].as_f64().unwrap()))
        .collect();
    eprintln!("recovered onto {name} in {:.1} s ({})", started.elapsed().as_secs_f64(), steps.join(", "));
    (image, report)
}

/// The recovery issue's proof: a small Debian (UEFI, GPT: ESP, swap, ext4 root; kernel,
/// systemd, GRUB) is backed up with `--root`, booted, recovered with `sysstate recover` onto a
/// blank image, and the recovered image boots in QEMU to the same marker: host name, an account
/// of the restored account database, the hash of a restored configuration file, the number of
/// installed packages, the swap area and the ESP by their recorded identifiers.
#[test]
fn a_recovered_machine_boots_like_the_original() {
    let Some(cached) = boot_image(Firmware::Uefi) else { return };
    let (sandbox, before) = shared_original(&cached);
    let (recovered, report) = recover_onto(sandbox, &cached, "recovered.img", &[]);
    let _image = RemoveFile(recovered.clone());
    assert_eq!(report["warnings"], serde_json::json!([]), "{report:#}");
    install_agent(sandbox, &recovered);
    let log = sandbox.path("recovered.console");
    // Under TCG the agent's first backup takes about two minutes of the boot.
    let (after, seconds) = boot(&recovered, Firmware::Uefi, &log, 660);
    let after = after.unwrap_or_else(|| {
        panic!(
            "the RECOVERED image printed no marker in {seconds:.0} s (the original did); its console ends:\n{}",
            tail(&log)
        )
    });
    eprintln!("the recovered machine booted to its marker and ran its agent in {seconds:.1} s: {after:?}");
    assert_eq!(&after, before, "the recovered machine differs from the original");

    // The agent under the recovered machine's own systemd (PID 1): its scheduled backup.
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("SYSSTATE-AGENT "))
        .unwrap_or_else(|| panic!("the recovered machine's agent reported no job; its console ends:\n{}", tail(&log)));
    let jobs: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let job = &jobs[0];
    assert_eq!((job["kind"].as_str(), job["trigger"].as_str()), (Some("backup"), Some("schedule")), "{job:#}");
    assert_eq!(job["state"], "succeeded", "the agent's scheduled backup on the recovered machine: {job:#}");
}

/// The marker unit's addition on the recovered machine: wait until the agent's first job has
/// ended, print it on the console, then power off.
const AGENT_MARKER_UNIT: &str = "[Service]
TimeoutStartSec=infinity
ExecStartPost=
ExecStartPost=/usr/local/sbin/sysstate-agent-marker
ExecStartPost=/bin/systemctl --no-block poweroff
";
const AGENT_MARKER: &str = r#"#!/bin/sh
for i in $(seq 180); do
  sysstate job --previous 1 --json 2>/dev/null | grep -q '"ended": *"' && break
  sleep 3
done
journalctl -u sysstate-agent --no-pager | tail -20
echo "SYSSTATE-AGENT $(sysstate job --previous 1 --json | tr -d '\n')"
"#;

/// Installs sysstate and its agent into the recovered image (the unit of `dist/systemd`,
/// enabled; a config that backs up every minute), and makes the image's marker unit wait for the
/// agent's first job before powering off ([`AGENT_MARKER`]).
fn install_agent(sandbox: &Sandbox, image: &Path) {
    let mut disk = DiskImage::open(image);
    let root = sandbox.path("recovered-root");
    disk.mount(3, &root);
    run("strip", &["-o", root.join("usr/bin/sysstate").to_str().unwrap(), env!("CARGO_BIN_EXE_sysstate")]);
    let units = root.join("etc/systemd/system");
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../../dist/systemd/sysstate-agent.service");
    std::fs::copy(unit, units.join("sysstate-agent.service")).unwrap();
    std::fs::create_dir_all(units.join("multi-user.target.wants")).unwrap();
    let wanted = units.join("multi-user.target.wants/sysstate-agent.service");
    std::os::unix::fs::symlink("../sysstate-agent.service", wanted).unwrap();
    std::fs::create_dir_all(root.join("etc/sysstate")).unwrap();
    std::fs::create_dir_all(root.join("var/backups")).unwrap();
    std::fs::write(root.join("etc/sysstate/config.toml"), "[schedule]\nbackup = \"* * * * *\"\n").unwrap();
    std::fs::create_dir_all(units.join("sysstate-marker.service.d")).unwrap();
    std::fs::write(units.join("sysstate-marker.service.d/agent.conf"), AGENT_MARKER_UNIT).unwrap();
    let script = root.join("usr/local/sbin/sysstate-agent-marker");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    std::fs::write(&script, AGENT_MARKER).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The boot test can fail: a recovery that leaves out `disk-layout` (the machine's fstab)
/// boots a machine without its ESP mounted, and the comparison says so. (Its swap still comes
/// up: systemd's gpt-auto-generator finds a swap partition by its GPT type.)
/// This recovery reads its version from the vault, as a rescue system of a lost machine would:
/// the host registers, its local repository is copied to the vault, and recover's every read
/// (layout, system, package selection, files) goes through the vault.
#[test]
fn a_recovery_from_the_vault_without_a_component_the_boot_needs_is_caught() {
    let Some(cached) = boot_image(Firmware::Uefi) else { return };
    let (sandbox, before) = shared_original(&cached);
    let vault = crate::vault::Vault::start();
    let credentials = vault.credentials("lost-machine", "1d");
    sandbox.ok(&["agent", "register", credentials.to_str().unwrap()]);
    let vault_url = vault.url();
    sandbox.ok(&["copy", "--to", &vault_url]);
    let components = ["boot", "efi", "config", "accounts", "bootloader", "systemd", "cron"];
    let mut extra = vec!["--target", vault_url.as_str()];
    for component in components {
        extra.extend(["--component", component]);
    }
    let (recovered, report) = recover_onto(sandbox, &cached, "without-fstab.img", &extra);
    let _image = RemoveFile(recovered.clone());
    // (The other boot test recovers from the same sandbox's local repository meanwhile.)
    let jobs = sandbox.json(&["job", "--previous", "10"], 0);
    let from_vault =
        jobs.as_array().unwrap().iter().find(|j| j["kind"] == "recover" && j["target"] == vault_url.as_str());
    assert_eq!(from_vault.map(|j| j["state"].clone()), Some(serde_json::json!("succeeded")), "{jobs:#}");
    assert!(!report["plan"]["components"].as_array().unwrap().contains(&serde_json::json!("disk-layout")));
    let (after, seconds) = boot(&recovered, Firmware::Uefi, &sandbox.path("without-fstab.console"), 240);
    eprintln!("without its fstab, the recovered machine gave {after:?} in {seconds:.1} s");
    if let Some(after) = after {
        assert_ne!(&after, before, "a recovery without the fstab cannot boot the same machine");
        assert_eq!(after["host"], before["host"], "what was restored is there");
        assert_ne!(after["efi"], before["efi"], "no fstab, no ESP mounted: {after:?}");
    }
}

/// A BIOS machine on a DOS-labelled disk (swap, root; GRUB in the MBR) is recovered with GRUB
/// for `i386-pc` written to the new disk, and boots under SeaBIOS to the original's marker.
#[test]
fn a_bios_machine_is_recovered_with_grub_in_its_mbr_and_boots_like_the_original() {
    let Some(cached) = boot_image(Firmware::Bios) else { return };
    let sandbox = Sandbox::new();
    let before = original(&sandbox, &cached, Firmware::Bios);
    let (recovered, report) = recover_onto(&sandbox, &cached, "recovered-bios.img", &[]);
    let _image = RemoveFile(recovered.clone());
    let plan = &report["plan"];
    assert_eq!((plan["firmware"].as_str(), plan["table"].as_str()), (Some("bios"), Some("dos")), "{plan:#}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report:#}");
    let mbr = std::fs::read(&recovered).unwrap();
    assert_eq!(&mbr[510..512], &[0x55, 0xaa], "a boot sector");
    assert!(mbr[..440].iter().any(|b| *b != 0), "GRUB's boot code in the MBR");
    // The new filesystems were trimmed: the image file holds what its root uses, not also the
    // packages apt downloaded and deleted.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&recovered).unwrap()) * 512;
    let used: u64 = {
        let mut disk = DiskImage::open(&recovered);
        let root = sandbox.path("recovered-bios-root");
        disk.mount(Firmware::Bios.root_partition(), &root);
        let df = run("df", &["-B1", "--output=used", root.to_str().unwrap()]);
        df.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("df said {df}"))
    };
    eprintln!("the recovered BIOS image holds {allocated} bytes for {used} used by its root");
    assert!(allocated < used + (100 << 20), "{allocated} bytes allocated for {used} used: not trimmed");
    let log = sandbox.path("recovered-bios.console");
    let (after, seconds) = boot(&recovered, Firmware::Bios, &log, 300);
    let after = after.unwrap_or_else(|| {
        panic!(
            "the RECOVERED BIOS image printed no marker in {seconds:.0} s (the original did); its console ends:\n{}",
            tail(&log)
        )
    });
    eprintln!("the recovered BIOS machine booted to its marker in {seconds:.1} s");
    assert_eq!(after, before, "the recovered BIOS machine differs from the original");
}

/// A small system root with a machine's identity: host name, machine-id, an SSH host key,
/// network configuration, and an application's configuration.
fn server_root(at: &Path, name: &str, machine_id: &str, release: (&str, &str)) {
    for dir in ["etc/ssh", "etc/network", "bin"] {
        std::fs::create_dir_all(at.join(dir)).unwrap();
    }
    let files = [
        ("etc/os-release", format!("ID=debian\nVERSION_ID=\"{}\"\nVERSION_CODENAME={}\n", release.0, release.1)),
        ("etc/hostname", format!("{name}\n")),
        ("etc/hosts", format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n")),
        ("etc/machine-id", format!("{machine_id}\n")),
        ("etc/ssh/ssh_host_ed25519_key", format!("{name}'s private host key\n")),
        ("etc/ssh/ssh_host_ed25519_key.pub", format!("ssh-ed25519 {name}\n")),
        ("etc/network/interfaces", format!("# {name}'s network\nauto eth0\n")),
        ("etc/app.conf", format!("written on {name}\n")),
    ];
    for (path, text) in files {
        std::fs::write(at.join(path), text).unwrap();
    }
    std::fs::copy("/bin/sh", at.join("bin/sh")).unwrap();
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap()
}

/// Restore to another server: onto a machine whose machine-id is not the version's, the
/// restore asks whose identity the machine ends with; `--identity leave` brings the system
/// state and keeps the machine's host name, machine-id, SSH host keys and network (a clone),
/// `--identity keep` makes it the version's machine (a replacement); a version of a newer
/// release is not applied onto an older system.
#[test]
fn a_restore_to_another_server_keeps_or_leaves_its_identity_as_told() {
    let sandbox = Sandbox::new();
    let (alpha, beta) = (sandbox.path("alpha"), sandbox.path("beta"));
    server_root(&alpha, "alpha", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", ("12", "bookworm"));
    server_root(&beta, "beta", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", ("12", "bookworm"));
    sandbox.json(&["backup", "--root", alpha.to_str().unwrap(), "--component", "config"], 0);
    let beta_arg = beta.to_str().unwrap();
    let before = snapshot(&beta);

    // Not said: refused, nothing changed.
    let refused = sandbox.run_code(&["restore", "--in-place", "--root", beta_arg, "--component", "config"], 2);
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("another machine") && stderr.contains("--identity keep") && stderr.contains("--identity leave"),
        "{stderr}"
    );
    assert_same(&before, &snapshot(&beta));

    // A clone: the system state, not the identity.
    let report =
        sandbox.json(&["restore", "--in-place", "--root", beta_arg, "--component", "config", "--identity", "leave"], 0);
    assert_eq!(report["identity"]["mode"], "leave", "{report:#}");
    assert_eq!(report["identity"]["other-machine"], true);
    assert_eq!(read(&beta, "etc/app.conf"), "written on alpha\n");
    assert_eq!(read(&beta, "etc/hostname"), "beta\n");
    assert_eq!(read(&beta, "etc/hosts"), "127.0.0.1\tlocalhost\n127.0.1.1\tbeta\n");
    assert_eq!(read(&beta, "etc/machine-id"), "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n");
    assert_eq!(read(&beta, "etc/ssh/ssh_host_ed25519_key"), "beta's private host key\n");
    assert_eq!(read(&beta, "etc/ssh/ssh_host_ed25519_key.pub"), "ssh-ed25519 beta\n");
    assert_eq!(read(&beta, "etc/network/interfaces"), "# beta's network\nauto eth0\n");
    let changed: Vec<&str> =
        report["differences"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap()).collect();
    assert!(changed.iter().all(|p| !p.contains("hostname") && !p.contains("ssh_host")), "{changed:?}");
    sandbox.ok(&["restore", "--undo", report["undo"].as_str().unwrap(), "--root", beta_arg]);
    assert_same(&before, &snapshot(&beta));

    // A replacement: the version's machine.
    let report =
        sandbox.json(&["restore", "--in-place", "--root", beta_arg, "--component", "config", "--identity", "keep"], 0);
    assert_eq!(report["identity"]["mode"], "keep");
    for path in [
        "etc/app.conf",
        "etc/hostname",
        "etc/hosts",
        "etc/machine-id",
        "etc/ssh/ssh_host_ed25519_key",
        "etc/network/interfaces",
    ] {
        assert_eq!(read(&beta, path), read(&alpha, path), "{path}");
    }
    sandbox.ok(&["restore", "--undo", report["undo"].as_str().unwrap(), "--root", beta_arg]);

    // A newer release onto an older one: refused, named, nothing changed.
    std::fs::write(beta.join("etc/os-release"), "ID=debian\nVERSION_ID=\"11\"\nVERSION_CODENAME=bullseye\n").unwrap();
    let before = snapshot(&beta);
    let refused = sandbox.run_code(&["restore", "--in-place", "--root", beta_arg, "--identity", "keep"], 2);
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("error[release-mismatch]")
            && stderr.contains("debian 12 (bookworm)")
            && stderr.contains("debian 11 (bullseye)"),
        "{stderr}"
    );
    assert_same(&before, &snapshot(&beta));
    assert_job_failed(&sandbox, "release-mismatch");
    // An older version onto a newer system is allowed (the dry run shows what it would do).
    std::fs::write(beta.join("etc/os-release"), "ID=debian\nVERSION_ID=\"13\"\nVERSION_CODENAME=trixie\n").unwrap();
    sandbox.json(&["restore", "--in-place", "--root", beta_arg, "--identity", "keep", "--dry-run"], 0);
}
