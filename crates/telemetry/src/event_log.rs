//! The per-session event log: a bounded, time-limited record of what happened to sessions,
//! newest last. Readable by contributors through the API. It lives in memory; the server
//! copies new events to its database ([`EventLog::since`]) and reads them back at start
//! ([`EventLog::restore`]), so the log survives restarts.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sandpool_engine::events::{FileChange, SessionEvent, SessionEventKind};

/// One event as kept: flat fields, ready to serialise.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoggedEvent {
    /// Increasing number, so a reader can ask for what came after the last one it saw.
    pub sequence: u64,
    pub at: SystemTime,
    pub pool: String,
    pub identifier: String,
    pub session_guid: Option<String>,
    /// `allocated`, `executed`, `files_changed` or `deleted`.
    pub kind: String,
    /// Kind-specific details: `from_ready_queue`/`wait_ms`, `outcome`/`duration_ms`,
    /// `change`/`path`/`bytes`, `reason`.
    pub details: Vec<(String, Detail)>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Detail {
    Text(String),
    Number(f64),
    Flag(bool),
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub pool: Option<String>,
    pub identifier: Option<String>,
    /// Only events with a larger sequence number.
    pub after: Option<u64>,
    /// At most this many (the newest), in order.
    pub limit: usize,
}

pub struct EventLog {
    retention: Duration,
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    events: VecDeque<LoggedEvent>,
    next_sequence: u64,
}

impl EventLog {
    /// Keeps events for `retention`, and at most `capacity` of them.
    pub fn new(retention: Duration, capacity: usize) -> EventLog {
        EventLog { retention, capacity: capacity.max(1), state: Mutex::new(State { events: VecDeque::new(), next_sequence: 1 }) }
    }

    pub fn push(&self, event: SessionEvent) {
        let details = details_of(&event.kind);
        let mut state = self.state.lock().expect("event log lock");
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        state.events.push_back(LoggedEvent {
            sequence,
            at: event.at,
            pool: event.pool,
            identifier: event.identifier.as_str().to_owned(),
            session_guid: event.sandbox_id,
            kind: event.kind.name().to_owned(),
            details: details.into_iter().map(|(name, value)| (name.to_owned(), value)).collect(),
        });
        while state.events.len() > self.capacity {
            state.events.pop_front();
        }
        let horizon = SystemTime::now().checked_sub(self.retention);
        while let (Some(first), Some(horizon)) = (state.events.front(), horizon) {
            if first.at >= horizon {
                break;
            }
            state.events.pop_front();
        }
    }

    /// Every event with a sequence number above `after`, oldest first (for copying new
    /// events to the database).
    pub fn since(&self, after: u64) -> Vec<LoggedEvent> {
        let state = self.state.lock().expect("event log lock");
        state.events.iter().filter(|event| event.sequence > after).cloned().collect()
    }

    /// Puts back events a previous run of the server logged (oldest first), before any new
    /// one; numbering goes on after the last of them.
    pub fn restore(&self, events: Vec<LoggedEvent>) {
        let mut state = self.state.lock().expect("event log lock");
        let next = events.iter().map(|event| event.sequence + 1).max().unwrap_or(1).max(state.next_sequence);
        let current = std::mem::take(&mut state.events);
        state.events = events.into_iter().chain(current).collect();
        while state.events.len() > self.capacity {
            state.events.pop_front();
        }
        state.next_sequence = next;
    }

    /// The events that match, oldest first.
    pub fn query(&self, query: &EventQuery) -> Vec<LoggedEvent> {
        let horizon = SystemTime::now().checked_sub(self.retention);
        let state = self.state.lock().expect("event log lock");
        let matching: Vec<&LoggedEvent> = state
            .events
            .iter()
            .filter(|e| horizon.is_none_or(|h| e.at >= h))
            .filter(|e| query.pool.as_deref().is_none_or(|p| e.pool == p))
            .filter(|e| query.identifier.as_deref().is_none_or(|id| e.identifier == id))
            .filter(|e| query.after.is_none_or(|after| e.sequence > after))
            .collect();
        let skip = matching.len().saturating_sub(query.limit);
        matching.into_iter().skip(skip).cloned().collect()
    }
}

fn details_of(kind: &SessionEventKind) -> Vec<(&'static str, Detail)> {
    let ms = |d: &Duration| Detail::Number((d.as_secs_f64() * 1e6).round() / 1e3);
    match kind {
        SessionEventKind::Allocated { from_ready_queue, wait } => {
            vec![("from_ready_queue", Detail::Flag(*from_ready_queue)), ("wait_ms", ms(wait))]
        }
        SessionEventKind::Executed { outcome, duration } => {
            vec![("outcome", Detail::Text(outcome.as_str().into())), ("duration_ms", ms(duration))]
        }
        SessionEventKind::FilesChanged(FileChange::Uploaded { path, bytes }) => vec![
            ("change", Detail::Text("uploaded".into())),
            ("path", Detail::Text(path.clone())),
            ("bytes", Detail::Number(*bytes as f64)),
        ],
        SessionEventKind::FilesChanged(FileChange::Deleted { path }) => {
            vec![("change", Detail::Text("deleted".into())), ("path", Detail::Text(path.clone()))]
        }
        SessionEventKind::Deleted { reason } => vec![("reason", Detail::Text(reason.as_str().into()))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpool_engine::events::{DeletionReason, ExecutionOutcome};
    use sandpool_engine::Identifier;

    fn event(identifier: &str, kind: SessionEventKind, age: Duration) -> SessionEvent {
        SessionEvent {
            at: SystemTime::now() - age,
            pool: "p".into(),
            identifier: Identifier::parse(identifier).unwrap(),
            sandbox_id: Some("sb".into()),
            kind,
        }
    }

    #[test]
    fn events_are_kept_in_order_filtered_and_numbered() {
        let log = EventLog::new(Duration::from_secs(3600), 100);
        log.push(event(
            "user-a",
            SessionEventKind::Allocated { from_ready_queue: true, wait: Duration::from_micros(1500) },
            Duration::ZERO,
        ));
        log.push(event(
            "user-b",
            SessionEventKind::Executed { outcome: ExecutionOutcome::Error, duration: Duration::from_millis(3) },
            Duration::ZERO,
        ));
        log.push(event("user-a", SessionEventKind::Deleted { reason: DeletionReason::Cooldown }, Duration::ZERO));
        let all = log.query(&EventQuery { limit: 10, ..Default::default() });
        assert_eq!(all.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[0].details, vec![("from_ready_queue".into(), Detail::Flag(true)), ("wait_ms".into(), Detail::Number(1.5))]);
        let a = log.query(&EventQuery { identifier: Some("user-a".into()), limit: 10, ..Default::default() });
        assert_eq!(a.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["allocated", "deleted"]);
        assert_eq!(log.query(&EventQuery { after: Some(2), limit: 10, ..Default::default() }).len(), 1);
        // `limit` keeps the newest.
        assert_eq!(log.query(&EventQuery { limit: 1, ..Default::default() })[0].sequence, 3);
    }

    #[test]
    fn restored_events_come_first_and_numbering_goes_on_after_them() {
        let earlier = EventLog::new(Duration::from_secs(60), 10);
        earlier.push(event("user-a", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::ZERO));
        earlier.push(event("user-b", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::ZERO));
        let saved = serde_json::to_string(&earlier.since(0)).unwrap();
        let log = EventLog::new(Duration::from_secs(60), 10);
        log.restore(serde_json::from_str(&saved).unwrap());
        log.push(event("user-c", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::ZERO));
        let all = log.query(&EventQuery { limit: 10, ..Default::default() });
        let seen: Vec<(u64, &str)> = all.iter().map(|e| (e.sequence, e.identifier.as_str())).collect();
        assert_eq!(seen, vec![(1, "user-a"), (2, "user-b"), (3, "user-c")]);
        assert_eq!(log.since(2).len(), 1);
    }

    #[test]
    fn old_events_and_events_beyond_capacity_are_dropped() {
        let log = EventLog::new(Duration::from_secs(60), 2);
        log.push(event("user-a", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::from_secs(120)));
        log.push(event("user-b", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::ZERO));
        assert_eq!(log.query(&EventQuery { limit: 10, ..Default::default() }).len(), 1, "the old one is past retention");
        log.push(event("user-c", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::ZERO));
        log.push(event("user-d", SessionEventKind::Deleted { reason: DeletionReason::Explicit }, Duration::ZERO));
        let kept = log.query(&EventQuery { limit: 10, ..Default::default() });
        assert_eq!(kept.iter().map(|e| e.identifier.as_str()).collect::<Vec<_>>(), vec!["user-c", "user-d"]);
    }
}
