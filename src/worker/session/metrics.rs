//! Metrics of the relay sessions. Labels are bounded: relay URLs only where the seed design
//! has them (one series per tracked relay), reasons from fixed enums.

use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use crate::observability::metrics::{
    histogram_vec, init_values, int_counter, int_counter_vec, int_gauge, int_gauge_vec,
};

#[derive(Clone)]
pub struct SessionMetrics {
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
    pub historic_batches: IntCounterVec,
    pub historic_batch_seconds: HistogramVec,
    pub subscriptions: IntGauge,
    pub historic_method: IntCounterVec,
    pub negentropy_ids_requested: IntCounter,
    pub bytes_received: IntCounterVec,
    pub closed_subscriptions: IntCounterVec,
    /// Bytes of live REQs sent (a set change re-sends only the REQs it changed).
    pub live_req_bytes: IntCounter,
    /// Re-plans that replaced or closed live REQs, by how: `overlapped` (the new REQs went
    /// out under new ids and the old stayed open until they were in place) or `in_place`
    /// (no room under the relay's cap for both; what could have moved is backfilled).
    pub live_replans: IntCounterVec,
    /// Relay messages that could not be parsed (shared with the publisher: one series).
    pub malformed_messages: IntCounter,
    /// Events a whole-range REQ page brought that the local relay already held (its set was
    /// read first): not handed to the publisher.
    pub events_already_held: IntCounter,
    /// Copies of an event whose signature was checked already (on a copy from another relay,
    /// or an earlier read): only their size and id were checked.
    pub signatures_known: IntCounter,
}

impl SessionMetrics {
    /// Create every metric and register it into `registry`.
    pub fn register(
        registry: &Registry,
        malformed_messages: IntCounter,
    ) -> prometheus::Result<Self> {
        let m = SessionMetrics {
            relay_connected: int_gauge_vec(
                registry,
                "ngit_sync_relay_connected",
                "Connection status per relay (0 disconnected, 1 connecting, 2 syncing, 3 live, 4 live with gaps, 5 backoff)",
                &["relay"],
            )?,
            connection_attempts: int_counter_vec(
                registry,
                "ngit_sync_connection_attempts_total",
                "Connection attempts by result",
                &["relay", "result"],
            )?,
            events: int_counter_vec(
                registry,
                "ngit_sync_events_total",
                "Events received from remote relays, by phase",
                &["source"],
            )?,
            relays_tracked: int_gauge(
                registry,
                "ngit_sync_relays_tracked_total",
                "Relays with a session",
            )?,
            relays_connected: int_gauge(
                registry,
                "ngit_sync_relays_connected_total",
                "Relays currently connected",
            )?,
            events_rejected: int_counter_vec(
                registry,
                "grasp_sync_events_rejected_total",
                "Events from remotes dropped before publishing, by reason",
                &["reason"],
            )?,
            historic_batches: int_counter_vec(
                registry,
                "grasp_sync_historic_batches_total",
                "Historic batches by outcome",
                &["outcome"],
            )?,
            historic_batch_seconds: histogram_vec(
                registry,
                "grasp_sync_historic_batch_duration_seconds",
                "Historic batch duration",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
                &["method"],
            )?,
            subscriptions: int_gauge(
                registry,
                "grasp_sync_subscriptions",
                "Open subscriptions on remote relays",
            )?,
            historic_method: int_counter_vec(
                registry,
                "grasp_sync_historic_method_total",
                "Historic batches by method (negentropy | req)",
                &["method"],
            )?,
            negentropy_ids_requested: int_counter(
                registry,
                "grasp_sync_negentropy_ids_requested_total",
                "Event ids fetched after negentropy reconciliation",
            )?,
            bytes_received: int_counter_vec(
                registry,
                "grasp_sync_bytes_received_total",
                "Bytes of relay messages received, by method",
                &["method"],
            )?,
            closed_subscriptions: int_counter_vec(
                registry,
                "grasp_sync_closed_subscriptions_total",
                "Subscriptions closed by remote relays, by reason",
                &["reason"],
            )?,
            live_replans: int_counter_vec(
                registry,
                "grasp_sync_live_replans_total",
                "Re-plans that replaced live subscriptions, by how (overlapped: the old stayed open until the new were in place; in_place: no room under the relay's cap, what could have moved is backfilled)",
                &["how"],
            )?,
            live_req_bytes: int_counter(
                registry,
                "grasp_sync_live_req_bytes_total",
                "Bytes of live subscription REQs sent to remote relays",
            )?,
            malformed_messages,
            events_already_held: int_counter(
                registry,
                "grasp_sync_events_already_held_total",
                "Events read by whole-range REQ pagination that the local relay already held (not handed to the publisher)",
            )?,
            signatures_known: int_counter(
                registry,
                "grasp_sync_signature_checks_skipped_total",
                "Events from remotes whose identical copy passed the signature check before (only size and id were checked)",
            )?,
        };
        init_values(
            &m.events_rejected,
            &["invalid_id", "invalid_signature", "oversize"],
        );
        init_values(
            &m.historic_batches,
            &["confirmed", "recovered", "timeout", "reconciliation"],
        );
        init_values(&m.events, &["startup", "reconnect", "daily", "live"]);
        Ok(m)
    }

    /// Remove a relay's series once its session has ended: relays come and go with
    /// announcements (untrusted), and a series kept for every relay ever seen would grow
    /// without bound.
    pub fn forget_relay(&self, relay: &str) {
        let _ = self.relay_connected.remove_label_values(&[relay]);
        for result in CONNECTION_RESULTS {
            let _ = self
                .connection_attempts
                .remove_label_values(&[relay, result]);
        }
    }
}

/// Every `result` of `ngit_sync_connection_attempts_total`.
pub const CONNECTION_RESULTS: [&str; 3] = ["success", "failure", "refused"];

/// Metrics in a registry of their own (tests, benchmarks).
impl Default for SessionMetrics {
    fn default() -> Self {
        crate::worker::WorkerMetrics::default().session
    }
}
