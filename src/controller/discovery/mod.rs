//! Discovery: the local relay's accepted announcements (and their deletions) → the repo
//! index → the RelaySync objects in the store.
//!
//! Objects are only ever removed once the local relay's stored announcements have all been
//! read (a half-loaded index must not delete anything), and then only after the grace period.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use nostr::{Filter, Kind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub mod caps;
pub mod desired;
pub mod index;
pub mod metrics;
pub mod targets;

#[cfg(test)]
mod tests;

use crate::nostr::RelayUrl;
use crate::nostr::kinds::REPO_ANNOUNCEMENT;
use crate::nostr::nip34::Announcement;
use crate::relay::address_policy::AddressPolicy;
use crate::relay::backoff::HealthConfig;
use crate::relay::connection::ConnectOptions;
use crate::relay::feed::{self, FeedEvent};
use crate::store::{RelaySyncStore, StoreError};
use caps::{LeftOut, RelayCaps, cap_relays};
use desired::{Action, Planner, desired_objects};
use index::{Change, RepoIndex};
use metrics::DiscoveryMetrics;
use targets::TargetPolicy;

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub local_relay: RelayUrl,
    pub policy: TargetPolicy,
    pub bootstrap: BTreeSet<RelayUrl>,
    pub repos_per_object: usize,
    /// How long a repo or relay must stay unwanted before it is removed.
    pub grace: Duration,
    /// Changes arriving within this window are written together.
    pub debounce: Duration,
    pub health: HealthConfig,
    /// Connection settings for reading the local relay (liveness: ping interval and pong
    /// deadline).
    pub connect: ConnectOptions,
    /// Relays per host and in total (relays per announcement: `policy.max_relays`).
    pub caps: RelayCaps,
    /// How often the loaded feed reads the local relay's announcements and deletions again
    /// (`None`: never): an announcement its live stream dropped is found within this.
    pub reread_every: Option<Duration>,
}

impl DiscoveryConfig {
    pub fn new(local_relay: RelayUrl, policy: TargetPolicy) -> Self {
        DiscoveryConfig {
            local_relay,
            policy,
            bootstrap: BTreeSet::new(),
            repos_per_object: desired::DEFAULT_REPOS_PER_OBJECT,
            grace: Duration::from_secs(15 * 60),
            debounce: Duration::from_millis(200),
            // Our own relay: reconnect soon, and not much later however often it failed.
            health: HealthConfig {
                base_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(30),
                ..HealthConfig::default()
            },
            connect: ConnectOptions::default(),
            caps: RelayCaps::default(),
            reread_every: Some(feed::DEFAULT_REREAD_EVERY),
        }
    }

    /// Discovery for a relay serving `service_domain`, with the operator's address policy,
    /// bootstrap relays, grace period and caps.
    pub fn for_service(
        local_relay: RelayUrl,
        service_domain: &str,
        addresses: AddressPolicy,
        bootstrap: &[RelayUrl],
        grace: Duration,
        limits: DiscoveryLimits,
    ) -> Self {
        let policy = TargetPolicy {
            service_domain: service_domain.to_string(),
            addresses,
            max_relays: limits.per_announcement,
        };
        DiscoveryConfig {
            bootstrap: bootstrap.iter().cloned().collect(),
            grace,
            caps: limits.caps,
            ..DiscoveryConfig::new(local_relay, policy)
        }
    }
}

/// Every bound on what announcements make us sync, as the operator sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryLimits {
    /// Relays taken from one announcement.
    pub per_announcement: usize,
    pub caps: RelayCaps,
}

impl Default for DiscoveryLimits {
    fn default() -> Self {
        DiscoveryLimits {
            per_announcement: caps::DEFAULT_PER_ANNOUNCEMENT,
            caps: RelayCaps::default(),
        }
    }
}

/// Run discovery until `shutdown` turns true.
pub async fn run<S: RelaySyncStore + 'static>(
    config: DiscoveryConfig,
    store: Arc<S>,
    metrics: DiscoveryMetrics,
    shutdown: watch::Receiver<bool>,
) {
    let filters = vec![
        Filter::new().kind(REPO_ANNOUNCEMENT),
        Filter::new().kind(Kind::EventDeletion),
    ];
    let (_feed, events) = feed::spawn_with(
        config.local_relay.clone(),
        filters,
        config.health.clone(),
        config.connect.clone(),
        feed::FeedLimits {
            reread_every: config.reread_every,
            ..feed::FeedLimits::default()
        },
    );
    discover(config, events, store, metrics, shutdown).await
}

/// Apply an announcement or deletion the local relay holds to `index`: whether it changed.
fn learn(
    index: &mut RepoIndex,
    event: &nostr::Event,
    config: &DiscoveryConfig,
    metrics: &DiscoveryMetrics,
) -> bool {
    if event.kind == Kind::EventDeletion {
        return !index.apply_deletion(event).is_empty();
    }
    let Ok(a) = Announcement::from_event(event) else {
        return false;
    };
    let coordinate = a.coordinate.clone();
    let rejected = config.policy.targets(&a).rejected;
    if index.apply_announcement(a, &config.policy) == Change::Stale {
        return false;
    }
    // Counted once per version taken, not per copy read (a re-read reads them all again).
    for (value, why) in rejected {
        metrics
            .discovery_rejected_targets
            .with_label_values(&[why.label()])
            .inc();
        tracing::debug!(repo = %coordinate, relay = %value, reason = %why, "relay target not used");
    }
    true
}

/// The discovery loop over a feed of the local relay's announcements and deletions.
pub(crate) async fn discover<S: RelaySyncStore + 'static>(
    config: DiscoveryConfig,
    mut events: mpsc::Receiver<FeedEvent>,
    store: Arc<S>,
    metrics: DiscoveryMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut index = RepoIndex::default();
    let mut planner = Planner::new(config.grace);
    let mut left_out = BTreeMap::new();
    let mut loaded = false;
    let mut dirty = true;
    let mut tick = tokio::time::interval(config.debounce.max(Duration::from_millis(10)));
    // Pending removals need a pass when their grace runs out, events or not.
    let mut last_pass = Instant::now();
    let sweep = (config.grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(FeedEvent::Event(event)) => {
                    if learn(&mut index, &event, &config, &metrics) {
                        dirty = true;
                    }
                }
                Some(FeedEvent::Reread(event)) => {
                    if learn(&mut index, &event, &config, &metrics) {
                        metrics.discovery_reread_found.inc();
                        dirty = true;
                    }
                }
                Some(FeedEvent::Synced) => {
                    if !loaded {
                        tracing::info!(repos = index.len(), "discovery loaded the local relay's announcements");
                    }
                    loaded = true;
                    dirty = true;
                }
                Some(FeedEvent::Refused { cap, .. }) => {
                    metrics
                        .discovery_feed_refusals
                        .with_label_values(&[if cap.is_some() { "subscription-cap" } else { "other" }])
                        .inc();
                }
                Some(FeedEvent::Loading) => {}
                Some(FeedEvent::Disconnected { error, retry_in }) => {
                    tracing::warn!(relay = %config.local_relay, %error, ?retry_in, "cannot read the local relay; retrying");
                }
                None => return,
            },
            _ = tick.tick() => {
                if loaded && (dirty || last_pass.elapsed() >= sweep) {
                    match reconcile(&config, &index, &mut planner, &mut left_out, store.as_ref(), &metrics).await {
                        Ok(()) => dirty = false,
                        Err(e) => tracing::warn!(error = %e, "discovery could not update the store; will retry"),
                    }
                    last_pass = Instant::now();
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

async fn reconcile<S: RelaySyncStore>(
    config: &DiscoveryConfig,
    index: &RepoIndex,
    planner: &mut Planner,
    left_out: &mut BTreeMap<LeftOut, usize>,
    store: &S,
    metrics: &DiscoveryMetrics,
) -> Result<(), StoreError> {
    let capped = cap_relays(&index.relay_map(), &config.bootstrap, config.caps);
    report_caps(config.caps, &capped, left_out, metrics);
    let desired = desired_objects(&capped.relays, &config.bootstrap, config.repos_per_object);
    metrics.discovery_repos.set(index.len() as i64);
    metrics.discovery_objects.set(desired.len() as i64);
    // The store's watch cache, not a fresh list: a pass must not fetch (nor copy) every
    // object (a lagging cache at worst re-applies an unchanged spec, which changes nothing).
    let existing: BTreeMap<String, _> = store.specs().await?.into_iter().collect();
    // Each object on its own: one that the API server refuses (or a write that fails) is
    // counted and retried on the next pass; it never holds up the others.
    let mut first_error = None;
    for action in planner.plan(&desired, &existing, Instant::now().into_std()) {
        let (verb, name, result) = match action {
            Action::Apply { name, spec } => {
                tracing::info!(object = %name, url = %spec.url, repos = spec.repos.len(), "apply RelaySync");
                let r = store.apply_spec(&name, &spec).await.map(|_| ());
                ("apply", name, r)
            }
            Action::Delete { name } => {
                tracing::info!(object = %name, "delete RelaySync");
                let r = store.delete(&name).await;
                ("delete", name, r)
            }
        };
        match result {
            Ok(()) => metrics.discovery_actions.with_label_values(&[verb]).inc(),
            Err(e) => {
                tracing::warn!(object = %name, action = verb, error = %e, "discovery could not write an object; retrying on the next pass");
                metrics
                    .discovery_write_errors
                    .with_label_values(&[verb])
                    .inc();
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Metrics for the relays the caps leave out, and a warning whenever their number changes
/// (not on every pass: the operator needs to see the change, not a stream).
fn report_caps(
    caps: RelayCaps,
    capped: &caps::Capped,
    last: &mut BTreeMap<LeftOut, usize>,
    metrics: &DiscoveryMetrics,
) {
    for why in LeftOut::ALL {
        let n = capped.count(why);
        metrics
            .discovery_capped_relays
            .with_label_values(&[why.label()])
            .set(n as i64);
        if last.insert(why, n).unwrap_or(0) == n {
            continue;
        }
        if n == 0 {
            tracing::info!(
                reason = why.label(),
                "no relay is left out by this cap any more"
            );
            continue;
        }
        let examples: Vec<&str> = capped
            .left_out
            .iter()
            .filter(|(_, w)| **w == why)
            .map(|(u, _)| u.as_str())
            .take(5)
            .collect();
        tracing::warn!(
            reason = why.label(),
            left_out = n,
            per_host = caps.per_host,
            total = caps.total,
            ?examples,
            "relays left out by a discovery cap (raise --max-relays-per-host / --max-relays to sync them)"
        );
    }
}
