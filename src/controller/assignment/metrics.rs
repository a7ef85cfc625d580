//! Metrics of assignment: live workers, unassigned and draining relays, moves applied.

use prometheus::{IntCounterVec, IntGauge, Registry};

use crate::observability::metrics::{init_values, int_counter_vec, int_gauge};

#[derive(Clone)]
pub struct AssignmentMetrics {
    /// Workers whose Lease is fresh, as the controller sees them.
    pub workers_live: IntGauge,
    /// RelaySyncs with no live worker.
    pub relays_unassigned: IntGauge,
    /// Worker Leases ignored: held by an identity the controller does not expect.
    pub foreign_leases: IntGauge,
    /// Workers that stopped gracefully and are waited for (a rolling restart).
    pub workers_resting: IntGauge,
    /// Relays (all parts of a split one) moving between two live workers.
    pub relays_draining: IntGauge,
    /// Assignment steps applied, by kind (assign | drain | cancel | reassign_drained |
    /// reassign_dead).
    pub assignment_moves: IntCounterVec,
    /// Workers that left the ring, by why (lease_expired | released | grace_ended).
    pub workers_departed: IntCounterVec,
    /// Departures judged from the Lease watch and judged again from a fresh list, by what
    /// the list said (left | stayed: the watch was behind | failed: no list, the ring kept).
    pub departures_checked: IntCounterVec,
}

impl AssignmentMetrics {
    /// Create every metric and register it into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = AssignmentMetrics {
            workers_live: int_gauge(
                registry,
                "grasp_sync_workers_live",
                "Workers whose Lease is fresh",
            )?,
            relays_unassigned: int_gauge(
                registry,
                "grasp_sync_relays_unassigned",
                "RelaySyncs with no live worker",
            )?,
            foreign_leases: int_gauge(
                registry,
                "grasp_sync_foreign_leases",
                "Worker Leases ignored: held by an identity the controller does not expect",
            )?,
            workers_resting: int_gauge(
                registry,
                "grasp_sync_workers_resting",
                "Workers that stopped gracefully and are expected back (a rolling restart): their relays wait for them for the restart grace",
            )?,
            relays_draining: int_gauge(
                registry,
                "grasp_sync_relays_draining",
                "Relays (all parts of a split one) moving between two live workers",
            )?,
            assignment_moves: int_counter_vec(
                registry,
                "grasp_sync_assignment_moves_total",
                "Assignment steps applied, by kind",
                &["kind"],
            )?,
            workers_departed: int_counter_vec(
                registry,
                "grasp_sync_workers_departed_total",
                "Workers that left the ring, by why: lease_expired (not renewed in time: a crash, a stall), released (stopped gracefully and not expected back), grace_ended (expected back but not back within the restart grace)",
                &["reason"],
            )?,
            departures_checked: int_counter_vec(
                registry,
                "grasp_sync_departures_checked_total",
                "Worker departures judged from the Lease watch and checked against a fresh list of the Leases, by outcome: left (confirmed), stayed (the watch was behind: nothing moved), failed (no list: the ring was kept as it was)",
                &["result"],
            )?,
        };
        init_values(
            &m.assignment_moves,
            &[
                "assign",
                "drain",
                "cancel",
                "reassign_drained",
                "reassign_dead",
            ],
        );
        init_values(
            &m.workers_departed,
            &["lease_expired", "released", "grace_ended"],
        );
        init_values(&m.departures_checked, &["left", "stayed", "failed"]);
        Ok(m)
    }
}

/// Metrics in a registry of their own (tests, benchmarks).
impl Default for AssignmentMetrics {
    fn default() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every static metric")
    }
}
