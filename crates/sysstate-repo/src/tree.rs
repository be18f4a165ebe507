//! Directory trees: one blob per directory, its entries sorted by name, encoded with postcard so
//! the same directory always gives the same bytes (and so the same blob id: identical directories
//! are stored once).
//!
//! Decoding validates what restore relies on: every name is a single, non-empty path component
//! (no `/`, no NUL, not `.` or `..`) and names are strictly increasing (no duplicates).

use crate::id::Id;
use serde::{Deserialize, Serialize};

/// Version byte at the start of every encoded tree.
pub const TREE_FORMAT: u8 = 1;

/// The deepest nesting of directories a version may hold. A path of 2048 levels no longer fits
/// in `PATH_MAX` (4096 bytes, each level at least 2), and a restore opens each directory by its
/// path beneath the restore root: half of that leaves room for names longer than one byte. No
/// system holds a deeper tree; a deeper one is crafted or damaged, and every walk refuses it
/// instead of overflowing its stack.
pub const MAX_TREE_DEPTH: usize = 1024;

/// The damage a walk reports at `object` (a tree, or [`at_path`]) nested deeper than
/// [`MAX_TREE_DEPTH`].
pub fn too_deep(repo: &crate::Repository, object: String) -> crate::RepoError {
    repo.corrupt(
        object,
        format!("directories are nested deeper than {MAX_TREE_DEPTH} levels: the tree was crafted or damaged"),
    )
}

/// A deep directory named for a message: the start of its path.
pub fn at_path(path: &std::path::Path) -> String {
    let shown: String = path.to_string_lossy().chars().take(120).collect();
    format!("the tree at `{shown}…`")
}

/// A file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileContent {
    /// The data blobs, in order. For a sparse file, the data of its extents concatenated.
    pub blobs: Vec<Id>,
    /// For a sparse file, its data extents as `(offset, length)`; everything else is a hole.
    pub extents: Option<Vec<(u64, u64)>>,
}

/// What kind of entry, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// A regular file.
    File(FileContent),
    /// A directory and the tree blob of its entries.
    Dir {
        /// Its tree blob.
        subtree: Id,
    },
    /// A symbolic link; the target as raw bytes.
    Symlink {
        /// What it points to, never interpreted.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// Its device number.
        rdev: u64,
    },
    /// A block device.
    BlockDevice {
        /// Its device number.
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
}

impl NodeKind {
    /// True when a live entry of type `file_type` is of this kind.
    pub fn is_type_of(&self, file_type: std::fs::FileType) -> bool {
        use std::os::unix::fs::FileTypeExt;
        match self {
            NodeKind::File(_) => file_type.is_file(),
            NodeKind::Dir { .. } => file_type.is_dir(),
            NodeKind::Symlink { .. } => file_type.is_symlink(),
            NodeKind::CharDevice { .. } => file_type.is_char_device(),
            NodeKind::BlockDevice { .. } => file_type.is_block_device(),
            NodeKind::Fifo => file_type.is_fifo(),
        }
    }
}

/// One directory entry with all its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The name: raw bytes, one path component.
    pub name: Vec<u8>,
    /// The kind.
    pub kind: NodeKind,
    /// `st_mode` permission bits including setuid, setgid and sticky (no file type bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// The owner's name on the backed-up system, if it has one.
    pub user: Option<String>,
    /// The group's name on the backed-up system, if it has one.
    pub group: Option<String>,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch (recorded, not restorable).
    pub ctime_ns: i64,
    /// Inode number (hardlinks, change detection).
    pub inode: u64,
    /// Device of the filesystem (hardlinks).
    pub device: u64,
    /// Link count.
    pub links: u64,
    /// Size in bytes.
    pub size: u64,
    /// Every extended attribute, sorted by name: ACLs (`system.posix_acl_*`), capabilities
    /// (`security.capability`), SELinux labels (`security.selinux`), user attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A directory's entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Sorted by name, unique.
    pub nodes: Vec<Node>,
}

/// Why a tree blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    /// Unknown format byte.
    #[error("unknown tree format {0}")]
    Format(u8),
    /// Does not decode.
    #[error("malformed tree: {0}")]
    Malformed(String),
    /// A name restore must never use.
    #[error("unsafe entry name {0:?}")]
    UnsafeName(String),
    /// Names out of order or repeated.
    #[error("entry {0:?} is out of order or repeated")]
    Order(String),
}

/// True when `name` is one path component that cannot leave its directory.
pub fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    /// Encodes deterministically; nodes are sorted first.
    pub fn encode(&mut self) -> Vec<u8> {
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        // About what a node takes (a name, a few numbers, a blob id or two): the buffer is
        // seldom grown and copied on the way.
        let mut out = Vec::with_capacity(1 + self.nodes.len() * 128);
        out.push(TREE_FORMAT);
        postcard::to_extend(self, out).expect("trees encode")
    }

    /// Decodes and validates.
    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        let (&format, body) = bytes.split_first().ok_or(TreeError::Format(0))?;
        if format != TREE_FORMAT {
            return Err(TreeError::Format(format));
        }
        let tree: Tree = postcard::from_bytes(body).map_err(|e| TreeError::Malformed(e.to_string()))?;
        for (i, node) in tree.nodes.iter().enumerate() {
            if !is_safe_name(&node.name) {
                return Err(TreeError::UnsafeName(String::from_utf8_lossy(&node.name).into_owned()));
            }
            if i > 0 && tree.nodes[i - 1].name >= node.name {
                return Err(TreeError::Order(String::from_utf8_lossy(&node.name).into_owned()));
            }
        }
        Ok(tree)
    }

    /// The node called `name`.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        self.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| &self.nodes[i])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn node_strategy() -> impl Strategy<Value = Node> {
        let kind = prop_oneof![
            (
                proptest::collection::vec(any::<[u8; 32]>(), 0..4),
                proptest::option::of(proptest::collection::vec((any::<u64>(), any::<u64>()), 0..3))
            )
                .prop_map(|(blobs, extents)| NodeKind::File(FileContent {
                    blobs: blobs.into_iter().map(Id).collect(),
                    extents
                })),
            any::<[u8; 32]>().prop_map(|id| NodeKind::Dir { subtree: Id(id) }),
            proptest::collection::vec(any::<u8>(), 0..50).prop_map(|target| NodeKind::Symlink { target }),
            any::<u64>().prop_map(|rdev| NodeKind::CharDevice { rdev }),
            any::<u64>().prop_map(|rdev| NodeKind::BlockDevice { rdev }),
            Just(NodeKind::Fifo),
        ];
        (
            proptest::collection::vec(1u8..=255, 1..20).prop_filter("safe", |n| is_safe_name(n)),
            kind,
            any::<(u32, u32, u32, i64, i64, i64, u64, u64, u64, u64)>(),
            proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 1..10), proptest::collection::vec(any::<u8>(), 0..10)),
                0..3,
            ),
            proptest::option::of("[a-z]{1,8}"),
        )
            .prop_map(
                |(
                    name,
                    kind,
                    (mode, uid, gid, atime_ns, mtime_ns, ctime_ns, inode, device, links, size),
                    xattrs,
                    user,
                )| Node {
                    name,
                    kind,
                    mode,
                    uid,
                    gid,
                    user: user.clone(),
                    group: user,
                    atime_ns,
                    mtime_ns,
                    ctime_ns,
                    inode,
                    device,
                    links,
                    size,
                    xattrs,
                },
            )
    }

    proptest! {
        #[test]
        fn trees_round_trip_and_encode_deterministically(nodes in proptest::collection::vec(node_strategy(), 0..12)) {
            let mut unique = std::collections::BTreeMap::new();
            for node in nodes { unique.insert(node.name.clone(), node); }
            let mut tree = Tree { nodes: unique.into_values().rev().collect() };
            let bytes = tree.encode();
            let decoded = Tree::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, &tree);
            let mut again = decoded.clone();
            prop_assert_eq!(again.encode(), bytes);
        }
    }

    fn sample(name: &[u8]) -> Node {
        Node {
            name: name.to_vec(),
            kind: NodeKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 1,
            device: 1,
            links: 1,
            size: 0,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn unsafe_names_and_duplicates_are_refused() {
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0b"] {
            let tree = Tree { nodes: vec![sample(bad)] };
            let mut bytes = vec![TREE_FORMAT];
            bytes.extend(postcard::to_allocvec(&tree).unwrap());
            assert!(matches!(Tree::decode(&bytes), Err(TreeError::UnsafeName(_))), "{bad:?} accepted");
        }
        let tree = Tree { nodes: vec![sample(b"a"), sample(b"a")] };
        let mut bytes = vec![TREE_FORMAT];
        bytes.extend(postcard::to_allocvec(&tree).unwrap());
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::Order(_))));
    }
}
