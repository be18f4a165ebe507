//! The writers of one shadow set, their calls and their persisted states.

use crate::error::{ShadowError, WriterFailure};
use crate::state::{StateBook, WriterState};
use crate::writer::{Phase, Writer, WriterError};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The writers, shared by the coordinator's thread and its watchdog, which serialize their
/// calls through each writer's mutex.
pub(super) struct Members {
    writers: Vec<Mutex<Box<dyn Writer>>>,
    /// Name and kind of each writer.
    names: Vec<(String, String)>,
    /// Each writer's freeze-to-thaw window.
    windows: Vec<Duration>,
    states: StateBook,
    set_id: String,
}

impl Members {
    pub(super) fn new(writers: Vec<Box<dyn Writer>>, runtime_dir: &Path, set_id: &str) -> Members {
        let names: Vec<(String, String)> =
            writers.iter().map(|w| (w.name().to_string(), w.kind().to_string())).collect();
        Members {
            states: StateBook::new(runtime_dir, &names),
            windows: writers.iter().map(|w| w.freeze_timeout()).collect(),
            writers: writers.into_iter().map(Mutex::new).collect(),
            names,
            set_id: set_id.to_string(),
        }
    }

    pub(super) fn count(&self) -> usize {
        self.writers.len()
    }

    pub(super) fn name(&self, index: usize) -> &str {
        &self.names[index].0
    }

    pub(super) fn kind(&self, index: usize) -> &str {
        &self.names[index].1
    }

    pub(super) fn window(&self, index: usize) -> Duration {
        self.windows[index]
    }

    /// Takes writer `index` through `phase`, which must end by `deadline`.
    pub(super) fn call(&self, index: usize, phase: Phase, deadline: Instant) -> Result<(), WriterError> {
        self.writer(index).handle(phase, deadline)
    }

    /// What the writers ask to add to, refresh in or remove from the copy.
    pub(super) fn copy_additions(&self) -> Vec<crate::writer::CopyAddition> {
        (0..self.count()).flat_map(|index| self.writer(index).copy_additions()).collect()
    }

    fn writer(&self, index: usize) -> std::sync::MutexGuard<'_, Box<dyn Writer>> {
        // A writer that panicked in a call is still called to thaw and abort.
        self.writers[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn set_state(&self, index: usize, state: WriterState, error: Option<String>) {
        self.states.set(self.name(index), state, error, &self.set_id);
    }

    /// Sets the state unless `keep` says the current one must stay (a thaw racing a failure
    /// must not hide the failure).
    pub(super) fn set_state_unless(
        &self,
        index: usize,
        keep: impl Fn(WriterState) -> bool,
        state: WriterState,
        error: Option<String>,
    ) {
        self.states.set_when(self.name(index), |current| !keep(current), state, error, &self.set_id);
    }

    pub(super) fn state(&self, index: usize) -> Option<WriterState> {
        self.states.get(self.name(index))
    }

    /// Recovers writer `index` from a dead set (see [`Writer::recover`]).
    pub(super) fn recover(&self, index: usize, frozen: bool, deadline: Instant) -> Result<(), WriterError> {
        self.writer(index).recover(frozen, deadline)
    }

    /// Records writer `index` as failed at `phase` and makes the error the set fails with.
    pub(super) fn failed(&self, index: usize, phase: Phase, error: WriterError) -> ShadowError {
        self.set_state(index, WriterState::Failed(phase), Some(error.message.clone()));
        ShadowError::Writer(WriterFailure {
            writer: self.name(index).to_string(),
            phase,
            class: error.class,
            message: error.message,
        })
    }
}
