//! Metrics of a worker's supervisor: the relays it holds by phase, and its writes to the
//! store (status, drain acknowledgements, phase Events).

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Registry};

use crate::crd::Phase;
use crate::observability::metrics::{init_values, int_counter, int_counter_vec, int_gauge_vec};

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
        };
        init_values(&m.status_writes, &["ok", "error", "timeout", "refused"]);
        init_values(&m.phase_events, &["ok", "error", "timeout", "dropped"]);
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
