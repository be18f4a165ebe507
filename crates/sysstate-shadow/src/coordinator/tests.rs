//! The coordinator's phases with a fake writer and a fake provider: no root, no filesystem
//! tricks, only timing and order.

use super::*;
use crate::error::FreezePart;
use crate::provider::{Commit, CommitError, CommitRequest};
use crate::state::WriterState;
use crate::storage::MaxSize;
use crate::writer::{ErrorClass, Phase, WriterError};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

/// Every call a writer got, in order: writer, phase, when.
type Calls = Arc<Mutex<Vec<(String, Phase, Instant)>>>;

struct FakeWriter {
    name: String,
    window: Duration,
    calls: Calls,
    fail_at: Option<Phase>,
}

impl Writer for FakeWriter {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "fake"
    }

    fn freeze_timeout(&self) -> Duration {
        self.window
    }

    fn handle(&mut self, phase: Phase, _deadline: Instant) -> Result<(), WriterError> {
        self.calls.lock().unwrap().push((self.name.clone(), phase, Instant::now()));
        match self.fail_at {
            Some(fail) if fail == phase => Err(WriterError::new(ErrorClass::Retryable, "told to fail")),
            _ => Ok(()),
        }
    }
}

/// Takes `delay` to commit (stopping early when interrupted), then fails with `failure` or
/// makes an empty copy.
struct FakeProvider {
    delay: Duration,
    failure: Option<fn() -> CommitError>,
}

impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn commit(&self, request: &CommitRequest<'_>) -> Result<Commit, CommitError> {
        let until = Instant::now() + self.delay;
        while Instant::now() < until {
            if request.interrupted.load(Ordering::SeqCst) {
                return Err(CommitError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::fs::create_dir_all(request.dest).expect("the fake copy's folder");
        match self.failure {
            Some(failure) => Err(failure()),
            None => Ok(Commit { root: request.dest.to_path_buf(), files: 1, ..Commit::default() }),
        }
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    calls: Calls,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/etc")).unwrap();
        std::fs::write(dir.path().join("root/etc/hostname"), "test\n").unwrap();
        Fixture { dir, calls: Calls::default() }
    }

    fn writer(&self, name: &str, window_ms: u64, fail_at: Option<Phase>) -> Box<dyn Writer> {
        Box::new(FakeWriter {
            name: name.into(),
            window: Duration::from_millis(window_ms),
            calls: self.calls.clone(),
            fail_at,
        })
    }

    fn options(&self) -> ShadowSetOptions {
        let path = self.dir.path();
        ShadowSetOptions {
            runtime_dir: path.join("run"),
            root: path.join("root"),
            paths: vec![PathBuf::from("/etc")],
            provider: ProviderChoice::Copy,
            storage: StorageArea { for_volume: "/".into(), on: path.join("storage"), max_size: MaxSize::Unbounded },
            commit_timeout: Duration::from_secs(30),
            holder: LockHolder {
                pid: std::process::id(),
                command: "coordinator test".into(),
                job: None,
                since_ns: sysstate_types::time::now_ns(),
            },
            wait: None,
            persistent: true,
            phase: None,
            extra: Vec::new(),
            warning: None,
            output: None,
            recovered: None,
            journal: None,
        }
    }

    fn create(
        &self,
        writers: Vec<Box<dyn Writer>>,
        provider: FakeProvider,
        trigger: &ThawTrigger,
    ) -> Result<ShadowSet, ShadowError> {
        Coordinator::new(writers).with_provider(Arc::new(provider)).create(&self.options(), trigger)
    }

    /// The phases `writer` was called with, in order, and when.
    fn calls_of(&self, writer: &str) -> Vec<(Phase, Instant)> {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|(name, ..)| name == writer).map(|(_, phase, at)| (*phase, *at)).collect()
    }

    fn phases_of(&self, writer: &str) -> Vec<Phase> {
        self.calls_of(writer).into_iter().map(|(phase, _)| phase).collect()
    }

    fn copies_left(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("storage")).map_or(0, |d| d.count())
    }

    fn state_of(&self, writer: &str) -> WriterState {
        let states = crate::state::read_states(&self.dir.path().join("run"));
        states.into_iter().find(|s| s.name == writer).expect("the writer has a state").state
    }
}

/// How long `writer` stayed frozen: from its freeze call to its thaw call.
fn frozen_for(fixture: &Fixture, writer: &str) -> Duration {
    let calls = fixture.calls_of(writer);
    let at = |wanted: Phase| calls.iter().find(|(phase, _)| *phase == wanted).map(|(_, at)| *at).unwrap();
    at(Phase::Thaw).duration_since(at(Phase::Freeze))
}

#[test]
fn a_set_takes_every_writer_through_its_phases_in_order() {
    let fixture = Fixture::new();
    let writers = vec![fixture.writer("a", 5_000, None), fixture.writer("b", 5_000, None)];
    let set = fixture.create(writers, FakeProvider { delay: Duration::ZERO, failure: None }, &ThawTrigger::default());
    let set = set.expect("the set is made");
    let record = set.complete(true);
    // Every phase in order, abort aside.
    let expected = &Phase::ALL[..7];
    assert_eq!(expected.last(), Some(&Phase::BackupComplete));
    assert_eq!(fixture.phases_of("a"), expected);
    assert_eq!(fixture.phases_of("b"), expected);
    // The last frozen is thawed first.
    assert!(fixture.calls_of("b")[4].1 <= fixture.calls_of("a")[4].1);
    assert_eq!(record.writers.len(), 2);
    assert_eq!(fixture.state_of("a"), WriterState::Stable);
    assert_eq!(fixture.copies_left(), 1, "a persistent copy stays");
}

#[test]
fn the_watchdog_thaws_at_the_deadline_and_the_set_fails_with_the_breakdown() {
    let fixture = Fixture::new();
    let writers = vec![fixture.writer("db", 100, None)];
    let provider = FakeProvider { delay: Duration::from_millis(1_500), failure: None };
    let error = fixture.create(writers, provider, &ThawTrigger::default()).unwrap_err();

    // Thawed at its 100 ms deadline, while the commit went on for 1.5 s. The deadline counts
    // from just before the freeze call, the fixture's clock from inside it: a hair less is the
    // deadline too.
    let frozen = frozen_for(&fixture, "db");
    assert!(frozen >= Duration::from_millis(95) && frozen < Duration::from_millis(1_000), "frozen {frozen:?}");
    let ShadowError::WriterTimeout(timeout) = error else { panic!("not a writer timeout: {error}") };
    assert_eq!((timeout.writer.as_str(), timeout.window_ms), ("db", 100));
    assert!(timeout.frozen_ms >= 100 && timeout.frozen_ms < 1_000, "{timeout:?}");
    // What took the time: the writer's freeze, then the provider's commit, which was most of it.
    let [FreezePart::WriterFreeze { writer, .. }, FreezePart::ProviderCommit { ms }] = &timeout.breakdown[..] else {
        panic!("breakdown {:?}", timeout.breakdown)
    };
    assert_eq!(writer, "db");
    assert!(*ms >= 1_500, "commit {ms} ms");
    assert!(timeout.pressure.load.is_some());
    let message = ShadowError::WriterTimeout(timeout).to_string();
    assert!(message.contains("writer `db` freeze") && message.contains("provider commit"), "{message}");
    // Failed at the freeze, aborted, nothing left behind.
    assert_eq!(fixture.phases_of("db").last(), Some(&Phase::Abort));
    assert_eq!(fixture.state_of("db"), WriterState::Failed(Phase::Freeze));
    assert_eq!(fixture.copies_left(), 0);
}

#[test]
fn the_trigger_thaws_at_once_and_stops_the_commit() {
    let fixture = Fixture::new();
    let writers = vec![fixture.writer("db", 60_000, None)];
    let trigger = ThawTrigger::default();
    let firing = {
        let trigger = trigger.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            trigger.fire(15);
        })
    };
    let started = Instant::now();
    let provider = FakeProvider { delay: Duration::from_secs(30), failure: None };
    let error = fixture.create(writers, provider, &trigger).unwrap_err();
    firing.join().unwrap();

    assert!(matches!(error, ShadowError::Interrupted(15)), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let frozen = frozen_for(&fixture, "db");
    assert!(frozen < Duration::from_secs(2), "frozen {frozen:?}: the window was a minute, the trigger fired at 200 ms");
    assert_eq!(fixture.phases_of("db").last(), Some(&Phase::Abort));
    assert_eq!(fixture.copies_left(), 0);
}

#[test]
fn the_guard_thaws_aborts_and_deletes_after_a_commit_error() {
    let fixture = Fixture::new();
    let writers = vec![fixture.writer("a", 5_000, None), fixture.writer("b", 5_000, None)];
    let failure = || CommitError::Unsupported("/etc".into(), "no clones here".into());
    let provider = FakeProvider { delay: Duration::ZERO, failure: Some(failure) };
    let error = fixture.create(writers, provider, &ThawTrigger::default()).unwrap_err();

    let ShadowError::Provider { provider, path, message } = &error else { panic!("{error}") };
    assert_eq!((provider.as_str(), path.as_str(), message.as_str()), ("fake", "/etc", "no clones here"));
    for writer in ["a", "b"] {
        let phases = fixture.phases_of(writer);
        assert_eq!(&phases[3..], [Phase::Freeze, Phase::Thaw, Phase::Abort], "{writer}");
        assert_eq!(fixture.state_of(writer), WriterState::Stable);
    }
    assert_eq!(fixture.copies_left(), 0, "the half-made copy is deleted");
}

#[test]
fn a_writer_failing_to_prepare_aborts_those_called_and_is_recorded_failed() {
    let fixture = Fixture::new();
    let writers = vec![fixture.writer("a", 5_000, None), fixture.writer("b", 5_000, Some(Phase::PrepareBackup))];
    let provider = FakeProvider { delay: Duration::ZERO, failure: None };
    let error = fixture.create(writers, provider, &ThawTrigger::default()).unwrap_err();

    let ShadowError::Writer(failure) = &error else { panic!("{error}") };
    assert_eq!((failure.writer.as_str(), failure.phase), ("b", Phase::PrepareBackup));
    assert_eq!(error.code(), sysstate_types::ErrorCode::WriterRetryable);
    assert_eq!(fixture.phases_of("a"), [Phase::Identify, Phase::PrepareBackup, Phase::Abort]);
    assert_eq!(fixture.phases_of("b"), [Phase::Identify, Phase::PrepareBackup, Phase::Abort]);
    assert_eq!(fixture.state_of("a"), WriterState::Stable);
    assert_eq!(fixture.state_of("b"), WriterState::Failed(Phase::PrepareBackup));
}
