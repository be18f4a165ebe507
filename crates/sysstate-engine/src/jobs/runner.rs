//! The job runner (think Proxmox's `WorkerTask::new_thread`): [`run`] starts a job's row, hands
//! the work a [`Job`] (its id, current operation, progress, the event log), and ends the row
//! with the right state, version, error and event on every path — a panic included.

use super::store::{JobStore, ProgressWriter};
use super::{JobKind, JobState, JobTrigger, Source};
use crate::error::{EngineError, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use sysstate_repo::{DamageHook, Progress, Warning};
use sysstate_types::{ErrorCode, Level};

/// What a job's work returns tells the runner how the job ended.
pub trait JobOutput {
    /// The version the job made, recorded in its row.
    fn version(&self) -> Option<String> {
        None
    }

    /// Entries that could not be done, each a warning: more than none ends the job
    /// `succeeded-with-warnings`.
    fn warnings(&self) -> usize {
        0
    }

    /// A failure the work found while running to its end (damage found by a check): the job
    /// ends `failed` with it, and the caller still gets the whole report to show.
    fn failure(&self) -> Option<EngineError> {
        None
    }
}

impl JobOutput for () {}

/// A running job, as its work sees it. As a [`Progress`] it feeds the job's row (at most twice a
/// second) and the caller's own progress (a terminal's bar).
pub struct Job<'a> {
    store: &'a Arc<JobStore>,
    id: String,
    kind: JobKind,
    progress: ProgressWriter<'a>,
    observer: &'a dyn Progress,
    /// Warnings recorded as events through [`Job::warn`], beside those of the output.
    warned: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Job<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.id).field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Job<'_> {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records the components the job covers, once they are resolved.
    pub fn components(&self, names: &[String]) {
        if let Err(error) = self.store.set_components(&self.id, names) {
            tracing::warn!("job {}: cannot record its components: {}", self.id, error.message);
        }
    }

    /// Says what the job is doing now (`sysstate job` shows it; the job's log keeps it).
    pub fn operation(&self, operation: &str) {
        if let Err(error) = self.store.operation(&self.id, operation) {
            tracing::warn!("job {}: cannot record the operation `{operation}`: {}", self.id, error.message);
        }
    }

    /// The hook the shadow copy coordinator tells its phases: each becomes the job's current
    /// operation.
    pub fn phase_hook(&self) -> sysstate_shadow::PhaseHook {
        let (store, id) = (self.store.clone(), self.id.clone());
        sysstate_shadow::PhaseHook(Arc::new(move |operation: &str| {
            let _ = store.operation(&id, operation);
        }))
    }

    /// The hook writers' programs' output goes to: each line into the job's log, with the
    /// writer's name.
    pub fn output_hook(&self) -> sysstate_shadow::OutputHook {
        let (store, id) = (self.store.clone(), self.id.clone());
        sysstate_shadow::OutputHook(Arc::new(move |writer: &str, line: &str| {
            store.log(&id, &format!("writer `{writer}`: {line}"));
        }))
    }

    /// The hook a shadow set tells when it recovered what a dead set left: that set's job, if
    /// it had one here, is told in its record (see [`JobStore::recovered`]).
    pub fn recovered_hook(&self) -> sysstate_shadow::RecoveredHook {
        let (store, id) = (self.store.clone(), self.id.clone());
        sysstate_shadow::RecoveredHook(Arc::new(move |holder, recovery| {
            if let Some(dead) = &holder.job {
                if let Err(error) = store.recovered(dead, &format!("job {id}"), &recovery.to_string()) {
                    tracing::warn!("cannot note the recovery in job {dead}'s record: {error}");
                }
            }
        }))
    }

    /// Records a warning of the job: an event, a line of its log, and one more warning for its
    /// end state (`succeeded-with-warnings`).
    pub fn warn(&self, source: Source, code: ErrorCode, message: &str) {
        record_warning(self.store, &self.id, &self.warned, source, code, message);
    }

    /// The hook the repository tells each damaged file it passes over: each a warning of the job
    /// (see [`Job::warn`]) and then `also`'s.
    pub fn damage_hook(&self, also: Option<DamageHook>) -> DamageHook {
        let (store, id, warned) = (self.store.clone(), self.id.clone(), self.warned.clone());
        DamageHook(Arc::new(move |damaged| {
            let message = damaged.to_string();
            record_warning(&store, &id, &warned, Source::Repository, ErrorCode::RepositoryCorrupt, &message);
            if let Some(also) = &also {
                (also.0)(damaged);
            }
        }))
    }

    /// The hook the shadow copy coordinator tells its warnings: each becomes an event of this job.
    pub fn warning_hook(&self) -> sysstate_shadow::WarningHook {
        let (store, id) = (self.store.clone(), self.id.clone());
        sysstate_shadow::WarningHook(Arc::new(move |code: ErrorCode, message: &str| {
            let _ = store.event(Some(&id), Level::Warning, Source::Shadow, code, message, None);
        }))
    }
}

fn record_warning(store: &JobStore, id: &str, warned: &AtomicUsize, source: Source, code: ErrorCode, message: &str) {
    warned.fetch_add(1, Ordering::Relaxed);
    store.log(id, &format!("warning: {message}"));
    if let Err(error) = store.event(Some(id), Level::Warning, source, code, message, None) {
        tracing::warn!("job {id}: cannot record the warning `{message}`: {}", error.message);
    }
}

impl Progress for Job<'_> {
    fn file_done(&self, bytes: u64) {
        self.progress.add(bytes);
        self.observer.file_done(bytes);
    }

    /// Each entry skipped is a warning event of the job (counted by the output's warnings).
    fn warning(&self, warning: &Warning) {
        let message = format!("`{}` {}", warning.path, warning.message);
        self.store.log(&self.id, &format!("warning: {message}"));
        let source = match self.kind {
            JobKind::Backup | JobKind::Validate => Source::Engine,
            _ => Source::Repository,
        };
        if let Err(error) =
            self.store.event(Some(&self.id), Level::Warning, source, ErrorCode::EntrySkipped, &message, None)
        {
            tracing::warn!("job {}: cannot record the warning `{message}`: {}", self.id, error.message);
        }
        self.observer.warning(warning);
    }

    fn total(&self, bytes: u64) {
        self.progress.total(bytes);
        self.observer.total(bytes);
    }

    fn total_files(&self, files: u64) {
        self.progress.total_files(files);
        self.observer.total_files(files);
    }

    fn bytes(&self, done: u64, total: u64) {
        self.progress.set_bytes(done, total);
        self.observer.bytes(done, total);
    }
}

/// Runs `work` as a job of `kind`: a `running` row from start to end, then its state (from the
/// output's failure and warnings, or the error: `cancelled` for [`ErrorCode::Cancelled`]), the
/// version it made, and its error, also written as an event. A panic in `work` ends the job
/// `failed` with an `internal` error and comes back as that error. `observer` is told the
/// progress too.
pub fn run<T: JobOutput>(
    store: &Arc<JobStore>,
    kind: JobKind,
    target: Option<&str>,
    components: &[String],
    observer: &dyn Progress,
    work: impl FnOnce(&Job<'_>) -> Result<T>,
) -> Result<T> {
    run_triggered(store, kind, JobTrigger::Command, target, components, observer, work)
}

/// Runs `work` as [`run`] does, as a job that `trigger` started (its record says so).
pub fn run_triggered<T: JobOutput>(
    store: &Arc<JobStore>,
    kind: JobKind,
    trigger: JobTrigger,
    target: Option<&str>,
    components: &[String],
    observer: &dyn Progress,
    work: impl FnOnce(&Job<'_>) -> Result<T>,
) -> Result<T> {
    let id = store.start(kind, trigger, target, components)?;
    let requests_before = sysstate_repo::backend::RequestCounts::now();
    let job = Job {
        store,
        id: id.clone(),
        kind,
        progress: ProgressWriter::new(store, &id),
        observer,
        warned: Arc::new(AtomicUsize::new(0)),
    };
    let result = catch_unwind(AssertUnwindSafe(|| work(&job))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(EngineError::new(ErrorCode::Internal, format!("the {kind} job {id} stopped on a bug: {what}"))
            .with_cause("a defect in sysstate (a panic); nothing after that point was done")
            .with_resolution("run the job again; if it happens again, report it with the job's log"))
    });
    job.progress.flush();
    // What the storage cost, and whether passing faults were hidden by retries.
    let requests = sysstate_repo::backend::RequestCounts::now().since(requests_before);
    if requests.requests > 0 {
        store.log(
            &id,
            &format!(
                "storage: {} requests, {} of them tried again after a passing fault",
                requests.requests, requests.retried
            ),
        );
    }
    match &result {
        Ok(output) => {
            let failure = output.failure();
            let state = match (&failure, output.warnings() + job.warned.load(Ordering::Relaxed)) {
                (Some(_), _) => JobState::Failed,
                (None, 0) => JobState::Succeeded,
                (None, _) => JobState::SucceededWithWarnings,
            };
            store.finish(&id, state, output.version().as_deref(), failure.as_ref())?;
        }
        Err(error) => {
            let state = if error.code == ErrorCode::Cancelled { JobState::Cancelled } else { JobState::Failed };
            store.finish(&id, state, None, Some(error))?;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{EventFilter, JobRecord};
    use sysstate_repo::NoProgress;

    struct Made {
        warnings: usize,
        damaged: bool,
    }

    impl JobOutput for Made {
        fn version(&self) -> Option<String> {
            Some("abc".into())
        }
        fn warnings(&self) -> usize {
            self.warnings
        }
        fn failure(&self) -> Option<EngineError> {
            self.damaged.then(|| EngineError::new(ErrorCode::RepositoryCorrupt, "pack 1234 is damaged"))
        }
    }

    fn store() -> (tempfile::TempDir, Arc<JobStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(JobStore::open(dir.path()).unwrap());
        (dir, store)
    }

    fn last(store: &JobStore) -> JobRecord {
        store.previous(1).unwrap().remove(0)
    }

    #[test]
    fn a_job_ends_with_the_state_its_output_says() {
        let (_dir, store) = store();
        for (warnings, damaged, state) in
            [(0, false, JobState::Succeeded), (2, false, JobState::SucceededWithWarnings), (0, true, JobState::Failed)]
        {
            let made = run(&store, JobKind::Check, Some("/t"), &[], &NoProgress, |job| {
                assert_eq!(store.running().unwrap()[0].id, job.id(), "the row runs while the work does");
                Ok(Made { warnings, damaged })
            });
            assert!(made.is_ok(), "the caller gets the report, damage or not");
            let record = last(&store);
            assert_eq!(record.state, state);
            assert_eq!(record.version.as_deref(), Some("abc"));
            assert_eq!(record.error.map(|e| e.code), damaged.then(|| "repository-corrupt".to_string()));
        }
    }

    #[test]
    fn an_error_fails_the_job_with_an_event_and_a_cancel_cancels_it() {
        let (_dir, store) = store();
        let error = run(&store, JobKind::Backup, None, &[], &NoProgress, |_| -> Result<()> {
            Err(EngineError::new(ErrorCode::WriterTimeout, "writer `db` was frozen too long"))
        })
        .unwrap_err();
        assert_eq!(error.code, ErrorCode::WriterTimeout);
        let record = last(&store);
        assert_eq!(record.state, JobState::Failed);
        let events = store.events(&EventFilter { job: Some(record.id.clone()), ..Default::default() }).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].code.as_str(), events[0].source.as_str()), ("writer-timeout", "writer"));

        let _ = run(&store, JobKind::Backup, None, &[], &NoProgress, |_| -> Result<()> {
            Err(EngineError::new(ErrorCode::Cancelled, "stopped by signal 15"))
        });
        assert_eq!(last(&store).state, JobState::Cancelled);
    }

    #[test]
    fn a_panic_ends_the_job_failed_and_comes_back_as_an_internal_error() {
        let (_dir, store) = store();
        let error = run(&store, JobKind::Prune, None, &[], &NoProgress, |job| -> Result<()> {
            job.operation("deleting packs");
            panic!("index out of range");
        })
        .unwrap_err();
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(error.message.contains("index out of range"), "{}", error.message);
        let record = last(&store);
        assert_eq!(record.state, JobState::Failed);
        assert_eq!(record.error.unwrap().code, "internal");
        assert!(store.running().unwrap().is_empty());
    }

    #[test]
    fn progress_reaches_the_row_and_the_observer() {
        #[derive(Default)]
        struct Count(std::sync::atomic::AtomicU64);
        impl Progress for Count {
            fn file_done(&self, bytes: u64) {
                self.0.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let (_dir, store) = store();
        let observer = Count::default();
        run(&store, JobKind::Restore, None, &[], &observer, |job| {
            job.file_done(10);
            job.file_done(5);
            Ok(())
        })
        .unwrap();
        assert_eq!(observer.0.load(std::sync::atomic::Ordering::Relaxed), 15);
        let record = last(&store);
        assert_eq!((record.progress.files_done, record.progress.bytes_done), (2, 15));
    }
}
