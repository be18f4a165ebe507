//! The components of system state (DESIGN §1) and their resolution under a root.

use crate::config::{ComponentConfig, Config};
use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};
use sysstate_types::ErrorCode;

/// A component: a named part of system state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Its name.
    pub name: String,
    /// Absolute paths as seen from the root.
    pub paths: Vec<String>,
    /// Glob patterns left out, relative to the root (`boot/efi`) or file names (`*.tmp`).
    pub exclude: Vec<String>,
    /// Check for locks before the freeze.
    pub lock_check: bool,
    /// Built in (true) or from the config.
    pub builtin: bool,
}

/// The default components, in DESIGN §1 order.
pub const DEFAULT_NAMES: &[&str] =
    &["boot", "efi", "config", "accounts", "packages", "bootloader", "disk-layout", "systemd", "cron"];

fn builtin(name: &str, paths: &[&str], exclude: &[&str]) -> Component {
    Component {
        name: name.into(),
        paths: paths.iter().map(|p| p.to_string()).collect(),
        exclude: exclude.iter().map(|p| p.to_string()).collect(),
        lock_check: true,
        builtin: true,
    }
}

/// The ESP partition type GUID (GPT).
const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";

/// The EFI system partition's mount points on the running system: vfat mounts whose partition
/// type is the ESP's (from udev's database), or vfat mounts at `/boot/efi` or `/efi`.
pub fn detect_esp() -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(separator) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(mount), Some(fstype), Some(device)) = (fields.get(4), fields.get(separator + 1), fields.get(2))
        else {
            continue;
        };
        if *fstype != "vfat" {
            continue;
        }
        let udev = std::fs::read_to_string(format!("/run/udev/data/b{device}")).unwrap_or_default();
        let esp_type = udev.lines().any(|l| l.eq_ignore_ascii_case(&format!("E:ID_PART_ENTRY_TYPE={ESP_TYPE}")));
        if esp_type || *mount == "/boot/efi" || *mount == "/efi" {
            found.push(mount.replace("\\040", " "));
        }
    }
    found
}

/// The built-in components.
pub fn builtins() -> Vec<Component> {
    builtins_with_esp(&detect_esp())
}

/// The built-in components, with the ESP at `esp` (the usual places when empty).
pub fn builtins_with_esp(esp: &[String]) -> Vec<Component> {
    let esp: Vec<&str> =
        if esp.is_empty() { vec!["/boot/efi", "/efi"] } else { esp.iter().map(String::as_str).collect() };
    let boot_excludes: Vec<String> =
        esp.iter().filter_map(|p| p.strip_prefix("/boot/")).map(|p| format!("boot/{p}")).collect();
    let boot_excludes: Vec<&str> = boot_excludes.iter().map(String::as_str).collect();
    vec![
        // The ESP is its own component, with its own lock check.
        builtin("boot", &["/boot"], &boot_excludes),
        builtin("efi", &esp, &[]),
        builtin("config", &["/etc"], &[]),
        builtin(
            "accounts",
            &["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/subuid", "/etc/subgid"],
            &[],
        ),
        builtin("packages", &["/var/lib/dpkg", "/var/lib/apt/extended_states", "/var/lib/rpm"], &[]),
        builtin("bootloader", &["/boot/grub", "/boot/grub2", "/etc/default/grub", "/etc/grub.d"], &[]),
        builtin("disk-layout", &["/etc/fstab", "/etc/crypttab", "/etc/mdadm", "/etc/lvm"], &[]),
        builtin("systemd", &["/etc/systemd"], &[]),
        builtin("cron", &["/var/spool/cron", "/etc/crontab", "/etc/cron.d"], &[]),
    ]
}

/// Every component known: the built-ins, then the config's (a config component with a
/// built-in's name replaces it).
pub fn all(config: &Config) -> Result<Vec<Component>> {
    let mut components = builtins();
    for ComponentConfig { name, paths, exclude, lock_check } in &config.components {
        if name.is_empty() || paths.is_empty() {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("component `{name}` in the config has no name or no paths"),
            ));
        }
        if let Some(bad) = paths.iter().find(|p| !p.starts_with('/') || p.split('/').any(|c| c == "..")) {
            return Err(EngineError::new(
                ErrorCode::InvalidInput,
                format!("component `{name}`: path `{bad}` must be absolute and without `..`"),
            ));
        }
        let component = Component {
            name: name.clone(),
            paths: paths.clone(),
            exclude: exclude.clone(),
            lock_check: lock_check.unwrap_or(true),
            builtin: false,
        };
        match components.iter_mut().find(|c| c.name == *name) {
            Some(existing) => *existing = component,
            None => components.push(component),
        }
    }
    Ok(components)
}

/// A component with the paths that exist under the root.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The component.
    pub component: Component,
    /// Its paths that exist.
    pub present: Vec<String>,
    /// Its paths that do not.
    pub missing: Vec<String>,
}

/// Path of `absolute` under `root`.
pub fn under_root(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

/// Picks the components to back up: those named (`--component`), else `backup.components`, else
/// every component (built-ins and the config's). A component named explicitly must have at least
/// one path on this machine (`component-missing`); a default one without any is left out.
pub fn select(config: &Config, root: &Path, named: &[String]) -> Result<(Vec<Resolved>, Vec<String>)> {
    let all = all(config)?;
    let (names, explicit): (Vec<String>, bool) = if !named.is_empty() {
        (named.to_vec(), true)
    } else if let Some(list) = &config.backup.components {
        (list.clone(), true)
    } else {
        (all.iter().map(|c| c.name.clone()).collect(), false)
    };
    let mut selected = Vec::new();
    let mut skipped = Vec::new();
    for name in names {
        let component = all.iter().find(|c| c.name == name).ok_or_else(|| {
            EngineError::new(ErrorCode::ComponentMissing, format!("component `{name}` is not known"))
                .with_cause(format!("no built-in component and no `[[component]]` in the config is called `{name}`"))
                .with_resolution(format!(
                    "use one of: {}",
                    all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
        })?;
        let (present, missing): (Vec<String>, Vec<String>) =
            component.paths.iter().cloned().partition(|p| std::fs::symlink_metadata(under_root(root, p)).is_ok());
        if present.is_empty() {
            if explicit {
                return Err(EngineError::new(
                    ErrorCode::ComponentMissing,
                    format!("component `{name}` has none of its paths on this machine: {}", component.paths.join(", ")),
                )
                .with_cause(format!("none of the paths of `{name}` exist under `{}`", root.display()))
                .with_resolution(format!("check the paths of `{name}` in the config, or leave it out of the backup")));
            }
            skipped.push(name.clone());
            continue;
        }
        selected.push(Resolved { component: component.clone(), present, missing });
    }
    Ok((selected, skipped))
}

/// One component as `sysstate components` shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ComponentReport {
    /// Its name.
    pub name: String,
    /// Built in, or from the config.
    pub builtin: bool,
    /// Its paths that exist under the root.
    pub paths: Vec<String>,
    /// Its paths that do not.
    pub missing: Vec<String>,
    /// Bytes of its regular files (each inode once).
    pub size: u64,
    /// Its files.
    pub files: u64,
    /// The writers that make it consistent.
    pub writers: Vec<String>,
    /// The filesystem type its first path is on (`auto` picks btrfs snapshots on btrfs, reflink
    /// on XFS and btrfs, copies elsewhere).
    pub filesystem: Option<String>,
    /// `free`, `not checked`, or who holds which file.
    pub lock_state: String,
}

fn filesystem_name(path: &Path) -> Option<String> {
    let magic = rustix::fs::statfs(path).ok()?.f_type as u64;
    Some(
        match magic {
            0xEF53 => "ext4",
            0x5846_5342 => "xfs",
            0x9123_683E => "btrfs",
            0x0102_1994 => "tmpfs",
            0x4d44 => "vfat",
            0x794c_7630 => "overlayfs",
            _ => return Some(format!("0x{magic:x}")),
        }
        .to_string(),
    )
}

/// Every known component with what is on this machine.
pub fn report(config: &Config, root: &Path, served: &[String]) -> Result<Vec<ComponentReport>> {
    use std::os::unix::fs::MetadataExt;
    let resolved: Vec<Resolved> = all(config)?
        .into_iter()
        .map(|component| {
            let (present, missing) =
                component.paths.iter().cloned().partition(|p| std::fs::symlink_metadata(under_root(root, p)).is_ok());
            Resolved { component, present, missing }
        })
        .collect();
    let busy = crate::locks::busy_by_component(&resolved, root, served);
    let mut out = Vec::new();
    for item in &resolved {
        let (component, present, missing) = (&item.component, &item.present, &item.missing);
        let (mut size, mut files) = (0, 0);
        let mut seen = std::collections::HashSet::new();
        let mut stack: Vec<PathBuf> = present.iter().map(|p| under_root(root, p)).collect();
        while let Some(path) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                stack.extend(std::fs::read_dir(&path).into_iter().flatten().filter_map(|e| e.ok().map(|e| e.path())));
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                size += meta.size();
                files += 1;
            }
        }
        let writers: Vec<String> = config
            .writers
            .iter()
            .filter(|w| w.components.contains(&component.name))
            .map(|w| w.name.clone())
            .chain(match component.name.as_str() {
                "packages" if !config.writers.iter().any(|w| w.name == "dpkg") => Some("dpkg (built in)".to_string()),
                "accounts" if !config.writers.iter().any(|w| w.name == "accounts") => {
                    Some("accounts (built in)".to_string())
                }
                _ => None,
            })
            .collect();
        let lock_state = match busy.iter().find(|(name, _, _)| *name == component.name) {
            _ if present.is_empty() => "not on this machine".to_string(),
            _ if !component.lock_check || served.contains(&component.name) => "not checked".to_string(),
            Some((_, shown, busy)) => format!(
                "{} by pid {} (`{}`): `{}`",
                if busy.locked { "locked" } else { "open for writing" },
                busy.pid,
                busy.command,
                shown.display()
            ),
            None => "free".to_string(),
        };
        out.push(ComponentReport {
            filesystem: present.first().and_then(|p| filesystem_name(&under_root(root, p))),
            name: component.name.clone(),
            builtin: component.builtin,
            paths: present.clone(),
            missing: missing.clone(),
            size,
            files,
            writers,
            lock_state,
        });
    }
    Ok(out)
}
