//! A session: one sandbox bound to one identifier, its activity clock and its executions.
//!
//! Requests reach a session through a [`SessionLease`]. While any lease is alive the session
//! is "in use" and the cooldown reaper leaves it alone; dropping the lease restarts its idle
//! clock. Executions in one session run one at a time, in arrival order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::backend::{Cell, CellOutcome, DeathCause, FileStore, Sandbox, SandboxError};
use crate::events::{DeletionReason, ExecutionOutcome};
use crate::identifier::Identifier;
use crate::pool::{Lifecycle, Pool};

/// How many finished executions a session remembers for `GET executions/{id}`.
const EXECUTION_HISTORY: usize = 100;

pub struct Session {
    identifier: Identifier,
    /// Set once: at allocation from the ready queue, or when a sandbox created on demand is
    /// ready. Concurrent first requests for one identifier all wait on this one cell, so they
    /// share one sandbox.
    sandbox: OnceCell<Result<Arc<dyn Sandbox>, SandboxError>>,
    created_at: SystemTime,
    created_instant: Instant,
    activity: Mutex<Activity>,
    /// Serialises executions; a tokio mutex because it is held across the execution.
    execution_lock: tokio::sync::Mutex<()>,
    executions: Mutex<VecDeque<ExecutionRecord>>,
    deleted: AtomicBool,
}

struct Activity {
    last_access: Instant,
    last_access_wall: SystemTime,
    in_flight: usize,
}

/// A snapshot of a session for listings.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub identifier: Identifier,
    /// The sandbox id, once the sandbox exists.
    pub sandbox_id: Option<String>,
    pub created_at: SystemTime,
    pub last_access: SystemTime,
    pub expires_at: SystemTime,
    pub in_use: bool,
}

/// One execution, running or finished.
#[derive(Debug, Clone)]
pub struct ExecutionRecord {
    pub id: String,
    pub asynchronous: bool,
    pub started_at: SystemTime,
    pub state: ExecutionState,
}

#[derive(Debug, Clone)]
pub enum ExecutionState {
    Running,
    Finished(CellOutcome),
    /// The execution could not finish: the sandbox died (the session is gone) or the
    /// backend failed. The message explains it to the user.
    Failed {
        message: String,
        cause: Option<DeathCause>,
    },
}

impl Session {
    pub(crate) fn with_sandbox(identifier: Identifier, sandbox: Arc<dyn Sandbox>) -> Session {
        Session::new(identifier, OnceCell::new_with(Some(Ok(sandbox))))
    }

    pub(crate) fn pending(identifier: Identifier) -> Session {
        Session::new(identifier, OnceCell::new())
    }

    /// A session the server's session table recorded before a restart, on the sandbox that
    /// survived it: its age and idle time go on from where they were.
    pub(crate) fn restored(identifier: Identifier, sandbox: Arc<dyn Sandbox>, created_at: SystemTime, last_access: SystemTime) -> Session {
        let mut session = Session::with_sandbox(identifier, sandbox);
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let back = |then: SystemTime| now.checked_sub(now_wall.duration_since(then).unwrap_or_default()).unwrap_or(now);
        session.created_at = created_at;
        session.created_instant = back(created_at);
        let activity = session.activity.get_mut().expect("activity lock");
        activity.last_access = back(last_access);
        activity.last_access_wall = last_access;
        session
    }

    fn new(identifier: Identifier, sandbox: OnceCell<Result<Arc<dyn Sandbox>, SandboxError>>) -> Session {
        Session {
            identifier,
            sandbox,
            created_at: SystemTime::now(),
            created_instant: Instant::now(),
            activity: Mutex::new(Activity { last_access: Instant::now(), last_access_wall: SystemTime::now(), in_flight: 0 }),
            execution_lock: tokio::sync::Mutex::new(()),
            executions: Mutex::new(VecDeque::new()),
            deleted: AtomicBool::new(false),
        }
    }

    pub fn identifier(&self) -> &Identifier {
        &self.identifier
    }

    /// The sandbox if it is ready (not while it is being created, not if creation failed).
    pub(crate) fn ready_sandbox(&self) -> Option<&Arc<dyn Sandbox>> {
        self.sandbox.get().and_then(|res| res.as_ref().ok())
    }

    pub(crate) async fn sandbox_or_create(&self, pool: &Pool) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.sandbox.get_or_init(|| pool.create_sandbox()).await.clone()
    }

    /// True when the sandbox exists and has ended, or its creation failed.
    pub(crate) fn is_dead(&self) -> bool {
        match self.sandbox.get() {
            Some(Ok(sandbox)) => !sandbox.is_alive(),
            Some(Err(_)) => true,
            None => false,
        }
    }

    pub(crate) fn mark_deleted(&self) -> bool {
        !self.deleted.swap(true, Ordering::SeqCst)
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    pub(crate) fn idle_for(&self, now: Instant) -> Option<Duration> {
        let activity = self.activity.lock().expect("activity lock");
        (activity.in_flight == 0).then(|| now.saturating_duration_since(activity.last_access))
    }

    /// How long ago the session was allocated.
    pub(crate) fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created_instant)
    }

    /// Why a dead session ended, for the event log.
    pub(crate) fn death_reason(&self) -> DeletionReason {
        match self.ready_sandbox().and_then(|sandbox| sandbox.death()) {
            Some((cause, _)) => DeletionReason::of_death(cause),
            None => DeletionReason::Crashed,
        }
    }

    pub fn info(&self, lifecycle: &Lifecycle) -> SessionInfo {
        let activity = self.activity.lock().expect("activity lock");
        SessionInfo {
            identifier: self.identifier.clone(),
            sandbox_id: self.ready_sandbox().map(|sandbox| sandbox.id().to_owned()),
            created_at: self.created_at,
            last_access: activity.last_access_wall,
            expires_at: lifecycle.expires_at(self.created_at, activity.last_access_wall),
            in_use: activity.in_flight > 0,
        }
    }

    fn touch(&self, delta: isize) {
        let mut activity = self.activity.lock().expect("activity lock");
        activity.last_access = Instant::now();
        activity.last_access_wall = SystemTime::now();
        activity.in_flight = activity.in_flight.saturating_add_signed(delta);
    }

    fn record(&self, record: ExecutionRecord) {
        let mut executions = self.executions.lock().expect("executions lock");
        if let Some(existing) = executions.iter_mut().find(|r| r.id == record.id) {
            *existing = record;
            return;
        }
        if executions.len() >= EXECUTION_HISTORY {
            // Forget the oldest finished execution; running ones are always kept.
            if let Some(idx) = executions.iter().position(|r| !matches!(r.state, ExecutionState::Running)) {
                executions.remove(idx);
            }
        }
        executions.push_back(record);
    }

    pub fn execution(&self, id: &str) -> Option<ExecutionRecord> {
        self.executions.lock().expect("executions lock").iter().find(|r| r.id == id).cloned()
    }
}

/// A request's hold on a session. Keeps the session out of the cooldown reaper's reach and
/// restarts its idle clock when dropped.
pub struct SessionLease {
    session: Arc<Session>,
    sandbox: Arc<dyn Sandbox>,
    pool: Arc<Pool>,
}

impl SessionLease {
    pub(crate) fn new(session: Arc<Session>, sandbox: Arc<dyn Sandbox>, pool: Arc<Pool>) -> SessionLease {
        session.touch(1);
        SessionLease { session, sandbox, pool }
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub fn sandbox_id(&self) -> &str {
        self.sandbox.id()
    }

    pub fn info(&self) -> SessionInfo {
        self.session.info(&self.pool.settings().lifecycle)
    }

    /// The session's network service, for pools that forward requests (custom containers).
    pub fn upstream(&self) -> Option<&dyn crate::backend::Upstream> {
        self.sandbox.upstream()
    }

    /// The session's data directory, if its sandbox has one.
    pub fn files(&self) -> Option<SessionFiles> {
        self.sandbox.files().is_some().then(|| SessionFiles { sandbox: self.sandbox.clone() })
    }

    /// Runs a cell and waits for it; `id` names the execution (the client's operation id or
    /// a generated one). The execution runs on a task of its own, holding its own lease: if the
    /// caller goes away (a client that hangs up), it still finishes and is recorded.
    pub async fn execute(&self, id: String, cell: Cell) -> ExecutionRecord {
        let started_at = SystemTime::now();
        let running = ExecutionRecord { id: id.clone(), asynchronous: false, started_at, state: ExecutionState::Running };
        self.session.record(running.clone());
        let lease = self.another();
        let task = tokio::spawn(async move { lease.run_and_record(running, cell).await });
        match task.await {
            Ok(record) => record,
            Err(err) => ExecutionRecord {
                id,
                asynchronous: false,
                started_at,
                state: ExecutionState::Failed { message: format!("the execution task failed: {err}"), cause: None },
            },
        }
    }

    /// Starts a cell in the background and returns its `Running` record at once. The
    /// execution keeps the session in use until it finishes.
    pub fn start_execution(self, id: String, cell: Cell) -> ExecutionRecord {
        let started_at = SystemTime::now();
        let running = ExecutionRecord { id, asynchronous: true, started_at, state: ExecutionState::Running };
        self.session.record(running.clone());
        let record = running.clone();
        tokio::spawn(async move { self.run_and_record(record, cell).await });
        running
    }

    /// A second lease on the same session.
    fn another(&self) -> SessionLease {
        SessionLease::new(self.session.clone(), self.sandbox.clone(), self.pool.clone())
    }

    async fn run_and_record(&self, running: ExecutionRecord, cell: Cell) -> ExecutionRecord {
        let started = std::time::Instant::now();
        let state = self.run_cell(cell).await;
        self.pool.report_execution(&self.session, self.sandbox.id(), ExecutionOutcome::of(&state), started.elapsed());
        if let ExecutionState::Failed { cause: Some(cause), .. } = &state {
            // After the execution is reported, so the event log reads in order.
            self.pool.forget_dead(&self.session, *cause);
        }
        let record = ExecutionRecord { state, ..running };
        self.session.record(record.clone());
        record
    }

    async fn run_cell(&self, cell: Cell) -> ExecutionState {
        let _turn = self.session.execution_lock.lock().await;
        match self.sandbox.execute(cell).await {
            Ok(outcome) => ExecutionState::Finished(outcome),
            Err(SandboxError::Died { cause, message }) => ExecutionState::Failed {
                message: format!("{message}. The session was deleted; the next request with this identifier starts a new session."),
                cause: Some(cause),
            },
            Err(err) => ExecutionState::Failed { message: err.to_string(), cause: None },
        }
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        self.session.touch(-1);
    }
}

/// A session's files, usable from blocking code (see [`FileStore`]).
#[derive(Clone)]
pub struct SessionFiles {
    sandbox: Arc<dyn Sandbox>,
}

impl SessionFiles {
    pub fn store(&self) -> &dyn FileStore {
        self.sandbox.files().expect("checked when the SessionFiles was made")
    }
}
