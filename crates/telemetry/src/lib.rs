//! Telemetry: Prometheus metrics and the per-session event log, both fed by the engine's
//! [`EventSink`] and by the API (one observation per request).
//!
//! * [`metrics`]: counters and histograms with bounded labels (pool, route, outcome, reason;
//!   never an identifier), rendered in the Prometheus text format by [`Telemetry::render`].
//! * [`timeline`]: per-minute totals of the last hour, for the dashboard's charts.
//! * [`event_log`]: what happened to each session (allocated, executed, files changed,
//!   deleted), kept for a configurable time and readable through the API by a contributor.
//!   Events never hold code, output or file contents.

pub mod event_log;
pub mod metrics;
pub mod timeline;

use std::sync::Arc;
use std::time::Duration;

use sandpool_engine::events::{EventSink, PoolEvent, SessionEvent};

pub use event_log::{EventLog, EventQuery, LoggedEvent};
pub use metrics::{Metrics, PoolGauges};

/// Everything telemetry keeps, shared by the engine's pools and the API.
pub struct Telemetry {
    pub metrics: Metrics,
    pub events: EventLog,
    pub timeline: timeline::Timeline,
}

impl Telemetry {
    pub fn new(event_retention: Duration, max_events: usize) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            metrics: Metrics::new(),
            events: EventLog::new(event_retention, max_events),
            timeline: timeline::Timeline::default(),
        })
    }

    /// The metrics in the Prometheus text format, with the pools' current counts.
    pub fn render(&self, pools: &[PoolGauges]) -> String {
        self.metrics.render(pools)
    }
}

impl EventSink for Telemetry {
    fn session(&self, event: SessionEvent) {
        self.metrics.observe_session(&event);
        self.timeline.observe(&event);
        self.events.push(event);
    }

    fn pool(&self, pool: &str, event: PoolEvent) {
        self.metrics.observe_pool(pool, &event);
    }
}
