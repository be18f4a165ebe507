//! The system state engine: configuration, the components of system state, and the backup and
//! restore operations that compose the repository (and, with its issue, the shadow copy
//! service).
//!
//! It knows nothing about terminals or argument parsing: the binary calls it with plain options
//! and prints what it returns. Every error carries a stable [`ErrorCode`], a message that names
//! the object, and a specific cause and resolution where the generic ones are not enough.

pub mod components;
pub mod config;
pub mod credentials;
pub mod effective;
mod error;
pub mod generated;
pub mod inplace;
pub mod jobs;
pub mod layout;
pub mod locks;
pub mod ops;
pub mod paths;
pub mod recover;
pub mod schedule;
pub mod shadow;
pub mod source;
pub mod system;
pub mod vault;

pub use error::{EngineError, Result};
pub use sysstate_types::ErrorCode;

/// `eprintln!` that lets a stderr it cannot write go (a log file on a full disk, `2>/dev/full`,
/// a journal that went away): the job's own outcome and exit code stand, instead of a panic
/// about printing. The stderr twin of the binary's `outln!`.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
