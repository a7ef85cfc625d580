//! Metrics of assignment: live workers, unassigned and draining relays, moves applied.

use prometheus::{IntCounterVec, IntGauge, Registry};

use crate::observability::metrics::{init_values, int_counter_vec, int_gauge, register_all};

#[derive(Clone)]
pub struct AssignmentMetrics {
    /// Workers whose Lease is fresh, as the controller sees them.
    pub workers_live: IntGauge,
    /// RelaySyncs with no live worker.
    pub relays_unassigned: IntGauge,
    /// RelaySyncs moving between two live workers.
    pub relays_draining: IntGauge,
    /// Assignment steps applied, by kind (assign | drain | cancel | reassign_drained |
    /// reassign_dead).
    pub assignment_moves: IntCounterVec,
}

impl AssignmentMetrics {
    /// Unregistered metrics (tests); a process uses [`AssignmentMetrics::register`].
    pub fn new() -> Self {
        let m = AssignmentMetrics {
            workers_live: int_gauge("grasp_sync_workers_live", "Workers whose Lease is fresh"),
            relays_unassigned: int_gauge(
                "grasp_sync_relays_unassigned",
                "RelaySyncs with no live worker",
            ),
            relays_draining: int_gauge(
                "grasp_sync_relays_draining",
                "RelaySyncs moving between two live workers",
            ),
            assignment_moves: int_counter_vec(
                "grasp_sync_assignment_moves_total",
                "Assignment steps applied, by kind",
                &["kind"],
            ),
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
        m
    }

    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::new();
        register_all(
            registry,
            vec![
                Box::new(m.workers_live.clone()),
                Box::new(m.relays_unassigned.clone()),
                Box::new(m.relays_draining.clone()),
                Box::new(m.assignment_moves.clone()),
            ],
        )?;
        Ok(m)
    }
}

impl Default for AssignmentMetrics {
    fn default() -> Self {
        Self::new()
    }
}
