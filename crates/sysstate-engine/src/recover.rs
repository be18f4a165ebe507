//! Bare-metal recovery (`sysstate recover`): a version rebuilt onto a blank disk or disk image,
//! as ReaR does it: the partitions and filesystems of the version's `layout.json` recreated with
//! their recorded identifiers (so its `fstab` and boot loader configuration stay valid), mounted
//! under a staging root, the base system of the recorded release installed with debootstrap (from
//! a mirror or a local tarball), the recorded package set installed with apt inside it, every
//! system-state component restored over it, the initramfs and GRUB regenerated for the new disk,
//! and everything unmounted.
//!
//! [`plan`] decides everything from the version and the disk before anything is written, and
//! refuses what it cannot rebuild (`recover-unsupported`), a disk too small
//! (`recover-disk-too-small`), a disk that holds data without `--overwrite`
//! (`restore-destination`) and a base tarball of another release (`release-mismatch`); `--dry-run`
//! prints the plan. [`recover`] then executes it step by step; a failed step names its command
//! and what it printed (`recover-failed`), and the disk is always unmounted and detached.

use crate::error::{EngineError, Result};
use crate::generated::LAYOUT_FILE;
use crate::jobs::{Job, JobOutput};
use crate::layout::{Filesystem, Layout, Partition, ESP_TYPE, LAYOUT_FORMAT};
use crate::ops::{restore_to, RestoreRequest};
use crate::system::SystemInfo;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use sysstate_repo::version::Version;
use sysstate_repo::{Id, Repository};
use sysstate_types::ErrorCode;

/// The mirror debootstrap and apt use when none is given.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Components a recovery does not restore: the package set is installed by apt, never written
/// over dpkg's database.
const NOT_RESTORED: &[&str] = &["packages"];

/// A recovery as asked on the command line.
#[derive(Debug, Clone)]
pub struct RecoverRequest {
    /// `latest` or an id prefix.
    pub version: String,
    /// The blank disk: a block device or a disk image file.
    pub disk: PathBuf,
    /// Only plan.
    pub dry_run: bool,
    /// Recover over a disk that holds a partition table or a filesystem.
    pub overwrite: bool,
    /// The mirror for debootstrap and apt.
    pub mirror: String,
    /// A debootstrap tarball (`debootstrap --make-tarball`) to install the base system from.
    pub base_tarball: Option<PathBuf>,
    /// Components to restore (empty: all the version's but `packages`).
    pub components: Vec<String>,
    /// The job this recovery runs as: names its staging folder.
    pub job: String,
}

/// The disk a recovery writes, as found before anything is written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TargetDisk {
    pub path: String,
    pub size_bytes: u64,
    pub sector_size: u32,
    /// A disk image file (attached to a loop device for the recovery) rather than a device.
    pub image: bool,
    /// What is on it now (`gpt partition table`, `ext4 filesystem`); empty when blank.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub holds: String,
}

/// A partition the recovery creates, in sectors of the new disk.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlannedPartition {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bootable: bool,
}

/// A filesystem (or swap area) the recovery makes.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PlannedFilesystem {
    pub partition: u32,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub label: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
    /// The mkfs command, with `{device}` for the new partition.
    pub command: Vec<String>,
}

/// Everything a recovery will do, decided before the disk is touched.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecoverPlan {
    pub version: String,
    pub system: SystemInfo,
    pub disk: TargetDisk,
    /// Bytes the recorded partitions need (the end of the last one, and GPT's backup table).
    pub needed_bytes: u64,
    /// `gpt` or `dos`, with the recorded identifier.
    pub table: String,
    pub table_id: String,
    pub partitions: Vec<PlannedPartition>,
    pub filesystems: Vec<PlannedFilesystem>,
    /// Where the base system comes from (a tarball, or the mirror).
    pub base: String,
    pub mirror: String,
    /// Packages of the version's selection apt installs.
    pub packages: usize,
    /// Components restored over the new system.
    pub components: Vec<String>,
    /// `uefi` or `bios`.
    pub firmware: String,
    /// What the plan cannot promise, for people.
    pub notes: Vec<String>,
}

/// How long a step of the recovery took.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Step {
    pub name: String,
    pub seconds: f64,
}

/// What a recovery did.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecoverReport {
    pub plan: RecoverPlan,
    pub dry_run: bool,
    pub steps: Vec<Step>,
    /// What was done otherwise than recorded (a kernel no longer in the mirror), for people.
    pub warnings: Vec<String>,
    /// Files restored over the new system.
    pub restored_files: u64,
}

impl JobOutput for RecoverReport {
    fn warnings(&self) -> usize {
        self.warnings.len()
    }
}

fn unsupported(message: String, resolution: &str) -> EngineError {
    EngineError::new(ErrorCode::RecoverUnsupported, message).with_resolution(resolution.to_string())
}

const BY_HAND: &str = "recreate it by hand, mount it under a folder and restore the version's components over it with `sysstate restore --to`; docs/recovery.md says what recover recreates";

/// The version's layout and system, as recorded in it.
pub fn recorded(repo: &Repository, manifest: &Version, id: &Id) -> Result<(Layout, SystemInfo)> {
    let path = format!("{}/disk-layout/{LAYOUT_FILE}", crate::generated::GENERATED_DIR);
    let layout = crate::inplace::version_file(repo, &manifest.tree, &path)?.ok_or_else(|| {
        unsupported(
            format!("version {} has no disk layout (`{path}`): it was made without the `disk-layout` component, or by a sysstate older than recovery", id.short()),
            "recover from a version that has one (`sysstate versions --json` shows `system` for those), or rebuild the disk by hand and restore with `sysstate restore --to`",
        )
    })?;
    let layout: Layout = serde_json::from_slice(&layout).map_err(|e| {
        EngineError::new(
            ErrorCode::RepositoryCorrupt,
            format!("version {}'s `{path}` cannot be read as a layout: {e}", id.short()),
        )
    })?;
    let system =
        manifest.system.clone().and_then(|v| serde_json::from_value::<SystemInfo>(v).ok()).ok_or_else(|| {
            unsupported(
                format!("version {} does not record what system it is of (release, architecture)", id.short()),
                "recover from a newer version: every version made by this sysstate records its system",
            )
        })?;
    Ok((layout, system))
}

/// Finds what `path` is: its size, its logical sector size, and what it holds.
pub fn examine_disk(path: &Path) -> Result<TargetDisk> {
    let shown = path.display().to_string();
    let destination = |why: String| {
        EngineError::new(ErrorCode::RestoreDestination, format!("cannot recover onto `{shown}`: {why}"))
            .with_resolution(
                "give the blank disk (a block device such as /dev/sdb) or a disk image file to write, with `--disk`",
            )
    };
    let metadata = std::fs::metadata(path).map_err(|e| destination(e.to_string()))?;
    use std::os::unix::fs::FileTypeExt;
    let (image, size_bytes, sector_size) = if metadata.file_type().is_block_device() {
        let ask = |flag: &str| -> Result<u64> {
            let output = sysstate_fs::command("blockdev").arg(flag).arg(path).output();
            let output = output.map_err(|e| destination(format!("`blockdev` could not run: {e}")))?;
            String::from_utf8_lossy(&output.stdout).trim().parse().map_err(|_| {
                destination(format!("`blockdev {flag}` answered `{}`", String::from_utf8_lossy(&output.stderr).trim()))
            })
        };
        (false, ask("--getsize64")?, ask("--getss")? as u32)
    } else if metadata.is_file() {
        (true, metadata.len(), 512)
    } else {
        return Err(destination("it is neither a block device nor a disk image file".into()));
    };
    // What cannot be probed is not taken for blank.
    let mut unreadable = Vec::new();
    let found = crate::layout::probe(&shown, &mut unreadable);
    let holds = match (found.get("PTTYPE"), found.get("TYPE")) {
        (Some(table), _) => format!("a {table} partition table"),
        (None, Some(kind)) => format!("a {kind} filesystem"),
        (None, None) if !unreadable.is_empty() => format!("what blkid could not read ({})", unreadable.join("; ")),
        (None, None) => String::new(),
    };
    Ok(TargetDisk { path: shown, size_bytes, sector_size, image, holds })
}

/// The mkfs command that makes `fs` again with its identifiers, or why there is none.
fn mkfs(fs: &Filesystem) -> std::result::Result<Vec<String>, String> {
    let mut command: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| command.extend(parts.iter().map(|s| s.to_string()));
    match fs.kind.as_str() {
        "ext2" | "ext3" | "ext4" => {
            push(&[&format!("mkfs.{}", fs.kind), "-F", "-q"]);
            if !fs.uuid.is_empty() {
                push(&["-U", &fs.uuid]);
            }
            if !fs.label.is_empty() {
                push(&["-L", &fs.label]);
            }
        }
        "xfs" => {
            push(&["mkfs.xfs", "-f", "-q"]);
            if !fs.uuid.is_empty() {
                push(&["-m", &format!("uuid={}", fs.uuid)]);
            }
            if !fs.label.is_empty() {
                push(&["-L", &fs.label]);
            }
        }
        "btrfs" => {
            push(&["mkfs.btrfs", "-f", "-q"]);
            if !fs.uuid.is_empty() {
                push(&["-U", &fs.uuid]);
            }
            if !fs.label.is_empty() {
                push(&["-L", &fs.label]);
            }
        }
        "vfat" => {
            let bits = match fs.version.as_str() {
                "FAT12" => "12",
                "FAT16" => "16",
                _ => "32",
            };
            push(&["mkfs.vfat", "-F", bits]);
            let id = fs.uuid.replace('-', "");
            if id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                push(&["-i", &id]);
            }
            if !fs.label.is_empty() {
                push(&["-n", &fs.label]);
            }
        }
        "swap" => {
            push(&["mkswap", "-f"]);
            if !fs.uuid.is_empty() {
                push(&["-U", &fs.uuid]);
            }
            if !fs.label.is_empty() {
                push(&["-L", &fs.label]);
            }
        }
        other => return Err(format!("a `{other}` filesystem")),
    }
    command.push("{device}".into());
    Ok(command)
}

/// Plans the recovery of a version with `layout` and `system` onto `disk`, from a machine of
/// architecture `machine_arch`. Refuses, before anything is written, what it cannot rebuild.
pub fn plan(
    version: &str,
    layout: &Layout,
    system: &SystemInfo,
    disk: TargetDisk,
    request: &RecoverRequest,
    machine_arch: &str,
) -> Result<RecoverPlan> {
    if layout.format > LAYOUT_FORMAT {
        return Err(unsupported(
            format!(
                "the version's layout is of format {}, newer than this sysstate reads ({LAYOUT_FORMAT})",
                layout.format
            ),
            "recover with the sysstate that made the version, or a newer one",
        ));
    }
    if let Some(stack) = layout.stacks.first() {
        return Err(unsupported(
            format!(
                "the version's filesystems stand on {} `{}` (made of {}): recover does not recreate LVM, RAID or LUKS yet",
                stack.kind,
                stack.device,
                stack.members.join(", ")
            ),
            BY_HAND,
        ));
    }
    check_identifiers(layout)?;
    let disks: Vec<&str> = layout.disks.iter().map(|d| d.device.as_str()).collect();
    let [source] = layout.disks.as_slice() else {
        return Err(unsupported(
            match disks.is_empty() {
                true => "the version's layout records no disk (its root was not on a partitioned disk this sysstate could read)".to_string(),
                false => format!("the version's filesystems are on {} disks ({}): recover rebuilds one disk", disks.len(), disks.join(", ")),
            },
            BY_HAND,
        ));
    };
    if source.table != "gpt" && source.table != "dos" {
        return Err(unsupported(
            format!(
                "the version's disk `{}` has no partition table recover can recreate (`{}`)",
                source.device, source.table
            ),
            BY_HAND,
        ));
    }
    let root =
        layout.filesystems.iter().find(|f| f.mountpoint == "/").ok_or_else(|| {
            unsupported("the version's layout records no filesystem mounted at `/`".to_string(), BY_HAND)
        })?;
    if root.disk != source.device || root.partition == 0 {
        return Err(unsupported(
            format!("the version's root filesystem `{}` is not on a partition of `{}`", root.device, source.device),
            BY_HAND,
        ));
    }
    if !matches!(system.distribution.as_str(), "debian" | "ubuntu") || system.codename.is_empty() {
        return Err(unsupported(
            format!(
                "the version is of `{}` (release `{}`): recover installs Debian-based systems with debootstrap, which needs a release code name",
                system.distribution, system.codename
            ),
            "install the base system by hand, mount it under a folder and restore the components over it with `sysstate restore --to`",
        ));
    }
    if system.architecture != machine_arch {
        return Err(unsupported(
            format!(
                "the version is of architecture `{}` and this machine is `{machine_arch}`: debootstrap installs this machine's architecture",
                system.architecture
            ),
            "recover from a rescue system of the version's architecture",
        ));
    }
    // Partitions, in the new disk's sectors.
    let (old, new) = (u64::from(source.sector_size.max(512)), u64::from(disk.sector_size.max(512)));
    let mut partitions = Vec::new();
    for p in &source.partitions {
        let (start, size) = (p.start * old, p.size * old);
        if start % new != 0 || size % new != 0 {
            return Err(unsupported(
                format!(
                    "partition {} of `{}` does not fall on the new disk's {new}-byte sectors",
                    p.number, source.device
                ),
                BY_HAND,
            ));
        }
        partitions.push(PlannedPartition {
            number: p.number,
            start: start / new,
            size: size / new,
            kind: p.kind.clone(),
            uuid: p.uuid.clone(),
            name: p.name.clone(),
            bootable: p.bootable,
        });
    }
    let gpt_backup = if source.table == "gpt" { 16 * 1024 + new } else { 0 };
    let last = source.partitions.iter().max_by_key(|p| p.start + p.size);
    let needed_bytes = last.map_or(0, |p| (p.start + p.size) * old) + gpt_backup;
    if disk.size_bytes < needed_bytes {
        let partition = last.map(|p: &Partition| p.number).unwrap_or_default();
        return Err(EngineError::new(
            ErrorCode::RecoverDiskTooSmall,
            format!(
                "`{}` holds {} bytes and the version's partitions need {needed_bytes} (partition {partition} of `{}` ends at byte {})",
                disk.path,
                disk.size_bytes,
                source.device,
                needed_bytes - gpt_backup
            ),
        ));
    }
    // Filesystems on that disk, in the order they are mounted.
    let mut filesystems = Vec::new();
    for fs in layout.filesystems.iter().filter(|f| f.disk == source.device) {
        if fs.partition == 0 {
            return Err(unsupported(format!("`{}` is a filesystem on the whole disk", fs.device), BY_HAND));
        }
        if fs.options.split(',').any(|o| o.starts_with("subvol=") || o.starts_with("subvolid=")) {
            return Err(unsupported(
                format!(
                    "`{}` mounts a btrfs subvolume of `{}` ({}): recover does not recreate subvolumes yet",
                    fs.mountpoint, fs.device, fs.options
                ),
                BY_HAND,
            ));
        }
        let command = mkfs(fs).map_err(|what| {
            unsupported(format!("`{}` ({}) is {what}: recover cannot make it", fs.device, fs.mountpoint), BY_HAND)
        })?;
        filesystems.push(PlannedFilesystem {
            partition: fs.partition,
            kind: fs.kind.clone(),
            uuid: fs.uuid.clone(),
            label: fs.label.clone(),
            mountpoint: fs.mountpoint.clone(),
            command,
        });
    }
    if let Some(fs) = layout.filesystems.iter().find(|f| f.disk != source.device && !f.mountpoint.is_empty()) {
        return Err(unsupported(
            format!("`{}` is mounted from `{}`, not on the disk recovered", fs.mountpoint, fs.device),
            BY_HAND,
        ));
    }
    filesystems.sort_by_key(|f| (f.mountpoint.is_empty(), f.mountpoint.matches('/').count(), f.mountpoint.clone()));
    if !disk.holds.is_empty() && !request.overwrite {
        return Err(EngineError::new(
            ErrorCode::RestoreDestination,
            format!("`{}` is not blank: it holds {}; recovering onto it destroys everything on it", disk.path, disk.holds),
        )
        .with_resolution("check that this is the disk to recover onto (`lsblk`), then run again with `--overwrite`; or give a blank disk"));
    }
    let base = match &request.base_tarball {
        Some(tarball) => {
            check_tarball_release(tarball, &system.codename)?;
            format!("the debootstrap tarball `{}`", tarball.display())
        }
        None => format!("the mirror {}", request.mirror),
    };
    let firmware = if layout.boot.firmware.is_empty() { "bios".to_string() } else { layout.boot.firmware.clone() };
    let mut notes = layout.notes.clone();
    if firmware == "uefi" && !source.partitions.iter().any(|p| p.kind.eq_ignore_ascii_case(ESP_TYPE)) {
        notes.push(
            "the version boots by UEFI but its disk has no EFI system partition: GRUB is installed for BIOS".into(),
        );
    }
    if disk.size_bytes > needed_bytes + 1024 * 1024 {
        notes.push(format!(
            "the new disk is larger: {} bytes after the last partition stay free (grow it with growpart and resize2fs after booting)",
            disk.size_bytes - needed_bytes
        ));
    }
    Ok(RecoverPlan {
        version: version.to_string(),
        system: system.clone(),
        disk,
        needed_bytes,
        table: source.table.clone(),
        table_id: source.table_id.clone(),
        partitions,
        filesystems,
        base,
        mirror: request.mirror.clone(),
        packages: 0,
        components: Vec::new(),
        firmware,
        notes,
    })
}

/// Refuses a layout whose identifiers could not have come from sfdisk and blkid: they go into
/// sfdisk's script, mkfs's arguments, link names and mount points, so a damaged or hostile
/// `layout.json` must not inject a line, climb out of the staging root or name a host path.
fn check_identifiers(layout: &Layout) -> Result<()> {
    let hex = |s: &str| {
        let s = s.strip_prefix("0x").unwrap_or(s);
        s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
    };
    let refuse = |what: String| {
        Err(EngineError::new(
            ErrorCode::RepositoryCorrupt,
            format!("the version's layout.json has {what}: a recovery cannot be made from it"),
        )
        .with_resolution(
            "recover from another version (`sysstate versions`); `sysstate check --read-data` checks the repository",
        ))
    };
    for disk in &layout.disks {
        if !hex(&disk.table_id) {
            return refuse(format!("the table id `{}`, which is not hexadecimal", disk.table_id.escape_debug()));
        }
        for p in &disk.partitions {
            if p.kind.is_empty() || !hex(&p.kind) || !hex(&p.uuid) {
                return refuse(format!(
                    "partition {} with type `{}` and GUID `{}`",
                    p.number,
                    p.kind.escape_debug(),
                    p.uuid.escape_debug()
                ));
            }
            if p.name.chars().any(char::is_control) {
                return refuse(format!("partition {} named `{}`", p.number, p.name.escape_debug()));
            }
        }
    }
    for fs in &layout.filesystems {
        if !hex(&fs.uuid) || fs.label.chars().any(char::is_control) {
            return refuse(format!(
                "a filesystem with UUID `{}` and label `{}`",
                fs.uuid.escape_debug(),
                fs.label.escape_debug()
            ));
        }
        if !fs.mountpoint.is_empty() && (!fs.mountpoint.starts_with('/') || fs.mountpoint.split('/').any(|c| c == ".."))
        {
            return refuse(format!(
                "the mount point `{}`, which is not an absolute path inside the root",
                fs.mountpoint.escape_debug()
            ));
        }
    }
    Ok(())
}

/// Refuses a debootstrap tarball of another release than `codename`: its apt lists name the
/// release they are of (`…_dists_bookworm_Release`).
fn check_tarball_release(tarball: &Path, codename: &str) -> Result<()> {
    let output = sysstate_fs::command("tar").arg("-tzf").arg(tarball).output();
    let listing = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("`{}` is not a debootstrap tarball: {}", tarball.display(), String::from_utf8_lossy(&o.stderr).trim()),
            )
            .with_resolution("make one with `debootstrap --make-tarball=FILE RELEASE DIR MIRROR`, or leave `--base-tarball` out to use the mirror"))
        }
        Err(e) => return Err(EngineError::new(ErrorCode::RecoverFailed, format!("`tar` could not run: {e}"))),
    };
    let releases: std::collections::BTreeSet<&str> = listing
        .lines()
        .filter(|l| l.contains("var/lib/apt/lists/") && l.ends_with("_Release"))
        .filter_map(|l| l.split("_dists_").nth(1)?.split('_').next())
        .collect();
    if releases.contains(codename) {
        return Ok(());
    }
    Err(EngineError::new(
        ErrorCode::ReleaseMismatch,
        format!(
            "the base tarball `{}` is of {} and the version is of Debian `{codename}`",
            tarball.display(),
            match releases.is_empty() {
                true => "no release apt knows (it has no Release file)".to_string(),
                false => format!("`{}`", releases.into_iter().collect::<Vec<_>>().join("`, `")),
            }
        ),
    )
    .with_resolution(format!(
        "make a tarball of `{codename}` (`debootstrap --make-tarball=FILE {codename} DIR MIRROR`), or leave `--base-tarball` out to use the mirror"
    )))
}

/// This machine's architecture, as Debian names it.
pub fn machine_architecture() -> String {
    let output = sysstate_fs::command("dpkg").arg("--print-architecture").output();
    match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => match std::env::consts::ARCH {
            "x86_64" => "amd64".into(),
            "aarch64" => "arm64".into(),
            other => other.into(),
        },
    }
}

/// Plans the recovery of `request.version` and, unless it is a dry run, executes it.
pub fn recover(repo: &Repository, request: &RecoverRequest, job: &Job<'_>) -> Result<RecoverReport> {
    job.operation("planning");
    let (id, manifest) = repo.find_version_holding(&request.version, &request.components)?;
    let (layout, system) = recorded(repo, &manifest, &id)?;
    let disk = examine_disk(&request.disk)?;
    let mut plan = plan(&id.to_hex(), &layout, &system, disk, request, &machine_architecture())?;
    let packages = crate::inplace::package_selection(repo, &manifest)?;
    plan.packages = packages.as_ref().map_or(0, |p| p.wanted().len());
    plan.components = match request.components.is_empty() {
        true => {
            manifest.components.iter().map(|c| c.name.clone()).filter(|n| !NOT_RESTORED.contains(&n.as_str())).collect()
        }
        false => request.components.clone(),
    };
    if packages.is_none() {
        plan.notes.push("the version has no package selection: only the base system is installed".into());
    }
    let mut report =
        RecoverReport { plan, dry_run: request.dry_run, steps: Vec::new(), warnings: Vec::new(), restored_files: 0 };
    if request.dry_run {
        return Ok(report);
    }
    let staging = crate::paths::state_dir().join("recover").join(&request.job);
    let mut run = Execution { job, steps: Vec::new(), warnings: Vec::new(), mounts: Vec::new(), loop_device: None };
    let outcome = run.execute(repo, &id, &report.plan, request, packages.as_ref(), &staging);
    let cleaned = run.clean_up(&staging);
    report.steps = std::mem::take(&mut run.steps);
    report.warnings = std::mem::take(&mut run.warnings);
    report.restored_files = outcome?;
    cleaned?;
    Ok(report)
}

/// A recovery under way: what it mounted and attached, to undo whatever happens.
struct Execution<'j, 'a> {
    job: &'j Job<'a>,
    steps: Vec<Step>,
    warnings: Vec<String>,
    /// Mounted, in order.
    mounts: Vec<PathBuf>,
    loop_device: Option<String>,
}

/// A command's failure as the recovery reports it.
fn failed(step: &str, command: &Command, why: String) -> EngineError {
    let program = command.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    EngineError::new(
        ErrorCode::RecoverFailed,
        format!("recovery step `{step}` failed: `{program} {}`: {why}", args.join(" ")),
    )
}

/// Runs `command` for `step`; its output goes to the job's log, its last lines into a failure.
fn run(step: &str, command: &mut Command, input: Option<&[u8]>) -> Result<String> {
    use std::io::Write;
    command.stdin(if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = command.spawn().map_err(|e| failed(step, command, format!("could not start it: {e}")))?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(bytes).map_err(|e| failed(step, command, format!("could not give it its input: {e}")))?;
    }
    let output = child.wait_with_output().map_err(|e| failed(step, command, e.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    tracing::info!(step, "{:?}: {}{stdout}{stderr}", command, output.status);
    if !output.status.success() {
        let text = format!("{stdout}{stderr}");
        let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(6)..].join(" | ");
        return Err(failed(step, command, format!("{} — {tail}", output.status)));
    }
    Ok(stdout)
}

/// `chroot ROOT PROGRAM…` with a clean environment for package scripts.
fn chroot(root: &Path, program: &str) -> Command {
    let mut command = sysstate_fs::command("chroot");
    command
        .arg(root)
        .arg(program)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("HOME", "/root");
    command
}

impl Execution<'_, '_> {
    fn step<T>(&mut self, name: &str, work: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.job.operation(name);
        let started = Instant::now();
        let out = work(self)?;
        self.steps.push(Step { name: name.to_string(), seconds: started.elapsed().as_secs_f64() });
        Ok(out)
    }

    fn mount(&mut self, step: &str, args: &[&str], source: &str, at: &Path) -> Result<()> {
        std::fs::create_dir_all(at).map_err(|e| {
            EngineError::new(
                ErrorCode::RecoverFailed,
                format!("recovery step `{step}`: cannot make `{}`: {e}", at.display()),
            )
        })?;
        run(step, sysstate_fs::command("mount").args(args).arg(source).arg(at), None)?;
        self.mounts.push(at.to_path_buf());
        Ok(())
    }

    fn execute(
        &mut self,
        repo: &Repository,
        id: &Id,
        plan: &RecoverPlan,
        request: &RecoverRequest,
        packages: Option<&crate::inplace::PackageSelection>,
        staging: &Path,
    ) -> Result<u64> {
        let disk = self.step("partitions", |this| this.partition(plan))?;
        let devices = partition_devices(&disk)?;
        let device = |n: u32| -> Result<String> {
            devices.get(&n).cloned().ok_or_else(|| {
                EngineError::new(
                    ErrorCode::RecoverFailed,
                    format!("partition {n} of `{disk}` has no device after partitioning"),
                )
                .with_resolution(
                    "check that the kernel sees the new partitions (`partx -a DISK`) and run again with `--overwrite`",
                )
            })
        };
        // Filesystems, made with their identifiers, then mounted in order.
        let mut unmounted_esp = None;
        self.step("filesystems", |this| {
            for fs in &plan.filesystems {
                let node = device(fs.partition)?;
                let args: Vec<String> =
                    fs.command.iter().map(|a| if a == "{device}" { node.clone() } else { a.clone() }).collect();
                run("filesystems", sysstate_fs::command(&args[0]).args(&args[1..]), None)?;
            }
            for fs in plan.filesystems.iter().filter(|f| f.mountpoint.starts_with('/')) {
                let node = device(fs.partition)?;
                let at = staging.join(fs.mountpoint.trim_start_matches('/'));
                match this.mount("filesystems", &["-t", &fs.kind], &node, &at) {
                    Ok(()) => {}
                    // A rescue system without vfat (a container): the ESP is written with mtools.
                    Err(_) if fs.kind == "vfat" => unmounted_esp = Some((node, at)),
                    Err(error) => return Err(error),
                }
            }
            Ok(())
        })?;
        self.step("base system", |this| {
            let mut command = sysstate_fs::command("debootstrap");
            command.args(["--variant=minbase", &format!("--arch={}", plan.system.architecture)]);
            if let Some(tarball) = &request.base_tarball {
                let tarball = std::fs::canonicalize(tarball).unwrap_or_else(|_| tarball.clone());
                command.arg(format!("--unpack-tarball={}", tarball.display()));
            }
            command.arg(&plan.system.codename).arg(staging).arg(&request.mirror);
            run("base system", &mut command, None)?;
            for (source, target, kind) in [
                ("/dev", "dev", None),
                ("/dev/pts", "dev/pts", None),
                ("proc", "proc", Some("proc")),
                ("sysfs", "sys", Some("sysfs")),
            ] {
                let args: Vec<&str> = match kind {
                    Some(kind) => vec!["-t", kind],
                    None => vec!["--bind"],
                };
                this.mount("base system", &args, source, &staging.join(target))?;
            }
            Ok(())
        })?;
        if let Some(selection) = packages {
            self.step("packages", |this| this.install_packages(staging, request, &plan.system.codename, selection))?;
        }
        let restored = self.step("restore", |this| {
            let restore = RestoreRequest {
                version: id.to_hex(),
                components: plan.components.clone(),
                to: staging.to_path_buf(),
                threads: 0,
            };
            let report = restore_to(repo, &restore, this.job)?;
            if let Some(error) = report.failure() {
                return Err(error);
            }
            this.warnings.extend(report.warnings.iter().map(|w| format!("not restored: {}: {}", w.path, w.message)));
            Ok(report.stats.files)
        })?;
        self.step("boot loader", |this| this.boot_loader(plan, staging, &disk, &devices, unmounted_esp.as_ref()))?;
        self.step("trim", |_| {
            trim(plan, staging);
            Ok(())
        })?;
        Ok(restored)
    }

    /// Writes the partition table; returns the disk's device (an image is attached to a loop
    /// device first).
    fn partition(&mut self, plan: &RecoverPlan) -> Result<String> {
        let mut script = format!("label: {}\nunit: sectors\n", plan.table);
        if !plan.table_id.is_empty() {
            script.push_str(&format!("label-id: {}\n", plan.table_id));
        }
        for p in &plan.partitions {
            script.push_str(&format!("start={}, size={}, type={}", p.start, p.size, p.kind));
            if !p.uuid.is_empty() && plan.table == "gpt" {
                script.push_str(&format!(", uuid={}", p.uuid));
            }
            if !p.name.is_empty() && plan.table == "gpt" {
                script.push_str(&format!(", name=\"{}\"", p.name.replace('"', "'")));
            }
            if p.bootable {
                script.push_str(", bootable");
            }
            script.push('\n');
        }
        run(
            "partitions",
            sysstate_fs::command("sfdisk")
                .args(["--quiet", "--wipe", "always", "--wipe-partitions", "always"])
                .arg(&plan.disk.path),
            Some(script.as_bytes()),
        )?;
        if !plan.disk.image {
            let _ = run("partitions", sysstate_fs::command("partx").args(["-u", &plan.disk.path]), None);
            return Ok(plan.disk.path.clone());
        }
        let device = run(
            "partitions",
            sysstate_fs::command("losetup").args(["--find", "--show", "--partscan", &plan.disk.path]),
            None,
        )?;
        let device = device.trim().to_string();
        self.loop_device = Some(device.clone());
        // Without udev the kernel may not have read the table: ask it (an error when it has).
        let _ = run("partitions", sysstate_fs::command("partx").args(["-a", &device]), None);
        Ok(device)
    }

    fn install_packages(
        &mut self,
        staging: &Path,
        request: &RecoverRequest,
        codename: &str,
        selection: &crate::inplace::PackageSelection,
    ) -> Result<()> {
        // No service starts inside the new system while its packages are configured.
        let policy = staging.join("usr/sbin/policy-rc.d");
        let io = |e: std::io::Error| {
            EngineError::new(
                ErrorCode::RecoverFailed,
                format!("recovery step `packages`: cannot write `{}`: {e}", policy.display()),
            )
        };
        std::fs::write(&policy, "#!/bin/sh\nexit 101\n").map_err(io)?;
        std::fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(io)?;
        let sources = format!("deb {} {} main\n", request.mirror, codename);
        std::fs::write(staging.join("etc/apt/sources.list"), sources).map_err(io)?;
        run("packages", chroot(staging, "apt-get").args(["update", "-q"]), None)?;
        // dpkg takes selections only of packages it knows: tell it what apt has.
        run("packages", chroot(staging, "sh").args(["-c", "apt-cache dumpavail | dpkg --merge-avail"]), None)?;
        run("packages", chroot(staging, "dpkg").arg("--set-selections"), Some(&selection.selections))?;
        let confold = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"];
        run(
            "packages",
            chroot(staging, "apt-get")
                .args(["-y", "-q", "--no-install-recommends"])
                .args(confold)
                .arg("dselect-upgrade"),
            None,
        )?;
        if let Some(manual) = &selection.manual {
            let names: Vec<String> = String::from_utf8_lossy(manual).split_whitespace().map(str::to_string).collect();
            if !names.is_empty() {
                run("packages", chroot(staging, "apt-mark").arg("manual").args(&names), None)?;
            }
        }
        let installed = run(
            "packages",
            chroot(staging, "dpkg-query").args(["-W", "-f", "${db:Status-Abbrev} ${Package}\n"]),
            None,
        )?;
        let installed: std::collections::BTreeSet<&str> =
            installed.lines().filter(|l| l.starts_with("ii")).filter_map(|l| l.split_whitespace().nth(1)).collect();
        let missing: Vec<String> =
            selection.wanted().into_iter().filter(|p| !installed.contains(p.split(':').next().unwrap_or(p))).collect();
        if !missing.is_empty() {
            self.warnings.push(format!(
                "{} packages of the version are not in the mirror and were not installed: {}",
                missing.len(),
                missing.join(", ")
            ));
        }
        run("packages", chroot(staging, "apt-get").arg("clean"), None)?;
        std::fs::remove_file(&policy).map_err(io)?;
        Ok(())
    }

    fn boot_loader(
        &mut self,
        plan: &RecoverPlan,
        staging: &Path,
        disk: &str,
        devices: &BTreeMap<u32, String>,
        unmounted_esp: Option<&(String, PathBuf)>,
    ) -> Result<()> {
        // Kernels the backup had that the mirror no longer has cannot boot: no modules.
        let boot = staging.join("boot");
        for entry in std::fs::read_dir(&boot).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix("vmlinuz-") else { continue };
            if !staging.join("lib/modules").join(version).is_dir() {
                for prefix in ["vmlinuz-", "initrd.img-", "System.map-", "config-"] {
                    let _ = std::fs::remove_file(boot.join(format!("{prefix}{version}")));
                }
                self.warnings.push(format!("kernel {version} of the version is not installed (the mirror no longer has it): the recovered machine boots the kernel apt installed"));
            }
        }
        // grub-mkconfig names the root by UUID only where udev would link it: the new system
        // gets a /dev/disk of its own (a tmpfs over the bound /dev's) with a link for each new
        // filesystem, whatever the rescue system's udev (or another recovery) does with its own.
        let by_uuid = staging.join("dev/disk/by-uuid");
        let _ = std::fs::create_dir_all(staging.join("dev/disk"));
        self.mount("boot loader", &["-t", "tmpfs", "-o", "mode=0755"], "tmpfs", &staging.join("dev/disk"))?;
        std::fs::create_dir_all(&by_uuid).map_err(|e| {
            EngineError::new(
                ErrorCode::RecoverFailed,
                format!("recovery step `boot loader`: cannot make `{}`: {e}", by_uuid.display()),
            )
        })?;
        for fs in plan.filesystems.iter().filter(|f| !f.uuid.is_empty()) {
            if let Some(node) = devices.get(&fs.partition) {
                let _ = std::os::unix::fs::symlink(node, by_uuid.join(&fs.uuid));
            }
        }
        // The ESP's files, when it could not be mounted, go in with mtools.
        if let Some((device, at)) = unmounted_esp {
            let entries: Vec<PathBuf> =
                std::fs::read_dir(at).into_iter().flatten().flatten().map(|e| e.path()).collect();
            if !entries.is_empty() {
                run(
                    "boot loader",
                    sysstate_fs::command("mcopy").args(["-s", "-o", "-i", device]).args(&entries).arg("::/"),
                    None,
                )?;
                for entry in &entries {
                    let _ = if entry.is_dir() { std::fs::remove_dir_all(entry) } else { std::fs::remove_file(entry) };
                }
            }
        }
        run("boot loader", chroot(staging, "update-initramfs").args(["-u", "-k", "all"]), None)?;
        std::fs::create_dir_all(staging.join("boot/grub")).ok();
        run("boot loader", chroot(staging, "grub-mkconfig").args(["-o", "/boot/grub/grub.cfg"]), None)?;
        let esp = plan.filesystems.iter().find(|f| {
            f.kind == "vfat"
                && plan.partitions.iter().any(|p| p.number == f.partition && p.kind.eq_ignore_ascii_case(ESP_TYPE))
        });
        match (plan.firmware.as_str(), esp) {
            ("uefi", Some(esp)) => self.grub_efi(staging, esp, unmounted_esp),
            _ => {
                self.require_grub(staging, "i386-pc", "grub-pc-bin")?;
                run("boot loader", chroot(staging, "grub-install").args(["--target=i386-pc", disk]), None).map(|_| ())
            }
        }
    }

    /// GRUB's modules for `target`, installed with apt when the version's package set lacks them.
    fn require_grub(&mut self, staging: &Path, target: &str, package: &str) -> Result<()> {
        if staging.join("usr/lib/grub").join(target).is_dir() {
            return Ok(());
        }
        run(
            "boot loader",
            chroot(staging, "apt-get").args(["install", "-y", "-q", "--no-install-recommends", package]),
            None,
        )?;
        self.warnings.push(format!(
            "the version's package set has no GRUB for `{target}`: `{package}` was installed to boot the new disk"
        ));
        Ok(())
    }

    /// GRUB for UEFI at the removable-media path (`EFI/BOOT/BOOTX64.EFI`), which the firmware
    /// of a new machine finds without a boot entry: `grub-install --removable` where the ESP is
    /// mounted; otherwise the same image made with grub-mkimage and written with mtools.
    fn grub_efi(
        &mut self,
        staging: &Path,
        esp: &PlannedFilesystem,
        unmounted_esp: Option<&(String, PathBuf)>,
    ) -> Result<()> {
        self.require_grub(staging, "x86_64-efi", "grub-efi-amd64-bin")?;
        let Some((device, _)) = unmounted_esp else {
            let args =
                ["--target=x86_64-efi", &format!("--efi-directory={}", esp.mountpoint), "--removable", "--no-nvram"];
            return run("boot loader", chroot(staging, "grub-install").args(args), None).map(|_| ());
        };
        let root = plan_root_uuid(staging)?;
        let modules = staging.join("boot/grub/x86_64-efi");
        std::fs::create_dir_all(&modules).ok();
        for entry in std::fs::read_dir(staging.join("usr/lib/grub/x86_64-efi")).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".mod") || name.ends_with(".lst") {
                std::fs::copy(entry.path(), modules.join(&name)).map_err(|e| {
                    EngineError::new(
                        ErrorCode::RecoverFailed,
                        format!("recovery step `boot loader`: cannot copy GRUB's `{name}`: {e}"),
                    )
                })?;
            }
        }
        let early = format!("search --no-floppy --fs-uuid --set=root {root}\nset prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n");
        let io =
            |e: std::io::Error| EngineError::new(ErrorCode::RecoverFailed, format!("recovery step `boot loader`: {e}"));
        std::fs::write(staging.join("tmp/sysstate-early.cfg"), early).map_err(io)?;
        let image = "/tmp/sysstate-BOOTX64.EFI";
        let parts = [
            "part_gpt",
            "part_msdos",
            "fat",
            "ext2",
            "xfs",
            "btrfs",
            "search",
            "search_fs_uuid",
            "normal",
            "configfile",
            "linux",
            "echo",
            "test",
            "gzio",
            "all_video",
            "efi_gop",
        ];
        run(
            "boot loader",
            chroot(staging, "grub-mkimage")
                .args(["-O", "x86_64-efi", "-o", image, "-c", "/tmp/sysstate-early.cfg", "-p", "/boot/grub"])
                .args(parts),
            None,
        )?;
        let _ = run(
            "boot loader",
            sysstate_fs::command("mmd").args(["-D", "s", "-i", device, "::/EFI", "::/EFI/BOOT"]),
            None,
        );
        run(
            "boot loader",
            sysstate_fs::command("mcopy")
                .args(["-o", "-i", device])
                .arg(staging.join(image.trim_start_matches('/')))
                .arg("::/EFI/BOOT/BOOTX64.EFI"),
            None,
        )?;
        let _ = std::fs::remove_file(staging.join(image.trim_start_matches('/')));
        let _ = std::fs::remove_file(staging.join("tmp/sysstate-early.cfg"));
        Ok(())
    }

    /// Unmounts everything in reverse order and detaches the loop device.
    fn clean_up(&mut self, staging: &Path) -> Result<()> {
        let mut failures = Vec::new();
        let _ = sysstate_fs::command("sync").status();
        while let Some(at) = self.mounts.pop() {
            if let Err(error) = run("unmount", sysstate_fs::command("umount").arg(&at), None) {
                failures.push(error.to_string());
                let _ = sysstate_fs::command("umount").arg("--lazy").arg(&at).status();
            }
        }
        if let Some(device) = self.loop_device.take() {
            let _ = sysstate_fs::command("partx").args(["-d", &device]).status();
            if let Err(error) = run("unmount", sysstate_fs::command("losetup").args(["-d", &device]), None) {
                failures.push(error.to_string());
            }
        }
        let _ = std::fs::remove_dir(staging);
        match failures.is_empty() {
            true => Ok(()),
            false => Err(EngineError::new(ErrorCode::RecoverFailed, failures.join("; ")).with_resolution(
                "unmount what `findmnt` lists under the state folder's `recover/`, then detach the disk (`losetup -d`)",
            )),
        }
    }
}

/// Discards the free blocks of the new filesystems: apt's downloaded packages, deleted after
/// installing, would otherwise stay allocated on a thin-provisioned disk or a disk image (a
/// loop device turns a discard into a hole). A disk without discard is left as it is.
fn trim(plan: &RecoverPlan, staging: &Path) {
    for fs in plan.filesystems.iter().filter(|f| f.mountpoint.starts_with('/')) {
        let at = staging.join(fs.mountpoint.trim_start_matches('/'));
        let result = sysstate_fs::command("fstrim").arg("--quiet-unsupported").arg(&at).output();
        match result {
            Ok(output) if output.status.success() => {}
            Ok(output) => tracing::info!("fstrim {}: {}", at.display(), String::from_utf8_lossy(&output.stderr).trim()),
            Err(error) => tracing::info!("fstrim {}: {error}", at.display()),
        }
    }
}

/// The root filesystem's UUID in the new system, from its `/etc/fstab` as restored.
fn plan_root_uuid(staging: &Path) -> Result<String> {
    let output = sysstate_fs::command("findmnt").args(["-n", "-o", "UUID", "--mountpoint"]).arg(staging).output();
    let uuid = output.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    if !uuid.is_empty() {
        return Ok(uuid);
    }
    let probe = sysstate_fs::command("findmnt").args(["-n", "-o", "SOURCE", "--mountpoint"]).arg(staging).output();
    let source = probe.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let blkid = sysstate_fs::command("blkid").args(["-p", "-s", "UUID", "-o", "value", &source]).output();
    let uuid = blkid.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    match uuid.is_empty() {
        true => Err(EngineError::new(
            ErrorCode::RecoverFailed,
            format!("recovery step `boot loader`: the new root `{source}` has no UUID for GRUB to find it by"),
        )),
        false => Ok(uuid),
    }
}

/// The partitions of the block device `disk` by number, with a device node each (made from
/// sysfs where no udev made it).
fn partition_devices(disk: &str) -> Result<BTreeMap<u32, String>> {
    let name = Path::new(disk).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sys = Path::new("/sys/class/block").join(&name);
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(&sys).into_iter().flatten().flatten() {
        let Ok(number) = std::fs::read_to_string(entry.path().join("partition")) else { continue };
        let Ok(number) = number.trim().parse::<u32>() else { continue };
        let part = entry.file_name().to_string_lossy().into_owned();
        let node = PathBuf::from("/dev").join(&part);
        if !node.exists() {
            let numbers = std::fs::read_to_string(entry.path().join("dev")).unwrap_or_default();
            let (major, minor) = numbers.trim().split_once(':').unwrap_or(("", ""));
            let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else { continue };
            let made = rustix::fs::mknodat(
                rustix::fs::CWD,
                &node,
                rustix::fs::FileType::BlockDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                rustix::fs::makedev(major, minor),
            );
            if let Err(error) = made {
                return Err(EngineError::new(
                    ErrorCode::RecoverFailed,
                    format!("cannot make the device node `{}` for partition {number}: {error}", node.display()),
                ));
            }
        }
        found.insert(number, node.display().to_string());
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
