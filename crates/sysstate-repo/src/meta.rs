//! Reading Linux file metadata into [`Node`]s: owners and their names, times in ns, xattrs.

use crate::tree::{Node, NodeKind};
use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub use sysstate_fs::read_xattrs;

/// Names of users and groups from a root's `/etc/passwd` and `/etc/group`.
#[derive(Debug, Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    /// Reads the account files under `root`; missing files give no names.
    pub fn load(root: &Path) -> Names {
        let parse = |file: &str| -> HashMap<u32, String> {
            std::fs::read_to_string(root.join(file))
                .unwrap_or_default()
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let id = fields.nth(1)?.parse().ok()?;
                    Some((id, name.to_string()))
                })
                .collect()
        };
        Names { users: parse("etc/passwd"), groups: parse("etc/group") }
    }

    fn user(&self, uid: u32) -> Option<String> {
        self.users.get(&uid).cloned()
    }

    fn group(&self, gid: u32) -> Option<String> {
        self.groups.get(&gid).cloned()
    }
}

/// A node with the metadata of `meta` and a placeholder kind.
pub fn node_from_metadata(
    name: &[u8],
    meta: &Metadata,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    names: &Names,
    kind: NodeKind,
) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        user: names.user(meta.uid()),
        group: names.group(meta.gid()),
        atime_ns: meta.atime() * 1_000_000_000 + meta.atime_nsec(),
        mtime_ns: mtime_ns(meta),
        ctime_ns: ctime_ns(meta),
        inode: meta.ino(),
        device: meta.dev(),
        links: meta.nlink(),
        size: node_size(meta),
        xattrs,
    }
}

/// `st_mtime` in ns since the epoch.
pub fn mtime_ns(meta: &Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// `st_ctime` in ns since the epoch.
pub fn ctime_ns(meta: &Metadata) -> i64 {
    meta.ctime() * 1_000_000_000 + meta.ctime_nsec()
}

/// True when `ctime_ns` is far enough before a moment (`at_ns`, a version's point in time or a
/// copy's) for any later change to move it: a clock tick on filesystems with fine timestamps
/// (50 ms is ample); two seconds where whole seconds (or two) are kept, which a ctime with no
/// fraction suggests.
pub fn settled_before(ctime_ns: i64, at_ns: i64) -> bool {
    let margin = if ctime_ns % 1_000_000_000 == 0 { 2_000_000_000 } else { 50_000_000 };
    ctime_ns < at_ns - margin
}

/// The size a node records: a regular file's, 0 for everything else.
fn node_size(meta: &Metadata) -> u64 {
    if meta.is_file() {
        meta.size()
    } else {
        0
    }
}

/// [`untouched`] for an entry's metadata, without making a node of it (a source asks this of
/// every entry before the walk knows whether it needs the node).
pub fn untouched_metadata(parent: &Node, meta: &Metadata) -> bool {
    parent.kind.is_type_of(meta.file_type())
        && parent.device == meta.dev()
        && parent.size == node_size(meta)
        && parent.mtime_ns == mtime_ns(meta)
        && parent.ctime_ns == ctime_ns(meta)
        && parent.inode == meta.ino()
}

/// True when a file's content need not be read again: same size, mtime, ctime and inode as
/// in the parent version.
pub fn unchanged(parent: &Node, current: &Node) -> bool {
    matches!(parent.kind, NodeKind::File(_)) && same_inode_state(parent, current)
}

/// True when an entry of type `file_type` is the parent version's entry, untouched since: same
/// type, inode, ctime, mtime and size. The kernel moves ctime with every change of mode, owner
/// or extended attribute, so the parent's extended attributes stand without being read again —
/// the same trust the content comparison puts in ctime.
pub fn untouched(parent: &Node, current: &Node, file_type: std::fs::FileType) -> bool {
    parent.kind.is_type_of(file_type) && same_inode_state(parent, current)
}

fn same_inode_state(parent: &Node, current: &Node) -> bool {
    parent.size == current.size
        && parent.mtime_ns == current.mtime_ns
        && parent.ctime_ns == current.ctime_ns
        && parent.inode == current.inode
}
