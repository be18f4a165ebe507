//! The shadow copy service: the Linux counterpart of VSS.
//!
//! A **shadow set** is made under one freeze: the coordinator takes the machine's shadow-set
//! lock, asks every writer to make its application consistent (identify → prepare-backup →
//! prepare-snapshot → freeze), has the provider commit point-in-time copies of the requested
//! paths into shadow storage, thaws the writers, and hands the copies to the caller, which
//! reads only from them. backup-complete (or abort) and the release of the copies follow.
//!
//! This crate knows nothing of repositories, components or terminals. Its invariants: writers
//! are thawed on every path — errors, panics, signals (the caller forwards them through a
//! [`ThawTrigger`]) — by a guard and by a watchdog thread that thaws at the freeze deadline
//! whatever the main flow is doing; a failed commit leaves no partial copy behind; writer
//! states are persisted in the runtime directory so another process can show them.

mod coordinator;
mod error;
pub mod journal;
pub mod lock;
pub mod pressure;
pub mod provider;
pub mod state;
pub mod storage;
pub mod writer;

pub use coordinator::{
    BeforeFreeze, Coordinator, InFreeze, JournalRecord, LiveRead, PhaseHook, RecoveredHook, Recovery, ShadowSet,
    ShadowSetOptions, ShadowSetRecord, ThawTrigger, VolumeGroup, WarningHook, WriterRecord, BASE_COPY,
};
pub use error::{FreezePart, ShadowError, WriterFailure, WriterTimeout};
pub use lock::{LockHolder, ShadowSetLock};
pub use pressure::Pressure;
pub use provider::Provider;
pub use state::WriterState;
pub use writer::{ErrorClass, OutputHook, Phase, Writer, WriterError};
