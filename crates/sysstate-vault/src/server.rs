//! The vault's HTTPS API (`docs/vault.md`). Every request is taken as hostile: TLS first, then
//! the host's token (`Authorization: Bearer …`) before any body is read; headers within 10 s, a
//! body of at most 128 MiB read within 5 minutes, 256 connections at once.
//!
//! What a host may do, file kind by file kind (the repository's layout, `docs/FORMAT.md`):
//!
//! | kind | list, read | write | delete |
//! |---|---|---|---|
//! | `config` | yes | only while there is none (the first host creates the repository) | never |
//! | `keys`, `data`, `index` | yes | put-if-absent (the same bytes again is success); packs and index files named by their hash | never |
//! | `versions` | its own, and those of hosts it was granted | put-if-absent, named by its hash; the vault records it as the host's | never |
//! | `locks` | yes | its own leases | its own leases |
//! | `protected` | yes | never (the vault's retention decides) | never |
//!
//! Packs and index files are shared: hosts that share the repository key deduplicate against
//! each other, and can read each other's data blobs if they know what to ask for (one key domain,
//! as a shared restic repository; `docs/vault.md`).

use crate::state::State;
use crate::Vault;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use sysstate_repo::backend::vault::THROUGH_VAULT;
use sysstate_repo::backend::{ErrorKind, FileKind};
use sysstate_repo::Id;
use sysstate_types::ErrorCode;

type Body = Full<Bytes>;

/// The largest body taken, and the largest range read (a pack is 8 MiB; a large file's may be
/// more).
pub const MAX_BODY: usize = 128 << 20;
/// How long a request's headers may take.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take to be read and answered.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How old the records a request is judged by may be: a revocation, a grant or a soft
/// deletion made elsewhere (the CLI, another vault process) takes effect within this time.
pub const RECORDS_MAX_AGE: Duration = Duration::from_secs(2);
/// How long a signed URL of a direct read is good for: the host asks for it right away, and a
/// few minutes cover a clock between the vault and the storage a little apart.
const DIRECT_READ_VALID_FOR: Duration = Duration::from_secs(300);

/// How often a token the records do not know makes them read again (a host registered at
/// another vault process a moment ago; a guesser's tokens do not make the vault list faster).
const RECORDS_MISS_AGE: Duration = Duration::from_millis(250);

fn answer(status: StatusCode, body: Bytes, content_type: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("a response builds")
}

fn json_answer(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    answer(status, Bytes::from(serde_json::to_vec(value).expect("JSON encodes")), "application/json")
}

fn refuse(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    json_answer(
        status,
        &json!({"error": {"code": code.as_str(), "message": message.into(), "resolution": code.resolution()}}),
    )
}

/// The file kind of a path segment.
fn kind_of(dir: &str) -> Option<FileKind> {
    Some(match dir {
        "config" => FileKind::Config,
        "keys" => FileKind::Key,
        "data" => FileKind::Pack,
        "index" => FileKind::Index,
        "versions" => FileKind::Version,
        "locks" => FileKind::Lock,
        "protected" => FileKind::Protection,
        _ => return None,
    })
}

/// A repository file name: hex (or `config`), nothing that could climb out of its folder.
fn valid_name(kind: FileKind, name: &str) -> bool {
    match kind {
        FileKind::Config => name == "config",
        _ => !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
    }
}

/// Serves the vault in `dir` until SIGTERM or SIGINT.
pub fn serve(dir: &Path) -> sysstate_engine::Result<()> {
    let vault = Vault::open(dir)?;
    vault.storage.create().map_err(|e| sysstate_engine::EngineError::from(sysstate_repo::RepoError::from(e)))?;
    vault.records.fresh()?;
    let config = vault.config.clone();
    let tls = tls_config(dir)?;
    let address: std::net::SocketAddr = config.listen.parse().map_err(|_| {
        sysstate_engine::EngineError::new(
            ErrorCode::InvalidInput,
            format!("`listen = \"{}\"` is not an address and port", config.listen),
        )
    })?;
    let vault = Arc::new(vault);
    let sample = config.verify_sample()?;
    config.soft_delete()?;
    let (stop_jobs, stopped) = std::sync::mpsc::channel::<()>();
    let daily = daily_jobs(dir.to_path_buf(), sample, stopped);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sysstate-vault")
        .enable_all()
        .build()
        .map_err(|e| sysstate_engine::EngineError::new(ErrorCode::Internal, e.to_string()))?;
    let listener = {
        let _guard = runtime.enter();
        let socket = std::net::TcpListener::bind(address).map_err(|error| {
            sysstate_engine::EngineError::new(ErrorCode::InvalidInput, format!("cannot listen on `{address}`: {error}"))
                .with_resolution("choose a free address in the vault's `vault.toml` (`listen`)")
        })?;
        socket
            .set_nonblocking(true)
            .map_err(|e| sysstate_engine::EngineError::new(ErrorCode::Internal, e.to_string()))?;
        tokio::net::TcpListener::from_std(socket)
            .map_err(|e| sysstate_engine::EngineError::new(ErrorCode::Internal, e.to_string()))?
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .map_err(|e| sysstate_engine::EngineError::new(ErrorCode::Internal, e.to_string()))?;
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                stop.notify_one();
            }
        });
    }
    sysstate_engine::errln!("sysstate vault: serving `{}` on https://{address} ({})", config.storage, config.url);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    // The last reference is dropped after the runtime, not in it: an object store's client has a
    // runtime of its own, which may not be dropped in an asynchronous context (a vault on Garage
    // panicked on SIGTERM).
    let served = vault.clone();
    runtime.block_on(async move {
        let vault = served;
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.notified() => break,
            };
            let Ok((stream, _)) = accepted else { continue };
            let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
            let (acceptor, vault) = (acceptor.clone(), vault.clone());
            tokio::spawn(async move {
                let Ok(Ok(stream)) = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    let vault = vault.clone();
                    async move {
                        let answered = tokio::time::timeout(REQUEST_TIMEOUT, handle(vault, request)).await;
                        Ok::<_, std::convert::Infallible>(answered.unwrap_or_else(|_| {
                            refuse(
                                StatusCode::SERVICE_UNAVAILABLE,
                                ErrorCode::VaultUnreachable,
                                "the request took longer than 5 minutes",
                            )
                        }))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                drop(permit);
            });
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(vault);
    drop(stop_jobs);
    let _ = daily.join();
    sysstate_engine::errln!("sysstate vault: stopped");
    Ok(())
}

/// How often the vault runs its jobs.
const JOBS_EVERY: Duration = Duration::from_secs(86_400);

/// The vault's daily jobs, on a thread of their own until `stopped` closes: retention, purge,
/// and a verify of `sample` percent of the packs, each recorded in the vault's job store. The
/// first run is at the start; then every day (in tests, every `SYSSTATE_FAILPOINT_VAULT_JOBS_EVERY_S`).
fn daily_jobs(
    dir: std::path::PathBuf,
    sample: u8,
    stopped: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    let every = sysstate_types::failpoint::<u64>("VAULT_JOBS_EVERY_S").map_or(JOBS_EVERY, Duration::from_secs);
    std::thread::Builder::new()
        .name("vault-jobs".into())
        .spawn(move || loop {
            use sysstate_engine::jobs::JobTrigger::Schedule;
            let said = |what: &str, ended: sysstate_engine::Result<()>| {
                if let Err(error) = ended {
                    sysstate_engine::errln!(
                        "sysstate vault: the {what} job failed: error[{}]: {}",
                        error.code,
                        error.message
                    );
                }
            };
            said("retention", crate::apply_retention(&dir, false, Schedule).map(drop));
            said("purge", crate::purge(&dir, Schedule).map(drop));
            said("verify", crate::verify(&dir, sample, Schedule).map(drop));
            if !matches!(stopped.recv_timeout(every), Err(std::sync::mpsc::RecvTimeoutError::Timeout)) {
                return;
            }
        })
        .expect("threads start")
}

/// The server's TLS: its certificate and key from `vault init`.
fn tls_config(dir: &Path) -> sysstate_engine::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: String| {
        sysstate_engine::EngineError::new(
            ErrorCode::InvalidInput,
            format!("the vault's {what} in `{}`: {e}", dir.display()),
        )
        .with_resolution("the folder must hold what `sysstate vault init` made")
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .map_err(|e| bad("certificate", e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(dir.join("server-key.pem")).map_err(|e| bad("key", e.to_string()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS settings", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad("certificate", e.to_string()))
}

/// Runs blocking work (the storage backend, the records) off the server's threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("the vault's blocking work does not panic")
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::InvalidInput,
            format!("the body is over {MAX_BODY} bytes"),
        )),
        Err(error) => {
            Err(refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, format!("cannot read the body: {error}")))
        }
    }
}

async fn handle(vault: Arc<Vault>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let segments: Vec<String> = path.trim_matches('/').split('/').map(String::from).collect();
    let method = request.method().clone();
    if method == Method::POST && segments == ["v1", "register"] {
        return register(vault, request).await;
    }
    // Everything else is a host's: its token first.
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(token) = token else {
        return refuse(StatusCode::UNAUTHORIZED, ErrorCode::VaultForbidden, "no token: register the host first");
    };
    let reader = vault.clone();
    let known = token.clone();
    let records = match blocking(move || {
        let records = reader.records.state(RECORDS_MAX_AGE)?;
        match records.host_of_token(&known) {
            Some(_) => Ok(records),
            None => reader.records.state(RECORDS_MISS_AGE),
        }
    })
    .await
    {
        Ok(records) => records,
        Err(error) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, error.code, error.message),
    };
    let Some(host) = records.host_of_token(&token).map(|h| h.name.clone()) else {
        return refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::VaultForbidden,
            "the token is not known to the vault (never registered, or revoked)",
        );
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "repo", dir]) => match kind_of(dir) {
            Some(kind) => list(vault, records, host, kind).await,
            None => refuse(StatusCode::NOT_FOUND, ErrorCode::InvalidInput, format!("no file kind `{dir}`")),
        },
        (method, ["v1", "repo", dir, name]) => {
            let Some(kind) = kind_of(dir).filter(|k| valid_name(*k, name)) else {
                return refuse(StatusCode::NOT_FOUND, ErrorCode::InvalidInput, format!("no file `{dir}/{name}`"));
            };
            let name = name.to_string();
            match *method {
                Method::GET => read(vault, records, host, kind, name, request).await,
                Method::PUT => write(vault, records, host, kind, name, request).await,
                Method::DELETE => delete(vault, host, kind, name).await,
                _ => refuse(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::InvalidInput,
                    format!("{method} is not served on files"),
                ),
            }
        }
        _ => refuse(StatusCode::NOT_FOUND, ErrorCode::InvalidInput, format!("no endpoint `{path}`")),
    }
}

fn storage_error(error: sysstate_repo::backend::BackendError) -> Response<Body> {
    let status = match error.kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Mismatch => StatusCode::CONFLICT,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Transient => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refuse(status, sysstate_repo::RepoError::from(error).code(), "the vault's storage: see its log")
}

async fn list(vault: Arc<Vault>, records: Arc<State>, host: String, kind: FileKind) -> Response<Body> {
    let storage = vault.storage.clone();
    match blocking(move || storage.list(kind)).await {
        Ok(files) => {
            let files: Vec<(String, u64)> = match kind {
                FileKind::Version => files.into_iter().filter(|(name, _)| records.visible(&host, name)).collect(),
                _ => files,
            };
            json_answer(StatusCode::OK, &json!(files))
        }
        Err(error) => storage_error(error),
    }
}

async fn read(
    vault: Arc<Vault>,
    records: Arc<State>,
    host: String,
    kind: FileKind,
    name: String,
    request: Request<Incoming>,
) -> Response<Body> {
    if kind == FileKind::Version && !records.visible(&host, &name) {
        // A version written through another vault process a moment ago: its owner, read now.
        let (reader, version) = (vault.clone(), name.clone());
        let owner = if records.versions.contains_key(&name) {
            None
        } else {
            match blocking(move || reader.records.owner(&version)).await {
                Ok(owner) => owner,
                Err(error) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, error.code, error.message),
            }
        };
        let deleted = records.deleted.contains_key(&name);
        if deleted || !owner.is_some_and(|owner| records.may_read(&host, &owner.host)) {
            let why = if deleted {
                "the vault soft-deleted it (`sysstate vault undelete` on the vault brings it back)"
            } else {
                "it is not its own and no grant lets it"
            };
            return refuse(
                StatusCode::FORBIDDEN,
                ErrorCode::VaultForbidden,
                format!("host `{host}` may not read version {name}: {why}"),
            );
        }
    }
    let range = request.headers().get("range").and_then(|v| v.to_str().ok()).map(str::to_string);
    let range = match range.as_deref().map(parse_range) {
        None => None,
        Some(Some((_, length))) if length > MAX_BODY as u64 => {
            return refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::InvalidInput,
                format!("a range is at most {MAX_BODY} bytes"),
            )
        }
        Some(Some(range)) => Some(range),
        Some(None) => {
            return refuse(StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::InvalidInput, "give `Range: bytes=FIRST-LAST`")
        }
    };
    if kind == FileKind::Pack
        && vault.config.direct_reads == Some(true)
        && !request.headers().contains_key(THROUGH_VAULT)
    {
        let (storage, pack) = (vault.storage.clone(), name.clone());
        let valid_for =
            sysstate_types::failpoint::<u64>("DIRECT_READ_VALID_S").map_or(DIRECT_READ_VALID_FOR, Duration::from_secs);
        match blocking(move || storage.signed_read_url(kind, &pack, valid_for)).await {
            Ok(Some(url)) => {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header("location", url)
                    .body(Full::new(Bytes::new()))
                    .expect("a response builds")
            }
            // A folder has no URL to give: the bytes go through the vault.
            Ok(None) => {}
            Err(error) => return storage_error(error),
        }
    }
    let storage = vault.storage.clone();
    let read = blocking(move || match range {
        Some((offset, length)) => storage.read_range(kind, &name, offset, length),
        None => storage.read(kind, &name),
    })
    .await;
    match read {
        Ok(bytes) => answer(
            if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK },
            Bytes::from(bytes),
            "application/octet-stream",
        ),
        Err(error) => storage_error(error),
    }
}

/// `bytes=FIRST-LAST` as (offset, length).
fn parse_range(text: &str) -> Option<(u64, u64)> {
    let (first, last) = text.strip_prefix("bytes=")?.split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    (last >= first).then(|| (first, last - first + 1))
}

async fn write(
    vault: Arc<Vault>,
    records: Arc<State>,
    host: String,
    kind: FileKind,
    name: String,
    request: Request<Incoming>,
) -> Response<Body> {
    // Refused before the body is read.
    match kind {
        FileKind::Protection => {
            return refuse(
                StatusCode::FORBIDDEN,
                ErrorCode::VaultForbidden,
                "protection is the vault's to set: its retention keeps versions",
            )
        }
        FileKind::Lock if records.locks.get(&name).is_some_and(|owner| *owner != host) => {
            return refuse(StatusCode::FORBIDDEN, ErrorCode::VaultForbidden, format!("lease {name} is another host's"))
        }
        _ => {}
    }
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    // Packs, index files and manifests are named by the hash of their bytes (`docs/FORMAT.md`):
    // a file under another's name would stand in for it, for every host.
    if matches!(kind, FileKind::Pack | FileKind::Index | FileKind::Version)
        && Id::from_hex(&name) != Some(Id::of_stored(&body))
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidInput,
            format!("`{}`: the bytes sent are not the ones its name is the hash of", kind.path(&name)),
        );
    }
    let written = blocking(move || -> Result<(), Box<Response<Body>>> {
        let internal =
            |e: sysstate_engine::EngineError| Box::new(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.code, e.message));
        // The owner first: a version or a lease is never stored unowned.
        let taken = match kind {
            FileKind::Version => vault.records.set_owner(&name, &host, crate::now()).map_err(internal)?,
            FileKind::Lock => match vault.records.lease_holder(&name).map_err(internal)? {
                Some(holder) if holder != host => Err(holder),
                Some(_) => Ok(()),
                None => vault.records.set_lease_holder(&name, &host).map(Ok).map_err(internal)?,
            },
            _ => Ok(()),
        };
        if let Err(owner) = taken {
            return Err(Box::new(refuse(
                StatusCode::FORBIDDEN,
                ErrorCode::VaultForbidden,
                format!("`{}` is host `{owner}`'s", kind.path(&name)),
            )));
        }
        // Put-if-absent is the storage's own promise: the same bytes again are success, other
        // bytes (a key, the config) an overwrite, refused.
        vault.storage.write_shared(kind, &name, body).map_err(|error| {
            Box::new(match error.kind {
                ErrorKind::Mismatch => refuse(
                    StatusCode::FORBIDDEN,
                    ErrorCode::VaultForbidden,
                    format!("`{}` exists: a host may add files, never overwrite them", kind.path(&name)),
                ),
                _ => storage_error(error),
            })
        })?;
        // Who added the pack, for the report of what each host stores: a failure here is the
        // upload's, so the host sends again and it is noted then.
        if kind == FileKind::Pack {
            vault.records.note_addition(&name, &host).map_err(internal)?;
        }
        Ok(())
    })
    .await;
    match written {
        Ok(()) => json_answer(StatusCode::CREATED, &json!({})),
        Err(response) => *response,
    }
}

async fn delete(vault: Arc<Vault>, host: String, kind: FileKind, name: String) -> Response<Body> {
    let refused = |why: String| {
        refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::VaultForbidden,
            format!("host `{host}` may not delete `{}`: {why}", kind.path(&name)),
        )
    };
    if kind != FileKind::Lock {
        return refused("a host adds, the vault's retention deletes".into());
    }
    let (reader, lease) = (vault.clone(), name.clone());
    match blocking(move || reader.records.lease_holder(&lease)).await {
        Ok(Some(holder)) if holder == host => {}
        Ok(Some(holder)) => return refused(format!("the lease is host `{holder}`'s")),
        Ok(None) => return refused("the vault knows no lease of that name taken by a host".into()),
        Err(error) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, error.code, error.message),
    }
    let removed = blocking(move || {
        vault.storage.remove(kind, &name).map_err(|e| Box::new(storage_error(e)))?;
        vault
            .records
            .drop_lease(&name)
            .map_err(|e| Box::new(refuse(StatusCode::INTERNAL_SERVER_ERROR, e.code, e.message)))
    })
    .await;
    match removed {
        Ok(()) => json_answer(StatusCode::OK, &json!({})),
        Err(response) => *response,
    }
}

/// `POST /v1/register {"host", "secret"}`: a credentials file exchanged for the host's token.
async fn register(vault: Arc<Vault>, request: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(request.into_body(), 4096).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, "a registration is a small JSON object")
        }
    };
    let Ok(asked) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, "the body is not JSON");
    };
    let (Some(name), Some(secret)) = (asked["host"].as_str(), asked["secret"].as_str()) else {
        return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, "send `host` and `secret`");
    };
    let (name, secret) = (name.to_string(), secret.to_string());
    let registered = blocking(move || {
        let records = vault.records.fresh()?;
        let now = crate::now();
        let hashed = crate::state::hash(&secret);
        let refused = |code: ErrorCode, message: String| sysstate_engine::EngineError::new(code, message);
        let (pending, used) = records.pending.get(&hashed).filter(|(p, _)| p.host == name).ok_or_else(|| {
            refused(
                ErrorCode::VaultCredentialsExpired,
                format!("no credentials of host `{name}` with that secret: revoked, or never made here"),
            )
        })?;
        let used_at = |used: i64| {
            refused(
                ErrorCode::VaultCredentialsExpired,
                format!(
                    "the credentials file of `{name}` was used at {}: each is good for one registration",
                    sysstate_types::time::format_utc(used)
                ),
            )
        };
        if let Some(used) = used {
            return Err(used_at(*used));
        }
        if now > pending.expires_ns {
            return Err(refused(
                ErrorCode::VaultCredentialsExpired,
                format!(
                    "the credentials file of `{name}` expired at {}",
                    sysstate_types::time::format_utc(pending.expires_ns)
                ),
            ));
        }
        if !vault.records.try_use(&hashed, now)? {
            let used = vault.records.fresh()?.pending.get(&hashed).and_then(|(_, used)| *used).unwrap_or(now);
            return Err(used_at(used));
        }
        let taken = |since: i64| {
            refused(
                ErrorCode::HostNameTaken,
                format!("host `{name}` is registered already (since {})", sysstate_types::time::format_utc(since)),
            )
        };
        if let Some(host) = records.host(&name) {
            return Err(taken(host.registered_ns));
        }
        let token = crate::state::secret();
        if !vault.records.add_host(&name, &crate::state::hash(&token), now)? {
            let since = vault.records.fresh()?.host(&name).map_or(now, |h| h.registered_ns);
            return Err(taken(since));
        }
        Ok(token)
    })
    .await;
    match registered {
        Ok(token) => json_answer(StatusCode::OK, &json!({"token": token})),
        Err(error) if error.code == ErrorCode::HostNameTaken => refuse(StatusCode::CONFLICT, error.code, error.message),
        Err(error) if error.code == ErrorCode::VaultCredentialsExpired => {
            refuse(StatusCode::FORBIDDEN, error.code, error.message)
        }
        Err(error) => refuse(StatusCode::INTERNAL_SERVER_ERROR, error.code, error.message),
    }
}
