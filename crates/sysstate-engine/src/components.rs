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

/// The built-in components.
pub fn builtins() -> Vec<Component> {
    vec![
        // The ESP is its own component, with its own lock check.
        builtin("boot", &["/boot"], &["boot/efi"]),
        builtin("efi", &["/boot/efi"], &[]),
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
