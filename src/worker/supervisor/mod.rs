//! A worker's supervisor: the RelaySync objects it holds (from the store) become relay
//! sessions, one per relay URL (split objects share it); the local relay tells it each
//! repo's maintainers and root events (for Layer 3); session state goes back into the
//! objects' status.
//!
//! Pure steps decide ([`report::due`], [`sessions::drains_due`],
//! [`sessions::reconcile_sessions`]); one task, the [`writer`], applies every status write,
//! drain acknowledgement and phase Event, and reports each result back into this loop.

pub mod metrics;

mod drain;
mod facts;
mod report;
mod sessions;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nostr::Filter;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::metrics::WorkerMetrics;
use super::publisher::Publisher;
use super::session::{SessionConfig, SessionState};
use super::status::{Coalescer, stopped_status};
use crate::nostr::{RelayUrl, RepoCoordinate};
use crate::relay::address_policy::AddressPolicy;
use crate::relay::backoff::HealthConfig;
use crate::relay::feed::{self, FeedEvent};
use crate::store::{RelaySyncStore, StoredRelaySync};
use drain::Stopping;
use facts::{RepoFacts, feed_filters};
use metrics::{PHASES, SupervisorMetrics};
use sessions::{Held, RelaySessions, SessionStarter, Sessions, Urls};
use writer::{StatusWriter, Write, WriteKind, WriteResult, Written};

/// Root events trickle in one by one while Layer 2 syncs: the sessions' sync sets change
/// at most once per this interval for them, not once per event.
const APPLY_EVERY: Duration = Duration::from_millis(500);

/// Each application rebuilds every held relay's sync set, and every session given a new
/// set plans its subscriptions again: work that grows with the repos held. For root events
/// the next application waits this many times what the last one took (within
/// [`APPLY_EVERY`] and [`APPLY_EVERY_MAX`]), so that rebuilding stays a small share of the
/// worker's CPU however many repos it holds: at 5,000 repos over three relays, once every
/// 500 ms was about 15 % of a busy demo's CPU (the supervisor's step, timed here, about 40 %
/// of that; the sessions' re-planning, which grows alike, the rest).
const APPLY_COST_FACTOR: u32 = 50;

/// The longest root events wait to reach the sessions' sync sets.
const APPLY_EVERY_MAX: Duration = Duration::from_secs(3);

/// How long root events wait for the next application, given what the last one cost.
fn roots_apply_every(last_cost: Duration) -> Duration {
    last_cost
        .saturating_mul(APPLY_COST_FACTOR)
        .clamp(APPLY_EVERY, APPLY_EVERY_MAX)
}

/// The held objects are re-read from the store at most this often: a failover labels
/// hundreds of relays over a few seconds, and reading (copying) every held object once per
/// label was most of a worker's CPU while it took them over.
const RELOAD_EVERY: Duration = Duration::from_millis(100);

/// Relays taken over (a failover or handover labels hundreds over a few seconds) get their
/// sessions in batches this far apart: soon, without a pass over every session per label.
const APPLY_HELD_EVERY: Duration = Duration::from_millis(100);

/// Sessions wait for the local feed to deliver what the relay holds (maintainers and root
/// events of the repos held) at most this long. A feed that cannot load (the relay refuses it,
/// or is down) must not keep every session from starting: without those facts a session
/// syncs what its spec names, and its spec is not confirmed until the maintainers are known.
pub(crate) const FEED_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This worker's name, written into status.
    pub worker: String,
    pub local_relay: RelayUrl,
    pub session: SessionConfig,
    pub status_interval: Duration,
    /// Reconnect policy of the local-relay feed.
    pub feed_health: HealthConfig,
    /// A store call (status write, phase Event) abandoned after this long.
    pub write_timeout: Duration,
    /// How often the loaded local feed reads the root events and announcements of the
    /// worker's repos again (`None`: never): a root its live stream dropped is found within
    /// this.
    pub feed_reread_every: Option<Duration>,
}

impl SupervisorConfig {
    /// A worker's configuration: sessions authenticate to remote relays with `auth_keys` (not
    /// the publisher's key for the local relay) and connect only
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
        SupervisorConfig {
            worker: worker.into(),
            local_relay,
            session,
            status_interval,
            feed_health: HealthConfig {
                base_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(30),
                ..HealthConfig::default()
            },
            write_timeout: Duration::from_secs(10),
            feed_reread_every: Some(feed::DEFAULT_REREAD_EVERY),
        }
    }
}

/// Run until `shutdown` turns true; then stop every session, tell `closed` that none is
/// open any more, and write final statuses.
pub async fn run<S: RelaySyncStore + 'static>(
    config: SupervisorConfig,
    store: Arc<S>,
    publisher: Publisher,
    metrics: WorkerMetrics,
    shutdown: watch::Receiver<bool>,
    closed: Option<oneshot::Sender<()>>,
) {
    let (feed, local) = feed::spawn_with(
        config.local_relay.clone(),
        Vec::new(),
        config.feed_health.clone(),
        config.session.connect.clone(),
        feed::FeedLimits {
            reread_every: config.feed_reread_every,
            ..feed::FeedLimits::default()
        },
    );
    let mut session_config = config.session.clone();
    session_config.local_relay = Some(config.local_relay.clone());
    let refusals = publisher.clone();
    let inputs = Inputs {
        local,
        held: publisher.watch_held(&facts::root_kinds()),
        feed_filters: Box::new(move |filters| feed.set_filters(filters)),
        relay_holds: Box::new(move |event| refusals.relay_holds(event)),
        starter: Box::new(RelaySessions {
            config: session_config,
            publisher,
            metrics: metrics.session.clone(),
        }),
    };
    supervise(config, store, inputs, metrics.supervisor, shutdown, closed).await
}

/// What the supervisor reads and starts, apart from the store.
pub(crate) struct Inputs {
    /// The local relay's announcements and root events of the repos held.
    pub(crate) local: mpsc::Receiver<FeedEvent>,
    /// Root events the local relay told our publisher it holds: learned like the feed's, in
    /// case the relay never streams them to the feed. (Not announcements: a relay may answer
    /// `OK true` for an older announcement it does not keep, and maintainers learned from it
    /// would be stale.)
    pub(crate) held: mpsc::UnboundedReceiver<nostr::Event>,
    /// Ask the local feed for these filters (the held repos changed).
    pub(crate) feed_filters: Box<dyn Fn(Vec<Filter>) + Send>,
    /// The local feed read this event at the local relay: the relay may now take events it
    /// refused that wait for it (the publisher forgets those refusals).
    pub(crate) relay_holds: Box<dyn Fn(&nostr::Event) + Send>,
    pub(crate) starter: Box<dyn SessionStarter>,
}

/// The supervisor's bookkeeping between passes.
struct State {
    objects: BTreeMap<String, StoredRelaySync>,
    /// The relays of `objects`, parsed when they change.
    urls: Urls,
    /// The repos of `objects`, kept with them: every local event is checked against it.
    wanted: BTreeSet<RepoCoordinate>,
    facts: RepoFacts,
    sessions: Sessions,
    coalescers: HashMap<String, Coalescer>,
    /// Objects whose drain this supervisor acknowledged (until the label moves).
    released: BTreeSet<String>,
    /// Draining sessions still closing: their tasks, awaited (never detached) before the
    /// drain is acknowledged.
    stopping: HashMap<RelayUrl, Stopping>,
    /// Final states of drained sessions, until every part's acknowledgement is written.
    stopped: HashMap<RelayUrl, Option<(SessionState, sessions::Given)>>,
    /// Objects with a write at the writer: nothing more is decided for them until it ends.
    in_flight: BTreeSet<String>,
}

pub(crate) async fn supervise<S: RelaySyncStore + 'static>(
    config: SupervisorConfig,
    store: Arc<S>,
    mut inputs: Inputs,
    metrics: SupervisorMetrics,
    mut shutdown: watch::Receiver<bool>,
    closed: Option<oneshot::Sender<()>>,
) {
    let mut changes = store.changes();
    let mut writer = StatusWriter::spawn(store.clone(), metrics.clone(), config.write_timeout);
    let mut st = State {
        objects: BTreeMap::new(),
        urls: Urls::default(),
        wanted: BTreeSet::new(),
        facts: RepoFacts::default(),
        sessions: Sessions::default(),
        coalescers: HashMap::new(),
        released: BTreeSet::new(),
        stopping: HashMap::new(),
        stopped: HashMap::new(),
        in_flight: BTreeSet::new(),
    };
    // Sessions start once the local feed has loaded, or once waiting for it gave up.
    let mut feed_ready = false;
    let feed_wait_until = Instant::now() + FEED_WAIT;
    let mut reload = true;
    let mut last_reload = Instant::now() - RELOAD_EVERY;
    let mut dirty = true;
    // Dirty for a reason that should not wait for the root events' batching: the objects
    // held changed, a restart is due, a drain ended, the local feed has been read.
    let mut urgent = true;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_apply = Instant::now() - APPLY_EVERY;
    let mut last_apply_cost = Duration::ZERO;
    loop {
        if reload && last_reload.elapsed() >= RELOAD_EVERY {
            reload = false;
            last_reload = Instant::now();
            match store.snapshot().await {
                Ok(list) => {
                    let next: BTreeMap<String, StoredRelaySync> =
                        list.into_iter().map(|o| (o.name.clone(), o)).collect();
                    let held_changed = held_changed(&st.objects, &next);
                    st.objects = next;
                    // Status alone (our own writes, in a store that announces them) changes
                    // neither the sessions nor the repos the local feed follows.
                    if held_changed {
                        st.urls.refresh(&st.objects);
                        st.wanted = st
                            .objects
                            .values()
                            .flat_map(|o| o.spec.repos.iter())
                            .filter_map(|r| RepoCoordinate::parse(r).ok())
                            .collect();
                        (inputs.feed_filters)(feed_filters(&st.wanted));
                        dirty = true;
                        urgent = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listing RelaySyncs failed; retrying");
                    reload = true;
                }
            }
        }
        // A drain is acknowledged only after the session closed, so two workers never hold
        // one relay's connection.
        if drain::release_drained(&config, &mut st, &writer).await {
            dirty = true;
            urgent = true;
        }
        let apply_every = if urgent {
            APPLY_HELD_EVERY
        } else {
            roots_apply_every(last_apply_cost)
        };
        if dirty && feed_ready && last_apply.elapsed() >= apply_every {
            dirty = false;
            urgent = false;
            last_apply = Instant::now();
            let mut hold = st.sessions.held_off(Instant::now());
            hold.extend(st.stopping.keys().cloned());
            sessions::reconcile_sessions(
                Held::new(&st.objects, &st.urls),
                &st.facts,
                &mut st.sessions,
                &hold,
                inputs.starter.as_ref(),
            );
            last_apply_cost = last_apply.elapsed();
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                reload = true;
            }
            ev = inputs.local.recv() => match ev {
                Some(FeedEvent::Event(event)) => {
                    // The relay holds it, whatever it changes here: refusals waiting for it
                    // may be taken now.
                    (inputs.relay_holds)(&event);
                    if st.facts.learn(&event, &st.wanted) {
                        dirty = true;
                    }
                }
                Some(FeedEvent::Reread(event)) => {
                    // Mostly what the feed delivered before, whose refusals were settled
                    // then: only what the stream missed tells the publisher something new
                    // (telling it everything again would empty its refusal memory).
                    if st.facts.learn(&event, &st.wanted) {
                        (inputs.relay_holds)(&event);
                        metrics.local_feed_reread_found.inc();
                        dirty = true;
                    }
                }
                Some(FeedEvent::Synced) => {
                    metrics.local_feed_loaded.set(1);
                    feed_ready = true;
                    dirty = true;
                    urgent = true;
                }
                Some(FeedEvent::Loading) => metrics.local_feed_loaded.set(0),
                Some(FeedEvent::Refused { live, cap, .. }) => {
                    // Logged by the feed; each refused subscription is sent again.
                    metrics
                        .local_feed_refusals
                        .with_label_values(&[
                            if live { "live" } else { "historic" },
                            if cap.is_some() { "subscription-cap" } else { "other" },
                        ])
                        .inc();
                }
                Some(FeedEvent::Disconnected { error, retry_in }) => {
                    metrics.local_feed_loaded.set(0);
                    tracing::warn!(relay = %config.local_relay, %error, ?retry_in, "cannot read the local relay; retrying");
                }
                None => break,
            },
            Some(event) = inputs.held.recv() => {
                // What the publisher delivered: its refusals were settled when it was taken.
                if st.facts.learn(&event, &st.wanted) {
                    metrics.facts_from_publisher.inc();
                    dirty = true;
                }
            }
            Some(written) = writer.results.recv() => on_written(&mut st, written),
            // A batch held back by the interval is applied when it is due, not at the next
            // unrelated wake-up.
            () = tokio::time::sleep_until(last_apply + apply_every), if dirty && feed_ready => {}
            () = tokio::time::sleep_until(feed_wait_until), if !feed_ready => {
                feed_ready = true;
                dirty = true;
                urgent = true;
                tracing::warn!(relay = %config.local_relay, wait = ?FEED_WAIT, "the local feed has not loaded; starting sessions for the repos held without its facts (specs stay unconfirmed until their maintainers are known)");
            }
            () = tokio::time::sleep_until(last_reload + RELOAD_EVERY), if reload => {}
            _ = tick.tick() => {
                let died = st.sessions.reap(Instant::now(), SystemTime::now());
                if died > 0 {
                    metrics.session_restarts.inc_by(died as u64);
                }
                if st.sessions.restart_due(Instant::now()) {
                    dirty = true;
                    urgent = true;
                }
                let by_phase = report::phases(Held::new(&st.objects, &st.urls), &st.sessions);
                for phase in PHASES {
                    metrics
                        .relays_by_phase
                        .with_label_values(&[phase.as_str()])
                        .set(by_phase.get(&phase).copied().unwrap_or(0));
                }
                let due = report::due(
                    &config,
                    Held::new(&st.objects, &st.urls),
                    &st.sessions,
                    &mut st.coalescers,
                    &st.in_flight,
                    Instant::now(),
                    SystemTime::now(),
                );
                for w in due {
                    submit(&mut st, &writer, w);
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    // Close every session at once — at once also when the API server is stalled: a worker
    // that lost its Lease must be off its relays before the Lease can expire, so closing
    // does not wait for any write. Meanwhile the reports already at the writer land, so none
    // of them can overwrite a final status; then the final state (cursor included) is
    // written.
    let running: Vec<_> = st.sessions.running.drain().collect();
    let stops = futures::future::join_all(running.into_iter().map(|(url, r)| async move {
        let given = r.given;
        (url, (r.control.stop().await, given))
    }));
    let landed = async {
        while !st.in_flight.is_empty() {
            match writer.results.recv().await {
                Some(written) => on_written(&mut st, written),
                None => break,
            }
        }
    };
    let (finals, ()) = tokio::join!(stops, landed);
    let finals: HashMap<RelayUrl, (SessionState, sessions::Given)> = finals.into_iter().collect();
    // Drained sessions still closing end too (their objects belong to another worker now).
    for (_, s) in st.stopping.drain() {
        let _ = s.task.await;
    }
    // No session of ours is open now: the worker may give its relays up (release its Lease)
    // while the final statuses are written. Each of those is conditional on the label, so
    // one that lands after the relay moved on is refused, never written over the new
    // holder's.
    if let Some(closed) = closed {
        let _ = closed.send(());
    }
    for (name, o) in st.objects.iter().filter(|(_, o)| !o.draining) {
        let Some(url) = st.urls.of(o) else {
            continue;
        };
        if let Some((state, given)) = finals.get(&url) {
            let status = stopped_status(
                &given.state_for(state, o),
                &config.worker,
                o.generation,
                o.status.as_ref(),
                SystemTime::now(),
            );
            writer.submit(Write {
                name: name.clone(),
                status,
                kind: WriteKind::Final,
                event: None,
                decided_at: Instant::now(),
            });
        }
    }
    let (mut written, mut moved_on, mut failed) = (0, 0, 0);
    for w in writer.finish().await {
        match w.result {
            WriteResult::Ok => written += 1,
            // Relabelled for its next holder meanwhile: that holder writes its status.
            WriteResult::Refused => moved_on += 1,
            WriteResult::Error | WriteResult::Timeout => {
                failed += 1;
                tracing::warn!(object = %w.write.name, result = ?w.result, "final status write failed");
            }
        }
    }
    tracing::info!(
        written,
        moved_on,
        failed,
        "final statuses: written, skipped (the relay moved on), failed"
    );
}

/// Whether anything a session depends on differs: an object came or went, or its spec,
/// generation or drain flag changed.
fn held_changed(
    before: &BTreeMap<String, StoredRelaySync>,
    after: &BTreeMap<String, StoredRelaySync>,
) -> bool {
    before.len() != after.len()
        || after.iter().any(|(name, o)| {
            before.get(name).is_none_or(|b| {
                b.generation != o.generation || b.draining != o.draining || b.spec != o.spec
            })
        })
}

fn submit(st: &mut State, writer: &StatusWriter, write: Write) {
    st.in_flight.insert(write.name.clone());
    if !writer.submit(write) {
        tracing::error!("the status writer has stopped");
    }
}

/// Bookkeeping from what the writer really did.
fn on_written(st: &mut State, written: Written) {
    let Written { write, result } = written;
    st.in_flight.remove(&write.name);
    // What we wrote is the object's status now: the store does not announce our own writes,
    // and the next status is built on this one (conditions keep their transition times).
    if result == WriteResult::Ok
        && let Some(o) = st.objects.get_mut(&write.name)
    {
        o.status = Some(write.status.clone());
    }
    if result != WriteResult::Ok {
        // Decided again on a later pass.
        if write.kind == WriteKind::Release {
            tracing::warn!(object = %write.name, ?result, "could not acknowledge the drain; will retry");
        }
        return;
    }
    match write.kind {
        WriteKind::Report => {
            if let Some(c) = st.coalescers.get_mut(&write.name) {
                c.written(write.status, write.decided_at.into_std());
            }
        }
        WriteKind::Release => {
            st.released.insert(write.name);
        }
        WriteKind::Final => {}
    }
}
