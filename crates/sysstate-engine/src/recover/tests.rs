use super::*;
use crate::layout::{Boot, Disk, Stack};

/// The layout of a UEFI machine on one GPT disk: ESP, swap, root.
fn layout() -> Layout {
    let disk = "/dev/vda".to_string();
    let part = |number: u32, start: u64, size: u64, kind: &str| Partition {
        number,
        device: format!("/dev/vda{number}"),
        start,
        size,
        kind: kind.into(),
        uuid: format!("0B1C3A55-5E55-4A7E-9D0C-5A5E1D0000E{number}"),
        name: format!("part{number}"),
        ..Partition::default()
    };
    let fs = |partition: u32, kind: &str, uuid: &str, mountpoint: &str| Filesystem {
        device: format!("/dev/vda{partition}"),
        disk: disk.clone(),
        partition,
        kind: kind.into(),
        uuid: uuid.into(),
        mountpoint: mountpoint.into(),
        options: "defaults".into(),
        ..Filesystem::default()
    };
    Layout {
        format: LAYOUT_FORMAT,
        disks: vec![Disk {
            device: disk.clone(),
            size_bytes: 2 << 30,
            sector_size: 512,
            table: "gpt".into(),
            table_id: "0B1C3A55-5E55-4A7E-9D0C-5A5E1D000000".into(),
            partitions: vec![
                part(1, 2048, 131072, ESP_TYPE),
                part(2, 133120, 131072, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
                part(3, 264192, 3928064, "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
            ],
        }],
        filesystems: vec![
            fs(3, "ext4", "0b1c3a55-5e55-4a7e-9d0c-5a5e1d000003", "/"),
            fs(2, "swap", "0b1c3a55-5e55-4a7e-9d0c-5a5e1d000002", ""),
            Filesystem { version: "FAT32".into(), label: "ESP".into(), ..fs(1, "vfat", "5A5E-1D01", "/boot/efi") },
        ],
        boot: Boot { firmware: "uefi".into(), disk: disk.clone(), esp: "/boot/efi".into() },
        stacks: Vec::new(),
        notes: Vec::new(),
    }
}

fn system() -> SystemInfo {
    SystemInfo {
        distribution: "debian".into(),
        release: "12".into(),
        codename: "bookworm".into(),
        architecture: "amd64".into(),
        ..SystemInfo::default()
    }
}

fn blank(size_bytes: u64) -> TargetDisk {
    TargetDisk { path: "/var/tmp/new.img".into(), size_bytes, sector_size: 512, image: true, holds: String::new() }
}

fn request() -> RecoverRequest {
    RecoverRequest {
        version: "latest".into(),
        disk: "/var/tmp/new.img".into(),
        dry_run: true,
        overwrite: false,
        mirror: DEFAULT_MIRROR.into(),
        base_tarball: None,
        components: Vec::new(),
        job: "job".into(),
    }
}

fn refusal(layout: &Layout, system: &SystemInfo, disk: TargetDisk, request: &RecoverRequest) -> EngineError {
    plan("v", layout, system, disk, request, "amd64").expect_err("the plan must refuse")
}

#[test]
fn a_plan_recreates_every_partition_and_filesystem_with_its_identifiers() {
    let plan = plan("v", &layout(), &system(), blank(2 << 30), &request(), "amd64").unwrap();
    assert_eq!(plan.table, "gpt");
    assert_eq!(plan.table_id, "0B1C3A55-5E55-4A7E-9D0C-5A5E1D000000");
    assert_eq!(
        plan.partitions.iter().map(|p| (p.number, p.start, p.size)).collect::<Vec<_>>(),
        [(1, 2048, 131072), (2, 133120, 131072), (3, 264192, 3928064)]
    );
    // Mounted in order: / first, then /boot/efi; swap (no mount point) last.
    let order: Vec<&str> = plan.filesystems.iter().map(|f| f.mountpoint.as_str()).collect();
    assert_eq!(order, ["/", "/boot/efi", ""]);
    assert_eq!(
        plan.filesystems[0].command,
        ["mkfs.ext4", "-F", "-q", "-U", "0b1c3a55-5e55-4a7e-9d0c-5a5e1d000003", "{device}"]
    );
    assert_eq!(plan.filesystems[1].command, ["mkfs.vfat", "-F", "32", "-i", "5A5E1D01", "-n", "ESP", "{device}"]);
    assert_eq!(plan.filesystems[2].command[..4], ["mkswap", "-f", "-U", "0b1c3a55-5e55-4a7e-9d0c-5a5e1d000002"]);
    assert_eq!(plan.needed_bytes, (264192 + 3928064) * 512 + 16 * 1024 + 512);
    assert_eq!(plan.firmware, "uefi");
}

#[test]
fn a_disk_too_small_is_refused_with_both_sizes() {
    let needed = (264192 + 3928064) * 512 + 16 * 1024 + 512;
    let error = refusal(&layout(), &system(), blank(needed - 1), &request());
    assert_eq!(error.code, ErrorCode::RecoverDiskTooSmall);
    assert!(error.to_string().contains(&format!("holds {} bytes", needed - 1)), "{error}");
    assert!(error.to_string().contains(&format!("need {needed}")), "{error}");
    assert!(error.to_string().contains("partition 3"), "{error}");
    // Exactly enough is enough.
    plan("v", &layout(), &system(), blank(needed), &request(), "amd64").unwrap();
}

#[test]
fn what_recover_cannot_rebuild_is_refused_by_name() {
    let mut lvm = layout();
    lvm.stacks.push(Stack { kind: "lvm".into(), device: "/dev/dm-0".into(), members: vec!["/dev/vda3".into()] });
    let mut two = layout();
    two.disks.push(Disk { device: "/dev/vdb".into(), table: "gpt".into(), ..Disk::default() });
    let mut zfs = layout();
    zfs.filesystems[0].kind = "zfs_member".into();
    let mut subvolume = layout();
    subvolume.filesystems[0].kind = "btrfs".into();
    subvolume.filesystems[0].options = "subvol=@,compress=zstd".into();
    let mut newer = layout();
    newer.format = LAYOUT_FORMAT + 1;
    let mut no_table = layout();
    no_table.disks[0].table = String::new();
    for (layout, says) in [
        (lvm, "lvm `/dev/dm-0`"),
        (two, "on 2 disks"),
        (zfs, "a `zfs_member` filesystem"),
        (subvolume, "btrfs subvolume"),
        (newer, "newer than this sysstate reads"),
        (no_table, "no partition table"),
    ] {
        let error = refusal(&layout, &system(), blank(4 << 30), &request());
        assert_eq!(error.code, ErrorCode::RecoverUnsupported, "{error}");
        assert!(error.to_string().contains(says), "`{error}` should say `{says}`");
    }
    let fedora = SystemInfo { distribution: "fedora".into(), codename: String::new(), ..system() };
    let error = refusal(&layout(), &fedora, blank(4 << 30), &request());
    assert!(error.to_string().contains("`fedora`"), "{error}");
    let arm = SystemInfo { architecture: "arm64".into(), ..system() };
    let error = refusal(&layout(), &arm, blank(4 << 30), &request());
    assert_eq!(error.code, ErrorCode::RecoverUnsupported);
    assert!(error.to_string().contains("`arm64` and this machine is `amd64`"), "{error}");
}

#[test]
fn a_disk_that_holds_data_needs_overwrite() {
    let used = TargetDisk { holds: "a gpt partition table".into(), ..blank(4 << 30) };
    let error = refusal(&layout(), &system(), used.clone(), &request());
    assert_eq!(error.code, ErrorCode::RestoreDestination);
    assert!(error.to_string().contains("holds a gpt partition table"), "{error}");
    let overwrite = RecoverRequest { overwrite: true, ..request() };
    plan("v", &layout(), &system(), used, &overwrite, "amd64").unwrap();
}

#[test]
fn partitions_are_converted_to_the_new_disks_sectors() {
    let disk = TargetDisk { sector_size: 4096, ..blank(4 << 30) };
    let plan = plan("v", &layout(), &system(), disk, &request(), "amd64").unwrap();
    assert_eq!((plan.partitions[0].start, plan.partitions[0].size), (256, 16384));
    let mut odd = layout();
    odd.disks[0].partitions[0].start = 2049;
    let error = refusal(&odd, &system(), TargetDisk { sector_size: 4096, ..blank(4 << 30) }, &request());
    assert!(error.to_string().contains("4096-byte sectors"), "{error}");
}

#[test]
fn a_base_tarball_of_another_release_is_refused() {
    let dir = std::env::temp_dir().join(format!("sysstate-tarball-{}", std::process::id()));
    let lists = dir.join("tree/var/lib/apt/lists");
    std::fs::create_dir_all(&lists).unwrap();
    let tarball = dir.join("base.tgz");
    // A tarball as debootstrap makes it, with apt lists of these releases.
    let make = |releases: &[&str]| {
        for release in releases {
            std::fs::write(lists.join(format!("deb.debian.org_debian_dists_{release}_Release")), "Suite: x\n").unwrap();
        }
        let _ = std::fs::remove_file(&tarball);
        let mut tar = sysstate_fs::command("tar");
        tar.arg("-czf").arg(&tarball).arg("-C").arg(dir.join("tree")).arg("./var");
        assert!(tar.status().unwrap().success());
    };
    make(&["trixie"]);
    let request = RecoverRequest { base_tarball: Some(tarball.clone()), ..request() };
    let error = refusal(&layout(), &system(), blank(4 << 30), &request);
    assert_eq!(error.code, ErrorCode::ReleaseMismatch);
    assert!(error.to_string().contains("is of `trixie`"), "{error}");
    assert!(error.to_string().contains("`bookworm`"), "{error}");
    make(&["bookworm"]);
    plan("v", &layout(), &system(), blank(4 << 30), &request, "amd64").unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_hostile_layout_is_refused_before_its_identifiers_reach_a_command_or_a_path() {
    let mut injected_type = layout();
    injected_type.disks[0].partitions[2].kind = "83\nstart=0, size=1".into();
    let mut climbing_uuid = layout();
    climbing_uuid.filesystems[0].uuid = "/etc/cron.d/evil".into();
    let mut climbing_mount = layout();
    climbing_mount.filesystems[2].mountpoint = "/boot/../../../etc".into();
    let mut relative_mount = layout();
    relative_mount.filesystems[2].mountpoint = "boot/efi".into();
    let mut newline_name = layout();
    newline_name.disks[0].partitions[0].name = "EFI\"\nlabel: dos".into();
    let mut table_id = layout();
    table_id.disks[0].table_id = "X\nunit: bytes".into();
    for (layout, says) in [
        (injected_type, "partition 3 with type"),
        (climbing_uuid, "UUID `/etc/cron.d/evil`"),
        (climbing_mount, "mount point `/boot/../../../etc`"),
        (relative_mount, "mount point `boot/efi`"),
        (newline_name, "partition 1 named"),
        (table_id, "the table id"),
    ] {
        let error = refusal(&layout, &system(), blank(4 << 30), &request());
        assert_eq!(error.code, ErrorCode::RepositoryCorrupt, "{error}");
        assert!(error.to_string().contains(says), "`{error}` should say `{says}`");
    }
    // What sfdisk and blkid really print passes: a DOS table id, a DOS type, a vfat volume id.
    let mut dos = layout();
    dos.disks[0].table = "dos".into();
    dos.disks[0].table_id = "0x5452574f".into();
    for p in &mut dos.disks[0].partitions {
        p.kind = "83".into();
        p.uuid = String::new();
    }
    plan("v", &dos, &system(), blank(4 << 30), &request(), "amd64").unwrap();
}
