//! Prometheus metrics. Labels are bounded: pool names come from the configuration, routes
//! and outcomes from fixed lists; no identifier, token or path is ever a label.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sandpool_engine::events::{PoolEvent, SessionEvent, SessionEventKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolState {
    pool: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Allocation {
    pool: String,
    /// `ready_queue` or `created` (the request waited for a new session).
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    pool: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    pool: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: &'static str,
}

/// A pool's counts at scrape time.
#[derive(Debug, Clone)]
pub struct PoolGauges {
    pub pool: String,
    pub ready: usize,
    pub allocated: usize,
    /// Allocated sessions whose sandbox is still being created.
    pub pending: usize,
    /// Sandboxes being created for the ready queue.
    pub creating: usize,
    pub max: usize,
}

/// Seconds, from 0.5 ms to about 16 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Seconds, from 1 ms to about 9 minutes.
fn execution_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 15))
}

pub struct Metrics {
    registry: Registry,
    sessions: Family<PoolState, Gauge>,
    max_sessions: Family<PoolLabel, Gauge>,
    allocation_seconds: Family<Allocation, Histogram, fn() -> Histogram>,
    execution_seconds: Family<PoolLabel, Histogram, fn() -> Histogram>,
    executions: Family<Outcome, Counter>,
    file_changes: Family<PoolLabel, Counter>,
    refills: Family<Outcome, Counter>,
    refill_seconds: Family<PoolLabel, Histogram, fn() -> Histogram>,
    deletions: Family<Reason, Counter>,
    requests: Family<Request, Counter>,
    request_seconds: Family<Route, Histogram, fn() -> Histogram>,
    /// Rendering reads gauges the scrape itself sets: one scrape at a time.
    render_lock: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandpool");
        let sessions = Family::<PoolState, Gauge>::default();
        registry.register(
            "sessions",
            "Sessions of each pool by state: ready (warm, unallocated), allocated, pending (allocated, sandbox still starting), creating (for the ready queue)",
            sessions.clone(),
        );
        let max_sessions = Family::<PoolLabel, Gauge>::default();
        registry.register("max_sessions", "The pool's max_concurrent_sessions", max_sessions.clone());
        let allocation_seconds = Family::<Allocation, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        registry.register(
            "session_allocation_seconds",
            "Time a request waited for a new session, by source (ready_queue or created)",
            allocation_seconds.clone(),
        );
        let execution_seconds = Family::<PoolLabel, Histogram, fn() -> Histogram>::new_with_constructor(execution_buckets);
        registry.register("execution_seconds", "Duration of code executions", execution_seconds.clone());
        let executions = Family::<Outcome, Counter>::default();
        registry.register("executions", "Code executions by outcome (succeeded, error, timeout, failed)", executions.clone());
        let file_changes = Family::<PoolLabel, Counter>::default();
        registry.register("file_changes", "Files uploaded or deleted through the API", file_changes.clone());
        let refills = Family::<Outcome, Counter>::default();
        registry.register("refills", "Sessions created for the ready queue, by outcome (created, failed)", refills.clone());
        let refill_seconds = Family::<PoolLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        registry.register("refill_seconds", "Time to create one session for the ready queue", refill_seconds.clone());
        let deletions = Family::<Reason, Counter>::default();
        registry.register(
            "session_deletions",
            "Sessions deleted, by reason (cooldown, explicit, crash, exited, unhealthy, max_alive, out_of_memory, shutdown)",
            deletions.clone(),
        );
        let requests = Family::<Request, Counter>::default();
        registry.register("http_requests", "API requests by route and status code", requests.clone());
        let request_seconds = Family::<Route, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        registry.register("http_request_seconds", "API request latency by route", request_seconds.clone());
        Metrics {
            registry,
            sessions,
            max_sessions,
            allocation_seconds,
            execution_seconds,
            executions,
            file_changes,
            refills,
            refill_seconds,
            deletions,
            requests,
            request_seconds,
            render_lock: Mutex::new(()),
        }
    }

    pub(crate) fn observe_session(&self, event: &SessionEvent) {
        let pool = event.pool.clone();
        match &event.kind {
            SessionEventKind::Allocated { from_ready_queue, wait } => {
                let source = if *from_ready_queue { "ready_queue" } else { "created" };
                self.allocation_seconds.get_or_create(&Allocation { pool, source }).observe(wait.as_secs_f64());
            }
            SessionEventKind::Executed { outcome, duration } => {
                self.execution_seconds.get_or_create(&PoolLabel { pool: pool.clone() }).observe(duration.as_secs_f64());
                self.executions.get_or_create(&Outcome { pool, outcome: outcome.as_str() }).inc();
            }
            SessionEventKind::FilesChanged(_) => {
                self.file_changes.get_or_create(&PoolLabel { pool }).inc();
            }
            SessionEventKind::Deleted { reason } => {
                self.deletions.get_or_create(&Reason { pool, reason: reason.as_str() }).inc();
            }
        }
    }

    pub(crate) fn observe_pool(&self, pool: &str, event: &PoolEvent) {
        match event {
            PoolEvent::Refilled { took } => {
                self.refills.get_or_create(&Outcome { pool: pool.to_owned(), outcome: "created" }).inc();
                self.refill_seconds.get_or_create(&PoolLabel { pool: pool.to_owned() }).observe(took.as_secs_f64());
            }
            PoolEvent::RefillFailed => {
                self.refills.get_or_create(&Outcome { pool: pool.to_owned(), outcome: "failed" }).inc();
            }
        }
    }

    /// Counts one API request; `route` is the operation's fixed name.
    pub fn observe_request(&self, route: &'static str, status: u16, took: Duration) {
        self.requests.get_or_create(&Request { route, status }).inc();
        self.request_seconds.get_or_create(&Route { route }).observe(took.as_secs_f64());
    }

    pub(crate) fn render(&self, pools: &[PoolGauges]) -> String {
        let _one_scrape = self.render_lock.lock().expect("metrics lock");
        for gauges in pools {
            let states =
                [("ready", gauges.ready), ("allocated", gauges.allocated), ("pending", gauges.pending), ("creating", gauges.creating)];
            for (state, value) in states {
                self.sessions.get_or_create(&PoolState { pool: gauges.pool.clone(), state }).set(value as i64);
            }
            self.max_sessions.get_or_create(&PoolLabel { pool: gauges.pool.clone() }).set(gauges.max as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpool_engine::events::{DeletionReason, ExecutionOutcome};
    use sandpool_engine::Identifier;

    fn event(kind: SessionEventKind) -> SessionEvent {
        SessionEvent {
            at: std::time::SystemTime::now(),
            pool: "main".into(),
            identifier: Identifier::parse("secret-identifier").unwrap(),
            sandbox_id: None,
            kind,
        }
    }

    #[test]
    fn events_become_counters_and_histograms_without_identifiers() {
        let metrics = Metrics::new();
        metrics.observe_session(&event(SessionEventKind::Allocated { from_ready_queue: true, wait: Duration::from_millis(2) }));
        metrics
            .observe_session(&event(SessionEventKind::Executed { outcome: ExecutionOutcome::Timeout, duration: Duration::from_secs(1) }));
        metrics.observe_session(&event(SessionEventKind::Deleted { reason: DeletionReason::OutOfMemory }));
        metrics.observe_pool("main", &PoolEvent::Refilled { took: Duration::from_millis(9) });
        metrics.observe_request("execute", 200, Duration::from_millis(3));
        let text = metrics.render(&[PoolGauges { pool: "main".into(), ready: 3, allocated: 1, pending: 0, creating: 0, max: 10 }]);
        for line in [
            r#"sandpool_sessions{pool="main",state="ready"} 3"#,
            r#"sandpool_max_sessions{pool="main"} 10"#,
            r#"sandpool_session_allocation_seconds_count{pool="main",source="ready_queue"} 1"#,
            r#"sandpool_executions_total{pool="main",outcome="timeout"} 1"#,
            r#"sandpool_session_deletions_total{pool="main",reason="out_of_memory"} 1"#,
            r#"sandpool_refills_total{pool="main",outcome="created"} 1"#,
            r#"sandpool_http_requests_total{route="execute",status="200"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        assert!(!text.contains("secret-identifier"));
    }
}
