//! Helpers: a sandbox per test, running the binary, generating trees, and comparing trees with
//! all their metadata.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// True when the requirement holds. When it does not: a failure under `SYSSTATE_TEST_REQUIRE=all`
/// (CI must run everything), else a printed reason and `false` so the test returns early.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var("SYSSTATE_TEST_REQUIRE").as_deref() == Ok("all") {
        panic!("this test needs {what}, and SYSSTATE_TEST_REQUIRE=all says it must run here");
    }
    eprintln!("skipped: this test needs {what} (scripts/test.sh provides it)");
    false
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A sandbox: a state dir, an empty config, a passphrase, a target.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub target: String,
    pub passphrase: Option<String>,
    /// More environment for every command (an object store's endpoint through a proxy).
    pub env: Vec<(String, String)>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "").unwrap();
        let target = dir.path().join("repo").display().to_string();
        Sandbox { dir, target, passphrase: Some("correct horse".into()), env: Vec::new() }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sysstate"));
        command
            .args(args)
            .env("SYSSTATE_CONFIG", self.path("config.toml"))
            .env("SYSSTATE_STATE_DIR", self.path("state"))
            .env("SYSSTATE_RUNTIME_DIR", self.path("run"))
            .env_remove("SYSSTATE_ROOT")
            .env_remove("SYSSTATE_FAILPOINT_KILL_AFTER_WRITES")
            .stdin(std::process::Stdio::null());
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        if !args.contains(&"--target") {
            command.args(["--target", &self.target]);
        }
        match &self.passphrase {
            Some(passphrase) => command.env("SYSSTATE_PASSPHRASE", passphrase),
            None => command.env_remove("SYSSTATE_PASSPHRASE"),
        };
        command
    }

    /// Runs the binary; returns the output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs the binary and requires exit code `code`.
    pub fn run_code(&self, args: &[&str], code: i32) -> Output {
        let output = self.run(args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "`sysstate {}` exited {:?}\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            text(&output.stdout),
            text(&output.stderr)
        );
        output
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        self.run_code(args, 0)
    }

    /// Runs with `--json` and parses stdout.
    pub fn json(&self, args: &[&str], code: i32) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.run_code(&all, code);
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&output.stdout)))
    }

    /// Backs up `root` with one component `data` covering `/data`; returns the version id.
    pub fn backup_data(&self, root: &Path) -> String {
        let value = self.json(&["backup", "--root", root.to_str().unwrap(), "--component", "data"], 0);
        value["version"].as_str().unwrap().to_string()
    }

    /// Writes a config with a `data` component over `/data`.
    pub fn with_data_component(self) -> Sandbox {
        std::fs::write(self.path("config.toml"), "[[component]]\nname = \"data\"\npaths = [\"/data\"]\n").unwrap();
        self
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A deterministic pseudo-random generator (xorshift), so trees are the same on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Text-like bytes that compress.
    pub fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&str; 8] = ["root", "etc", "grub", "efi", "passwd", "x:0:0", "/bin/sh\n", "# comment\n"];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(WORDS[(self.next() % 8) as usize].as_bytes());
            out.push(b' ');
        }
        out.truncate(len);
        out
    }
}

/// Makes `files` files under `dir` in nested folders, with sizes from 0 to ~3 MiB.
pub fn make_tree(dir: &Path, files: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    for i in 0..files {
        let sub = dir.join(format!("d{}/e{}", i % 7, i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let size = match rng.next() % 20 {
            0 => (rng.next() % (3 << 20)) as usize,
            1..=5 => 0,
            _ => (rng.next() % 20_000) as usize,
        };
        let content = if rng.next().is_multiple_of(2) { rng.text(size) } else { rng.bytes(size) };
        std::fs::write(sub.join(format!("f{i}.bin")), content).unwrap();
    }
}

/// One entry with everything restore must bring back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub content: Option<blake3::Hash>,
    pub link: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The first path (sorted) sharing this entry's inode, for hardlinks.
    pub hardlink_of: Option<PathBuf>,
    /// Allocated bytes, rounded to 64 KiB, for sparse files (`None` for dense ones).
    pub sparse_blocks: Option<u64>,
}

/// Every entry under `root`, keyed by path relative to it. `atime` is not compared (reading
/// changes it); directories' sizes are filesystem-specific and not compared.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    for path in paths {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let file_type = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if file_type.is_dir() {
            "dir"
        } else if file_type.is_file() {
            "file"
        } else if file_type.is_symlink() {
            "symlink"
        } else if file_type.is_char_device() {
            "char"
        } else if file_type.is_block_device() {
            "block"
        } else if file_type.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let hardlink_of = if file_type.is_file() && meta.nlink() > 1 {
            Some(inodes.entry((meta.dev(), meta.ino())).or_insert_with(|| rel.clone()).clone())
        } else {
            None
        };
        let sparse = file_type.is_file() && meta.blocks() * 512 < meta.size();
        out.insert(
            rel,
            Entry {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                size: if file_type.is_dir() { 0 } else { meta.size() },
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                content: file_type.is_file().then(|| blake3::hash(&std::fs::read(&path).unwrap())),
                link: file_type
                    .is_symlink()
                    .then(|| std::fs::read_link(&path).unwrap().as_os_str().as_bytes().to_vec()),
                rdev: meta.rdev(),
                xattrs: sysstate_repo::meta::read_xattrs(&path).unwrap(),
                hardlink_of,
                sparse_blocks: sparse.then(|| (meta.blocks() * 512).div_ceil(65536)),
            },
        );
    }
    out
}

/// Asserts two snapshots are equal, naming the first differences.
pub fn assert_same(expected: &BTreeMap<PathBuf, Entry>, actual: &BTreeMap<PathBuf, Entry>) {
    let mut problems = Vec::new();
    for (path, entry) in expected {
        match actual.get(path) {
            None => problems.push(format!("missing: {}", path.display())),
            Some(other) if other != entry => {
                problems.push(format!("differs: {}\n  expected {entry:?}\n  actual   {other:?}", path.display()))
            }
            _ => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        problems.push(format!("unexpected: {}", path.display()));
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The last ended job failed with `code`, with a cause, a resolution and the code's event id,
/// and the event log holds that error for it.
pub fn assert_job_failed(sandbox: &Sandbox, code: &str) {
    let jobs = sandbox.json(&["job", "--previous", "1"], 0);
    let job = &jobs[0];
    assert!(job["state"] == "failed" || job["state"] == "cancelled", "{job}");
    assert_eq!(job["error"]["code"], code, "{job}");
    assert!(
        !job["error"]["cause"].as_str().unwrap().is_empty() && !job["error"]["resolution"].as_str().unwrap().is_empty(),
        "{job}"
    );
    let id = job["id"].as_str().unwrap();
    let events = sandbox.json(&["events", "--job", id, "--level", "error"], 0);
    let event = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["code"] == code)
        .unwrap_or_else(|| panic!("no {code} event for job {id}: {events}"));
    assert_eq!(event["event-id"], job["error"]["event-id"]);
    assert!(!event["source"].as_str().unwrap().is_empty());
    let log = std::fs::read_to_string(job["log-path"].as_str().unwrap()).unwrap();
    assert!(log.contains(code), "the job log does not name {code}:\n{log}");
    assert_diagnosed(sandbox, code);
}

/// `sysstate doctor` diagnoses the newest failed job: its code, a cause from the knowledge
/// base with what told it apart, this machine's specifics where the code has them, and a
/// resolution. Returns the diagnosis for more specific checks.
pub fn assert_diagnosed(sandbox: &Sandbox, code: &str) -> serde_json::Value {
    let report = sandbox.json(&["doctor", "--no-validate"], 2);
    let diagnosis = report["diagnoses"]
        .as_array()
        .unwrap()
        .first()
        .unwrap_or_else(|| panic!("the doctor diagnosed no failed job: {report:#}"))
        .clone();
    assert_eq!(diagnosis["code"], code, "{diagnosis:#}");
    for field in ["symptom", "cause", "tell", "resolution", "message"] {
        assert!(!diagnosis[field].as_str().unwrap_or("").is_empty(), "no {field}: {diagnosis:#}");
    }
    let with_specifics = [
        "writer-timeout",
        "writer-retryable",
        "writer-nonretryable",
        "writer-out-of-resources",
        "writer-inconsistent",
        "writer-not-responding",
        "shadow-storage-full",
        "component-locked",
        "shadow-set-in-progress",
        "repository-locked",
        "commit-timeout",
        "target-unavailable",
        "target-full",
        "target-permission",
        "wrong-passphrase",
    ];
    if with_specifics.contains(&code) {
        assert!(!diagnosis["specifics"].as_array().unwrap().is_empty(), "no specifics: {diagnosis:#}");
    }
    diagnosis
}

/// Mounts a tmpfs with `options` (`size=2m`, `ro,size=1m`) at `dir`; unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(dir).status().unwrap();
        assert!(status.success(), "mount -t tmpfs -o {options} {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Points `command` at an S3 endpoint nobody listens on.
pub fn dead_s3(command: &mut Command) -> &mut Command {
    command
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_REGION", "garage")
}

/// `from` bind-mounted at `at` (read-only with [`BindMount::read_only`]); unmounted on drop.
pub struct BindMount(pub PathBuf);

impl BindMount {
    pub fn new(from: &Path, at: &Path) -> BindMount {
        let status = Command::new("mount").arg("--bind").arg(from).arg(at).status().unwrap();
        assert!(status.success(), "mount --bind {} {}", from.display(), at.display());
        BindMount(at.to_path_buf())
    }

    pub fn read_only(from: &Path, at: &Path) -> BindMount {
        let mount = BindMount::new(from, at);
        let status = Command::new("mount").args(["-o", "remount,bind,ro"]).arg(at).status().unwrap();
        assert!(status.success(), "remount {} read-only", at.display());
        mount
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Every entry of a version, by path: everything the repository records of it (identity,
/// times, metadata, content's blob ids), for comparing two versions entry for entry — but a
/// directory's access time, which every walk that lists the directory moves (and a walk that
/// does not list it, like the agent's journaled one, does not).
pub fn version_entries(sandbox: &Sandbox, version: &str) -> std::collections::BTreeMap<String, String> {
    use sysstate_repo::tree::NodeKind;
    let backend = sysstate_repo::backend::open_target(&sandbox.target).unwrap();
    let repo = sysstate_repo::Repository::open(backend, sandbox.passphrase.as_deref().unwrap().as_bytes()).unwrap();
    repo.load_index().unwrap();
    let id = sysstate_repo::Id::from_hex(version).unwrap();
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![(String::new(), repo.read_version(&id).unwrap().tree)];
    while let Some((path, tree)) = stack.pop() {
        for mut node in repo.read_tree(&tree).unwrap().nodes {
            let path = format!("{path}/{}", String::from_utf8_lossy(&node.name));
            if let NodeKind::Dir { subtree } = node.kind {
                stack.push((path.clone(), subtree));
                // The subtree is compared entry by entry.
                node.kind = NodeKind::Dir { subtree: sysstate_repo::Id([0; 32]) };
                node.atime_ns = 0;
            }
            out.insert(path, format!("{node:?}"));
        }
    }
    out
}
