//! Per-minute totals of the last hour, for the dashboard's charts: new sessions and how long
//! they waited, executions and how many failed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sandpool_engine::events::{ExecutionOutcome, SessionEvent, SessionEventKind};

/// Minutes kept.
pub const MINUTES: usize = 60;

/// One minute's totals, across pools.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Minute {
    /// Unix time of the minute's start, in seconds.
    pub start: u64,
    pub allocations: u64,
    /// Sum and maximum of the allocation waits, in milliseconds.
    pub allocation_wait_ms_sum: f64,
    pub allocation_wait_ms_max: f64,
    pub executions: u64,
    /// Executions that did not succeed (error, timeout, failed).
    pub execution_failures: u64,
}

#[derive(Default)]
pub struct Timeline {
    minutes: Mutex<VecDeque<Minute>>,
}

fn minute_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60 * 60
}

impl Timeline {
    pub fn observe(&self, event: &SessionEvent) {
        let start = minute_of(event.at);
        let mut minutes = self.minutes.lock().expect("timeline lock");
        if minutes.back().is_none_or(|last| last.start < start) {
            minutes.push_back(Minute { start, ..Minute::default() });
            while minutes.len() > MINUTES {
                minutes.pop_front();
            }
        }
        // Events arrive in time order, give or take a clock step; late ones go to the newest
        // minute rather than being lost.
        let minute = minutes.back_mut().expect("just pushed");
        match &event.kind {
            SessionEventKind::Allocated { wait, .. } => {
                let ms = wait.as_secs_f64() * 1e3;
                minute.allocations += 1;
                minute.allocation_wait_ms_sum += ms;
                minute.allocation_wait_ms_max = minute.allocation_wait_ms_max.max(ms);
            }
            SessionEventKind::Executed { outcome, .. } => {
                minute.executions += 1;
                if *outcome != ExecutionOutcome::Succeeded {
                    minute.execution_failures += 1;
                }
            }
            SessionEventKind::FilesChanged(_) | SessionEventKind::Deleted { .. } => {}
        }
    }

    /// The last hour, one entry per minute (empty minutes included), oldest first.
    pub fn last_hour(&self, now: SystemTime) -> Vec<Minute> {
        let current = minute_of(now);
        let minutes = self.minutes.lock().expect("timeline lock");
        (0..MINUTES as u64)
            .rev()
            .map(|ago| current.saturating_sub(ago * 60))
            .map(|start| minutes.iter().find(|m| m.start == start).cloned().unwrap_or(Minute { start, ..Minute::default() }))
            .collect()
    }
}

/// How long ago `time` was, in whole seconds (0 for the future).
pub fn seconds_since(time: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(time).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpool_engine::Identifier;

    fn at(time: SystemTime, kind: SessionEventKind) -> SessionEvent {
        SessionEvent { at: time, pool: "p".into(), identifier: Identifier::parse("user-1").unwrap(), sandbox_id: None, kind }
    }

    #[test]
    fn events_are_summed_per_minute_and_the_hour_has_every_minute() {
        let timeline = Timeline::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000 * 60 + 30);
        let two_minutes_ago = now - Duration::from_secs(120);
        timeline.observe(&at(two_minutes_ago, SessionEventKind::Allocated { from_ready_queue: true, wait: Duration::from_millis(4) }));
        timeline.observe(&at(two_minutes_ago, SessionEventKind::Allocated { from_ready_queue: false, wait: Duration::from_millis(10) }));
        timeline.observe(&at(now, SessionEventKind::Executed { outcome: ExecutionOutcome::Timeout, duration: Duration::from_secs(1) }));
        timeline.observe(&at(now, SessionEventKind::Executed { outcome: ExecutionOutcome::Succeeded, duration: Duration::from_secs(1) }));
        let hour = timeline.last_hour(now);
        assert_eq!(hour.len(), MINUTES);
        let older = &hour[MINUTES - 3];
        assert_eq!((older.allocations, older.allocation_wait_ms_sum, older.allocation_wait_ms_max), (2, 14.0, 10.0));
        let last = hour.last().unwrap();
        assert_eq!((last.executions, last.execution_failures), (2, 1));
        assert_eq!(hour[MINUTES - 2], Minute { start: last.start - 60, ..Minute::default() });
    }
}
