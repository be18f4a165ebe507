//! Types shared by every sysstate crate: the stable error codes of DESIGN §4 with their numeric
//! event ids, and the levels of the event log.
//!
//! This crate does no I/O and knows nothing about repositories, writers or terminals. Its
//! invariant: an [`ErrorCode`]'s kebab-case name and event id never change once released,
//! because administrators' scripts and the event log match on them.

mod code;
mod failpoint;

pub use code::{ErrorCode, Level};
pub use failpoint::failpoint;
pub mod time;
pub mod units;
