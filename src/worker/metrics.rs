//! A worker's metrics: the sessions', the publisher's and the supervisor's, registered
//! together (they share the malformed-message counter).

use prometheus::{IntCounter, Registry};

use super::publisher::metrics::PublisherMetrics;
use super::session::metrics::SessionMetrics;
use super::supervisor::metrics::SupervisorMetrics;
use crate::observability::metrics::int_counter;

/// `grasp_sync_malformed_messages_total`, counted by sessions and the publisher alike.
fn malformed_messages(registry: &Registry) -> prometheus::Result<IntCounter> {
    int_counter(
        registry,
        "grasp_sync_malformed_messages_total",
        "Relay messages that could not be parsed",
    )
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub session: SessionMetrics,
    pub publisher: PublisherMetrics,
    pub supervisor: SupervisorMetrics,
}

impl WorkerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let malformed = malformed_messages(registry)?;
        Ok(WorkerMetrics {
            session: SessionMetrics::register(registry, malformed.clone())?,
            publisher: PublisherMetrics::register(registry, malformed)?,
            supervisor: SupervisorMetrics::register(registry)?,
        })
    }
}

/// Metrics in a registry of their own (tests, benchmarks).
impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every worker metric")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observability::metrics::render;

    #[test]
    fn seed_metric_names_are_exported() {
        let registry = Registry::new();
        let m = WorkerMetrics::register(&registry).expect("unique names");
        m.session.events.with_label_values(&["live"]).inc();
        m.session
            .relay_connected
            .with_label_values(&["wss://r.example"])
            .set(3);
        m.session
            .connection_attempts
            .with_label_values(&["wss://r.example", "success"])
            .inc();
        let text = render(&registry);
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
