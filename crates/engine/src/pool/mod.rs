//! A pool: a sandbox factory, a queue of ready sandboxes and the table of live sessions.
//!
//! Two background tasks run per pool once it has started:
//! * the **refiller** keeps `ready_session_instances` sandboxes warm (never more than the
//!   pool's remaining capacity), woken whenever a ready sandbox is taken;
//! * the **reaper** deletes sessions idle for longer than the cooldown, and sessions whose
//!   sandbox died while idle.
//!
//! Invariants:
//! * at most `max_concurrent_sessions` sessions exist (pending ones included);
//! * a session in the table is never reaped while a [`SessionLease`] on it is alive;
//! * every sandbox that leaves the pool (deleted, reaped, dead, shut down) is destroyed;
//! * a template change ([`Pool::hand_over`]) moves every session to the new pool object
//!   under the old one's lock, so no session is lost or served twice; requests that still
//!   hold the old object follow it to its successor.
//!
//! The state lock is a `std::sync::Mutex`: it is never held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backend::{DeathCause, Purpose, RuntimeInfo, Sandbox, SandboxError, SandboxFactory};
use crate::events::{DeletionReason, EventSink, ExecutionOutcome, FileChange, NoEvents, PoolEvent, SessionEvent, SessionEventKind};
use crate::identifier::Identifier;
use crate::session::{Session, SessionInfo, SessionLease};

/// How long a request waits for a pool that is still starting before it gets an error.
const START_WAIT: Duration = Duration::from_secs(120);
/// Sandboxes the refiller creates at once; the zygote forks one at a time anyway, this only
/// overlaps the round trips.
const REFILL_CONCURRENCY: usize = 8;

/// A session as the server's session table recorded it, for [`Pool::start_restoring`].
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub identifier: Identifier,
    pub sandbox_id: String,
    pub created_at: std::time::SystemTime,
    pub last_access: std::time::SystemTime,
}

/// Where `find_or_allocate` found or put the session.
enum Allocation {
    /// In this pool; for a new session, whether it came from the ready queue.
    Here(Arc<Session>, Option<bool>),
    /// The pool was handed over to a successor meanwhile: ask it instead.
    Moved(Arc<Pool>),
}

/// What creating one sandbox gave.
type CreateResult = Result<Arc<dyn Sandbox>, SandboxError>;

/// A pool's settings, validated by the caller.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub name: String,
    pub max_concurrent_sessions: usize,
    pub ready_session_instances: usize,
    /// When sessions end.
    pub lifecycle: Lifecycle,
    /// What the pool's sessions are.
    pub kind: PoolKind,
    /// Timeout of an execution that does not ask for one.
    pub default_timeout: Duration,
    /// Upper bound on the timeout an execution may ask for.
    pub max_timeout: Duration,
    /// Cap on each captured output stream, in characters.
    pub output_cap: usize,
}

/// When a pool's sessions end (Azure's `lifecycleConfiguration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Deleted after `cooldown` without a request.
    Timed { cooldown: Duration },
    /// Kept until the sandbox's main process exits, or `max_alive` after allocation.
    OnContainerExit { max_alive: Duration },
}

impl Lifecycle {
    /// When a session whose last request ended at `last_access` and that was allocated at
    /// `created_at` will be deleted, if nothing else happens.
    pub fn expires_at(&self, created_at: std::time::SystemTime, last_access: std::time::SystemTime) -> std::time::SystemTime {
        match *self {
            Lifecycle::Timed { cooldown } => last_access + cooldown,
            Lifecycle::OnContainerExit { max_alive } => created_at + max_alive,
        }
    }

    /// How often the reaper looks for sessions to delete.
    fn reap_period(&self) -> Duration {
        let span = match *self {
            Lifecycle::Timed { cooldown } => cooldown,
            Lifecycle::OnContainerExit { max_alive } => max_alive,
        };
        (span / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// What a pool's sessions are, which decides how the API serves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Code interpreter sessions: the API runs code and manages files through the backend.
    CodeInterpreter,
    /// Custom container sessions: the API forwards requests to each sandbox's
    /// [`crate::backend::Upstream`].
    CustomContainer,
}

/// Where a pool is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolStatus {
    Starting,
    Running,
    Failed(String),
    Stopped,
}

/// Why the engine could not serve a request; the API maps these to status codes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no more sessions can be allocated in session pool '{pool}' (maxConcurrentSessions={max})")]
    AtCapacity { pool: String, max: usize },
    #[error("session pool '{pool}' is still starting; retry shortly")]
    Starting { pool: String },
    #[error("session pool '{pool}' failed to start: {reason}")]
    Failed { pool: String, reason: String },
    #[error("session pool '{pool}' is shutting down")]
    Stopped { pool: String },
    #[error("the session could not be created: {0}")]
    Sandbox(SandboxError),
}

pub struct Pool {
    settings: PoolSettings,
    factory: Arc<dyn SandboxFactory>,
    state: Mutex<PoolState>,
    /// Wakes the refiller when the ready queue shrank or capacity freed up.
    refill: Notify,
    status: watch::Sender<PoolStatus>,
    runtime: OnceLock<RuntimeInfo>,
    /// Background tasks (refiller and reaper), aborted at shutdown.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    events: Arc<dyn EventSink>,
    /// Backends of earlier templates whose sessions this pool inherited, retired once the
    /// last of those sessions is gone.
    retired: Mutex<Vec<RetiredBackend>>,
}

struct RetiredBackend {
    factory: Arc<dyn SandboxFactory>,
    sessions: Vec<Weak<Session>>,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Arc<dyn Sandbox>>,
    /// Sandboxes the refiller is creating for the ready queue.
    creating: usize,
    sessions: HashMap<Identifier, Arc<Session>>,
    /// Ready sandboxes that died before anyone used them, since one was last allocated: a
    /// backend whose sandboxes keep dying (a container that exits at once) must not be
    /// restarted in a tight loop.
    ready_deaths: u32,
    /// No refills before this, after ready sandboxes died.
    refill_paused_until: Option<Instant>,
    /// Set when the pool's template changed: the pool that now holds the sessions.
    successor: Option<Arc<Pool>>,
}

/// Counts for readiness and dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// Warm sandboxes waiting in the ready queue.
    pub ready: usize,
    /// Sessions bound to an identifier (pending ones included).
    pub allocated: usize,
    /// Of `allocated`, sessions whose sandbox is still being created for a waiting request.
    pub pending: usize,
    /// Sandboxes being created for the ready queue.
    pub creating: usize,
}

impl Pool {
    pub fn new(settings: PoolSettings, factory: Arc<dyn SandboxFactory>) -> Arc<Pool> {
        Pool::with_events(settings, factory, Arc::new(NoEvents))
    }

    /// A pool that reports what happens to its sessions to `events`.
    pub fn with_events(settings: PoolSettings, factory: Arc<dyn SandboxFactory>, events: Arc<dyn EventSink>) -> Arc<Pool> {
        Arc::new(Pool {
            events,
            settings,
            factory,
            state: Mutex::new(PoolState::default()),
            refill: Notify::new(),
            status: watch::Sender::new(PoolStatus::Starting),
            runtime: OnceLock::new(),
            tasks: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
        })
    }

    /// The pool object that serves this pool's sessions now: this one, or the one it was
    /// handed over to (after a template change).
    fn successor(&self) -> Option<Arc<Pool>> {
        self.state.lock().expect("pool lock").successor.clone()
    }

    /// Hands every session to `successor`, the same pool with a new template (already
    /// started), and stops this one: its ready sandboxes are destroyed, allocated sessions
    /// keep their sandboxes and move over as they are, and this pool's backend lives on
    /// until the last of them is gone.
    pub async fn hand_over(self: &Arc<Self>, successor: &Arc<Pool>) {
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        let (ready, sessions) = {
            let mut state = self.state.lock().expect("pool lock");
            state.successor = Some(successor.clone());
            (std::mem::take(&mut state.ready), std::mem::take(&mut state.sessions))
        };
        let inherited: Vec<Weak<Session>> = sessions.values().map(Arc::downgrade).collect();
        {
            let mut next = successor.state.lock().expect("pool lock");
            for (identifier, session) in sessions {
                next.sessions.entry(identifier).or_insert(session);
            }
        }
        {
            let mut retired = successor.retired.lock().expect("retired lock");
            retired.push(RetiredBackend { factory: self.factory.clone(), sessions: inherited });
            retired.extend(self.retired.lock().expect("retired lock").drain(..));
        }
        successor.refill.notify_one();
        tracing::info!(pool = %self.settings.name, destroyed_ready = ready.len(), "pool template replaced; allocated sessions kept");
        let mut destroying = JoinSet::new();
        for sandbox in ready {
            destroying.spawn(async move { sandbox.destroy().await });
        }
        destroying.join_all().await;
        successor.retire_finished_backends();
    }

    /// Retires the backends of earlier templates whose sessions are all gone.
    fn retire_finished_backends(&self) {
        let finished: Vec<Arc<dyn SandboxFactory>> = {
            let mut retired = self.retired.lock().expect("retired lock");
            let (done, waiting): (Vec<_>, Vec<_>) = retired
                .drain(..)
                .partition(|backend| backend.sessions.iter().all(|weak| weak.upgrade().is_none_or(|session| session.is_deleted())));
            *retired = waiting;
            done.into_iter().map(|backend| backend.factory).collect()
        };
        for factory in finished {
            tokio::spawn(async move { factory.retire().await });
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    pub fn status(&self) -> PoolStatus {
        self.status.borrow().clone()
    }

    pub fn runtime(&self) -> Option<&RuntimeInfo> {
        self.runtime.get()
    }

    pub fn counts(&self) -> PoolCounts {
        let state = self.state.lock().expect("pool lock");
        let pending = state.sessions.values().filter(|session| session.ready_sandbox().is_none()).count();
        PoolCounts { ready: state.ready.len(), allocated: state.sessions.len(), pending, creating: state.creating }
    }

    /// Running, and holding the ready sandboxes it should: at least one, unless it keeps none
    /// by configuration or because it is full (a full pool still serves its sessions).
    pub fn is_ready(&self) -> bool {
        let ready = self.state.lock().expect("pool lock").ready.len();
        self.status() == PoolStatus::Running && (ready > 0 || self.ready_target() == 0)
    }

    /// Starts the backend, then the refiller and the reaper. Returns when the backend is up
    /// (or failed); the ready queue fills in the background.
    pub async fn start(self: &Arc<Self>) -> Result<(), SandboxError> {
        self.start_restoring(Vec::new()).await
    }

    /// [`Pool::start`] after a restart: the sessions of `records` whose sandboxes the backend
    /// adopted are back in the table before any request is served; the others are reported
    /// lost. Adopted sandboxes no record names are destroyed, never handed to another
    /// identifier (one may have served a session whose record did not reach the table).
    pub async fn start_restoring(self: &Arc<Self>, records: Vec<SessionRecord>) -> Result<(), SandboxError> {
        match self.factory.start().await {
            Ok(runtime) => {
                let _ = self.runtime.set(runtime);
            }
            Err(err) => {
                self.status.send_replace(PoolStatus::Failed(err.to_string()));
                return Err(err);
            }
        }
        self.restore(records, self.factory.adopted());
        self.status.send_replace(PoolStatus::Running);
        let refiller = tokio::spawn(self.clone().refill_loop());
        let reaper = tokio::spawn(self.clone().reap_loop());
        self.tasks.lock().expect("tasks lock").extend([refiller, reaper]);
        Ok(())
    }

    fn restore(&self, records: Vec<SessionRecord>, survivors: Vec<Arc<dyn Sandbox>>) {
        if records.is_empty() && survivors.is_empty() {
            return;
        }
        let mut survivors: HashMap<String, Arc<dyn Sandbox>> =
            survivors.into_iter().map(|sandbox| (sandbox.id().to_owned(), sandbox)).collect();
        let mut lost = Vec::new();
        let mut expired = Vec::new();
        let mut restored = 0;
        let now = std::time::SystemTime::now();
        {
            let mut state = self.state.lock().expect("pool lock");
            for record in records {
                // Its cooldown (or maximum age) ran out while the server was down.
                if self.settings.lifecycle.expires_at(record.created_at, record.last_access) <= now {
                    if let Some(sandbox) = survivors.remove(&record.sandbox_id) {
                        tokio::spawn(async move { sandbox.destroy().await });
                    }
                    expired.push(record);
                    continue;
                }
                match survivors.remove(&record.sandbox_id) {
                    Some(sandbox) if sandbox.is_alive() => {
                        let session = Session::restored(record.identifier.clone(), sandbox, record.created_at, record.last_access);
                        state.sessions.insert(record.identifier, Arc::new(session));
                        restored += 1;
                    }
                    Some(dead) => {
                        tokio::spawn(async move { dead.destroy().await });
                        lost.push(record);
                    }
                    None => lost.push(record),
                }
            }
        }
        for record in &lost {
            let session = Session::pending(record.identifier.clone());
            self.report(&session, Some(&record.sandbox_id), SessionEventKind::Deleted { reason: DeletionReason::LostInRestart });
        }
        let reason = match self.settings.lifecycle {
            Lifecycle::Timed { .. } => DeletionReason::Cooldown,
            Lifecycle::OnContainerExit { .. } => DeletionReason::MaxAlive,
        };
        for record in &expired {
            let session = Session::pending(record.identifier.clone());
            self.report(&session, Some(&record.sandbox_id), SessionEventKind::Deleted { reason });
        }
        let unclaimed = survivors.len();
        for (_, sandbox) in survivors {
            tokio::spawn(async move { sandbox.destroy().await });
        }
        tracing::info!(pool = %self.settings.name, restored, lost = lost.len(), expired = expired.len(), unclaimed, "sessions restored after a restart");
    }

    /// Stops the background tasks and destroys every sandbox of the pool.
    pub async fn shutdown(&self) {
        self.status.send_replace(PoolStatus::Stopped);
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        let (ready, sessions) = {
            let mut state = self.state.lock().expect("pool lock");
            (std::mem::take(&mut state.ready), std::mem::take(&mut state.sessions))
        };
        let mut destroying = JoinSet::new();
        for sandbox in ready {
            destroying.spawn(async move { sandbox.destroy().await });
        }
        for session in sessions.into_values() {
            self.report_deleted(&session, DeletionReason::Shutdown);
            session.mark_deleted();
            if let Some(sandbox) = session.ready_sandbox().cloned() {
                destroying.spawn(async move { sandbox.destroy().await });
            }
        }
        destroying.join_all().await;
        let retired: Vec<RetiredBackend> = self.retired.lock().expect("retired lock").drain(..).collect();
        for backend in retired {
            backend.factory.retire().await;
        }
        self.factory.shutdown().await;
    }

    /// The session for `identifier`, allocating one if there is none: from the ready queue
    /// when possible, otherwise by creating a sandbox now.
    pub async fn lease(self: &Arc<Self>, identifier: &Identifier) -> Result<SessionLease, EngineError> {
        if let Some(next) = self.successor() {
            return Box::pin(next.lease(identifier)).await;
        }
        self.wait_running().await?;
        let started = Instant::now();
        let (session, allocated) = match self.find_or_allocate(identifier)? {
            Allocation::Here(session, allocated) => (session, allocated),
            Allocation::Moved(next) => return Box::pin(next.lease(identifier)).await,
        };
        let lease = self.finish_lease(session).await?;
        if let Some(from_ready_queue) = allocated {
            let kind = SessionEventKind::Allocated { from_ready_queue, wait: started.elapsed() };
            self.report(lease.session(), Some(lease.sandbox_id()), kind);
        }
        Ok(lease)
    }

    /// The live session for `identifier`, or a new one (taking a ready sandbox if any); for a
    /// new one, also whether it came from the ready queue.
    fn find_or_allocate(&self, identifier: &Identifier) -> Result<Allocation, EngineError> {
        let mut state = self.state.lock().expect("pool lock");
        if let Some(next) = &state.successor {
            return Ok(Allocation::Moved(next.clone()));
        }
        if let Some(existing) = state.sessions.get(identifier) {
            if !existing.is_dead() {
                return Ok(Allocation::Here(existing.clone(), None));
            }
            let dead = state.sessions.remove(identifier).expect("present");
            self.report_deleted(&dead, dead.death_reason());
            self.destroy_session_later(dead);
        }
        if state.sessions.len() >= self.settings.max_concurrent_sessions {
            return Err(EngineError::AtCapacity { pool: self.settings.name.clone(), max: self.settings.max_concurrent_sessions });
        }
        let mut session = None;
        while let Some(sandbox) = state.ready.pop_front() {
            if sandbox.is_alive() {
                state.ready_deaths = 0;
                state.refill_paused_until = None;
                session = Some(Session::with_sandbox(identifier.clone(), sandbox));
                break;
            }
            tokio::spawn(async move { sandbox.destroy().await });
        }
        let from_ready_queue = session.is_some();
        let session = Arc::new(session.unwrap_or_else(|| Session::pending(identifier.clone())));
        state.sessions.insert(identifier.clone(), session.clone());
        drop(state);
        self.refill.notify_one();
        Ok(Allocation::Here(session, Some(from_ready_queue)))
    }

    /// Waits for the session's sandbox (created now if the session is pending) and leases it.
    async fn finish_lease(self: &Arc<Self>, session: Arc<Session>) -> Result<SessionLease, EngineError> {
        match session.sandbox_or_create(self).await {
            Ok(sandbox) => {
                sandbox.claim();
                if session.is_deleted() {
                    // Deleted while its sandbox was starting: nobody else will destroy it.
                    sandbox.destroy().await;
                    return Err(EngineError::Sandbox(SandboxError::Unavailable("the session was deleted while it was starting".into())));
                }
                Ok(SessionLease::new(session, sandbox, self.clone()))
            }
            Err(err) => {
                self.remove_if_current(&session);
                Err(EngineError::Sandbox(err))
            }
        }
    }

    /// The existing session for `identifier`, without allocating one.
    pub async fn existing(self: &Arc<Self>, identifier: &Identifier) -> Result<Option<SessionLease>, EngineError> {
        if let Some(next) = self.successor() {
            return Box::pin(next.existing(identifier)).await;
        }
        self.wait_running().await?;
        let session = {
            let state = self.state.lock().expect("pool lock");
            match state.sessions.get(identifier) {
                Some(session) if !session.is_dead() => session.clone(),
                _ => return Ok(None),
            }
        };
        self.finish_lease(session).await.map(Some)
    }

    /// Deletes the session for `identifier` and waits until its sandbox is gone. Returns
    /// false when there was no such session.
    pub async fn delete(&self, identifier: &Identifier) -> bool {
        if let Some(next) = self.successor() {
            return Box::pin(next.delete(identifier)).await;
        }
        let session = self.state.lock().expect("pool lock").sessions.remove(identifier);
        let Some(session) = session else { return false };
        self.refill.notify_one();
        self.report_deleted(&session, DeletionReason::Explicit);
        session.mark_deleted();
        if let Some(sandbox) = session.ready_sandbox() {
            sandbox.destroy().await;
        }
        true
    }

    /// Snapshots of every session, oldest first.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        if let Some(next) = self.successor() {
            return next.sessions();
        }
        let sessions: Vec<Arc<Session>> = self.state.lock().expect("pool lock").sessions.values().cloned().collect();
        let mut infos: Vec<SessionInfo> = sessions.iter().map(|s| s.info(&self.settings.lifecycle)).collect();
        infos.sort_by_key(|info| info.created_at);
        infos
    }

    /// Called by a lease whose sandbox died: the session leaves the table (so the identifier
    /// gets a fresh session next time) and its sandbox is cleaned up.
    pub(crate) fn forget_dead(&self, session: &Arc<Session>, cause: DeathCause) {
        if let Some(next) = self.successor() {
            return next.forget_dead(session, cause);
        }
        tracing::info!(pool = %self.settings.name, session = %session.identifier().redacted(), ?cause, "session sandbox died");
        if self.remove_if_current(session) {
            self.report_deleted(session, DeletionReason::of_death(cause));
            self.destroy_session_later(session.clone());
        }
    }

    pub(crate) async fn create_sandbox(&self) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.factory.create(Purpose::Waiting).await
    }

    fn remove_if_current(&self, session: &Arc<Session>) -> bool {
        let mut state = self.state.lock().expect("pool lock");
        match state.sessions.get(session.identifier()) {
            Some(current) if Arc::ptr_eq(current, session) => {
                state.sessions.remove(session.identifier());
                drop(state);
                self.refill.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Reports a change to a session's files (the API changes them directly).
    pub fn report_file_change(&self, lease: &SessionLease, change: FileChange) {
        self.report(lease.session(), Some(lease.sandbox_id()), SessionEventKind::FilesChanged(change));
    }

    pub(crate) fn report_execution(&self, session: &Session, sandbox_id: &str, outcome: ExecutionOutcome, duration: Duration) {
        self.report(session, Some(sandbox_id), SessionEventKind::Executed { outcome, duration });
    }

    fn report_deleted(&self, session: &Session, reason: DeletionReason) {
        let sandbox_id = session.ready_sandbox().map(|sandbox| sandbox.id().to_owned());
        self.report(session, sandbox_id.as_deref(), SessionEventKind::Deleted { reason });
    }

    fn report(&self, session: &Session, sandbox_id: Option<&str>, kind: SessionEventKind) {
        self.events.session(SessionEvent {
            at: std::time::SystemTime::now(),
            pool: self.settings.name.clone(),
            identifier: session.identifier().clone(),
            sandbox_id: sandbox_id.map(str::to_owned),
            kind,
        });
    }

    fn destroy_session_later(&self, session: Arc<Session>) {
        session.mark_deleted();
        if let Some(sandbox) = session.ready_sandbox().cloned() {
            tokio::spawn(async move { sandbox.destroy().await });
        }
    }

    async fn wait_running(&self) -> Result<(), EngineError> {
        let mut status = self.status.subscribe();
        let waited = tokio::time::timeout(START_WAIT, status.wait_for(|s| *s != PoolStatus::Starting)).await;
        let pool = self.settings.name.clone();
        match waited {
            Err(_) => Err(EngineError::Starting { pool }),
            Ok(Err(_)) => Err(EngineError::Stopped { pool }),
            Ok(Ok(status)) => match &*status {
                PoolStatus::Running => Ok(()),
                PoolStatus::Failed(reason) => Err(EngineError::Failed { pool, reason: reason.clone() }),
                PoolStatus::Stopped | PoolStatus::Starting => Err(EngineError::Stopped { pool }),
            },
        }
    }

    /// How many ready sandboxes the pool should hold now: the configured number, but never
    /// more than the sessions it could still allocate.
    fn ready_target(&self) -> usize {
        let state = self.state.lock().expect("pool lock");
        let room = self.settings.max_concurrent_sessions.saturating_sub(state.sessions.len());
        self.settings.ready_session_instances.min(room)
    }

    /// How many more sandboxes the ready queue needs now.
    fn refill_deficit(&self) -> usize {
        let target = self.ready_target();
        let state = self.state.lock().expect("pool lock");
        if state.refill_paused_until.is_some_and(|until| Instant::now() < until) {
            return 0;
        }
        target.saturating_sub(state.ready.len() + state.creating)
    }

    async fn refill_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        let mut creating: JoinSet<(CreateResult, Duration)> = JoinSet::new();
        loop {
            let deficit = self.refill_deficit().min(REFILL_CONCURRENCY.saturating_sub(creating.len()));
            for _ in 0..deficit {
                self.state.lock().expect("pool lock").creating += 1;
                let pool = self.clone();
                creating.spawn(async move {
                    let started = Instant::now();
                    (pool.factory.create(Purpose::ReadyQueue).await, started.elapsed())
                });
            }
            tokio::select! {
                Some(joined) = creating.join_next(), if !creating.is_empty() => {
                    self.state.lock().expect("pool lock").creating -= 1;
                    match joined {
                        Ok((Ok(sandbox), took)) => {
                            self.events.pool(&self.settings.name, PoolEvent::Refilled { took });
                            backoff = Duration::from_millis(250);
                            self.state.lock().expect("pool lock").ready.push_back(sandbox);
                        }
                        Ok((Err(err), _)) => {
                            self.events.pool(&self.settings.name, PoolEvent::RefillFailed);
                            tracing::warn!(pool = %self.settings.name, error = %err, "could not create a ready session; retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                        Err(join_error) => tracing::error!(pool = %self.settings.name, error = %join_error, "refill task failed"),
                    }
                }
                _ = self.refill.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn reap_loop(self: Arc<Self>) {
        let period = self.settings.lifecycle.reap_period();
        loop {
            tokio::time::sleep(period).await;
            self.reap_once(Instant::now());
        }
    }

    /// Removes idle-expired and dead sessions, and dead ready sandboxes.
    fn reap_once(&self, now: Instant) {
        let mut removed = Vec::new();
        let mut dead_ready = Vec::new();
        {
            let mut state = self.state.lock().expect("pool lock");
            state.sessions.retain(|_, session| {
                let Some(idle) = session.idle_for(now) else {
                    return true;
                };
                let expired = match self.settings.lifecycle {
                    Lifecycle::Timed { cooldown } => (idle >= cooldown).then_some(DeletionReason::Cooldown),
                    Lifecycle::OnContainerExit { max_alive } => (session.age(now) >= max_alive).then_some(DeletionReason::MaxAlive),
                };
                if let Some(reason) = expired {
                    removed.push((session.clone(), reason));
                    return false;
                }
                if session.is_dead() {
                    removed.push((session.clone(), session.death_reason()));
                    return false;
                }
                true
            });
            state.ready.retain(|sandbox| {
                let alive = sandbox.is_alive();
                if !alive {
                    if let Some((_, why)) = sandbox.death() {
                        tracing::warn!(pool = %self.settings.name, sandbox = sandbox.id(), "a ready session ended before it was allocated: {why}");
                    }
                    dead_ready.push(sandbox.clone());
                }
                alive
            });
        }
        if !dead_ready.is_empty() {
            let mut state = self.state.lock().expect("pool lock");
            state.ready_deaths = state.ready_deaths.saturating_add(dead_ready.len() as u32);
            // 250 ms after the first death, doubling up to 30 s.
            let pause =
                Duration::from_millis(250).saturating_mul(1 << state.ready_deaths.min(7).saturating_sub(1)).min(Duration::from_secs(30));
            state.refill_paused_until = Some(now + pause);
            if state.ready_deaths >= 3 {
                tracing::warn!(pool = %self.settings.name, deaths = state.ready_deaths, "ready sessions keep ending before use; refilling again in {pause:?}");
            }
        }
        self.retire_finished_backends();
        if removed.is_empty() && dead_ready.is_empty() {
            return;
        }
        for (session, reason) in removed {
            tracing::debug!(pool = %self.settings.name, session = %session.identifier().redacted(), reason = reason.as_str(), "session deleted");
            self.report_deleted(&session, reason);
            self.destroy_session_later(session);
        }
        for sandbox in dead_ready {
            tokio::spawn(async move { sandbox.destroy().await });
        }
        self.refill.notify_one();
    }
}

#[cfg(test)]
mod tests;
