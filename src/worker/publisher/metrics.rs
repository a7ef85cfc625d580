//! Metrics of the publisher: the local relay's answers, retries, queue and pace.

use prometheus::{Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::observability::metrics::{
    gauge, histogram, init_values, int_counter, int_counter_vec, int_gauge,
};

#[derive(Clone)]
pub struct PublisherMetrics {
    /// Local relay answers, by outcome (accepted, duplicate, blocked, rate-limited, …).
    pub publish_outcomes: IntCounterVec,
    pub publish_retries: IntCounter,
    pub publish_queue_depth: IntGauge,
    pub publish_in_flight: IntGauge,
    pub publish_latency_seconds: Histogram,
    /// The adaptive publish pace (events/s per connection) once the local relay pushed back.
    pub publish_rate_limit: Gauge,
    /// Connections open to the local relay (more while it limits each one).
    pub publisher_connections: IntGauge,
    /// Events remembered as held by the local relay (later copies answered without a send).
    pub publish_settled: IntGauge,
    /// Policy refusals remembered (later copies answered without a send).
    pub publish_refused_remembered: IntGauge,
    /// Events the local relay holds in purgatory, remembered (later copies not sent).
    pub publish_purgatory: IntGauge,
    /// Relay messages that could not be parsed (shared with the sessions: one series).
    pub malformed_messages: IntCounter,
}

/// Every outcome label value the publisher counts.
pub const OUTCOMES: [&str; 17] = [
    "accepted",
    "duplicate",
    // A copy of an event the relay had just said it holds, answered without a send.
    "already-held",
    // A copy of an event the relay refused on policy grounds, answered without a send.
    "refused-before",
    // A copy of an event the relay holds in purgatory (a GRASP relay waiting for git
    // data), answered without a send.
    "in-purgatory",
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
    "quarantined",
];

impl PublisherMetrics {
    /// Create every metric and register it into `registry`.
    pub fn register(
        registry: &Registry,
        malformed_messages: IntCounter,
    ) -> prometheus::Result<Self> {
        let m = PublisherMetrics {
            publish_outcomes: int_counter_vec(
                registry,
                "grasp_sync_publish_outcomes_total",
                "Local relay answers to published events, by outcome",
                &["outcome"],
            )?,
            publish_retries: int_counter(
                registry,
                "grasp_sync_publish_retries_total",
                "Events sent to the local relay again after a transient refusal or a lost connection",
            )?,
            publish_queue_depth: int_gauge(
                registry,
                "grasp_sync_publish_queue_depth",
                "Events waiting to be published (retry queue)",
            )?,
            publish_in_flight: int_gauge(
                registry,
                "grasp_sync_publish_in_flight",
                "Events sent to the local relay and awaiting OK",
            )?,
            publish_latency_seconds: histogram(
                registry,
                "grasp_sync_publish_latency_seconds",
                "Time from EVENT sent to OK received from the local relay",
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            )?,
            publish_rate_limit: gauge(
                registry,
                "grasp_sync_publish_rate",
                "Adaptive publish pace per connection (events/s) after the local relay pushed back",
            )?,
            publisher_connections: int_gauge(
                registry,
                "grasp_sync_publisher_connections",
                "Connections publishing into the local relay (more are opened while it rate-limits each connection and events wait)",
            )?,
            publish_settled: int_gauge(
                registry,
                "grasp_sync_publish_settled_events",
                "Events the local relay just said it holds, remembered so later copies from other relays are answered without a send (bounded, 10 min)",
            )?,
            publish_refused_remembered: int_gauge(
                registry,
                "grasp_sync_publish_refused_remembered_events",
                "Events the local relay refused on policy grounds, remembered so later copies are answered without a send (bounded by --refusal-memory, up to about 1 KB each with their references; forgotten when the relay is seen holding what one waits for, on a new connection, or after --refusal-memory-ttl)",
            )?,
            publish_purgatory: int_gauge(
                registry,
                "grasp_sync_publish_purgatory_events",
                "Events the local relay accepted into purgatory (a GRASP relay holding them until git data arrives), remembered so later copies are not sent (bounded; for --purgatory-ttl, forgotten on a new connection)",
            )?,
            malformed_messages,
        };
        init_values(&m.publish_outcomes, &OUTCOMES);
        Ok(m)
    }
}

/// Metrics in a registry of their own (tests, benchmarks).
impl Default for PublisherMetrics {
    fn default() -> Self {
        crate::worker::WorkerMetrics::default().publisher
    }
}
