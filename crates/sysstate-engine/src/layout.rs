//! The disk layout a recovery needs to rebuild a machine, in one document of sysstate's own
//! (`layout.json` in the `disk-layout` component's generated files): the disks that hold the
//! filesystems mounted at and below the backed-up root, each with its partition table (type,
//! identifier, and every partition's start, size, type, GUID and name), the filesystems on them
//! (type, UUID, label, where the system mounts them and with which options), swap, the EFI
//! system partition, which disk the boot loader lives on, and the device stacks (LVM, RAID,
//! LUKS) that a recovery does not recreate yet — named, so a plan can refuse them.
//!
//! It is read from the kernel (`/proc/self/mountinfo`, `/sys/dev/block`) and from the devices
//! themselves (`sfdisk --json`, `blkid -p`: a low-level probe, which needs no udev), so it
//! describes a root given with `--root` (a disk image mounted somewhere) as well as `/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layout's format version.
pub const LAYOUT_FORMAT: u32 = 1;

/// GPT type of an EFI system partition.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// GPT type of a BIOS boot partition (GRUB's core image on a GPT disk booted by a BIOS).
pub const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";

/// A machine's disk layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Layout {
    pub format: u32,
    pub disks: Vec<Disk>,
    pub filesystems: Vec<Filesystem>,
    /// How the machine boots: `uefi` or `bios`, and from which disk.
    pub boot: Boot,
    /// Device-mapper and RAID devices under the filesystems: recorded, not recreated yet.
    pub stacks: Vec<Stack>,
    /// What could not be read, for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A disk and its partition table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Disk {
    /// Its device when the backup ran (`/dev/sda`, `/dev/loop3`).
    pub device: String,
    pub size_bytes: u64,
    pub sector_size: u32,
    /// `gpt`, `dos`, or empty for a disk with no partition table (a filesystem on the whole disk).
    pub table: String,
    /// The table's identifier (GPT disk GUID, DOS disk id).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub table_id: String,
    pub partitions: Vec<Partition>,
}

/// A partition, in sectors of its disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Partition {
    pub number: u32,
    /// Its device when the backup ran.
    pub device: String,
    pub start: u64,
    pub size: u64,
    /// GPT type GUID, or DOS type (`83`).
    #[serde(rename = "type")]
    pub kind: String,
    /// GPT partition GUID (what `PARTUUID=` names).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub attrs: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
}

/// A filesystem (or swap area) on a partition or a whole disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Filesystem {
    /// Its device when the backup ran.
    pub device: String,
    /// The disk it is on and the partition's number (0: the whole disk).
    pub disk: String,
    pub partition: u32,
    /// `ext4`, `xfs`, `btrfs`, `vfat`, `swap`, …
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// Where the system mounts it, from the root's point of view (`/`, `/boot/efi`); empty for
    /// swap or a filesystem it does not mount.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    /// Its options in the root's `/etc/fstab` (or the mount's, when fstab does not name it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub options: String,
    /// The filesystem's version as blkid reports it (`FAT32`, `1.0`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// How the machine boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Boot {
    /// `uefi` or `bios`.
    pub firmware: String,
    /// The disk the boot loader is on (the ESP's, a BIOS boot partition's, or the one whose
    /// first sector holds GRUB); empty when none was found.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disk: String,
    /// The EFI system partition's mount point, under UEFI.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub esp: String,
}

/// A device-mapper or RAID device the filesystems stand on.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stack {
    /// `lvm`, `luks`, `raid`, or `dm` for another device-mapper target.
    pub kind: String,
    pub device: String,
    /// The devices it is made of.
    pub members: Vec<String>,
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    device: (u32, u32),
    target: PathBuf,
    kind: String,
    options: String,
}

/// The mounts of `mountinfo` at `root` or below it.
fn mounts_under(mountinfo: &str, root: &Path) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJOR:MINOR ROOT TARGET OPTIONS [OPTIONAL…] - TYPE SOURCE SUPER-OPTIONS
        let Some((head, tail)) = line.split_once(" - ") else { continue };
        let fields: Vec<&str> = head.split(' ').collect();
        let tail: Vec<&str> = tail.split(' ').collect();
        if fields.len() < 6 || tail.is_empty() {
            continue;
        }
        let Some((major, minor)) = fields[2].split_once(':') else { continue };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else { continue };
        let target = PathBuf::from(unescape_mount(fields[4]));
        if !target.starts_with(root) {
            continue;
        }
        let mut device = (major, minor);
        // btrfs gives its mounts an anonymous device (major 0): the block device is the source.
        if major == 0 {
            if let Some(source) = tail.get(1).filter(|s| s.starts_with("/dev/")) {
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                if let Ok(meta) = std::fs::metadata(unescape_mount(source)) {
                    if meta.file_type().is_block_device() {
                        device = (rustix::fs::major(meta.rdev()), rustix::fs::minor(meta.rdev()));
                    }
                }
            }
        }
        out.push(Mount { device, target, kind: tail[0].to_string(), options: fields[5].to_string() });
    }
    out
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape_mount(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of an fstab: what, where, type, options.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FstabEntry {
    spec: String,
    target: String,
    kind: String,
    options: String,
}

fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| FstabEntry {
                spec: unescape_mount(f[0]),
                target: unescape_mount(f[1]),
                kind: f[2].to_string(),
                options: f.get(3).unwrap_or(&"defaults").to_string(),
            })
        })
        .collect()
}

/// True when fstab's `spec` names the filesystem `fs` (or its partition).
fn names(spec: &str, fs: &Filesystem, partition: Option<&Partition>) -> bool {
    let eq = |a: &str, b: &str| !b.is_empty() && a.eq_ignore_ascii_case(b);
    match spec.split_once('=') {
        Some(("UUID", v)) => eq(v, &fs.uuid),
        Some(("LABEL", v)) => eq(v, &fs.label),
        Some(("PARTUUID", v)) => partition.is_some_and(|p| eq(v, &p.uuid)),
        Some(("PARTLABEL", v)) => partition.is_some_and(|p| eq(v, &p.name)),
        _ => spec == fs.device,
    }
}

/// `/sys/dev/block/MAJOR:MINOR`.
fn sys_block(device: (u32, u32)) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", device.0, device.1))
}

fn read_sys(path: &Path) -> String {
    std::fs::read_to_string(path).map(|t| t.trim().to_string()).unwrap_or_default()
}

/// The device numbers of a block device by its sysfs folder (its `dev` file, `MAJOR:MINOR`).
fn dev_numbers(sys: &Path) -> Option<(u32, u32)> {
    let text = read_sys(&sys.join("dev"));
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The `/dev` node of a block device by its sysfs folder.
fn dev_node(sys: &Path) -> Option<String> {
    let uevent = std::fs::read_to_string(sys.join("uevent")).ok()?;
    uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(|n| format!("/dev/{n}"))
}

/// `blkid -p -o export DEVICE` as a map: empty when it finds nothing; a note when it could not
/// probe (a device it may not read).
pub(crate) fn probe(device: &str, notes: &mut Vec<String>) -> BTreeMap<String, String> {
    let output = sysstate_fs::command("blkid").args(["-p", "-o", "export", device]).env("LC_ALL", "C").output();
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            notes.push(format!("`blkid` could not run for {device} ({error}): its filesystem is not recorded"));
            return BTreeMap::new();
        }
    };
    // blkid exits with 2 both for "nothing found" and for a device it cannot open: its
    // message tells them apart.
    if !output.status.success() && !output.stderr.is_empty() {
        notes.push(format!(
            "`blkid -p {device}` failed ({}): its filesystem is not recorded",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("\\ ", " ")))
        .collect()
}

/// The partition table of `disk` by `sfdisk --json` (none: `table` left empty).
fn read_table(disk: &mut Disk, notes: &mut Vec<String>) {
    let output = sysstate_fs::command("sfdisk").args(["--json", &disk.device]).env("LC_ALL", "C").output();
    let Ok(output) = output else {
        notes.push(format!("`sfdisk` could not run for {}: its partition table is not recorded", disk.device));
        return;
    };
    if !output.status.success() {
        return; // no partition table: a filesystem on the whole disk
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
        notes.push(format!("`sfdisk --json {}` printed what is not JSON", disk.device));
        return;
    };
    let table = &value["partitiontable"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    disk.table = text(&table["label"]);
    disk.table_id = text(&table["id"]);
    if let Some(size) = table["sectorsize"].as_u64() {
        disk.sector_size = size as u32;
    }
    for part in table["partitions"].as_array().into_iter().flatten() {
        let node = text(&part["node"]);
        let number = node
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(disk.partitions.len() as u32 + 1);
        disk.partitions.push(Partition {
            number,
            device: node,
            start: part["start"].as_u64().unwrap_or(0),
            size: part["size"].as_u64().unwrap_or(0),
            kind: text(&part["type"]).to_uppercase(),
            uuid: text(&part["uuid"]).to_uppercase(),
            name: text(&part["name"]),
            attrs: text(&part["attrs"]),
            bootable: part["bootable"].as_bool().unwrap_or(false),
        });
    }
}

/// True when the first sector of `disk` holds GRUB's boot code.
fn grub_in_first_sector(disk: &str) -> bool {
    let mut sector = [0u8; 512];
    std::fs::File::open(disk).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut sector)).is_ok()
        && sector.windows(4).any(|w| w == b"GRUB")
}

/// Describes the disk layout of the system at `root`: the disks of the filesystems mounted at
/// and below it. Swap areas and filesystems on those disks that are not mounted are included,
/// with their mount point from the root's fstab.
pub fn describe(root: &Path) -> Layout {
    let mut layout = Layout { format: LAYOUT_FORMAT, ..Layout::default() };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let fstab = parse_fstab(&std::fs::read_to_string(root.join("etc/fstab")).unwrap_or_default());
    let mut mounts = mounts_under(&mountinfo, &root);
    // With an fstab, what it does not name is mounted for the moment (a stick, a test's
    // filesystem), not part of the machine: noted, not recorded.
    if !fstab.is_empty() {
        mounts.retain(|m| {
            let relative = Path::new("/").join(m.target.strip_prefix(&root).unwrap_or(Path::new("")));
            let kept = m.target == root || m.device.0 == 0 || fstab.iter().any(|e| Path::new(&e.target) == relative);
            if !kept {
                layout.notes.push(format!(
                    "`{}` is mounted but not in the root's fstab: its disk is not recorded",
                    relative.display()
                ));
            }
            kept
        });
    }
    // The disks under the mounted block devices, through partitions and stacks.
    let mut disks: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let mut pending: Vec<(u32, u32)> = mounts.iter().filter(|m| m.device.0 != 0).map(|m| m.device).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(device) = pending.pop() {
        if !seen.insert(device) {
            continue;
        }
        let sys = sys_block(device);
        let Ok(real) = std::fs::canonicalize(&sys) else { continue };
        let Some(node) = dev_node(&real) else { continue };
        if real.join("partition").exists() {
            // A partition: its disk is the folder above.
            let disk = real.parent().expect("a partition's folder has a parent");
            if let (Some(disk_node), Some(numbers)) = (dev_node(disk), dev_numbers(disk)) {
                disks.insert(disk_node, numbers);
            }
        } else if real.join("dm").exists() || real.join("md").exists() {
            let dm_uuid = read_sys(&real.join("dm/uuid"));
            let kind = if real.join("md").exists() {
                "raid"
            } else if dm_uuid.starts_with("LVM-") {
                "lvm"
            } else if dm_uuid.starts_with("CRYPT-") {
                "luks"
            } else {
                "dm"
            };
            let mut members = Vec::new();
            for slave in std::fs::read_dir(real.join("slaves")).into_iter().flatten().flatten() {
                let slave_sys = std::fs::canonicalize(slave.path()).unwrap_or_else(|_| slave.path());
                if let Some(numbers) = dev_numbers(&slave_sys) {
                    pending.push(numbers);
                    members.push(dev_node(&slave_sys).unwrap_or_default());
                }
            }
            layout.stacks.push(Stack { kind: kind.into(), device: node, members });
        } else {
            disks.insert(node, device);
        }
    }
    for (node, device) in &disks {
        let sys = std::fs::canonicalize(sys_block(*device)).unwrap_or_else(|_| sys_block(*device));
        let sectors: u64 = read_sys(&sys.join("size")).parse().unwrap_or(0);
        let mut disk = Disk {
            device: node.clone(),
            size_bytes: sectors * 512,
            sector_size: read_sys(&sys.join("queue/logical_block_size")).parse().unwrap_or(512),
            ..Disk::default()
        };
        read_table(&mut disk, &mut layout.notes);
        // The filesystems: on each partition, or on the whole disk.
        let places: Vec<(String, u32)> = if disk.table.is_empty() {
            vec![(node.clone(), 0)]
        } else {
            disk.partitions.iter().map(|p| (p.device.clone(), p.number)).collect()
        };
        for (device, number) in places {
            let probed = probe(&device, &mut layout.notes);
            let Some(kind) = probed.get("TYPE") else { continue };
            let field = |k: &str| probed.get(k).cloned().unwrap_or_default();
            let mut fs = Filesystem {
                device: device.clone(),
                disk: node.clone(),
                partition: number,
                kind: kind.clone(),
                uuid: field("UUID"),
                label: field("LABEL"),
                version: field("VERSION"),
                ..Filesystem::default()
            };
            let partition = disk.partitions.iter().find(|p| p.number == number);
            if let Some(entry) = fstab.iter().find(|e| names(&e.spec, &fs, partition)) {
                fs.mountpoint = if entry.kind == "swap" { String::new() } else { entry.target.clone() };
                fs.options = entry.options.clone();
            } else if let Ok(meta) = std::fs::metadata(&device) {
                // Not in fstab: where it is mounted under the root, if it is.
                use std::os::unix::fs::MetadataExt;
                let rdev = meta.rdev();
                let numbers = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
                if let Some(mount) = mounts.iter().find(|m| m.device == numbers) {
                    let relative = mount.target.strip_prefix(&root).unwrap_or(Path::new(""));
                    fs.mountpoint = Path::new("/").join(relative).display().to_string();
                    fs.options = mount.options.clone();
                }
            }
            layout.filesystems.push(fs);
        }
        layout.disks.push(disk);
    }
    // How it boots.
    let esp = layout.disks.iter().find_map(|d| {
        d.partitions.iter().find(|p| p.kind == ESP_TYPE || (d.table == "dos" && p.kind == "ef")).map(|p| (d, p))
    });
    let live = root == Path::new("/");
    let uefi = if live { Path::new("/sys/firmware/efi").exists() } else { esp.is_some() };
    layout.boot.firmware = if uefi { "uefi" } else { "bios" }.into();
    if let Some((disk, partition)) = esp {
        layout.boot.esp = layout
            .filesystems
            .iter()
            .find(|f| f.disk == disk.device && f.partition == partition.number)
            .map(|f| f.mountpoint.clone())
            .unwrap_or_default();
        if uefi {
            layout.boot.disk = disk.device.clone();
        }
    }
    if !uefi {
        layout.boot.disk = layout
            .disks
            .iter()
            .find(|d| d.partitions.iter().any(|p| p.kind == BIOS_BOOT_TYPE) || grub_in_first_sector(&d.device))
            .map(|d| d.device.clone())
            .unwrap_or_default();
    }
    if layout.disks.is_empty() {
        layout.notes.push(format!(
            "no block device is mounted at `{}` or below it (an overlay, a network or a virtual filesystem): there is no disk layout to record",
            root.display()
        ));
    }
    layout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_at_and_below_the_root_are_found_with_escapes_undone() {
        let mountinfo = "\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
30 22 7:3 / /mnt/img rw,noatime - ext4 /dev/loop3p3 rw\n\
31 30 7:4 / /mnt/img/boot/efi rw - vfat /dev/loop3p1 rw,fmask=0077\n\
32 22 0:25 / /mnt/img2 rw - tmpfs tmpfs rw\n\
33 30 7:5 / /mnt/img/my\\040data rw - xfs /dev/loop5 rw\n";
        let found = mounts_under(mountinfo, Path::new("/mnt/img"));
        let targets: Vec<_> = found.iter().map(|m| m.target.display().to_string()).collect();
        assert_eq!(targets, ["/mnt/img", "/mnt/img/boot/efi", "/mnt/img/my data"]);
        assert_eq!(found[1].device, (7, 4));
        assert_eq!(found[1].kind, "vfat");
        assert_eq!(mounts_under(mountinfo, Path::new("/")).len(), 5);
    }

    #[test]
    fn fstab_names_a_filesystem_by_uuid_label_partuuid_or_device() {
        let fstab = parse_fstab(
            "# comment\nUUID=ABCD-1234 /boot/efi vfat umask=0077 0 1\nLABEL=root / ext4 errors=remount-ro 0 1\n\
             PARTUUID=11111111-2222 none swap sw 0 0\n/dev/sdb1 /srv xfs\nonly-two fields\n\u{0}\n",
        );
        assert_eq!(fstab.len(), 4);
        assert_eq!(fstab[3].options, "defaults");
        let fs = Filesystem {
            uuid: "abcd-1234".into(),
            label: "root".into(),
            device: "/dev/sdb1".into(),
            ..Default::default()
        };
        let part = Partition { uuid: "11111111-2222".into(), ..Default::default() };
        assert!(names(&fstab[0].spec, &fs, None), "UUID is compared without case");
        assert!(names(&fstab[1].spec, &fs, None));
        assert!(names(&fstab[2].spec, &fs, Some(&part)));
        assert!(!names(&fstab[2].spec, &fs, None));
        assert!(names(&fstab[3].spec, &fs, None));
        let other = Filesystem::default();
        assert!(!fstab.iter().any(|e| names(&e.spec, &other, None)), "empty identifiers name nothing");
    }
}
