//! What happens to sessions and pools, reported to an [`EventSink`] (metrics, the session
//! event log). The engine only reports; what is kept, counted or exported is the sink's
//! business. Events never carry code, output or file contents.

use std::time::{Duration, SystemTime};

use crate::backend::{CellStatus, DeathCause};
use crate::identifier::Identifier;
use crate::session::ExecutionState;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeletionReason {
    /// Idle for longer than the pool's cooldown.
    Cooldown,
    /// Deleted through the API.
    Explicit,
    /// Its process ended (crashed, or killed after ignoring a timeout).
    Crashed,
    /// Its main process exited by itself (custom containers; the end of an
    /// `OnContainerExit` session).
    Exited,
    /// It failed its liveness or startup probe.
    Unhealthy,
    /// It reached the pool's `max_alive_period_in_seconds`.
    MaxAlive,
    OutOfMemory,
    /// The server stopped.
    Shutdown,
    /// Its backend went away and took it along (a zygote that died).
    BackendLost,
    /// The server restarted and the session's sandbox was no longer there to adopt.
    LostInRestart,
}

impl DeletionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionReason::Cooldown => "cooldown",
            DeletionReason::Explicit => "explicit",
            DeletionReason::Crashed => "crash",
            DeletionReason::Exited => "exited",
            DeletionReason::Unhealthy => "unhealthy",
            DeletionReason::MaxAlive => "max_alive",
            DeletionReason::OutOfMemory => "out_of_memory",
            DeletionReason::Shutdown => "shutdown",
            DeletionReason::BackendLost => "backend_lost",
            DeletionReason::LostInRestart => "lost_in_restart",
        }
    }

    pub(crate) fn of_death(cause: DeathCause) -> DeletionReason {
        match cause {
            DeathCause::OutOfMemory => DeletionReason::OutOfMemory,
            DeathCause::Exited => DeletionReason::Exited,
            DeathCause::Unhealthy => DeletionReason::Unhealthy,
            DeathCause::Crashed | DeathCause::Unresponsive => DeletionReason::Crashed,
            DeathCause::BackendLost => DeletionReason::BackendLost,
        }
    }
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutionOutcome {
    Succeeded,
    /// The code raised an exception.
    Error,
    /// The code ran past its timeout and was interrupted.
    Timeout,
    /// The session died during the execution (or the backend failed).
    Failed,
}

impl ExecutionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionOutcome::Succeeded => "succeeded",
            ExecutionOutcome::Error => "error",
            ExecutionOutcome::Timeout => "timeout",
            ExecutionOutcome::Failed => "failed",
        }
    }

    pub(crate) fn of(state: &ExecutionState) -> ExecutionOutcome {
        match state {
            ExecutionState::Finished(outcome) => match outcome.status {
                CellStatus::Success => ExecutionOutcome::Succeeded,
                CellStatus::Error => ExecutionOutcome::Error,
                CellStatus::Timeout => ExecutionOutcome::Timeout,
            },
            ExecutionState::Running | ExecutionState::Failed { .. } => ExecutionOutcome::Failed,
        }
    }
}

/// A change to a session's files, made through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    Uploaded { path: String, bytes: u64 },
    Deleted { path: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum SessionEventKind {
    /// The identifier got a session: from the ready queue, or created while the request
    /// waited. `wait` is how long the request waited for it.
    Allocated {
        from_ready_queue: bool,
        wait: Duration,
    },
    Executed {
        outcome: ExecutionOutcome,
        duration: Duration,
    },
    FilesChanged(FileChange),
    Deleted {
        reason: DeletionReason,
    },
}

impl SessionEventKind {
    pub fn name(&self) -> &'static str {
        match self {
            SessionEventKind::Allocated { .. } => "allocated",
            SessionEventKind::Executed { .. } => "executed",
            SessionEventKind::FilesChanged(_) => "files_changed",
            SessionEventKind::Deleted { .. } => "deleted",
        }
    }
}

/// Something that happened to one session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEvent {
    pub at: SystemTime,
    pub pool: String,
    pub identifier: Identifier,
    /// The sandbox behind the session (the session GUID), when it has one.
    pub sandbox_id: Option<String>,
    pub kind: SessionEventKind,
}

/// Something that happened to a pool's ready queue.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolEvent {
    /// A sandbox was created for the ready queue, in `took`.
    Refilled {
        took: Duration,
    },
    RefillFailed,
}

/// Receives events. Called inline on request paths: implementations must be quick and must
/// not block.
pub trait EventSink: Send + Sync + 'static {
    fn session(&self, event: SessionEvent);
    fn pool(&self, pool: &str, event: PoolEvent);
}

/// Discards every event.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn session(&self, _event: SessionEvent) {}
    fn pool(&self, _pool: &str, _event: PoolEvent) {}
}
