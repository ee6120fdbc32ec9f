//! Pool lifecycle tests against an in-memory backend, with tokio's paused clock so that
//! cooldowns are exercised without waiting.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::*;
use crate::backend::{Cell, CellOutcome, CellResult, CellStatus, FileStore};
use crate::session::ExecutionState;

#[derive(Default)]
struct FakeFactory {
    created: AtomicUsize,
    destroyed: Arc<AtomicUsize>,
    /// How long `create` takes (paused clock).
    create_delay: Duration,
    /// Put before sandbox ids, to tell two factories' sandboxes apart.
    prefix: &'static str,
    retired: AtomicBool,
}

struct FakeSandbox {
    id: String,
    alive: AtomicBool,
    destroyed: Arc<AtomicUsize>,
}

#[async_trait]
impl SandboxFactory for FakeFactory {
    async fn start(&self) -> Result<RuntimeInfo, SandboxError> {
        Ok(RuntimeInfo { language: "python".into(), language_version: "3.11".into(), packages: vec![], started_at: SystemTime::now() })
    }

    async fn create(&self, _purpose: Purpose) -> Result<Arc<dyn Sandbox>, SandboxError> {
        tokio::time::sleep(self.create_delay).await;
        let n = self.created.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(FakeSandbox { id: format!("{}sb{n}", self.prefix), alive: AtomicBool::new(true), destroyed: self.destroyed.clone() }))
    }

    async fn shutdown(&self) {}

    async fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Sandbox for FakeSandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    async fn execute(&self, cell: Cell) -> Result<CellOutcome, SandboxError> {
        if cell.code == "slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if cell.code == "exit-after-reply" {
            // Like a container whose main process exits after answering.
            self.alive.store(false, Ordering::SeqCst);
        }
        if cell.code == "crash" {
            self.alive.store(false, Ordering::SeqCst);
            return Err(SandboxError::Died { cause: DeathCause::Exited, message: "the session process exited with code 3".into() });
        }
        Ok(CellOutcome {
            status: CellStatus::Success,
            stdout: format!("{}:{}", self.id, cell.code),
            stderr: String::new(),
            result: CellResult::None,
            error: None,
            duration: Duration::ZERO,
        })
    }

    fn files(&self) -> Option<&dyn FileStore> {
        None
    }

    async fn destroy(&self) {
        if self.alive.swap(false, Ordering::SeqCst) {
            self.destroyed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn settings(max: usize, ready: usize) -> PoolSettings {
    PoolSettings {
        name: "test".into(),
        max_concurrent_sessions: max,
        ready_session_instances: ready,
        lifecycle: Lifecycle::Timed { cooldown: Duration::from_secs(10) },
        kind: PoolKind::CodeInterpreter,
        default_timeout: Duration::from_secs(5),
        max_timeout: Duration::from_secs(220),
        output_cap: 1000,
    }
}

fn id(text: &str) -> Identifier {
    Identifier::parse(text).unwrap()
}

fn cell(code: &str) -> Cell {
    Cell { code: code.into(), timeout: Duration::from_secs(1), output_cap: 100 }
}

async fn started(max: usize, ready: usize, factory: Arc<FakeFactory>) -> Arc<Pool> {
    let pool = Pool::new(settings(max, ready), factory);
    pool.start().await.unwrap();
    wait_for(|| pool.counts().ready == ready.min(max)).await;
    pool
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}

async fn stdout_of(lease: &SessionLease, code: &str) -> String {
    match lease.execute("e".into(), cell(code)).await.state {
        ExecutionState::Finished(outcome) => outcome.stdout,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn first_request_takes_a_ready_sandbox_and_the_queue_refills() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 2, factory.clone()).await;
    assert_eq!(factory.created.load(Ordering::SeqCst), 2);

    let lease = pool.lease(&id("user-one")).await.unwrap();
    assert_eq!(lease.sandbox_id(), "sb0");
    wait_for(|| pool.counts().ready == 2).await;
    assert_eq!(pool.counts().allocated, 1);

    // The same identifier keeps its sandbox; another identifier gets the next one.
    assert_eq!(pool.lease(&id("user-one")).await.unwrap().sandbox_id(), "sb0");
    assert_eq!(pool.lease(&id("user-two")).await.unwrap().sandbox_id(), "sb1");
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_share_one_sandbox() {
    let factory = Arc::new(FakeFactory { create_delay: Duration::from_millis(50), ..Default::default() });
    let pool = started(10, 0, factory.clone()).await;
    let shared = id("shared-id");
    let (a, b, c) = tokio::join!(pool.lease(&shared), pool.lease(&shared), pool.lease(&shared));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.sandbox_id(), b.sandbox_id());
    assert_eq!(b.sandbox_id(), c.sandbox_id());
    assert_eq!(factory.created.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_pool_refuses_new_identifiers_but_serves_existing_ones() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(2, 1, factory.clone()).await;
    let _a = pool.lease(&id("aaaa")).await.unwrap();
    let _b = pool.lease(&id("bbbb")).await.unwrap();
    let err = pool.lease(&id("cccc")).await.err().expect("pool is full");
    assert!(matches!(err, EngineError::AtCapacity { max: 2, .. }), "{err}");
    assert!(pool.lease(&id("aaaa")).await.is_ok());
    // No ready sandbox is kept for capacity that cannot be used, and a full pool still
    // counts as ready: it serves its sessions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.counts().ready, 0);
    assert!(pool.is_ready());
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_are_deleted_after_the_cooldown_but_not_while_in_use() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 1, factory.clone()).await;

    let held = pool.lease(&id("busy-session")).await.unwrap();
    drop(pool.lease(&id("idle-session")).await.unwrap());

    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(pool.counts().allocated, 2, "not yet expired");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let remaining: Vec<_> = pool.sessions().into_iter().map(|s| s.identifier).collect();
    assert_eq!(remaining, vec![id("busy-session")]);
    wait_for(|| factory.destroyed.load(Ordering::SeqCst) == 1).await;

    // Every request restarts the clock.
    drop(held);
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(pool.lease(&id("busy-session")).await.unwrap());
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(pool.counts().allocated, 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pool.counts().allocated, 0);
}

#[tokio::test(start_paused = true)]
async fn on_container_exit_sessions_outlive_idleness_and_end_at_exit_or_max_alive() {
    let factory = Arc::new(FakeFactory::default());
    let settings = PoolSettings { lifecycle: Lifecycle::OnContainerExit { max_alive: Duration::from_secs(60) }, ..settings(10, 1) };
    let pool = Pool::new(settings, factory.clone());
    pool.start().await.unwrap();
    wait_for(|| pool.counts().ready == 1).await;

    let info = pool.lease(&id("long-lived")).await.unwrap().info();
    assert_eq!(info.expires_at, info.created_at + Duration::from_secs(60), "expiry counts from allocation, not from the last request");
    let exiting = pool.lease(&id("exits-soon")).await.unwrap();
    let exiting_id = exiting.sandbox_id().to_owned();
    // Its container's main process exits by itself.
    stdout_of(&exiting, "exit-after-reply").await;
    drop(exiting);
    // Idle far past any cooldown: still there (no cooldown for OnContainerExit)...
    tokio::time::sleep(Duration::from_secs(30)).await;
    let remaining: Vec<_> = pool.sessions().into_iter().map(|s| s.identifier).collect();
    assert_eq!(remaining, vec![id("long-lived")], "the exited session is gone, the idle one stays");
    assert_ne!(pool.lease(&id("exits-soon")).await.unwrap().sandbox_id(), exiting_id);
    // ...until the maximum alive period.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(pool.sessions().iter().all(|s| s.identifier != id("long-lived")), "deleted after max_alive_period");
}

#[tokio::test(start_paused = true)]
async fn a_session_that_dies_fails_its_request_and_the_identifier_starts_fresh() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 1, factory.clone()).await;
    let lease = pool.lease(&id("fragile")).await.unwrap();
    let first = lease.sandbox_id().to_owned();
    let record = lease.execute("x".into(), cell("crash")).await;
    match record.state {
        ExecutionState::Failed { message, cause } => {
            assert_eq!(cause, Some(DeathCause::Exited));
            assert!(message.contains("exited with code 3"), "{message}");
            assert!(message.contains("new session"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(lease);
    let lease = pool.lease(&id("fragile")).await.unwrap();
    assert_ne!(lease.sandbox_id(), first);
    assert!(stdout_of(&lease, "1").await.ends_with(":1"));
}

#[tokio::test(start_paused = true)]
async fn delete_destroys_the_sandbox_and_forgets_the_identifier() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 1, factory.clone()).await;
    let first = pool.lease(&id("to-delete")).await.unwrap().sandbox_id().to_owned();
    assert!(pool.delete(&id("to-delete")).await);
    assert_eq!(factory.destroyed.load(Ordering::SeqCst), 1);
    assert!(!pool.delete(&id("to-delete")).await);
    assert!(pool.existing(&id("to-delete")).await.unwrap().is_none());
    assert_ne!(pool.lease(&id("to-delete")).await.unwrap().sandbox_id(), first);
}

#[tokio::test(start_paused = true)]
async fn executions_in_one_session_run_one_at_a_time_and_are_remembered() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 1, factory.clone()).await;
    let lease = pool.lease(&id("history")).await.unwrap();
    let record = lease.execute("op-1".into(), cell("a")).await;
    assert!(matches!(record.state, ExecutionState::Finished(_)));
    let stored = lease.session().execution("op-1").expect("remembered");
    assert!(matches!(stored.state, ExecutionState::Finished(ref o) if o.stdout.ends_with(":a")));
    assert!(lease.session().execution("op-2").is_none());
}

#[tokio::test(start_paused = true)]
async fn shutdown_destroys_every_sandbox() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 3, factory.clone()).await;
    drop(pool.lease(&id("some-session")).await.unwrap());
    wait_for(|| pool.counts().ready == 3).await;
    pool.shutdown().await;
    assert_eq!(factory.destroyed.load(Ordering::SeqCst), 4);
    assert!(matches!(pool.lease(&id("late-one")).await, Err(EngineError::Stopped { .. })));
}

#[tokio::test(start_paused = true)]
async fn an_execution_whose_caller_goes_away_still_finishes_and_is_recorded() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 1, factory.clone()).await;
    let lease = pool.lease(&id("impatient")).await.unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(10), lease.execute("op-slow".into(), cell("slow"))).await;
    assert!(gave_up.is_err());
    drop(lease);
    let session = pool.existing(&id("impatient")).await.unwrap().expect("session kept while its execution runs");
    assert!(matches!(session.session().execution("op-slow").unwrap().state, ExecutionState::Running));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(matches!(session.session().execution("op-slow").unwrap().state, ExecutionState::Finished(_)));
}

/// Keeps every event, for assertions.
#[derive(Default)]
struct Recorder {
    sessions: std::sync::Mutex<Vec<crate::events::SessionEvent>>,
    refills: AtomicUsize,
}

impl crate::events::EventSink for Recorder {
    fn session(&self, event: crate::events::SessionEvent) {
        self.sessions.lock().unwrap().push(event);
    }

    fn pool(&self, _pool: &str, event: crate::events::PoolEvent) {
        if matches!(event, crate::events::PoolEvent::Refilled { .. }) {
            self.refills.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn every_step_of_a_session_is_reported_as_an_event() {
    use crate::events::{DeletionReason, ExecutionOutcome, SessionEventKind};
    let recorder = Arc::new(Recorder::default());
    let pool = Pool::with_events(settings(10, 1), Arc::new(FakeFactory::default()), recorder.clone());
    pool.start().await.unwrap();
    wait_for(|| pool.counts().ready == 1).await;
    assert_eq!(recorder.refills.load(Ordering::SeqCst), 1);

    let lease = pool.lease(&id("from-ready")).await.unwrap();
    stdout_of(&lease, "1").await;
    drop(lease);
    // The second identifier finds the queue empty only if it asks before the refill.
    let cold = pool.lease(&id("cold-one")).await.unwrap();
    drop(cold);
    let crashing = pool.lease(&id("crashing")).await.unwrap();
    crashing.execute("e".into(), cell("crash")).await;
    drop(crashing);
    assert!(pool.delete(&id("from-ready")).await);
    // `cold-one` idles past the cooldown.
    tokio::time::sleep(Duration::from_secs(12)).await;
    pool.shutdown().await;

    let events = recorder.sessions.lock().unwrap().clone();
    let of = |identifier: &str| -> Vec<SessionEventKind> {
        events.iter().filter(|e| e.identifier.as_str() == identifier).map(|e| e.kind.clone()).collect()
    };
    let ready = of("from-ready");
    assert!(matches!(ready[0], SessionEventKind::Allocated { from_ready_queue: true, .. }), "{ready:?}");
    assert!(matches!(ready[1], SessionEventKind::Executed { outcome: ExecutionOutcome::Succeeded, .. }), "{ready:?}");
    assert_eq!(ready[2], SessionEventKind::Deleted { reason: DeletionReason::Explicit });
    assert_eq!(ready.len(), 3);
    assert!(events.iter().all(|e| e.pool == "test" && e.sandbox_id.is_some()));
    let crashing = of("crashing");
    assert!(matches!(crashing[1], SessionEventKind::Executed { outcome: ExecutionOutcome::Failed, .. }), "{crashing:?}");
    assert_eq!(crashing[2], SessionEventKind::Deleted { reason: DeletionReason::Exited });
    assert_eq!(of("cold-one").last(), Some(&SessionEventKind::Deleted { reason: DeletionReason::Cooldown }));
}

#[tokio::test(start_paused = true)]
async fn ready_sandboxes_that_keep_dying_are_replaced_with_growing_pauses() {
    let factory = Arc::new(FakeFactory::default());
    let pool = started(10, 1, factory.clone()).await;
    // Each death doubles the pause before the next refill.
    for _ in 0..5 {
        wait_for(|| pool.counts().ready == 1).await;
        let ready: Vec<Arc<dyn Sandbox>> = pool.state.lock().unwrap().ready.iter().cloned().collect();
        for sandbox in ready {
            sandbox.destroy().await; // as if its process had ended by itself
        }
        tokio::time::sleep(Duration::from_millis(1100)).await; // the reaper notices
    }
    let created = factory.created.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(factory.created.load(Ordering::SeqCst), created, "paused after five early deaths (4 s)");
    wait_for(|| pool.counts().ready == 1).await;
    // A sandbox that gets used resets the pause.
    drop(pool.lease(&id("user")).await.unwrap());
    let state = pool.state.lock().unwrap();
    assert_eq!(state.ready_deaths, 0);
}

#[tokio::test(start_paused = true)]
async fn a_template_change_replaces_ready_sandboxes_and_keeps_allocated_sessions() {
    let old_factory = Arc::new(FakeFactory { prefix: "old-", ..Default::default() });
    let old = started(10, 2, old_factory.clone()).await;
    let kept = old.lease(&id("user-kept")).await.unwrap();
    assert_eq!(stdout_of(&kept, "print").await, "old-sb0:print");
    wait_for(|| old.counts().ready == 2).await;
    drop(kept);

    let new_factory = Arc::new(FakeFactory { prefix: "new-", ..Default::default() });
    let new = Pool::new(settings(10, 2), new_factory.clone());
    new.start().await.unwrap();
    old.hand_over(&new).await;
    wait_for(|| new.counts().ready == 2).await;
    assert_eq!(old_factory.destroyed.load(Ordering::SeqCst), 2, "the old template's ready sandboxes are destroyed");

    // The allocated session moved over untouched, reached through either pool object.
    assert_eq!(new.lease(&id("user-kept")).await.unwrap().sandbox_id(), "old-sb0");
    assert_eq!(old.lease(&id("user-kept")).await.unwrap().sandbox_id(), "old-sb0");
    assert_eq!(new.counts().allocated, 1);
    // New identifiers get the new template, even through the old object.
    assert!(old.lease(&id("user-new")).await.unwrap().sandbox_id().starts_with("new-"));
    assert!(!old_factory.retired.load(Ordering::SeqCst), "the old backend still serves a session");

    // Once its last session is gone, the old backend is retired.
    assert!(old.delete(&id("user-kept")).await);
    wait_for(|| old_factory.retired.load(Ordering::SeqCst)).await;
    assert!(!new_factory.retired.load(Ordering::SeqCst));
}
