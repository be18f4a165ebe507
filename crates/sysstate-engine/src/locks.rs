//! Lock detection before the freeze: a file of a component that another process holds a lock on
//! or has open for writing fails the backup with `component-locked`, naming the component, the
//! file, and the process — the seed's "EFI system partition is locked", with the culprit named.

use crate::components::{under_root, Resolved};
use crate::error::{EngineError, Result};
use std::path::{Path, PathBuf};
use sysstate_types::ErrorCode;

/// Lock files that the `dpkg` and `accounts` writers take themselves, waiting for their holders.
const HANDLED_BY_WRITERS: &[&str] = &["/var/lib/dpkg/lock", "/var/lib/dpkg/lock-frontend", "/etc/.pwd.lock"];

/// Busy files by the component that owns them: a file belongs to the component with the
/// longest path above it, so a component that opts out keeps its files out even when they lie
/// inside another's. Components in `served` have a writer that makes them consistent (a
/// database keeps its files open by design) and are not checked, nor those with
/// `lock-check = false`.
pub fn busy_by_component<'r>(
    resolved: &'r [Resolved],
    root: &Path,
    served: &[String],
) -> Vec<(&'r str, PathBuf, sysstate_fs::BusyFile)> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let root_ref = &root;
    let mut claims: Vec<(PathBuf, &str, bool)> = resolved
        .iter()
        .flat_map(|r| {
            let checked = r.component.lock_check && !served.contains(&r.component.name);
            r.present.iter().map(move |p| (under_root(root_ref, p), r.component.name.as_str(), checked))
        })
        .collect();
    claims.sort_by_key(|(path, _, _)| std::cmp::Reverse(path.as_os_str().len()));
    let prefixes: Vec<PathBuf> = claims.iter().filter(|(_, _, checked)| *checked).map(|(p, _, _)| p.clone()).collect();
    if prefixes.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for busy in sysstate_fs::busy_files(&prefixes) {
        let shown = Path::new("/").join(busy.path.strip_prefix(&root).unwrap_or(&busy.path));
        if HANDLED_BY_WRITERS.iter().any(|f| shown == Path::new(f)) {
            continue;
        }
        if let Some((_, component, true)) = claims.iter().find(|(p, _, _)| busy.path.starts_with(p)) {
            out.push((*component, shown, busy));
        }
    }
    out
}

/// Fails with `component-locked` when a file of a checked component is busy (see
/// [`busy_by_component`]).
pub fn check(resolved: &[Resolved], root: &Path, served: &[String]) -> Result<()> {
    let Some((component, shown, busy)) = busy_by_component(resolved, root, served).into_iter().next() else {
        return Ok(());
    };
    let how = if busy.locked { "holds a lock on it" } else { "has it open for writing" };
    Err(EngineError::new(
        ErrorCode::ComponentLocked,
        format!("component `{component}` is locked: `{}` is held by pid {} (`{}`)", shown.display(), busy.pid, busy.command),
    )
    .with_cause(format!("pid {} (`{}`) {how}, so a copy now could catch it half-written", busy.pid, busy.command))
    .with_resolution(format!(
        "wait for pid {} to finish, or stop it, and run the backup again; if its writes are safe to copy, set `lock-check = false` for component `{component}`",
        busy.pid
    ))
    .with_data(serde_json::json!({
        "component": component, "file": shown.display().to_string(), "pid": busy.pid, "command": busy.command,
        "how": if busy.locked { "lock" } else { "open for writing" },
    })))
}
