//! Reading a repository: its versions, and the components and files of one.

use crate::error::Result;
use serde::Serialize;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use sysstate_repo::tree::{at_path, too_deep, NodeKind, MAX_TREE_DEPTH};
use sysstate_repo::version::{ComponentRecord, Version};
use sysstate_repo::{Id, Repository};

/// One entry of a version, as `sysstate items` lists it.
#[derive(Debug, Serialize)]
pub struct Item {
    /// The path, absolute as seen from the root.
    pub path: String,
    /// `f`, `d`, `l`, `c`, `b` or `p`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Mode bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (RFC 3339).
    pub mtime: String,
}

/// The components and entries of a version.
#[derive(Debug, Serialize)]
pub struct Items {
    /// The version's full id.
    pub version: String,
    /// Its components.
    pub components: Vec<ComponentRecord>,
    /// The entries within the chosen components' paths, in tree order.
    pub entries: Vec<Item>,
}

/// The versions, oldest first.
pub fn versions(repo: &Repository) -> Result<Vec<(Id, Version)>> {
    Ok(repo.versions()?)
}

/// The entries of `version` within the paths of `components` (empty: all of them).
pub fn items(repo: &Repository, version: &str, components: &[String]) -> Result<Items> {
    let (id, manifest) = repo.find_version_holding(version, components)?;
    let include: Vec<String> = manifest
        .components
        .iter()
        .filter(|c| components.is_empty() || components.contains(&c.name))
        .flat_map(|c| c.paths.clone())
        .collect();
    let mut entries = Vec::new();
    walk(repo, &manifest.tree, &include, &mut entries)?;
    Ok(Items { version: id.to_hex(), components: manifest.components, entries })
}

/// Lists the entries within `include` in tree order, with an explicit stack (a crafted
/// repository cannot overflow it; a tree nested deeper than [`MAX_TREE_DEPTH`] is damage).
fn walk(repo: &Repository, root: &Id, include: &[String], out: &mut Vec<Item>) -> Result<()> {
    let mut stack = vec![(PathBuf::from("/"), repo.read_tree(root)?.nodes.into_iter())];
    while let Some((path, nodes)) = stack.last_mut() {
        let Some(node) = nodes.next() else {
            stack.pop();
            continue;
        };
        let child = path.join(OsStr::from_bytes(&node.name));
        let inside = include.iter().any(|p| child.starts_with(p));
        let above = include.iter().any(|p| Path::new(p).starts_with(&child));
        if !inside && !above {
            continue;
        }
        let kind = match &node.kind {
            NodeKind::File(_) => "f",
            NodeKind::Dir { .. } => "d",
            NodeKind::Symlink { .. } => "l",
            NodeKind::CharDevice { .. } => "c",
            NodeKind::BlockDevice { .. } => "b",
            NodeKind::Fifo => "p",
        };
        if inside {
            out.push(Item {
                path: child.display().to_string(),
                kind,
                mode: node.mode,
                uid: node.uid,
                gid: node.gid,
                size: node.size,
                mtime: sysstate_types::time::format_utc(node.mtime_ns),
            });
        }
        if let NodeKind::Dir { subtree } = node.kind {
            if stack.len() > MAX_TREE_DEPTH {
                return Err(too_deep(repo, at_path(&child)).into());
            }
            stack.push((child, repo.read_tree(&subtree)?.nodes.into_iter()));
        }
    }
    Ok(())
}
