//! The agent (DESIGN §1: the seed's Azure Backup agent): a daemon that protects the machine
//! without anyone at a prompt. It runs the system state backup on its schedule, applies the
//! retention policy after each scheduled backup, prunes and checks on their own schedules,
//! catches up a time it missed while it was not running, and answers a local API on a unix
//! socket (`docs/api.md`).
//!
//! Every run is an ordinary job of the engine's job runner (its record says what started it), so
//! `sysstate job`, `sysstate events` and the doctor see the agent's work as they see a
//! command's. One job runs at a time: the agent's queue is the machine's queue.
//!
//! - [`daemon`]: the agent's life: its lock, signals, the schedule and the worker;
//! - [`work`]: what one queued request runs, through the engine's operations;
//! - [`notify`]: notifications of failures, warnings and too long without a success;
//! - [`metrics`]: metrics for Prometheus, served and as a textfile;
//! - [`api`]: the HTTP API on the unix socket, with access by the caller's credentials;
//! - [`client`]: the CLI's side of that API.

pub mod api;
pub mod client;
pub mod daemon;
pub mod metrics;
pub mod notify;
mod peer;
pub mod systemd;
pub mod work;

pub use daemon::{run, AgentOptions};

pub use sysstate_engine::paths::agent_socket as socket_path;
