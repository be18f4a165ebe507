//! The watchdog: a thread that thaws every writer at the first freeze deadline, or at once when
//! the [`ThawTrigger`] fires, whatever the coordinator's thread is doing.

use super::members::Members;
use crate::error::FreezePart;
use crate::state::WriterState;
use crate::writer::{Phase, DEFAULT_PHASE_TIMEOUT};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Fires a thaw from anywhere (a signal handler thread): frozen writers are thawed at once and
/// the shadow set stops with [`ShadowError::Interrupted`](crate::ShadowError::Interrupted).
#[derive(Debug, Clone, Default)]
pub struct ThawTrigger {
    inner: Arc<TriggerInner>,
}

#[derive(Debug, Default)]
struct TriggerInner {
    fired: Arc<AtomicBool>,
    signal: AtomicI32,
    watchers: Mutex<Vec<Arc<Watch>>>,
}

impl ThawTrigger {
    /// Fires, with the signal number that caused it.
    pub fn fire(&self, signal: i32) {
        self.inner.signal.store(signal, Ordering::SeqCst);
        self.inner.fired.store(true, Ordering::SeqCst);
        for watch in self.inner.watchers.lock().expect("watchers lock").iter() {
            watch.wake.notify_all();
        }
    }

    /// A flag that is set when the trigger fires (for work outside the shadow set, such as the
    /// archiver, to stop too).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.inner.fired.clone()
    }

    /// Waits until no writer of any running shadow set is frozen or being thawed, up to `limit`.
    pub fn wait_thawed(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            let busy = self.inner.watchers.lock().expect("watchers lock").iter().any(|watch| {
                let state = watch.lock();
                state.thawing > 0 || state.frozen.iter().any(Option::is_some)
            });
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The signal, once fired.
    pub fn fired(&self) -> Option<i32> {
        self.inner.fired.load(Ordering::SeqCst).then(|| self.inner.signal.load(Ordering::SeqCst))
    }

    /// Runs `work` with a stop flag that is raised when the trigger fires, and lowered for good
    /// when `work` returns (for providers, which poll a flag).
    pub(super) fn with_stop_flag<T>(&self, work: impl FnOnce(&AtomicBool) -> T) -> T {
        let stop = AtomicBool::new(false);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    if self.fired().is_some() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let result = work(&stop);
            done.store(true, Ordering::SeqCst);
            result
        })
    }
}

/// The freeze timings of one shadow set, shared by the coordinator's thread and its watchdog.
#[derive(Debug)]
pub(super) struct Watch {
    state: Mutex<WatchState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct WatchState {
    /// Per writer: its thaw deadline while frozen.
    frozen: Vec<Option<Instant>>,
    /// When each writer's freeze started.
    freeze_started: Vec<Option<Instant>>,
    /// When each writer was thawed.
    thawed_at: Vec<Option<Instant>>,
    /// The first writer whose window the watchdog saw pass.
    expired: Option<usize>,
    /// Thaws in progress.
    thawing: usize,
    done: bool,
}

impl Watch {
    pub(super) fn new(writers: usize) -> Watch {
        Watch {
            state: Mutex::new(WatchState {
                frozen: vec![None; writers],
                freeze_started: vec![None; writers],
                thawed_at: vec![None; writers],
                ..WatchState::default()
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().expect("watch lock")
    }

    /// Writer `index` is about to be frozen for `window`: the watchdog thaws it at the deadline
    /// returned.
    pub(super) fn start_freeze(&self, index: usize, window: Duration) -> Instant {
        let start = Instant::now();
        let deadline = start + window;
        {
            let mut state = self.lock();
            state.freeze_started[index] = Some(start);
            state.frozen[index] = Some(deadline);
        }
        self.wake.notify_all();
        deadline
    }

    /// How long writer `index` was frozen, ms (until now when it still is).
    pub(super) fn frozen_ms(&self, index: usize) -> u64 {
        let state = self.lock();
        match (state.freeze_started[index], state.thawed_at[index]) {
            (Some(start), Some(end)) => end.duration_since(start).as_millis() as u64,
            (Some(start), None) => start.elapsed().as_millis() as u64,
            _ => 0,
        }
    }

    /// The first writer that stayed frozen past its window: the one the watchdog thawed, or one
    /// whose thaw came late.
    pub(super) fn overrun(&self, members: &Members) -> Option<usize> {
        let state = self.lock();
        state.expired.or_else(|| {
            (0..members.count()).find(|i| match (state.freeze_started[*i], state.thawed_at[*i]) {
                (Some(start), Some(end)) => end.duration_since(start) > members.window(*i),
                _ => false,
            })
        })
    }

    /// From `since` (the first freeze) to the last thaw, ms.
    pub(super) fn window_ms(&self, since: Instant) -> u64 {
        let state = self.lock();
        state.thawed_at.iter().flatten().max().map_or(0, |end| end.duration_since(since).as_millis() as u64)
    }

    /// What took the freeze's time: each frozen writer's freeze call (until the next writer's
    /// freeze started, or at most `frozen_ms`), then the provider's commit.
    pub(super) fn breakdown(&self, members: &Members, frozen_ms: u64, commit_ms: u64) -> Vec<FreezePart> {
        let state = self.lock();
        let mut parts = Vec::new();
        for (index, start) in state.freeze_started.iter().enumerate() {
            let Some(start) = start else { continue };
            let next = state.freeze_started.get(index + 1).copied().flatten();
            let ms = next
                .map(|next| next.duration_since(*start).as_millis() as u64)
                .unwrap_or_else(|| (start.elapsed().as_millis() as u64).min(frozen_ms));
            parts.push(FreezePart::WriterFreeze { writer: members.name(index).to_string(), ms });
        }
        if commit_ms > 0 {
            parts.push(FreezePart::ProviderCommit { ms: commit_ms });
        }
        parts
    }
}

/// Thaws every writer still frozen (whoever calls it first does the work), last frozen first.
pub(super) fn thaw_all(members: &Members, watch: &Watch) {
    let frozen: Vec<usize> = {
        let mut state = watch.lock();
        let now = Instant::now();
        let frozen: Vec<usize> = (0..state.frozen.len()).rev().filter(|i| state.frozen[*i].is_some()).collect();
        for index in &frozen {
            state.frozen[*index] = None;
            state.thawed_at[*index] = Some(now);
        }
        state.thawing += frozen.len();
        frozen
    };
    for index in frozen {
        match members.call(index, Phase::Thaw, Instant::now() + DEFAULT_PHASE_TIMEOUT) {
            Ok(()) => members.set_state_unless(
                index,
                |current| current != WriterState::WaitingForThaw,
                WriterState::WaitingForPostSnapshot,
                None,
            ),
            Err(error) => members.set_state_unless(
                index,
                WriterState::is_failed,
                WriterState::Failed(Phase::Thaw),
                Some(error.message),
            ),
        }
        watch.lock().thawing -= 1;
    }
}

/// The running watchdog thread of one shadow set; [`stop`](Watchdog::stop) ends it.
pub(super) struct Watchdog {
    watch: Arc<Watch>,
    trigger: ThawTrigger,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `watch` (and `trigger`) for the writers of `members`.
    pub(super) fn start(members: Arc<Members>, watch: Arc<Watch>, trigger: &ThawTrigger) -> std::io::Result<Watchdog> {
        trigger.inner.watchers.lock().expect("watchers lock").push(watch.clone());
        let thread = {
            let (watch, trigger) = (watch.clone(), trigger.clone());
            std::thread::Builder::new().name("sysstate-watchdog".into()).spawn(move || run(&members, &watch, &trigger))
        };
        let mut watchdog = Watchdog { watch, trigger: trigger.clone(), thread: None };
        watchdog.thread = Some(thread?);
        Ok(watchdog)
    }

    /// Ends the thread (after the shadow set is made or has failed).
    pub(super) fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.watch.lock().done = true;
        self.watch.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.trigger.inner.watchers.lock().expect("watchers lock").retain(|w| !Arc::ptr_eq(w, &self.watch));
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.end();
    }
}

/// The watchdog's loop: thaws at the earliest freeze deadline, or at once when the trigger fires.
fn run(members: &Members, watch: &Watch, trigger: &ThawTrigger) {
    let mut state = watch.lock();
    loop {
        if state.done {
            return;
        }
        if trigger.fired().is_some() {
            drop(state);
            thaw_all(members, watch);
            return;
        }
        let next = state.frozen.iter().enumerate().filter_map(|(i, d)| d.map(|d| (d, i))).min();
        match next {
            Some((deadline, index)) if deadline <= Instant::now() => {
                state.expired.get_or_insert(index);
                drop(state);
                tracing::warn!(writer = %members.name(index), "freeze window expired: the watchdog thaws every writer");
                thaw_all(members, watch);
                state = watch.lock();
            }
            Some((deadline, _)) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                state = watch.wake.wait_timeout(state, wait).expect("watch lock").0;
            }
            None => state = watch.wake.wait(state).expect("watch lock"),
        }
    }
}
