//! Metrics of a worker's supervisor: the relays it holds by phase, and its writes to the
//! store (status, drain acknowledgements, phase Events).

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::crd::Phase;
use crate::observability::metrics::{
    init_values, int_counter, int_counter_vec, int_gauge, int_gauge_vec,
};

/// Every phase, for per-phase gauges.
pub const PHASES: [Phase; 9] = [
    Phase::Pending,
    Phase::Connecting,
    Phase::Syncing,
    Phase::Live,
    Phase::LiveWithGaps,
    Phase::Backoff,
    Phase::RateLimited,
    Phase::Dead,
    Phase::Paused,
];

#[derive(Clone)]
pub struct SupervisorMetrics {
    /// Relays this worker holds, by phase.
    pub relays_by_phase: IntGaugeVec,
    /// Status writes by result (ok | error | timeout).
    pub status_writes: IntCounterVec,
    /// Kubernetes Events published for phase transitions, by result (ok | error | timeout |
    /// dropped: the queue behind a slow API server was full).
    pub phase_events: IntCounterVec,
    /// Session tasks that ended without being stopped (panicked) and were started again.
    pub session_restarts: IntCounter,
    /// 1 while the local feed has delivered every stored root event and announcement of the
    /// repos held (on its current connection, for the current set), else 0.
    pub local_feed_loaded: IntGauge,
    /// Subscriptions of the local feed the local relay refused, by subscription (live |
    /// historic) and reason (subscription-cap | other); each is sent again later.
    pub local_feed_refusals: IntCounterVec,
    /// Root events learned from the publisher's delivery (the local relay said it holds
    /// them) before the local feed reported them.
    pub facts_from_publisher: IntCounter,
    /// Root events and announcements first learned from the local feed's periodic re-read:
    /// the local relay held them, and its live stream did not deliver them.
    pub local_feed_reread_found: IntCounter,
}

impl SupervisorMetrics {
    /// Create every metric and register it into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = SupervisorMetrics {
            relays_by_phase: int_gauge_vec(
                registry,
                "grasp_sync_relays",
                "Relays this worker holds, by phase",
                &["phase"],
            )?,
            status_writes: int_counter_vec(
                registry,
                "grasp_sync_status_writes_total",
                "RelaySync status writes by result",
                &["result"],
            )?,
            phase_events: int_counter_vec(
                registry,
                "grasp_sync_phase_events_total",
                "Kubernetes Events published on phase transitions, by result",
                &["result"],
            )?,
            session_restarts: int_counter(
                registry,
                "grasp_sync_session_restarts_total",
                "Session tasks that ended without being stopped (a panic) and were started again",
            )?,
            local_feed_loaded: int_gauge(
                registry,
                "grasp_sync_local_feed_loaded",
                "1 while the worker's local feed has read every stored event it asks for",
            )?,
            local_feed_refusals: int_counter_vec(
                registry,
                "grasp_sync_local_feed_refusals_total",
                "Local feed subscriptions the local relay refused (each sent again later)",
                &["subscription", "reason"],
            )?,
            facts_from_publisher: int_counter(
                registry,
                "grasp_sync_facts_from_publisher_total",
                "Root events learned from our own delivery (the local relay said it holds them) before the local feed reported them",
            )?,
            local_feed_reread_found: int_counter(
                registry,
                "grasp_sync_local_feed_reread_found_total",
                "Root events and announcements first learned from the local feed's periodic re-read: the local relay held them and its live stream had not delivered them",
            )?,
        };
        init_values(&m.status_writes, &["ok", "error", "timeout", "refused"]);
        init_values(&m.phase_events, &["ok", "error", "timeout", "dropped"]);
        for sub in ["live", "historic"] {
            for reason in ["subscription-cap", "other"] {
                m.local_feed_refusals.with_label_values(&[sub, reason]);
            }
        }
        for phase in PHASES {
            m.relays_by_phase.with_label_values(&[phase.as_str()]);
        }
        Ok(m)
    }
}

/// Metrics in a registry of their own (tests, benchmarks).
impl Default for SupervisorMetrics {
    fn default() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every static metric")
    }
}
