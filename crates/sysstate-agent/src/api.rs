//! The agent's API: HTTP/1.1 with JSON on a unix socket (`docs/api.md`). Every request is taken
//! as hostile: the caller's role comes from the kernel's peer credentials before anything else
//! is read (403 for a caller with none), headers must arrive within 10 s, a body is at most
//! 64 KiB, a request is answered within 30 s (a followed log streams until its job ends), at most
//! 64 connections are served at once, and malformed input gets a 400 that says what was wrong.

use crate::daemon::{CancelRefused, Shared};
use crate::peer::{Peer, Role};
use crate::work::Work;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use sysstate_engine::jobs::{EventFilter, JobFilter, JobKind, JobState, JobTrigger};
use sysstate_engine::{EngineError, ErrorCode, Result};

type Body = BoxBody<Bytes, std::io::Error>;

/// The largest request body taken.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a request's headers may take to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take to be answered (a followed log excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The most jobs one list returns.
pub const MAX_LIST: usize = 1000;

/// The running API; [`ApiHandle::stop`] ends it.
#[derive(Debug)]
pub struct ApiHandle {
    runtime: tokio::runtime::Runtime,
    stop: Arc<tokio::sync::Notify>,
}

impl ApiHandle {
    /// Serves `GET /metrics` on `address` too (`[metrics] listen`): the metrics only, to
    /// anyone who can reach the address, with the API's bounds.
    pub fn serve_metrics(&self, shared: Arc<Shared>, address: std::net::SocketAddr) -> Result<()> {
        let listener = {
            let _guard = self.runtime.enter();
            let socket = std::net::TcpListener::bind(address).map_err(|error| {
                EngineError::new(ErrorCode::InvalidInput, format!("cannot listen on `{address}` for metrics: {error}"))
                    .with_resolution("choose a free address and port in `metrics.listen`")
            })?;
            socket.set_nonblocking(true).map_err(|e| EngineError::new(ErrorCode::Internal, e.to_string()))?;
            tokio::net::TcpListener::from_std(socket)
                .map_err(|e| EngineError::new(ErrorCode::Internal, e.to_string()))?
        };
        let stopped = self.stop.clone();
        self.runtime.spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped.notified() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_connection(stream, move |request: Request<Incoming>| {
                        let shared = shared.clone();
                        async move {
                            if request.method() == Method::GET && request.uri().path() == "/metrics" {
                                let config = shared.lock().config.clone();
                                let text = blocking(move || crate::metrics::render(&shared, &config)).await;
                                Response::builder()
                                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                    .body(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed())
                                    .expect("a response builds")
                            } else {
                                refuse(
                                    StatusCode::NOT_FOUND,
                                    "not-found",
                                    "only `GET /metrics` is served here",
                                    "scrape `/metrics`",
                                )
                            }
                        }
                    })
                    .await;
                    drop(permit);
                });
            }
        });
        Ok(())
    }

    /// Stops serving; connections in flight are dropped.
    pub fn stop(self) {
        self.stop.notify_waiters();
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// Serves the API on `socket` (replacing a socket a dead agent left: the caller holds the
/// agent's lock). The socket is open to every local user (0666): who may do what is decided by
/// peer credentials, and the runtime folder is made traversable (0711), not listable.
pub fn serve(shared: Arc<Shared>, socket: &Path) -> Result<ApiHandle> {
    let fail = |what: &str, error: std::io::Error| {
        EngineError::new(
            ErrorCode::StateDirPermission,
            format!("cannot {what} the API socket `{}`: {error}", socket.display()),
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sysstate-agent-api")
        .enable_all()
        .build()
        .map_err(|e| fail("start the runtime of", e))?;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(socket).map_err(|e| fail("remove the stale", e))?;
    }
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(socket).map_err(|e| fail("bind", e))?
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).map_err(|e| fail("open", e))?;
    if let Some(dir) = socket.parent() {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
    }
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    runtime.spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped.notified() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue; // dropped: too many connections at once
            };
            let Ok(credentials) = stream.peer_cred() else { continue };
            let peer = Peer { uid: credentials.uid(), gid: credentials.gid(), pid: credentials.pid().unwrap_or(0) };
            let shared = shared.clone();
            tokio::spawn(async move {
                serve_connection(stream, move |request| handle(shared.clone(), peer.clone(), request)).await;
                drop(permit);
            });
        }
    });
    Ok(ApiHandle { runtime, stop })
}

/// Serves one connection with `handler`: one request, its headers within [`HEADER_TIMEOUT`].
async fn serve_connection<I, F, Fut>(io: I, handler: F)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let answer = handler(request);
        async move { Ok::<_, std::convert::Infallible>(answer.await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// An error answer: `{"error": {"code", "message", "resolution"}}`.
fn refuse(status: StatusCode, code: &str, message: impl Into<String>, resolution: &str) -> Response<Body> {
    let value = json!({"error": {"code": code, "message": message.into(), "resolution": resolution}});
    reply(status, &value)
}

fn reply(status: StatusCode, value: &Value) -> Response<Body> {
    let mut text = serde_json::to_vec_pretty(value).expect("JSON encodes");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed())
        .expect("a response builds")
}

fn engine_error(failure: &EngineError) -> Response<Body> {
    refuse(StatusCode::INTERNAL_SERVER_ERROR, failure.code.as_str(), failure.message.clone(), failure.resolution())
}

/// Runs blocking work (the job store is SQLite) off the API's thread.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("the API's blocking work does not panic")
}

async fn handle(shared: Arc<Shared>, peer: Peer, request: Request<Incoming>) -> Response<Body> {
    // Authorization comes first: a caller with no role learns nothing, not even the routes.
    let config = shared.lock().config.clone();
    let role = peer.role(&config.agent);
    if role == Role::Nobody {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not use the agent's API", peer.describe()),
            "run as root, or join the group named by `[agent] read-group` (read) or `admin-group` (start and cancel)",
        );
    }
    let method = request.method().clone();
    if method == Method::POST && role < Role::Admin {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may read but not start or cancel jobs", peer.describe()),
            "run as root, or join the group named by `[agent] admin-group`",
        );
    }
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let streaming = matches!(segments.as_slice(), ["v1", "jobs", _, "log"]) && query_flag(&query, "follow");
    let answer = route(shared, peer, method, segments.iter().map(|s| s.to_string()).collect(), query, request);
    if streaming {
        return answer.await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
        Ok(response) => response,
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took longer than 30 s", "try again"),
    }
}

async fn route(
    shared: Arc<Shared>,
    peer: Peer,
    method: Method,
    segments: Vec<String>,
    query: String,
    request: Request<Incoming>,
) -> Response<Body> {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => status(shared).await,
        (&Method::GET, ["v1", "jobs"]) => list(shared, &query).await,
        (&Method::POST, ["v1", "jobs"]) => match read_json(request).await {
            Ok(body) => start(shared, &peer, body),
            Err(response) => response,
        },
        (&Method::GET, ["v1", "jobs", id]) => job(shared, id.to_string(), &query).await,
        (&Method::GET, ["v1", "jobs", id, "events"]) => {
            let id = id.to_string();
            let filter = EventFilter { job: Some(id.clone()), ..Default::default() };
            let store = shared.store.clone();
            match blocking(move || Ok::<_, EngineError>((store.job(&id)?, store.events(&filter)?))).await {
                Ok((Some(_), events)) => reply(StatusCode::OK, &serde_json::to_value(events).expect("events encode")),
                Ok((None, _)) => not_found(segments[2]),
                Err(error) => engine_error(&error),
            }
        }
        (&Method::GET, ["v1", "jobs", id, "log"]) => log(shared, id.to_string(), query_flag(&query, "follow")).await,
        (&Method::POST, ["v1", "jobs", id, "cancel"]) => cancel(shared, &peer, id),
        (&Method::GET, ["v1", "requests", id]) => request_state(&shared, id),
        (_, ["v1", "status"] | ["v1", "jobs"] | ["v1", "jobs", _] | ["v1", "jobs", _, "events" | "log" | "cancel"])
        | (_, ["v1", "requests", _]) => refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("{method} is not served on `/{}`", segments.join("/")),
            "docs/api.md lists each endpoint's method",
        ),
        _ => refuse(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no endpoint `/{}`", segments.join("/")),
            "docs/api.md lists the endpoints",
        ),
    }
}

/// The longest `GET /v1/jobs/ID?wait=MS` waits.
const JOB_WAIT_MAX: Duration = Duration::from_secs(10);

/// How often a waiting `GET /v1/jobs/ID?wait=MS` looks at the job's row.
const JOB_WAIT_LOOK: Duration = Duration::from_millis(5);

/// `GET /v1/jobs/ID[?wait=MS]`: the job; with `wait`, once it is no longer running or its
/// current operation changed from the one it had when asked, or after MS milliseconds (at most
/// ten seconds), whichever comes first — a client following a job learns of its end within
/// milliseconds without asking every few.
async fn job(shared: Arc<Shared>, id: String, query: &str) -> Response<Body> {
    let wait = match query_value(query, "wait").map(str::parse::<u64>) {
        None => Duration::ZERO,
        Some(Ok(ms)) => Duration::from_millis(ms).min(JOB_WAIT_MAX),
        Some(Err(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "`wait` is not a number of milliseconds".to_string(),
                "give `wait=MS`, at most 10000",
            )
        }
    };
    let until = tokio::time::Instant::now() + wait;
    let mut asked_during = None;
    loop {
        let store = shared.store.clone();
        let row = {
            let id = id.clone();
            blocking(move || store.job(&id)).await
        };
        let job = match row {
            Ok(Some(job)) => job,
            Ok(None) => return not_found(&id),
            Err(error) => return engine_error(&error),
        };
        let operation = job.current_operation.clone();
        let changed = asked_during.as_ref().is_some_and(|asked| *asked != operation);
        if job.state != JobState::Running || changed || tokio::time::Instant::now() >= until {
            return reply(StatusCode::OK, &serde_json::to_value(job).expect("jobs encode"));
        }
        asked_during.get_or_insert(operation);
        tokio::time::sleep(JOB_WAIT_LOOK).await;
    }
}

fn not_found(job: &str) -> Response<Body> {
    refuse(StatusCode::NOT_FOUND, "not-found", format!("no job `{job}`"), "`GET /v1/jobs` lists the jobs")
}

/// The value of `key` in a query string (no percent-decoding is needed for what is taken).
fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

fn query_flag(query: &str, key: &str) -> bool {
    query_value(query, key).is_some_and(|v| v.is_empty() || v == "true" || v == "1")
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes (an empty body is `{}`).
async fn read_json(request: Request<Incoming>) -> std::result::Result<Value, Response<Body>> {
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                format!("the request body is over {MAX_BODY} bytes"),
                "send a smaller body: the API's bodies are small JSON objects",
            ));
        }
        Err(error) => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("cannot read the request body: {error}"),
                "send the whole body",
            ));
        }
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "the body is not a JSON object",
            "send an object, such as `{\"kind\": \"backup\"}`",
        )),
        Err(error) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("the body is not JSON: {error}"),
            "send an object, such as `{\"kind\": \"backup\"}`",
        )),
    }
}

async fn status(shared: Arc<Shared>) -> Response<Body> {
    let (schedules, running, queue, config_error) = {
        let state = shared.lock();
        let schedules: Vec<Value> = state
            .slots
            .iter()
            .map(|slot| {
                json!({
                    "name": slot.schedule.work.key(),
                    "entries": slot.schedule.entries.iter().map(|e| e.text.clone()).collect::<Vec<_>>(),
                    "next-run": slot.next.map(|t| t.to_rfc3339()),
                })
            })
            .collect();
        let running = state.running.as_ref().map(|r| json!({"job": r.job, "request": r.request}));
        let queue: Vec<Value> = state.queue.iter().map(|r| json!(r)).collect();
        (schedules, running, queue, state.config_error.clone())
    };
    let store = shared.store.clone();
    let last = blocking(move || -> Result<Value> {
        let mut last = serde_json::Map::new();
        for kind in [JobKind::Backup, JobKind::Forget, JobKind::Replicate, JobKind::Prune, JobKind::Check] {
            let brief = |job: Option<sysstate_engine::jobs::JobRecord>| {
                job.map(|j| json!({"job": j.id, "ended": j.ended, "state": j.state, "trigger": j.trigger, "error": j.error}))
            };
            last.insert(
                kind.as_str().into(),
                json!({"success": brief(store.last_ended(kind, true)?), "failure": brief(store.last_ended(kind, false)?)}),
            );
        }
        Ok(Value::Object(last))
    })
    .await;
    match last {
        Ok(last) => reply(
            StatusCode::OK,
            &json!({
                "agent": {
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "started": sysstate_types::time::format_utc(shared.started_ns),
                    "config-error": config_error,
                },
                "running": running,
                "queue": queue,
                "schedules": schedules,
                "last": last,
            }),
        ),
        Err(error) => engine_error(&error),
    }
}

/// `GET /v1/jobs?running=&since=&kind=&state=&limit=`.
async fn list(shared: Arc<Shared>, query: &str) -> Response<Body> {
    let bad = |key: &str, detail: String, fix: &str| {
        refuse(StatusCode::BAD_REQUEST, "bad-request", format!("`{key}`: {detail}"), fix)
    };
    let mut filter = JobFilter { limit: 50, ..Default::default() };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "running" => filter.running = Some(value.is_empty() || value == "true" || value == "1"),
            "since" => match sysstate_engine::jobs::parse_since(value) {
                Ok(ns) => filter.since_ns = Some(ns),
                Err(detail) => return bad(key, detail, "give an RFC 3339 time or a duration (`2h`)"),
            },
            "kind" => match JobKind::from_name(value) {
                Some(kind) => filter.kind = Some(kind),
                None => {
                    return bad(
                        key,
                        format!("`{value}` is not a kind of job"),
                        "give backup, restore, check, forget, prune, …",
                    )
                }
            },
            "state" => match JobState::from_name(value) {
                Some(state) => filter.state = Some(state),
                None => {
                    return bad(
                        key,
                        format!("`{value}` is not a state"),
                        "give running, succeeded, succeeded-with-warnings, failed or cancelled",
                    )
                }
            },
            "limit" => match value.parse::<usize>() {
                Ok(limit @ 1..=MAX_LIST) => filter.limit = limit,
                _ => {
                    return bad(key, format!("`{value}` is not a number from 1 to {MAX_LIST}"), "give a smaller limit")
                }
            },
            other => return bad(other, "is not a filter".into(), "filter by running, since, kind, state and limit"),
        }
    }
    let store = shared.store.clone();
    match blocking(move || store.list(&filter)).await {
        Ok(jobs) => reply(StatusCode::OK, &serde_json::to_value(jobs).expect("jobs encode")),
        Err(error) => engine_error(&error),
    }
}

/// `POST /v1/jobs {"kind": "backup", "components": [...]}` (or `prune`, or `check` with
/// `read-data`: `"5%"`): queued; 202 with the request's id and place.
fn start(shared: Arc<Shared>, peer: &Peer, body: Value) -> Response<Body> {
    let bad = |message: String, fix: &str| refuse(StatusCode::BAD_REQUEST, "bad-request", message, fix);
    let fields = body.as_object().expect("read_json gives an object");
    if let Some(key) = fields.keys().find(|k| !["kind", "components", "read-data"].contains(&k.as_str())) {
        return bad(format!("`{key}` is not a field of a job request"), "send `kind`, and `components` or `read-data`");
    }
    let components = match fields.get("components") {
        None => Vec::new(),
        Some(Value::Array(names)) if names.iter().all(Value::is_string) && names.len() <= 256 => {
            names.iter().filter_map(|n| n.as_str().map(String::from)).collect()
        }
        Some(_) => return bad("`components` is not a list of names".into(), "send `[\"config\", \"boot\"]`"),
    };
    let work = match fields.get("kind").and_then(Value::as_str) {
        Some("backup") => Work::Backup { components },
        Some("prune") => Work::Prune,
        Some("check") => {
            match fields.get("read-data").map(|v| v.as_str().map(sysstate_engine::schedule::parse_percent)) {
                None => Work::Check { read_data: None },
                Some(Some(Ok(percent))) => Work::Check { read_data: Some(percent) },
                Some(Some(Err(detail))) => return bad(format!("`read-data`: {detail}"), "send `\"5%\"`"),
                Some(None) => return bad("`read-data` is not a string".into(), "send `\"5%\"`"),
            }
        }
        Some(other) => {
            return bad(format!("`{other}` is not a kind the agent starts"), "send `backup`, `prune` or `check`")
        }
        None => return bad("the request has no `kind`".into(), "send `{\"kind\": \"backup\"}`"),
    };
    if !matches!(work, Work::Backup { .. }) && fields.contains_key("components") {
        return bad("`components` is for a backup".into(), "leave it out");
    }
    let kind = work.kind();
    match shared.enqueue(work, JobTrigger::Api, peer.describe()) {
        Ok((request, position)) => reply(
            StatusCode::ACCEPTED,
            &json!({"request": request, "position": position, "location": format!("/v1/requests/{request}")}),
        ),
        Err(busy) => refuse(
            StatusCode::CONFLICT,
            "busy",
            format!("a {kind} is already running or queued: {}", busy.holder),
            "wait for it to end (`sysstate job`), or cancel it (`sysstate job cancel ID`)",
        ),
    }
}

/// `GET /v1/requests/ID`: queued (with its place) or started (with its job).
fn request_state(shared: &Shared, id: &str) -> Response<Body> {
    let Ok(id) = id.parse::<u64>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("`{id}` is not a request id"),
            "give the number `POST /v1/jobs` answered",
        );
    };
    let state = shared.lock();
    if let Some((_, job)) = state.started.iter().find(|(request, _)| *request == id) {
        return reply(StatusCode::OK, &json!({"request": id, "state": "started", "job": job}));
    }
    if state.running.as_ref().is_some_and(|r| r.request.id == id) {
        return reply(StatusCode::OK, &json!({"request": id, "state": "starting"}));
    }
    if let Some(place) = state.queue.iter().position(|r| r.id == id) {
        let place = place + usize::from(state.running.is_some());
        return reply(StatusCode::OK, &json!({"request": id, "state": "queued", "position": place}));
    }
    refuse(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no request {id}: unknown, or dropped when the agent stopped"),
        "`GET /v1/jobs` lists the jobs",
    )
}

/// `POST /v1/jobs/ID/cancel`.
fn cancel(shared: Arc<Shared>, peer: &Peer, id: &str) -> Response<Body> {
    match shared.cancel(id, &peer.describe()) {
        Ok(()) => reply(StatusCode::ACCEPTED, &json!({"job": id, "cancelling": true})),
        Err(CancelRefused::NotCancellable(kind)) => refuse(
            StatusCode::CONFLICT,
            "not-cancellable",
            format!("job {id} is a {kind}, which runs to its end"),
            "wait for it to end; only a backup stops midway",
        ),
        Err(CancelRefused::NotRunningHere) => match shared.store.job(id) {
            Ok(Some(job)) if job.state != JobState::Running => refuse(
                StatusCode::CONFLICT,
                "not-running",
                format!("job {id} has ended: {}", job.state),
                "nothing to cancel",
            ),
            Ok(Some(job)) => refuse(
                StatusCode::CONFLICT,
                "not-the-agents",
                format!("job {id} is run by process {}, not by the agent", job.pid),
                &format!("stop that command (Ctrl-C, or `kill {}`): it thaws its writers and stops", job.pid),
            ),
            Ok(None) => not_found(id),
            Err(error) => engine_error(&error),
        },
    }
}

/// `GET /v1/jobs/ID/log[?follow]`: the job's log; followed, it streams until the job ends.
async fn log(shared: Arc<Shared>, id: String, follow: bool) -> Response<Body> {
    let store = shared.store.clone();
    let looked_up = id.clone();
    let job = match blocking(move || store.job(&looked_up)).await {
        Ok(Some(job)) => job,
        Ok(None) => return not_found(&id),
        Err(error) => return engine_error(&error),
    };
    let Some(path) = job.log_path.clone() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("job {id} has no log"),
            "its events say what it did",
        );
    };
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::result::Result<Frame<Bytes>, std::io::Error>>(8);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let Ok(mut file) = tokio::fs::File::open(&path).await else { return };
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = match file.read(&mut buffer).await {
                Ok(read) => read,
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            };
            if read > 0 {
                if sender.send(Ok(Frame::data(Bytes::copy_from_slice(&buffer[..read])))).await.is_err() {
                    return; // the caller went away
                }
                continue;
            }
            if !follow {
                return;
            }
            let store = shared.store.clone();
            let id = id.clone();
            let ended =
                blocking(move || store.job(&id)).await.ok().flatten().is_none_or(|j| j.state != JobState::Running);
            if ended {
                // The rest: the log's last lines were written before the row ended.
                while let Ok(read @ 1..) = file.read(&mut buffer).await {
                    if sender.send(Ok(Frame::data(Bytes::copy_from_slice(&buffer[..read])))).await.is_err() {
                        return;
                    }
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|frame| (frame, receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; charset=utf-8")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a response builds")
}
