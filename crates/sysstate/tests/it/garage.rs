//! A Garage cluster of three nodes on 127.0.0.1, replication factor 3, one zone each: made for a
//! test in a folder of its own (its own ports, keys and bucket), its nodes killed and restarted
//! by the test, all stopped when dropped. `garage` comes from `scripts/test.sh` (cargo install).

use crate::support::text;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    config: PathBuf,
    log: PathBuf,
    /// Its S3 API's port.
    pub s3_port: u16,
    child: Option<Child>,
}

pub struct Cluster {
    _dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// The bucket made for the test.
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, seconds: u64, mut ready: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(seconds);
    while !ready() {
        assert!(Instant::now() < until, "{what} within {seconds} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Node {
    fn garage(&self, args: &[&str]) -> std::process::Output {
        Command::new("garage").arg("-c").arg(&self.config).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs a `garage` command on this node: its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.garage(args);
        assert!(
            output.status.success(),
            "`garage {}`: {}{}",
            args.join(" "),
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new("garage")
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.s3_port;
        wait_for("a Garage node opens its S3 port", 60, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    /// Kills the node at once (SIGKILL), as a machine that loses power.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("node running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `s3://BUCKET` through this node: the settings a vault's `storage.env` needs.
    pub fn storage_env(&self, cluster: &Cluster) -> String {
        format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_ENDPOINT=http://127.0.0.1:{}\nAWS_REGION=garage\nAWS_ALLOW_HTTP=true\n",
            cluster.key_id, cluster.secret, self.s3_port
        )
    }
}

impl Cluster {
    /// Three nodes, connected, each in a zone of its own with 1 GB, one key and one bucket that
    /// every node serves.
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let secret: String = {
            let mut rng = crate::support::Rng(std::process::id() as u64 ^ 0x6a7a_6e65);
            rng.bytes(32).iter().map(|b| format!("{b:02x}")).collect()
        };
        let mut nodes: Vec<Node> = (0..3).map(|n| Node::configure(dir.path(), n, &secret)).collect();
        for node in &mut nodes {
            node.start();
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|node| {
                let mut id = String::new();
                wait_for("a Garage node tells its id", 30, || {
                    let output = node.garage(&["node", "id", "-q"]);
                    id = text(&output.stdout).trim().to_string();
                    output.status.success() && id.contains('@')
                });
                id
            })
            .collect();
        let first = &nodes[0];
        for id in &ids[1..] {
            first.ok(&["node", "connect", id]);
        }
        for (n, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap();
            first.ok(&["layout", "assign", "-z", &format!("zone{n}"), "-c", "1G", short]);
        }
        first.ok(&["layout", "apply", "--version", "1"]);
        let mut key = String::new();
        wait_for("the cluster makes a key", 60, || {
            let output = first.garage(&["key", "create", "sysstate-test"]);
            key = text(&output.stdout);
            output.status.success()
        });
        let key_id = key.split_whitespace().find(|w| w.starts_with("GK")).expect("a key id").to_string();
        let secret = key
            .lines()
            .filter(|line| line.to_ascii_lowercase().contains("secret"))
            .flat_map(|line| line.split_whitespace())
            .find(|word| word.len() == 64 && word.chars().all(|c| c.is_ascii_hexdigit()))
            .expect("a secret key")
            .to_string();
        let bucket = "vault".to_string();
        first.ok(&["bucket", "create", &bucket]);
        first.ok(&["bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", "sysstate-test"]);
        let cluster = Cluster { _dir: dir, nodes, bucket, key_id, secret };
        // Every node knows the layout, the key and the bucket before a test writes through it.
        for node in &cluster.nodes {
            wait_for("every node serves the bucket", 60, || node.garage(&["bucket", "info", "vault"]).status.success());
            wait_for("every node answers S3 for the bucket", 60, || cluster.s3_ready(node));
        }
        cluster
    }

    /// A signed listing of the bucket through `node` answers 200.
    fn s3_ready(&self, node: &Node) -> bool {
        let output = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--aws-sigv4", "aws:amz:garage:s3"])
            // The hash of the empty body, which Garage wants named and curl does not send.
            .args(["-H", "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"])
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            .arg(format!("http://127.0.0.1:{}/{}?list-type=2&max-keys=1", node.s3_port, self.bucket))
            .output()
            .unwrap();
        text(&output.stdout).trim() == "200"
    }
}

impl Node {
    fn configure(dir: &Path, n: usize, secret: &str) -> Node {
        let home = dir.join(format!("node{n}"));
        std::fs::create_dir_all(home.join("meta")).unwrap();
        std::fs::create_dir_all(home.join("data")).unwrap();
        let (s3_port, rpc_port) = (free_port(), free_port());
        let config = home.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\nreplication_factor = 3\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\nrpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = home.join("meta").display(),
                data = home.join("data").display(),
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        Node { config, log: home.join("garage.log"), s3_port, child: None }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
