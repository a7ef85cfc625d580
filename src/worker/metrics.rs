//! Prometheus metrics of the sync engine. Labels are bounded: relay URLs only where the
//! seed design has them (one series per tracked relay), reasons from fixed enums.

use crate::crd::Phase;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Seed name: connection status per relay (0 disconnected, 1 connecting, 2 syncing,
    /// 3 live, 4 live with gaps, 5 backoff/rate-limited).
    pub relay_connected: IntGaugeVec,
    pub connection_attempts: IntCounterVec,
    /// Seed name: events received from remotes, by `source` (live | startup | reconnect | daily).
    pub events: IntCounterVec,
    pub relays_tracked: IntGauge,
    pub relays_connected: IntGauge,
    /// Events dropped before publishing, by reason (invalid_signature, oversize, …).
    pub events_rejected: IntCounterVec,
    /// Local relay answers, by outcome (accepted, duplicate, blocked, rate-limited, …).
    pub publish_outcomes: IntCounterVec,
    pub publish_retries: IntCounter,
    pub publish_queue_depth: IntGauge,
    pub publish_in_flight: IntGauge,
    pub historic_batches: IntCounterVec,
    pub historic_batch_seconds: HistogramVec,
    pub subscriptions: IntGauge,
    pub historic_method: IntCounterVec,
    pub negentropy_ids_requested: IntCounter,
    pub bytes_received: IntCounterVec,
    pub closed_subscriptions: IntCounterVec,
    pub malformed_messages: IntCounter,
    pub publish_latency_seconds: Histogram,
    /// The adaptive publish pace (events/s per connection) once the local relay pushed back.
    pub publish_rate_limit: Gauge,
    /// Repositories in the discovery index.
    pub discovery_repos: IntGauge,
    /// RelaySync objects discovery wants.
    pub discovery_objects: IntGauge,
    /// Store writes by discovery, by action (apply | delete).
    pub discovery_actions: IntCounterVec,
    /// Relay URLs from announcements not used, by reason.
    pub discovery_rejected_targets: IntCounterVec,
    /// 1, labelled with this process's role (controller | worker | standalone) and version,
    /// so rules can tell which process a series comes from.
    pub info: IntGaugeVec,
    /// Relays this worker holds, by phase.
    pub relays_by_phase: IntGaugeVec,
    /// Status writes by result (ok | error).
    pub status_writes: IntCounterVec,
    /// Kubernetes Events published for phase transitions, by result.
    pub phase_events: IntCounterVec,
    /// 1 while this worker holds its Lease.
    pub lease_held: IntGauge,
    /// 1 while this controller replica leads.
    pub leader: IntGauge,
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

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            relay_connected: IntGaugeVec::new(
                Opts::new("ngit_sync_relay_connected", "Connection status per relay (0 disconnected, 1 connecting, 2 syncing, 3 live, 4 live with gaps, 5 backoff)"),
                &["relay"],
            )
            .expect("static metric"),
            connection_attempts: IntCounterVec::new(
                Opts::new("ngit_sync_connection_attempts_total", "Connection attempts by result"),
                &["relay", "result"],
            )
            .expect("static metric"),
            events: IntCounterVec::new(
                Opts::new("ngit_sync_events_total", "Events received from remote relays, by phase"),
                &["source"],
            )
            .expect("static metric"),
            relays_tracked: IntGauge::new("ngit_sync_relays_tracked_total", "Relays with a session")
                .expect("static metric"),
            relays_connected: IntGauge::new("ngit_sync_relays_connected_total", "Relays currently connected")
                .expect("static metric"),
            events_rejected: IntCounterVec::new(
                Opts::new("grasp_sync_events_rejected_total", "Events from remotes dropped before publishing, by reason"),
                &["reason"],
            )
            .expect("static metric"),
            publish_outcomes: IntCounterVec::new(
                Opts::new("grasp_sync_publish_outcomes_total", "Local relay answers to published events, by outcome"),
                &["outcome"],
            )
            .expect("static metric"),
            publish_retries: IntCounter::new("grasp_sync_publish_retries_total", "Events sent to the local relay again after a transient refusal or a lost connection")
                .expect("static metric"),
            publish_queue_depth: IntGauge::new("grasp_sync_publish_queue_depth", "Events waiting to be published (retry queue)")
                .expect("static metric"),
            publish_in_flight: IntGauge::new("grasp_sync_publish_in_flight", "Events sent to the local relay and awaiting OK")
                .expect("static metric"),
            historic_batches: IntCounterVec::new(
                Opts::new("grasp_sync_historic_batches_total", "Historic batches by outcome"),
                &["outcome"],
            )
            .expect("static metric"),
            historic_batch_seconds: HistogramVec::new(
                HistogramOpts::new("grasp_sync_historic_batch_duration_seconds", "Historic batch duration")
                    .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
                &["method"],
            )
            .expect("static metric"),
            subscriptions: IntGauge::new("grasp_sync_subscriptions", "Open subscriptions on remote relays")
                .expect("static metric"),
            historic_method: IntCounterVec::new(
                Opts::new("grasp_sync_historic_method_total", "Historic batches by method (negentropy | req)"),
                &["method"],
            )
            .expect("static metric"),
            negentropy_ids_requested: IntCounter::new("grasp_sync_negentropy_ids_requested_total", "Event ids fetched after negentropy reconciliation")
                .expect("static metric"),
            bytes_received: IntCounterVec::new(
                Opts::new("grasp_sync_bytes_received_total", "Bytes of relay messages received, by method"),
                &["method"],
            )
            .expect("static metric"),
            closed_subscriptions: IntCounterVec::new(
                Opts::new("grasp_sync_closed_subscriptions_total", "Subscriptions closed by remote relays, by reason"),
                &["reason"],
            )
            .expect("static metric"),
            malformed_messages: IntCounter::new("grasp_sync_malformed_messages_total", "Relay messages that could not be parsed")
                .expect("static metric"),
            publish_latency_seconds: Histogram::with_opts(
                HistogramOpts::new("grasp_sync_publish_latency_seconds", "Time from EVENT sent to OK received from the local relay")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            )
            .expect("static metric"),
            publish_rate_limit: Gauge::new("grasp_sync_publish_rate", "Adaptive publish pace per connection (events/s) after the local relay pushed back")
                .expect("static metric"),
            discovery_repos: IntGauge::new("grasp_sync_discovery_repos", "Repositories in the discovery index")
                .expect("static metric"),
            discovery_objects: IntGauge::new("grasp_sync_discovery_objects", "RelaySync objects discovery wants")
                .expect("static metric"),
            discovery_actions: IntCounterVec::new(
                Opts::new("grasp_sync_discovery_actions_total", "Store writes by discovery"),
                &["action"],
            )
            .expect("static metric"),
            info: IntGaugeVec::new(
                Opts::new("grasp_sync_info", "This process's role and version (always 1)"),
                &["role", "version"],
            )
            .expect("static metric"),
            relays_by_phase: IntGaugeVec::new(
                Opts::new("grasp_sync_relays", "Relays this worker holds, by phase"),
                &["phase"],
            )
            .expect("static metric"),
            status_writes: IntCounterVec::new(
                Opts::new("grasp_sync_status_writes_total", "RelaySync status writes by result"),
                &["result"],
            )
            .expect("static metric"),
            phase_events: IntCounterVec::new(
                Opts::new("grasp_sync_phase_events_total", "Kubernetes Events published on phase transitions, by result"),
                &["result"],
            )
            .expect("static metric"),
            lease_held: IntGauge::new("grasp_sync_worker_lease_held", "1 while this worker holds its Lease")
                .expect("static metric"),
            leader: IntGauge::new("grasp_sync_controller_leader", "1 while this controller replica is the leader")
                .expect("static metric"),
            workers_live: IntGauge::new("grasp_sync_workers_live", "Workers whose Lease is fresh")
                .expect("static metric"),
            relays_unassigned: IntGauge::new("grasp_sync_relays_unassigned", "RelaySyncs with no live worker")
                .expect("static metric"),
            relays_draining: IntGauge::new("grasp_sync_relays_draining", "RelaySyncs moving between two live workers")
                .expect("static metric"),
            assignment_moves: IntCounterVec::new(
                Opts::new("grasp_sync_assignment_moves_total", "Assignment steps applied, by kind"),
                &["kind"],
            )
            .expect("static metric"),
            discovery_rejected_targets: IntCounterVec::new(
                Opts::new("grasp_sync_discovery_rejected_targets_total", "Relay URLs from announcements not used, by reason"),
                &["reason"],
            )
            .expect("static metric"),
            registry,
        };
        m.register_all();
        m
    }

    fn register_all(&self) {
        let r = &self.registry;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.relay_connected.clone()),
            Box::new(self.connection_attempts.clone()),
            Box::new(self.events.clone()),
            Box::new(self.relays_tracked.clone()),
            Box::new(self.relays_connected.clone()),
            Box::new(self.events_rejected.clone()),
            Box::new(self.publish_outcomes.clone()),
            Box::new(self.publish_retries.clone()),
            Box::new(self.publish_queue_depth.clone()),
            Box::new(self.publish_in_flight.clone()),
            Box::new(self.historic_batches.clone()),
            Box::new(self.historic_batch_seconds.clone()),
            Box::new(self.subscriptions.clone()),
            Box::new(self.historic_method.clone()),
            Box::new(self.negentropy_ids_requested.clone()),
            Box::new(self.bytes_received.clone()),
            Box::new(self.closed_subscriptions.clone()),
            Box::new(self.malformed_messages.clone()),
            Box::new(self.publish_latency_seconds.clone()),
            Box::new(self.publish_rate_limit.clone()),
            Box::new(self.discovery_repos.clone()),
            Box::new(self.discovery_objects.clone()),
            Box::new(self.discovery_actions.clone()),
            Box::new(self.discovery_rejected_targets.clone()),
            Box::new(self.info.clone()),
            Box::new(self.relays_by_phase.clone()),
            Box::new(self.status_writes.clone()),
            Box::new(self.phase_events.clone()),
            Box::new(self.lease_held.clone()),
            Box::new(self.leader.clone()),
            Box::new(self.workers_live.clone()),
            Box::new(self.relays_unassigned.clone()),
            Box::new(self.relays_draining.clone()),
            Box::new(self.assignment_moves.clone()),
        ];
        for c in collectors {
            r.register(c).expect("metric names are unique");
        }
        self.init_label_values();
    }

    /// Series for every known value of the bounded labels exist from the start (at 0), so
    /// dashboards and `rate()` see them before the first occurrence.
    fn init_label_values(&self) {
        let sets: [(&IntCounterVec, &[&str]); 8] = [
            (
                &self.events_rejected,
                &["invalid_id", "invalid_signature", "oversize"],
            ),
            (&self.status_writes, &["ok", "error"]),
            (&self.phase_events, &["ok", "error"]),
            (
                &self.assignment_moves,
                &[
                    "assign",
                    "drain",
                    "cancel",
                    "reassign_drained",
                    "reassign_dead",
                ],
            ),
            (
                &self.publish_outcomes,
                &[
                    "accepted",
                    "duplicate",
                    "blocked",
                    "invalid",
                    "rate-limited",
                    "auth-required",
                    "restricted",
                    "pow",
                    "mute",
                    "unsupported",
                    "error",
                    "other",
                    "gave_up",
                ],
            ),
            (
                &self.historic_batches,
                &["confirmed", "recovered", "timeout", "reconciliation"],
            ),
            (&self.events, &["startup", "reconnect", "daily", "live"]),
            (&self.discovery_actions, &["apply", "delete"]),
        ];
        for (vec, values) in sets {
            for v in values {
                vec.with_label_values(&[*v]);
            }
        }
        for phase in PHASES {
            self.relays_by_phase.with_label_values(&[phase.as_str()]);
        }
    }

    /// Declare the role of this process (`grasp_sync_info`).
    pub fn set_role(&self, role: &str) {
        self.info
            .with_label_values(&[role, env!("CARGO_PKG_VERSION")])
            .set(1);
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_metric_names_are_exported() {
        let m = Metrics::new();
        m.events.with_label_values(&["live"]).inc();
        m.relay_connected
            .with_label_values(&["wss://r.example"])
            .set(3);
        m.connection_attempts
            .with_label_values(&["wss://r.example", "success"])
            .inc();
        let text = m.render();
        for name in [
            "ngit_sync_relay_connected",
            "ngit_sync_connection_attempts_total",
            "ngit_sync_events_total",
            "ngit_sync_relays_tracked_total",
            "ngit_sync_relays_connected_total",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
