//! Shadow storage: where providers keep shadow copies, with a maximum size.
//!
//! A storage area is a directory (`on`) holding one folder per shadow copy: `<id>/meta.json`
//! and `<id>/tree/` (the copied paths, mirrored by their absolute path). Used bytes are the
//! real bytes each copy allocated, recorded when it was made.

use crate::error::ShadowError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The maximum size of a storage area.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxSize {
    /// A number of bytes.
    Bytes(u64),
    /// A percentage of the storage's volume.
    Percent(f64),
    /// No limit but the volume's free space.
    Unbounded,
}

impl MaxSize {
    /// Parses `512MiB`, `2G`, `1048576`, `10%` or `unbounded`.
    pub fn parse(text: &str) -> Result<MaxSize, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("unbounded") {
            return Ok(MaxSize::Unbounded);
        }
        if let Some(percent) = text.strip_suffix('%') {
            let value: f64 = percent.trim().parse().map_err(|_| format!("`{text}` is not a percentage"))?;
            if !(0.0..=100.0).contains(&value) {
                return Err(format!("`{text}`: a percentage is between 0 and 100"));
            }
            return Ok(MaxSize::Percent(value));
        }
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 =
            number.parse().map_err(|_| format!("`{text}` is not a size: use bytes, `512MiB`, `10%` or `unbounded`"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            other => return Err(format!("`{text}`: unknown unit `{other}`")),
        };
        Ok(MaxSize::Bytes(number.saturating_mul(multiplier)))
    }

    /// Bytes, given the total size of the storage's volume.
    pub fn resolve(&self, volume_total: u64) -> Option<u64> {
        match self {
            MaxSize::Bytes(bytes) => Some(*bytes),
            MaxSize::Percent(percent) => Some((volume_total as f64 * percent / 100.0) as u64),
            MaxSize::Unbounded => None,
        }
    }
}

impl MaxSize {
    /// As a setting that parses back to the same limit (`512`, `10%`, `unbounded`).
    pub fn setting(&self) -> String {
        match self {
            MaxSize::Bytes(bytes) => bytes.to_string(),
            MaxSize::Percent(percent) => format!("{percent}%"),
            MaxSize::Unbounded => "unbounded".into(),
        }
    }
}

impl std::fmt::Display for MaxSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxSize::Bytes(bytes) => f.write_str(&sysstate_types::units::bytes(*bytes)),
            MaxSize::Percent(percent) => write!(f, "{percent}%"),
            MaxSize::Unbounded => f.write_str("unbounded"),
        }
    }
}

/// What is known of one shadow copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CopyMeta {
    /// Its id.
    pub id: String,
    /// The shadow set it belongs to.
    pub set: String,
    /// The volume it copies.
    pub for_volume: String,
    /// The provider that made it.
    pub provider: String,
    /// When, ns since the epoch.
    pub created_ns: i64,
    /// Real bytes it allocated.
    pub bytes: u64,
    /// Entries copied.
    pub files: u64,
    /// Kept after the backup (`sysstate shadows create`), or released.
    pub persistent: bool,
    /// The absolute paths it holds.
    pub paths: Vec<String>,
}

/// A storage area.
#[derive(Debug, Clone)]
pub struct StorageArea {
    /// The volume whose copies it holds.
    pub for_volume: PathBuf,
    /// Where.
    pub on: PathBuf,
    /// Its maximum.
    pub max_size: MaxSize,
}

/// The one resize recommended when a storage area is full: room for what is used and what was
/// needed, with a quarter more, in whole MiB.
pub fn resize_command(volume: &str, location: &str, used: u64, needed: u64) -> String {
    let size = (used + needed + (used + needed) / 4).div_ceil(1 << 20).max(1);
    format!("sysstate shadowstorage resize --for {volume} --on {location} --max-size {size}MiB")
}

/// Total and free bytes of the filesystem holding `path`.
pub fn volume_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let stat = rustix::fs::statvfs(path)?;
    Ok((stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize))
}

impl StorageArea {
    /// The folder of a copy.
    pub fn copy_dir(&self, id: &str) -> PathBuf {
        self.on.join(id)
    }

    /// Every copy, oldest first.
    pub fn copies(&self) -> Vec<CopyMeta> {
        let mut copies: Vec<CopyMeta> = std::fs::read_dir(&self.on)
            .into_iter()
            .flatten()
            .filter_map(|entry| std::fs::read(entry.ok()?.path().join("meta.json")).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect();
        copies.sort_by_key(|c| (c.created_ns, c.id.clone()));
        copies
    }

    /// Bytes used by its copies.
    pub fn used(&self) -> u64 {
        self.copies().iter().map(|c| c.bytes).sum()
    }

    /// Its limit in bytes (`None`: unbounded), and the free bytes of its volume.
    pub fn limit_and_free(&self) -> Result<(Option<u64>, u64), ShadowError> {
        std::fs::create_dir_all(&self.on).map_err(|e| ShadowError::io(&self.on, e))?;
        let (total, free) = volume_space(&self.on).map_err(|e| ShadowError::io(&self.on, e))?;
        Ok((self.max_size.resolve(total), free))
    }

    /// How many bytes a new copy may take now.
    pub fn budget(&self) -> Result<u64, ShadowError> {
        let (limit, free) = self.limit_and_free()?;
        let by_limit = limit.map(|l| l.saturating_sub(self.used())).unwrap_or(u64::MAX);
        Ok(by_limit.min(free))
    }

    /// Deletes a copy.
    pub fn delete(&self, id: &str) -> Result<(), ShadowError> {
        let dir = self.copy_dir(id);
        let tree = dir.join("tree");
        if crate::provider::is_btrfs(&dir) {
            crate::provider::delete_snapshot_in(&tree).map_err(|e| ShadowError::io(&tree, e))?;
        }
        make_writable(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ShadowError::io(&dir, e)),
        }
    }

    /// Makes room for `needed` bytes by deleting the oldest persistent copies; returns those
    /// deleted. Fails with `shadow-storage-full` when even that is not enough.
    pub fn make_room(&self, needed: u64) -> Result<Vec<CopyMeta>, ShadowError> {
        self.make_room_with(needed, &|_| {})
    }

    /// [`make_room`](Self::make_room), telling `deleted` of each copy as it goes.
    pub fn make_room_with(&self, needed: u64, on_delete: &dyn Fn(&CopyMeta)) -> Result<Vec<CopyMeta>, ShadowError> {
        let mut deleted = Vec::new();
        loop {
            let (limit, free) = self.limit_and_free()?;
            let fits = limit.is_none_or(|limit| self.used() + needed <= limit) && needed <= free;
            if fits {
                return Ok(deleted);
            }
            match self.copies().into_iter().find(|c| c.persistent) {
                Some(oldest) => {
                    self.delete(&oldest.id)?;
                    tracing::warn!(
                        "shadow-storage-oldest-deleted: deleted persistent shadow copy {} of `{}` (made {}, {} bytes) to make room in `{}`",
                        oldest.id,
                        oldest.for_volume,
                        sysstate_types::time::format_utc(oldest.created_ns),
                        oldest.bytes,
                        self.on.display()
                    );
                    on_delete(&oldest);
                    deleted.push(oldest);
                }
                None => return Err(self.full(needed)),
            }
        }
    }

    /// The `shadow-storage-full` error for a copy that needed `needed` bytes.
    pub fn full(&self, needed: u64) -> ShadowError {
        let (limit, free) = self.limit_and_free().unwrap_or((None, 0));
        ShadowError::StorageFull {
            volume: self.for_volume.display().to_string(),
            location: self.on.display().to_string(),
            max_size: match limit {
                Some(bytes) => format!("{} ({bytes} bytes)", self.max_size),
                None => "unbounded".into(),
            },
            used: self.used(),
            free,
            needed,
        }
    }
}

/// Copies keep their sources' modes; make a copy's folders writable so it can be deleted
/// whatever they were (root ignores modes, other users do not).
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if rustix::process::geteuid().is_root() {
        return;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.is_dir() {
                let _ =
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
                if let Ok(entries) = std::fs::read_dir(&path) {
                    stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(MaxSize::parse("512MiB"), Ok(MaxSize::Bytes(512 << 20)));
        assert_eq!(MaxSize::parse("2G"), Ok(MaxSize::Bytes(2 << 30)));
        assert_eq!(MaxSize::parse("1000"), Ok(MaxSize::Bytes(1000)));
        assert_eq!(MaxSize::parse("10%"), Ok(MaxSize::Percent(10.0)));
        assert_eq!(MaxSize::parse("unbounded"), Ok(MaxSize::Unbounded));
        assert!(MaxSize::parse("10 parsecs").is_err());
        assert!(MaxSize::parse("150%").is_err());
        assert_eq!(MaxSize::Percent(10.0).resolve(1000), Some(100));
    }
}
