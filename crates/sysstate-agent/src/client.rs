//! The CLI's side of the agent's API: one request on the unix socket, its answer as JSON (or a
//! followed log, written as it comes).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::path::{Path, PathBuf};
use sysstate_engine::{EngineError, ErrorCode, Result};

/// The agent's API, as the CLI reaches it.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// An answer: its status and its JSON.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body, as JSON (`Null` when it is not JSON).
    pub body: Value,
}

impl Answer {
    /// The answer's JSON when it is a success, else the error it carries, as an engine error
    /// (its code, message and resolution).
    pub fn into_result(self) -> Result<Value> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let error = &self.body["error"];
        let message = error["message"].as_str().unwrap_or("the agent refused the request").to_string();
        let code = match self.status {
            403 => ErrorCode::StateDirPermission,
            400 | 404 | 409 => ErrorCode::InvalidInput,
            _ => ErrorCode::Internal,
        };
        let mut engine = EngineError::new(code, format!("the agent answered {}: {message}", self.status));
        if let Some(resolution) = error["resolution"].as_str() {
            engine = engine.with_resolution(resolution.to_string());
        }
        Err(engine)
    }
}

impl Client {
    /// The agent of this machine (see [`crate::socket_path`]), if one is listening.
    pub fn find() -> Option<Client> {
        let socket = crate::socket_path();
        std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| Client { socket })
    }

    /// The agent listening on `socket`.
    pub fn at(socket: &Path) -> Client {
        Client { socket: socket.to_path_buf() }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Answer> {
        self.request("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        self.request("POST", path, Some(body))
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> EngineError {
        EngineError::new(
            ErrorCode::TargetUnavailable,
            format!("cannot reach the agent on `{}`: {error}", self.socket.display()),
        )
        .with_cause("the agent is not running, or this user may not open its socket")
        .with_resolution("start it (`systemctl start sysstate-agent`, or `sysstate agent`); `sysstate services` shows whether it runs")
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer> {
        let mut chunks = Vec::new();
        let status = self.exchange(method, path, body, |chunk| {
            chunks.extend_from_slice(chunk);
            true
        })?;
        Ok(Answer { status, body: serde_json::from_slice(&chunks).unwrap_or(Value::Null) })
    }

    /// Sends a request and hands each chunk of the answer's body to `chunk` as it arrives (until
    /// it returns false); returns the status.
    pub fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        mut chunk: impl FnMut(&[u8]) -> bool,
    ) -> Result<u16> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| self.unreachable(e))?;
        runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| self.unreachable(e))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| self.unreachable(e))?;
            tokio::spawn(connection);
            let body = body.map(|b| serde_json::to_vec(b).expect("JSON encodes")).unwrap_or_default();
            let request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "sysstate-agent")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("a request builds");
            let response = sender.send_request(request).await.map_err(|e| self.unreachable(e))?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| self.unreachable(e))?;
                if let Some(data) = frame.data_ref() {
                    if !chunk(data) {
                        break;
                    }
                }
            }
            Ok(status)
        })
    }
}
