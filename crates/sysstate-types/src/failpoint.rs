//! Fault injection for the tests: `failpoint("KILL_AFTER_WRITES")` reads
//! `SYSSTATE_FAILPOINT_KILL_AFTER_WRITES`. Compiled in only with the `failpoints` feature, which
//! only test builds turn on: a production binary has no environment variable that makes it sleep
//! or kill itself.

/// The value of `SYSSTATE_FAILPOINT_<name>`, parsed; `None` when unset, unparsable, or built
/// without the `failpoints` feature.
#[cfg(feature = "failpoints")]
pub fn failpoint<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(format!("SYSSTATE_FAILPOINT_{name}")).ok()?.parse().ok()
}

/// Without the `failpoints` feature, no failpoint is ever set.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint<T: std::str::FromStr>(_name: &str) -> Option<T> {
    None
}
