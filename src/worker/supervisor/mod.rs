//! A worker's main loop: the RelaySync objects it holds (from the store) become relay
//! sessions, one per relay URL (split objects share it); the local relay tells it each
//! repo's maintainers and root events (for Layer 3); session state goes back into the
//! objects' status.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use nostr::{Event, EventId, Filter, Kind, PublicKey, TagKind};
use tokio::sync::watch;

use crate::relay::backoff::HealthConfig;
use crate::relay::feed::{self, FeedEvent};
pub mod metrics;

use super::metrics::WorkerMetrics;
use super::publisher::Publisher;
use super::session::{self, SessionConfig, SessionHandle, SessionState, SyncSet};
use super::status::{Coalescer, released_status, status_from_session};
use crate::crd::RelaySyncStatus;
use crate::crd::{Phase, is_released_by};
use crate::nostr::filters::{ROOT_KINDS, RepoScope};
use crate::nostr::kinds::REPO_ANNOUNCEMENT;
use crate::nostr::nip34::Announcement;
use crate::nostr::{RelayUrl, RepoCoordinate};
use crate::relay::address_policy::AddressPolicy;
use crate::store::{RelaySyncStore, StoreError, StoredRelaySync};
use metrics::SupervisorMetrics;

/// Status writes in flight at once.
const STATUS_WRITES_IN_FLIGHT: usize = 16;

/// Most one change of a session's sync set per this interval.
const APPLY_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This worker's name, written into status.
    pub worker: String,
    pub local_relay: RelayUrl,
    pub session: SessionConfig,
    pub status_interval: Duration,
    /// Reconnect policy of the local-relay feed.
    pub feed_health: HealthConfig,
}

impl RuntimeConfig {
    /// A worker's configuration: sessions authenticate with `auth_keys` and connect only
    /// where `addresses` allows; the local-relay feed reconnects quickly (it is nearby).
    pub fn new(
        worker: impl Into<String>,
        local_relay: RelayUrl,
        mut session: SessionConfig,
        status_interval: Duration,
        addresses: AddressPolicy,
        auth_keys: Option<nostr::Keys>,
    ) -> Self {
        session.auth_keys = auth_keys;
        session.addresses = Some(addresses);
        RuntimeConfig {
            worker: worker.into(),
            local_relay,
            session,
            status_interval,
            feed_health: HealthConfig {
                base_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(30),
                ..HealthConfig::default()
            },
        }
    }
}

/// What the local relay says about the repos this worker syncs.
#[derive(Default)]
struct RepoFacts {
    /// coordinate → (announcement created_at, owner and maintainers)
    authors: HashMap<RepoCoordinate, (u64, BTreeSet<PublicKey>)>,
    roots: HashMap<RepoCoordinate, BTreeSet<EventId>>,
}

impl RepoFacts {
    /// Learn from one local event; true if anything changed.
    fn learn(&mut self, event: &Event, wanted: &BTreeSet<RepoCoordinate>) -> bool {
        if event.kind == REPO_ANNOUNCEMENT {
            let Ok(a) = Announcement::from_event(event) else {
                return false;
            };
            if !wanted.contains(&a.coordinate) {
                return false;
            }
            let entry = self.authors.entry(a.coordinate.clone()).or_default();
            if a.created_at < entry.0 {
                return false;
            }
            let authors = a.authors();
            let changed = entry.1 != authors;
            *entry = (a.created_at, authors);
            return changed;
        }
        if !ROOT_KINDS.contains(&event.kind.as_u16()) {
            return false;
        }
        let mut changed = false;
        for tag in event.tags.iter().filter(|t| t.kind() == TagKind::a()) {
            let Some(c) = tag.content().and_then(|v| RepoCoordinate::parse(v).ok()) else {
                continue;
            };
            if wanted.contains(&c) {
                changed |= self.roots.entry(c).or_default().insert(event.id);
            }
        }
        changed
    }

    fn scope(&self, c: &RepoCoordinate) -> Option<RepoScope> {
        let mut scope = RepoScope::owned(c.clone()).ok()?;
        if let Some((_, authors)) = self.authors.get(c) {
            scope.authors.extend(authors.iter().copied());
        }
        Some(scope)
    }
}

struct Running {
    handle: SessionHandle,
    state: watch::Receiver<SessionState>,
    set: SyncSet,
}

fn feed_filters(coords: &BTreeSet<RepoCoordinate>) -> Vec<Filter> {
    let list: Vec<&RepoCoordinate> = coords.iter().collect();
    let mut out = Vec::new();
    for part in list.chunks(100) {
        let owners: BTreeSet<PublicKey> = part
            .iter()
            .filter_map(|c| PublicKey::from_hex(c.pubkey()).ok())
            .collect();
        out.push(
            Filter::new()
                .kind(REPO_ANNOUNCEMENT)
                .authors(owners)
                .identifiers(part.iter().map(|c| c.identifier().to_string())),
        );
        out.push(
            Filter::new()
                .kinds(ROOT_KINDS.iter().map(|k| Kind::from(*k)))
                .custom_tags(
                    nostr::SingleLetterTag::lowercase(nostr::Alphabet::A),
                    part.iter().map(|c| c.to_string()),
                ),
        );
    }
    out
}

/// Run until `shutdown` turns true; then stop every session and write final statuses.
pub async fn run<S: RelaySyncStore + 'static>(
    config: RuntimeConfig,
    store: Arc<S>,
    publisher: Publisher,
    metrics: WorkerMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = store.changes();
    let (feed, mut local) = feed::spawn(
        config.local_relay.clone(),
        Vec::new(),
        config.feed_health.clone(),
    );
    let mut objects: BTreeMap<String, StoredRelaySync> = BTreeMap::new();
    // The repos of `objects`, kept with them: every local event is checked against it.
    let mut wanted: BTreeSet<RepoCoordinate> = BTreeSet::new();
    let mut facts = RepoFacts::default();
    let mut sessions: HashMap<RelayUrl, Running> = HashMap::new();
    let mut coalescers: HashMap<String, Coalescer> = HashMap::new();
    let mut released: BTreeSet<String> = BTreeSet::new();
    let mut feed_synced = false;
    let mut reload = true;
    let mut dirty = true;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_apply = Instant::now() - APPLY_EVERY;
    loop {
        if reload {
            reload = false;
            match store.snapshot().await {
                Ok(list) => {
                    objects = list.into_iter().map(|o| (o.name.clone(), o)).collect();
                    wanted = objects
                        .values()
                        .flat_map(|o| o.spec.repos.iter())
                        .filter_map(|r| RepoCoordinate::parse(r).ok())
                        .collect();
                    feed.set_filters(feed_filters(&wanted));
                    dirty = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing RelaySyncs failed; retrying");
                    reload = true;
                }
            }
        }
        // Root events trickle in one by one while Layer 2 syncs: apply them in batches (at
        // most once per tick), not one subscription change per event.
        // A drain is acknowledged only after the session closed, so two workers never hold
        // one relay's connection.
        release_drained(
            &config,
            &objects,
            &mut sessions,
            &mut released,
            store.as_ref(),
            &metrics.supervisor,
        )
        .await;
        if dirty && feed_synced && last_apply.elapsed() >= APPLY_EVERY {
            dirty = false;
            last_apply = Instant::now();
            reconcile_sessions(
                &config,
                &objects,
                &facts,
                &mut sessions,
                &publisher,
                &metrics.session,
            );
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                reload = true;
            }
            ev = local.recv() => match ev {
                Some(FeedEvent::Event(event)) => {
                    dirty |= facts.learn(&event, &wanted);
                }
                Some(FeedEvent::Synced) => {
                    feed_synced = true;
                    dirty = true;
                }
                Some(FeedEvent::Disconnected { error, retry_in }) => {
                    tracing::warn!(relay = %config.local_relay, %error, ?retry_in, "cannot read the local relay; retrying");
                }
                None => break,
            },
            _ = tick.tick() => {
                report(&config, &objects, &sessions, &mut coalescers, store.as_ref(), &metrics.supervisor).await;
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    // Graceful stop: close every session (all at once), then write the final state (cursor
    // included).
    let stops = sessions
        .drain()
        .map(|(url, r)| async move { (url, r.handle.stop().await) });
    let finals: HashMap<RelayUrl, SessionState> =
        futures::future::join_all(stops).await.into_iter().collect();
    let mut writes = Vec::new();
    for (name, o) in objects.iter().filter(|(_, o)| !o.draining) {
        let Ok(url) = RelayUrl::parse(&o.spec.url) else {
            continue;
        };
        if let Some(state) = finals.get(&url) {
            let status = status_from_session(
                state,
                &config.worker,
                o.generation,
                o.status.as_ref(),
                SystemTime::now(),
            );
            writes.push((name.clone(), status));
        }
    }
    for (name, result) in write_statuses(store.as_ref(), &metrics.supervisor, writes).await {
        if let Err(e) = result {
            tracing::warn!(object = %name, error = %e, "final status write failed");
        }
    }
}

/// Write statuses concurrently (bounded); the results in no particular order.
async fn write_statuses<S: RelaySyncStore>(
    store: &S,
    metrics: &SupervisorMetrics,
    writes: Vec<(String, RelaySyncStatus)>,
) -> Vec<(String, Result<(), StoreError>)> {
    let results: Vec<_> = futures::stream::iter(writes)
        .map(|(name, status)| async move {
            let result = store.apply_status(&name, &status).await;
            (name, result)
        })
        .buffer_unordered(STATUS_WRITES_IN_FLIGHT)
        .collect()
        .await;
    for (_, r) in &results {
        count_write(metrics, r.is_ok());
    }
    results
}

fn reconcile_sessions(
    config: &RuntimeConfig,
    objects: &BTreeMap<String, StoredRelaySync>,
    facts: &RepoFacts,
    sessions: &mut HashMap<RelayUrl, Running>,
    publisher: &Publisher,
    metrics: &crate::worker::session::metrics::SessionMetrics,
) {
    // Group the objects by relay: split parts share one session.
    let mut by_url = group_by_url(objects);
    // Relays being drained are closed by `release_drained`, not restarted here.
    by_url.retain(|_, parts| !parts.iter().all(|o| o.draining));
    sessions.retain(|url, r| {
        let keep = by_url
            .get(url)
            .is_some_and(|parts| parts.iter().any(|o| o.spec.paused != Some(true)));
        if !keep {
            r.handle.abort_soon();
        }
        keep
    });
    for (url, parts) in by_url {
        if parts.iter().all(|o| o.spec.paused == Some(true)) {
            continue;
        }
        let coords: BTreeSet<RepoCoordinate> = parts
            .iter()
            .flat_map(|o| o.spec.repos.iter())
            .filter_map(|r| RepoCoordinate::parse(r).ok())
            .collect();
        let set = SyncSet {
            repos: coords.iter().filter_map(|c| facts.scope(c)).collect(),
            roots: coords
                .iter()
                .flat_map(|c| facts.roots.get(c).into_iter().flatten().copied())
                .collect(),
        };
        match sessions.get_mut(&url) {
            Some(r) => {
                if r.set != set {
                    r.handle.set(set.clone());
                    r.set = set;
                }
            }
            None => {
                // Resume from the stored cursor only if every part's spec was confirmed.
                let cursor = parts
                    .iter()
                    .map(|o| {
                        o.status.as_ref().and_then(|s| {
                            (s.confirmed_generation == Some(o.generation))
                                .then_some(s.cursor)
                                .flatten()
                        })
                    })
                    .collect::<Option<Vec<i64>>>()
                    .and_then(|c| c.into_iter().min())
                    .map(|c| c.max(0) as u64);
                let mut session_config = config.session.clone();
                session_config.local_relay = Some(config.local_relay.clone());
                let handle = session::spawn(
                    url.clone(),
                    set.clone(),
                    cursor,
                    session_config,
                    publisher.clone(),
                    metrics.clone(),
                );
                let state = handle.state();
                sessions.insert(url, Running { handle, state, set });
            }
        }
    }
}

fn group_by_url(
    objects: &BTreeMap<String, StoredRelaySync>,
) -> BTreeMap<RelayUrl, Vec<&StoredRelaySync>> {
    let mut by_url: BTreeMap<RelayUrl, Vec<&StoredRelaySync>> = BTreeMap::new();
    for o in objects.values() {
        if let Ok(url) = RelayUrl::parse(&o.spec.url) {
            by_url.entry(url).or_default().push(o);
        }
    }
    by_url
}

fn count_write(metrics: &SupervisorMetrics, ok: bool) {
    metrics
        .status_writes
        .with_label_values(&[if ok { "ok" } else { "error" }])
        .inc();
}

/// Close the sessions of relays whose every part is draining and acknowledge each part with
/// its final status.
async fn release_drained<S: RelaySyncStore>(
    config: &RuntimeConfig,
    objects: &BTreeMap<String, StoredRelaySync>,
    sessions: &mut HashMap<RelayUrl, Running>,
    released: &mut BTreeSet<String>,
    store: &S,
    metrics: &SupervisorMetrics,
) {
    released.retain(|name| objects.get(name).is_some_and(|o| o.draining));
    for (url, parts) in group_by_url(objects) {
        if !parts.iter().all(|o| o.draining) {
            continue;
        }
        let pending: Vec<&StoredRelaySync> = parts
            .into_iter()
            .filter(|o| {
                !released.contains(&o.name) && !is_released_by(o.status.as_ref(), &config.worker)
            })
            .collect();
        if pending.is_empty() {
            continue;
        }
        let state = match sessions.remove(&url) {
            Some(r) => {
                tracing::info!(relay = %url, "draining: closing the session for reassignment");
                match tokio::time::timeout(Duration::from_secs(10), r.handle.stop()).await {
                    Ok(state) => Some(state),
                    // Never acknowledge while the connection might still be open.
                    Err(_) => {
                        tracing::warn!(relay = %url, "session did not stop in time; not releasing yet");
                        continue;
                    }
                }
            }
            None => None,
        };
        let writes: Vec<(String, RelaySyncStatus)> = pending
            .iter()
            .map(|o| {
                let status = released_status(
                    state.as_ref(),
                    &config.worker,
                    o.generation,
                    o.status.as_ref(),
                    SystemTime::now(),
                );
                (o.name.clone(), status)
            })
            .collect();
        for (name, result) in write_statuses(store, metrics, writes).await {
            match result {
                Ok(()) => {
                    released.insert(name.clone());
                    let before = objects
                        .get(&name)
                        .and_then(|o| o.status.as_ref())
                        .and_then(|s| s.phase);
                    let _ = store
                        .record_phase(
                            &name,
                            before,
                            Phase::Pending,
                            Some("released for reassignment"),
                        )
                        .await;
                }
                Err(e) => {
                    tracing::warn!(object = %name, error = %e, "could not acknowledge the drain; will retry")
                }
            }
        }
    }
}

async fn report<S: RelaySyncStore>(
    config: &RuntimeConfig,
    objects: &BTreeMap<String, StoredRelaySync>,
    sessions: &HashMap<RelayUrl, Running>,
    coalescers: &mut HashMap<String, Coalescer>,
    store: &S,
    metrics: &SupervisorMetrics,
) {
    let now = Instant::now();
    coalescers.retain(|name, _| objects.contains_key(name));
    let mut by_phase: HashMap<Phase, i64> = HashMap::new();
    for o in objects.values() {
        let phase = RelayUrl::parse(&o.spec.url)
            .ok()
            .and_then(|u| sessions.get(&u))
            .map(|r| r.state.borrow().phase)
            .unwrap_or(if o.spec.paused == Some(true) {
                Phase::Paused
            } else {
                Phase::Pending
            });
        *by_phase.entry(phase).or_default() += 1;
    }
    for phase in metrics::PHASES {
        metrics
            .relays_by_phase
            .with_label_values(&[phase.as_str()])
            .set(by_phase.get(&phase).copied().unwrap_or(0));
    }
    let mut due = Vec::new();
    for (name, o) in objects.iter().filter(|(_, o)| !o.draining) {
        let Ok(url) = RelayUrl::parse(&o.spec.url) else {
            continue;
        };
        let state = match sessions.get(&url) {
            Some(r) => r.state.borrow().clone(),
            None if o.spec.paused == Some(true) => SessionState {
                phase: Phase::Paused,
                ..SessionState::default()
            },
            None => continue,
        };
        let status = status_from_session(
            &state,
            &config.worker,
            o.generation,
            o.status.as_ref(),
            SystemTime::now(),
        );
        let c = coalescers
            .entry(name.clone())
            .or_insert_with(|| Coalescer::new(config.status_interval));
        if c.due(&status, now) {
            tracing::debug!(object = %name, changed = ?c.changes(&status), "writing status");
            let before = c
                .last_phase()
                .or_else(|| o.status.as_ref().and_then(|s| s.phase));
            due.push((name.clone(), status, before, state.last_error.clone()));
        }
    }
    // Writes go out concurrently (bounded): after a failover a worker takes hundreds of
    // relays at once, and each phase change must reach the API server promptly.
    let results: Vec<_> = futures::stream::iter(due)
        .map(|(name, status, before, note)| async move {
            let result = store.apply_status(&name, &status).await;
            let mut event = None;
            if result.is_ok()
                && let Some(to) = status.phase.filter(|p| Some(*p) != before)
            {
                event = Some(store.record_phase(&name, before, to, note.as_deref()).await);
            }
            (name, status, result, event)
        })
        .buffer_unordered(STATUS_WRITES_IN_FLIGHT)
        .collect()
        .await;
    for (name, status, result, event) in results {
        count_write(metrics, result.is_ok());
        match result {
            Ok(()) => {
                if let Some(c) = coalescers.get_mut(&name) {
                    c.written(status, now);
                }
            }
            Err(e) => {
                tracing::debug!(object = %name, error = %e, "status write failed; will retry")
            }
        }
        match event {
            Some(Ok(true)) => metrics.phase_events.with_label_values(&["ok"]).inc(),
            Some(Err(e)) => {
                metrics.phase_events.with_label_values(&["error"]).inc();
                tracing::debug!(object = %name, error = %e, "phase event not published");
            }
            _ => {}
        }
    }
}
