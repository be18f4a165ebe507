//! What system a version is of: distribution, release, architecture, kernels and host name, read
//! from the backed-up root itself (its `/etc/os-release`, the ELF header of its `/bin/sh`, its
//! `/boot`), so a backup with `--root` describes the system under that root and not the machine
//! that ran it. Recorded in every version's manifest (`system`), for a recovery to install
//! that release and a restore onto another server to compare releases.

use std::path::Path;

/// A system's identity, as recorded in a version.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SystemInfo {
    /// `ID` of os-release (`debian`, `ubuntu`); empty when the root has none.
    pub distribution: String,
    /// `VERSION_ID` (`12`, `24.04`); empty for a rolling or unreleased one (Debian testing).
    pub release: String,
    /// `VERSION_CODENAME` (`bookworm`), what a mirror calls the release.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub codename: String,
    /// `PRETTY_NAME`, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Debian's name of the architecture (`amd64`, `arm64`), from the root's `/bin/sh`.
    pub architecture: String,
    /// The kernels installed in the root's `/boot` (`6.1.0-13-amd64`), oldest name first.
    pub kernels: Vec<String>,
    /// The kernel running when the backup was taken, when the root is `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_kernel: Option<String>,
    /// The root's own host name (`/etc/hostname`): with `--root`, not the machine's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
}

impl SystemInfo {
    /// Reads the identity of the system at `root`. Nothing here fails: what cannot be read is
    /// left empty.
    pub fn of(root: &Path) -> SystemInfo {
        let release = read_os_release(root);
        let field = |name: &str| release.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
        let live = root == Path::new("/");
        SystemInfo {
            distribution: field("ID"),
            release: field("VERSION_ID"),
            codename: field("VERSION_CODENAME"),
            name: field("PRETTY_NAME"),
            architecture: architecture(root).unwrap_or_default(),
            kernels: kernels(root),
            running_kernel: live.then(|| rustix::system::uname().release().to_string_lossy().into_owned()),
            hostname: std::fs::read_to_string(root.join("etc/hostname"))
                .map(|t| t.trim().to_string())
                .unwrap_or_default(),
        }
    }
}

/// `/etc/os-release` of `root` (or `/usr/lib/os-release`), as name and unquoted value.
fn read_os_release(root: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root.join("etc/os-release"))
        .or_else(|_| std::fs::read_to_string(root.join("usr/lib/os-release")))
        .unwrap_or_default();
    parse_os_release(&text)
}

/// The `NAME=value` lines of an os-release file, values unquoted (os-release(5): shell-style
/// quoting with `"` or `'`, and `\` escapes inside double quotes).
fn parse_os_release(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else { continue };
        let value = if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            let mut unescaped = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    unescaped.extend(chars.next());
                } else {
                    unescaped.push(c);
                }
            }
            unescaped
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.to_string()
        } else {
            value.to_string()
        };
        out.push((name.to_string(), value));
    }
    out
}

/// Debian's architecture name of the root's `/bin/sh` (its ELF header), its symbolic links
/// (`/bin` → `usr/bin`, `sh` → `dash`) resolved as if the root were `/`.
fn architecture(root: &Path) -> Option<String> {
    let mut file = open_in_root(root, "bin/sh")?;
    let mut header = [0u8; 20];
    std::io::Read::read_exact(&mut file, &mut header).ok()?;
    elf_architecture(&header)
}

/// Opens `path` of the system at `root` for reading, its links resolved inside the root.
fn open_in_root(root: &Path, path: &str) -> Option<std::fs::File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let fd =
        rustix::fs::openat2(&dir, path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty(), ResolveFlags::IN_ROOT).ok()?;
    Some(std::fs::File::from(fd))
}

/// Debian's architecture name for an ELF header's class, byte order and machine.
fn elf_architecture(header: &[u8; 20]) -> Option<String> {
    if &header[..4] != b"\x7fELF" {
        return None;
    }
    let wide = header[4] == 2;
    let little = header[5] == 1;
    let machine = if little {
        u16::from_le_bytes([header[18], header[19]])
    } else {
        u16::from_be_bytes([header[18], header[19]])
    };
    let name = match (machine, wide, little) {
        (62, true, _) => "amd64",
        (3, false, _) => "i386",
        (183, true, _) => "arm64",
        (40, false, true) => "armhf",
        (243, true, _) => "riscv64",
        (21, true, true) => "ppc64el",
        (22, true, _) => "s390x",
        (8, _, true) => "mipsel",
        (258, true, _) => "loong64",
        _ => return Some(format!("elf-machine-{machine}")),
    };
    Some(name.to_string())
}

/// The kernel versions of `root/boot/vmlinuz-*`, sorted by name.
fn kernels(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root.join("boot"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted() {
        let parsed = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n# a comment\nID=debian\nVERSION_ID='12'\nNAME=\"say \\\"hi\\\"\"\nbroken line\n",
        );
        let get = |k: &str| parsed.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PRETTY_NAME"), Some("Debian GNU/Linux 12 (bookworm)"));
        assert_eq!(get("ID"), Some("debian"));
        assert_eq!(get("VERSION_ID"), Some("12"));
        assert_eq!(get("NAME"), Some("say \"hi\""));
        assert_eq!(parsed.len(), 4);
    }

    #[test]
    fn the_architecture_is_read_from_the_roots_shell_through_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        // An aarch64 header, the shell behind two links (merged /usr, sh → dash).
        let mut header = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
        header.extend([0; 8]);
        header.extend([2, 0, 183, 0]);
        std::fs::write(dir.path().join("usr/bin/dash"), &header).unwrap();
        std::os::unix::fs::symlink("dash", dir.path().join("usr/bin/sh")).unwrap();
        std::os::unix::fs::symlink("usr/bin", dir.path().join("bin")).unwrap();
        assert_eq!(architecture(dir.path()).as_deref(), Some("arm64"));
        // A link that climbs out of the root stays inside it: `/../../usr/bin/dash` is the
        // root's own dash, not this machine's.
        std::fs::remove_file(dir.path().join("usr/bin/sh")).unwrap();
        std::os::unix::fs::symlink("/../../../usr/bin/dash", dir.path().join("usr/bin/sh")).unwrap();
        assert_eq!(architecture(dir.path()).as_deref(), Some("arm64"));
        // This machine's own.
        let own = architecture(Path::new("/")).unwrap();
        let expected = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        assert_eq!(own, expected);
    }

    #[test]
    fn kernels_hostname_and_release_come_from_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        for name in ["vmlinuz-6.1.0-13-amd64", "vmlinuz-6.1.0-10-amd64", "initrd.img-6.1.0-13-amd64"] {
            std::fs::write(dir.path().join("boot").join(name), b"").unwrap();
        }
        std::fs::write(dir.path().join("etc/hostname"), "web1\n").unwrap();
        std::fs::write(dir.path().join("etc/os-release"), "ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n")
            .unwrap();
        let info = SystemInfo::of(dir.path());
        assert_eq!(info.kernels, ["6.1.0-10-amd64", "6.1.0-13-amd64"]);
        assert_eq!(info.hostname, "web1");
        assert_eq!(
            (info.distribution.as_str(), info.release.as_str(), info.codename.as_str()),
            ("debian", "12", "bookworm")
        );
        assert_eq!(info.running_kernel, None);
    }
}
