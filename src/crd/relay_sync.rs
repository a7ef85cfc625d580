//! The RelaySync custom resource: one object per remote relay (or per slice of a relay's
//! repos, when one relay carries more repos than fit in one object).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::nostr::coordinate::{COORDINATE_PATTERN, MAX_COORDINATE_CHARS};
use crate::nostr::relay_url::MAX_RELAY_URL_LEN;

/// The API server's check on `spec.url`; the controller only ever writes URLs that
/// [`crate::nostr::RelayUrl`] normalised, which always match.
pub const URL_PATTERN: &str = r"^wss?://[^\s/?#@]+(/[^\s?#]*)?$";

/// Most repos one object may carry. At ~330 bytes a coordinate this keeps an object near
/// 1 MiB, under etcd's 1.5 MiB limit; the controller splits well before this.
pub const MAX_REPOS_PER_OBJECT: usize = 3000;

/// What grasp-sync syncs from one remote relay.
#[derive(
    CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema,
)]
#[kube(
    group = "grasp-sync.dev",
    version = "v1alpha1",
    kind = "RelaySync",
    plural = "relaysyncs",
    singular = "relaysync",
    shortname = "rsync",
    category = "grasp-sync",
    namespaced,
    status = "RelaySyncStatus",
    derive = "PartialEq",
    doc = "A remote nostr relay that grasp-sync pulls NIP-34 events from into the local GRASP relay.",
    // Raw JSON rather than `printcolumn(type_ = …)`: repeated `type_` keys trip clippy's
    // duplicated-attributes lint inside the derive.
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Worker","type":"string","jsonPath":".status.worker"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Repos","type":"integer","jsonPath":".status.repos","description":"Repos in the spec generation the worker last observed"}"#,
    printcolumn = r#"{"name":"Confirmed","type":"integer","jsonPath":".status.confirmedRepos","description":"Repos whose historic sync is confirmed"}"#,
    printcolumn = r#"{"name":"Last-Connected","type":"date","jsonPath":".status.lastConnected"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RelaySyncSpec {
    /// Normalised relay URL: ws[s]://host[:port][/path], lower-case host, no default port,
    /// no trailing slash, no credentials, query or fragment.
    #[schemars(length(min = 6, max = MAX_RELAY_URL_LEN), pattern(URL_PATTERN))]
    pub url: String,

    /// A configured bootstrap relay: always kept, never garbage-collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<bool>,

    /// Repository coordinates (30617:<owner pubkey hex>:<identifier>) to sync from this
    /// relay, sorted and deduplicated.
    #[serde(default)]
    #[schemars(
        length(max = MAX_REPOS_PER_OBJECT),
        inner(length(min = 72, max = MAX_COORDINATE_CHARS), pattern(COORDINATE_PATTERN))
    )]
    pub repos: Vec<String>,

    /// Operator switch: stop syncing this relay without deleting the object. Never written
    /// by grasp-sync, so server-side apply leaves it to the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// Lifecycle of a relay session as the assigned worker sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Phase {
    /// Not yet picked up by a worker.
    #[default]
    Pending,
    Connecting,
    /// Connected; historic batches still running.
    Syncing,
    /// Connected; every historic batch confirmed, live subscriptions running.
    Live,
    /// Connected and live, but some historic batches failed and await retry.
    LiveWithGaps,
    /// Disconnected; waiting `nextRetryAt` before reconnecting.
    Backoff,
    /// The relay asked us to slow down; cooling down before resuming.
    RateLimited,
    /// Failing for a long time; retried rarely.
    Dead,
    /// `spec.paused` is set.
    Paused,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Connecting => "Connecting",
            Phase::Syncing => "Syncing",
            Phase::Live => "Live",
            Phase::LiveWithGaps => "LiveWithGaps",
            Phase::Backoff => "Backoff",
            Phase::RateLimited => "RateLimited",
            Phase::Dead => "Dead",
            Phase::Paused => "Paused",
        }
    }
}

/// What the relay said about itself (NIP-11) and what we observed at connect.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayCapabilities {
    /// NIP-77 negentropy is used for historic sync.
    #[serde(default)]
    pub negentropy: bool,
    /// NIP-11 `supported_nips`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub supported_nips: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_filters: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_required: Option<bool>,
}

/// Observed state, written only by the assigned worker (field manager `grasp-sync-worker`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySyncStatus {
    /// The worker that wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub worker: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_connected: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_disconnected: Option<Time>,
    /// When the last full reconciliation of every repo and root on this relay (or the
    /// initial full sync) completed. The next is due about one reconciliation period later,
    /// however often the connection or the worker restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconciled: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
    /// Number of repos in the observed spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repos: Option<u32>,
    /// The spec generation whose historic batches have all been confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_generation: Option<i64>,
    /// How many of `spec.repos` have confirmed historic sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_repos: Option<u32>,
    /// Unix time up to which everything matching this object's filters is known synced;
    /// a new session resumes from `cursor - slack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cursor: Option<i64>,
    /// Which root events (issues, patches, PRs) had their history confirmed when this status
    /// was written, as 64 bucket digests (hex). A session resuming from `cursor` fetches in
    /// full every root not vouched for here — roots accepted shortly before a crash or a
    /// move included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub confirmed_roots_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<RelayCapabilities>,
    /// Open subscriptions on the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<u32>,
    /// Events handed to the local relay and accepted (coarse; exact counts are in metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_published: Option<u64>,
    /// Events refused by validation or by the local relay (coarse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_rejected: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
    )]
    pub conditions: Vec<Condition>,
}

/// A standard Kubernetes condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Assigned`, `Connected`, `HistoricSynced` or `Ready`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    pub status: ConditionStatus,
    /// CamelCase machine-readable reason.
    #[schemars(length(min = 1, max = 1024))]
    pub reason: String,
    /// Human-readable details; omitted when empty. (Not `required` as in metav1.Condition:
    /// older API servers turn an applied `""` into null and then reject it.)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 32768))]
    pub message: String,
    pub last_transition_time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}
