//! A repository behind a sysstate vault (`vault://HOST:PORT`): the repository's files over the
//! vault's HTTPS API (`docs/vault.md`), with the host's token and the vault's own certificate
//! authority pinned (no outside PKI, and no other certificate is trusted). The vault decides what
//! the host may do; its refusals come back as [`ErrorKind::Forbidden`].

use super::{Backend, BackendError, ErrorKind, FileKind, Result};

/// What a host holds to reach its vault (written by `sysstate agent register`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VaultCredentials {
    /// `vault://HOST:PORT`.
    pub vault: String,
    /// This host's name at the vault.
    pub host: String,
    /// The host's token (a secret: the file is 0600).
    pub token: String,
    /// The vault's certificate authority, PEM: the only one trusted for it.
    pub ca: String,
}

/// The vault's API.
#[derive(Debug)]
pub struct VaultBackend {
    location: String,
    base: String,
    token: String,
    client: reqwest::Client,
    /// The client of direct reads (a pack's bytes from the vault's storage, at a URL the vault
    /// signed): the system's roots, no token. Made at the first redirect.
    storage_client: std::sync::OnceLock<std::result::Result<reqwest::Client, String>>,
    /// Set when a direct read failed: this process reads through the vault from then on.
    through_vault: std::sync::atomic::AtomicBool,
    runtime: tokio::runtime::Runtime,
}

/// The header that asks the vault for the bytes themselves, not a redirect to its storage.
pub const THROUGH_VAULT: &str = "x-sysstate-through-vault";

/// The HTTPS base of `vault://HOST:PORT`.
pub fn https_base(vault: &str) -> std::result::Result<String, String> {
    let rest = vault
        .strip_prefix("vault://")
        .ok_or_else(|| format!("`{vault}` is not a vault URL: write `vault://HOST:PORT`"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("`{vault}` is not a vault URL: write `vault://HOST:PORT`"));
    }
    Ok(format!("https://{authority}"))
}

/// The settings of every client of a host: rustls, bounded times, and no redirect followed (a
/// redirect is the vault's answer to a pack's read, taken by `VaultBackend::send`: the token
/// never follows it).
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(300))
        .user_agent(concat!("sysstate/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
}

/// A client that trusts only `ca_pem`.
pub fn pinned_client(ca_pem: &str) -> std::result::Result<reqwest::Client, String> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| format!("the vault's certificate: {e}"))?;
    client_builder().tls_built_in_root_certs(false).add_root_certificate(ca).build().map_err(|e| e.to_string())
}

/// The full text of a reqwest error and its causes.
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl VaultBackend {
    /// Opens the vault of `credentials`.
    pub fn open(credentials: &VaultCredentials) -> Result<VaultBackend> {
        let fail = |message: String| BackendError {
            kind: ErrorKind::VaultUnreachable,
            operation: "open",
            path: String::new(),
            location: credentials.vault.clone(),
            message,
        };
        let base = https_base(&credentials.vault).map_err(fail)?;
        let client = pinned_client(&credentials.ca).map_err(fail)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sysstate-vault-io")
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(VaultBackend {
            location: credentials.vault.clone(),
            base,
            token: credentials.token.clone(),
            client,
            storage_client: std::sync::OnceLock::new(),
            through_vault: std::sync::atomic::AtomicBool::new(false),
            runtime,
        })
    }

    fn url(&self, kind: FileKind, name: Option<&str>) -> String {
        let dir = match kind {
            FileKind::Config => "config",
            other => other.dir(),
        };
        match name {
            Some(name) => format!("{}/v1/repo/{dir}/{name}", self.base),
            None => format!("{}/v1/repo/{dir}", self.base),
        }
    }

    fn failure(
        &self,
        operation: &'static str,
        kind: FileKind,
        name: &str,
        kind_of: ErrorKind,
        message: String,
    ) -> BackendError {
        BackendError { kind: kind_of, operation, path: kind.path(name), location: self.location.clone(), message }
    }

    /// Sends `request` (the bytes `range` of a file, when given) and answers the response of a
    /// success, the vault's redirect to its storage followed without the token; a status that is
    /// not a success becomes the error it stands for.
    async fn respond(
        &self,
        operation: &'static str,
        kind: FileKind,
        name: &str,
        request: reqwest::RequestBuilder,
        range: Option<String>,
    ) -> Result<reqwest::Response> {
        let error = |kind_of: ErrorKind, message: String| self.failure(operation, kind, name, kind_of, message);
        let mut request = request.bearer_auth(&self.token);
        if let Some(range) = &range {
            request = request.header("range", range);
        }
        if self.through_vault.load(std::sync::atomic::Ordering::Relaxed) {
            request = request.header(THROUGH_VAULT, "1");
        }
        let again = request.try_clone();
        let mut response = request.send().await.map_err(|e| {
            let text = describe(&e);
            let kind_of = if e.is_connect() || text.contains("certificate") {
                ErrorKind::VaultUnreachable
            } else {
                ErrorKind::Transient
            };
            error(kind_of, text)
        })?;
        if response.status() == reqwest::StatusCode::TEMPORARY_REDIRECT {
            let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
            match location {
                Some(location) => match self.read_direct(&location, range.as_deref()).await {
                    Ok(response) => return Ok(response),
                    Err(why) => {
                        // Out of this host's reach (or the URL expired): through the vault,
                        // now and from now on.
                        tracing::warn!(%why, "a direct read from the vault's storage failed: reading through the vault");
                        self.through_vault.store(true, std::sync::atomic::Ordering::Relaxed);
                        let again = again.ok_or_else(|| error(ErrorKind::Permanent, "a redirect to retry".into()))?;
                        response = again
                            .header(THROUGH_VAULT, "1")
                            .send()
                            .await
                            .map_err(|e| error(ErrorKind::Transient, describe(&e)))?;
                    }
                },
                None => return Err(error(ErrorKind::Permanent, "the vault redirected without a location".into())),
            }
        }
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let body = response.bytes().await.map_err(|e| error(ErrorKind::Transient, describe(&e)))?;
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        let kind_of = match status {
            404 => ErrorKind::NotFound,
            401 | 403 => ErrorKind::Forbidden,
            409 => ErrorKind::Mismatch,
            507 => ErrorKind::NoSpace,
            500..=599 => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        };
        Err(error(kind_of, format!("the vault answered {status}: {message}")))
    }

    /// [`respond`](Self::respond) to a request for a whole file (or none), and the whole body of
    /// the success.
    fn send(
        &self,
        operation: &'static str,
        kind: FileKind,
        name: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes> {
        self.runtime.block_on(async {
            let response = self.respond(operation, kind, name, request, None).await?;
            response.bytes().await.map_err(|e| self.failure(operation, kind, name, ErrorKind::Transient, describe(&e)))
        })
    }

    /// The answer of the storage to a read of a pack (or `range` of it) at the URL the vault
    /// signed: no token goes there.
    async fn read_direct(&self, url: &str, range: Option<&str>) -> std::result::Result<reqwest::Response, String> {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!("the vault redirected to `{url}`, not an HTTP URL"));
        }
        let client = self
            .storage_client
            .get_or_init(|| client_builder().build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)?;
        let mut request = client.get(url);
        if let Some(range) = range {
            request = request.header("range", range);
        }
        let response = request.send().await.map_err(|e| describe(&e))?;
        // A range answered with the whole object (a store that ignores `Range`) is not taken.
        let expected = if range.is_some() { reqwest::StatusCode::PARTIAL_CONTENT } else { reqwest::StatusCode::OK };
        if response.status() != expected {
            return Err(format!("the storage answered {}", response.status()));
        }
        Ok(response)
    }
}

impl Backend for VaultBackend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn create(&self) -> Result<()> {
        self.list(FileKind::Config).map(|_| ())
    }

    fn list(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        let body = self.send("list", kind, "", self.client.get(self.url(kind, None)))?;
        serde_json::from_slice(&body).map_err(|e| BackendError {
            kind: ErrorKind::Permanent,
            operation: "list",
            path: kind.dir().to_string(),
            location: self.location.clone(),
            message: format!("the vault's listing is not JSON: {e}"),
        })
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Vec<u8>> {
        Ok(Vec::from(self.send("read", kind, name, self.client.get(self.url(kind, Some(name))))?))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        super::gather_range(self, kind, name, offset, length)
    }

    fn read_range_streamed(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        length: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let range = format!("bytes={offset}-{}", offset + length - 1);
        let request = self.client.get(self.url(kind, Some(name)));
        let given = self.runtime.block_on(async {
            let mut response = self.respond("read", kind, name, request, Some(range)).await?;
            let mut given = 0u64;
            while given < length {
                let piece = response
                    .chunk()
                    .await
                    .map_err(|e| self.failure("read", kind, name, ErrorKind::Transient, describe(&e)))?;
                let Some(piece) = piece else { break };
                super::give(&piece, &mut given, length, sink);
            }
            Ok(given)
        })?;
        if given < length {
            let message = format!("{given} bytes where {length} were asked for");
            return Err(self.failure("read", kind, name, ErrorKind::Mismatch, message));
        }
        Ok(())
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.write_shared(kind, name, bytes::Bytes::copy_from_slice(data))
    }

    fn write_shared(&self, kind: FileKind, name: &str, data: bytes::Bytes) -> Result<()> {
        self.send("write", kind, name, self.client.put(self.url(kind, Some(name))).body(data)).map(|_| ())
    }

    fn remove(&self, kind: FileKind, name: &str) -> Result<()> {
        match self.send("remove", kind, name, self.client.delete(self.url(kind, Some(name)))) {
            Err(error) if error.kind == ErrorKind::NotFound => Ok(()),
            other => other.map(|_| ()),
        }
    }
}
