//! Metrics of discovery: the index, the objects it wants, its writes and the relay targets
//! it refused.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::observability::metrics::{
    init_values, int_counter, int_counter_vec, int_gauge, int_gauge_vec,
};

#[derive(Clone)]
pub struct DiscoveryMetrics {
    /// Repositories in the discovery index.
    pub discovery_repos: IntGauge,
    /// RelaySync objects discovery wants.
    pub discovery_objects: IntGauge,
    /// Store writes by discovery, by action (apply | delete).
    pub discovery_actions: IntCounterVec,
    /// Store writes by discovery that failed, by action (retried on the next pass).
    pub discovery_write_errors: IntCounterVec,
    /// Relay URLs from announcements not used, by reason.
    pub discovery_rejected_targets: IntCounterVec,
    /// Relays named by announcements but left out by a cap, by cap (per_host | total).
    pub discovery_capped_relays: IntGaugeVec,
    /// Subscriptions of discovery's local feed the local relay refused, by reason
    /// (subscription-cap | other); each is sent again later, and discovery waits for them.
    pub discovery_feed_refusals: IntCounterVec,
    /// Announcements and deletions that changed the index when discovery's feed read the
    /// local relay again: its live stream had not delivered them.
    pub discovery_reread_found: IntCounter,
}

impl DiscoveryMetrics {
    /// Create every metric and register it into `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = DiscoveryMetrics {
            discovery_repos: int_gauge(
                registry,
                "grasp_sync_discovery_repos",
                "Repositories in the discovery index",
            )?,
            discovery_objects: int_gauge(
                registry,
                "grasp_sync_discovery_objects",
                "RelaySync objects discovery wants",
            )?,
            discovery_actions: int_counter_vec(
                registry,
                "grasp_sync_discovery_actions_total",
                "Store writes by discovery",
                &["action"],
            )?,
            discovery_write_errors: int_counter_vec(
                registry,
                "grasp_sync_discovery_write_errors_total",
                "Store writes by discovery that failed (retried on the next pass)",
                &["action"],
            )?,
            discovery_rejected_targets: int_counter_vec(
                registry,
                "grasp_sync_discovery_rejected_targets_total",
                "Relay URLs from announcements not used, by reason",
                &["reason"],
            )?,
            discovery_capped_relays: int_gauge_vec(
                registry,
                "grasp_sync_discovery_capped_relays",
                "Relays named by announcements but left out by a cap",
                &["cap"],
            )?,
            discovery_feed_refusals: int_counter_vec(
                registry,
                "grasp_sync_discovery_feed_refusals_total",
                "Subscriptions of discovery's local feed the local relay refused (each sent again later)",
                &["reason"],
            )?,
            discovery_reread_found: int_counter(
                registry,
                "grasp_sync_discovery_reread_found_total",
                "Announcements and deletions that changed discovery's index only when its feed read the local relay again: the live stream had not delivered them",
            )?,
        };
        init_values(&m.discovery_feed_refusals, &["subscription-cap", "other"]);
        init_values(&m.discovery_actions, &["apply", "delete"]);
        init_values(&m.discovery_write_errors, &["apply", "delete"]);
        for why in super::caps::LeftOut::ALL {
            m.discovery_capped_relays
                .with_label_values(&[why.label()])
                .set(0);
        }
        Ok(m)
    }
}

/// Metrics in a registry of their own (tests, benchmarks).
impl Default for DiscoveryMetrics {
    fn default() -> Self {
        Self::register(&Registry::new()).expect("a fresh registry takes every static metric")
    }
}
