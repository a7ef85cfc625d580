//! Hands synced events to the local relay over the wire and reads every `OK`.
//!
//! The local relay is the authority (it applies its own write policy) and often the
//! bottleneck (per-connection ingress limits). So the publisher:
//! - takes events through a bounded queue, fair between sessions (see [`fair`]): each has its
//!   own, served in turn, so one relay's flood slows only that relay; a session that cannot
//!   enqueue stops reading from its remote (backpressure instead of unbounded buffering);
//! - keeps a bounded number of events in flight and matches each `OK` to its event;
//! - paces itself with a token bucket per connection that adapts to `rate-limited:` answers
//!   (see [`super::pacing`]), and hands refused events to whichever connection has room;
//! - after a lost connection or a missing `OK` resends everything that was in flight;
//! - spreads the load over several connections, opening more while the relay limits each
//!   connection and events wait (see [`scaling`]), closing idle ones; and authenticates with
//!   NIP-42 so an operator can exempt the syncer by key;
//! - counts every final answer by reason. A policy refusal (`blocked:`, `invalid:`, …) is
//!   final and never retried in a loop. Nothing taken from a remote disappears without being
//!   counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nostr::{Event, EventId, Keys};
use thiserror::Error;
use tokio::task::{JoinHandle, JoinSet};

use crate::nostr::RelayUrl;
use crate::relay::connection::ConnectOptions;
use connection::PublisherConn;
use metrics::PublisherMetrics;

mod connection;
mod fair;
mod memory;
pub mod metrics;
mod pacing;
mod refused;
mod scaling;
pub mod settled;

pub use refused::RefusalMemory;
mod validate;

pub use validate::{EventRejection, SIGNATURE_MEMORY, SignatureMemory, Validated};

/// The default cap on connections to the local relay.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;

#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub local_relay: RelayUrl,
    /// Events that may wait in the queue before senders block (each session may still add
    /// up to `queue_reserve`).
    pub queue_capacity: usize,
    /// Most events one session may have queued.
    pub queue_per_source: usize,
    /// Events a session may always queue, however full the queue is.
    pub queue_reserve: usize,
    /// Events sent and not yet answered.
    pub max_in_flight: usize,
    /// An event without `OK` after this long is sent again.
    pub ok_timeout: Duration,
    /// Attempts for `auth-required:` answers before giving up on an event, and failures
    /// while the relay stored others before a transient failure may be final (below).
    /// `rate-limited:` is retried without limit: it is about pace, not content.
    pub max_error_attempts: u32,
    /// A transient failure (`error:`, or a refusal with no standard prefix, as real relays
    /// send for a busy database) is retried after this pause, doubling with each failure of
    /// the same event up to a minute…
    pub error_backoff: Duration,
    /// …and given up (`gave_up`, answered for its session as a refusal; a later
    /// reconciliation offers it again) only once this long has passed since its first
    /// failure *and* it failed `max_error_attempts` times each after the relay stored other
    /// events since its previous failure: a relay failing every write (a full disk, a
    /// locked database) is waited for however long it takes, so its outage costs no event —
    /// each connection holds at most `max_in_flight` events waiting to be sent again, and
    /// the queue then fills and holds the sessions back.
    pub max_error_age: Duration,
    /// Pause after `auth-required:` so our AUTH is answered before we resend.
    pub auth_pause: Duration,
    pub connect: ConnectOptions,
    /// NIP-42 identity, so an operator can exempt the syncer from the relay's limits by key.
    pub auth_keys: Option<Keys>,
    /// Connections to the local relay at least (kept open); relays limit ingress per
    /// connection.
    pub connections: usize,
    /// Connections at most: more are opened while the local relay rate-limits each
    /// connection and events wait.
    pub max_connections: usize,
    /// A connection beyond `connections` with nothing to send for this long is closed.
    pub idle_close: Duration,
    /// Ceiling on events per second per connection (None: as fast as the relay accepts;
    /// the pace adapts to `rate-limited:` answers either way).
    pub max_rate: Option<f64>,
    /// Policy refusals remembered, so later copies are answered without a send.
    pub refusals: RefusalMemory,
    /// How long an event the local relay holds in purgatory (`OK true "purgatory: …"`) is
    /// not sent again; zero sends every copy.
    pub purgatory_ttl: Duration,
}

impl PublisherConfig {
    pub fn new(local_relay: RelayUrl) -> Self {
        PublisherConfig {
            local_relay,
            queue_capacity: 1024,
            queue_per_source: 256,
            queue_reserve: 16,
            max_in_flight: 64,
            ok_timeout: Duration::from_secs(15),
            max_error_attempts: 5,
            error_backoff: Duration::from_millis(500),
            max_error_age: Duration::from_secs(600),
            auth_pause: Duration::from_millis(500),
            connect: ConnectOptions::default(),
            auth_keys: None,
            connections: 1,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_close: Duration::from_secs(30),
            max_rate: None,
            refusals: RefusalMemory::default(),
            purgatory_ttl: settled::PURGATORY_TTL,
        }
    }

    /// Publishing over `connections` (at least one) to `max_connections` connections,
    /// authenticating with `auth_keys` when the local relay asks.
    pub fn with(
        local_relay: RelayUrl,
        connections: usize,
        max_connections: usize,
        auth_keys: Option<nostr::Keys>,
    ) -> Self {
        let connections = connections.max(1);
        PublisherConfig {
            connections,
            max_connections: max_connections.max(connections),
            auth_keys,
            ..PublisherConfig::new(local_relay)
        }
    }
}

/// Per-source counters, shared with the session that produced the events (for its status).
#[derive(Debug, Default)]
pub struct SourceCounters {
    /// Handed to the publisher.
    pub submitted: AtomicU64,
    /// Finally answered by the local relay (any outcome), or given up on.
    pub resolved: AtomicU64,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    /// Set aside unanswered (the local relay drops the connection whenever it is sent):
    /// never resolved, so the cursor holds, but nothing more will come of it.
    pub quarantined: AtomicU64,
}

impl SourceCounters {
    /// Handed over and not yet finally answered.
    pub fn pending(&self) -> u64 {
        self.submitted
            .load(Ordering::Acquire)
            .saturating_sub(self.resolved.load(Ordering::Acquire))
    }

    /// Everything handed over has a final answer.
    pub fn drained(&self) -> bool {
        self.pending() == 0
    }

    /// Everything handed over has a final answer or was set aside: nothing is still on its
    /// way.
    pub fn settled(&self) -> bool {
        self.pending() <= self.quarantined.load(Ordering::Acquire)
    }
}

/// Totals over the publisher's lifetime.
#[derive(Debug, Default)]
pub struct PublisherStats {
    pub submitted: AtomicU64,
    pub accepted: AtomicU64,
    pub duplicate: AtomicU64,
    pub refused: AtomicU64,
    pub gave_up: AtomicU64,
    pub retries: AtomicU64,
    /// Events set aside because the local relay dropped the connection every time one was
    /// sent alone (see `connection`); never answered, so their relays' cursors hold.
    pub quarantined: AtomicU64,
}

impl PublisherStats {
    /// Events submitted and not yet finally answered.
    pub fn outstanding(&self) -> u64 {
        let done = self.accepted.load(Ordering::Relaxed)
            + self.duplicate.load(Ordering::Relaxed)
            + self.refused.load(Ordering::Relaxed)
            + self.gave_up.load(Ordering::Relaxed)
            + self.quarantined.load(Ordering::Relaxed);
        self.submitted.load(Ordering::Relaxed).saturating_sub(done)
    }
}

#[derive(Debug, Error)]
#[error("the publisher has stopped")]
pub struct PublisherClosed;

struct Pending {
    event: Event,
    attempts: u32,
    /// Transient failures so far, and when the first one came.
    failures: u32,
    first_failure: Option<std::time::Instant>,
    /// When the last transient failure came, and how many failures came after the relay
    /// stored some other event since the one before: failures of this event, not of the
    /// relay (one store at the edge of an outage makes one such failure, not all later ones).
    last_failure: Option<std::time::Instant>,
    own_failures: u32,
    /// Connections lost while this event was the only one in flight.
    strikes: u32,
    /// One entry per `publish` call for this event: the same event often arrives through
    /// several subscriptions, and each delivery must get its answer.
    origins: Vec<Option<Arc<SourceCounters>>>,
}

impl Pending {
    /// Every delivery of this event has its final answer (its session may count it done).
    fn resolve(&self) {
        for o in self.origins.iter().flatten() {
            o.resolved.fetch_add(1, Ordering::Release);
        }
    }
}

/// Takes one back from a counter when dropped (see [`Publisher::publish`]).
struct Uncounted<'a>(&'a AtomicU64);

impl Drop for Uncounted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Cheap to clone; every session holds one.
#[derive(Clone)]
pub struct Publisher {
    tx: fair::FairSender<Pending>,
    stats: Arc<PublisherStats>,
    shared: Arc<Common>,
}

/// Totals across a publisher's connections, for the gauges and the scaler.
#[derive(Default)]
struct Gauges {
    retry: AtomicI64,
    in_flight: AtomicI64,
    /// Connections open (a connection beyond the floor retires by taking one off).
    open: AtomicUsize,
    /// Since the scaler last looked: `rate-limited:` answers, and the first answers of
    /// connections a growth step opened.
    pushed_back: AtomicU64,
    fresh_accepted: AtomicU64,
    fresh_limited: AtomicU64,
    /// Events the relay took (accepted or already held) since the scaler last looked.
    taken: AtomicU64,
}

/// What a publisher's connections share besides the fair queue.
struct Common {
    /// Events a connection gave up (it closed, or cannot reach the relay) for the others.
    queue: Mutex<VecDeque<Pending>>,
    /// Events the local relay just said it holds: later copies are answered here.
    settled: Mutex<settled::Settled>,
    /// Events the local relay refused on policy grounds: later copies are answered here.
    refused: Mutex<refused::Refused>,
    /// Events in flight on some connection, with the copies that reached other
    /// connections meanwhile: those wait for that send's answer instead of being sent too
    /// (each such send was a `duplicate:` that cost its connection a second of a stock
    /// relay's allowance).
    flights: Mutex<HashMap<EventId, Flight>>,
    /// Numbers the connections, so a flight is released only by the one that sent it.
    next_connection: std::sync::atomic::AtomicU64,
    /// Events whose signature passed the check, so their copies skip it.
    signatures: SignatureMemory,
    /// Who is told of the events of some kinds the relay said it holds (see
    /// [`Publisher::watch_held`]).
    held_watch: Mutex<Option<HeldWatch>>,
    /// When the relay last stored an event (`OK true`, not a duplicate): whether it is
    /// storing at all, for telling an event's own failures from the relay's.
    last_stored: Mutex<Option<std::time::Instant>>,
    /// The relay's message limit as its NIP-11 document states it (`max_message_length`;
    /// 0: not stated, or not read yet).
    local_max_message: AtomicUsize,
}

/// What an `EVENT` message adds to the event's JSON: `["EVENT",` and `]`.
const EVENT_FRAME_OVERHEAD: usize = 10;

/// How often the local relay's NIP-11 document is read again (its operator may change it).
const LIMITS_REREAD: Duration = Duration::from_secs(600);

/// A stated message limit below this is not believed (a typo, a unit mistaken): refusing
/// by it would drop, as if the relay had refused them, events it would take. Under such a
/// limit, an event the relay really cannot take is set aside when sent (holding its
/// cursor) as with a relay that states nothing.
const MIN_BELIEVED_LOCAL_LIMIT: usize = 64 * 1024;

/// The message limit acted on for one the relay states (0: none).
fn believed_limit(stated: usize) -> usize {
    if stated >= MIN_BELIEVED_LOCAL_LIMIT {
        stated
    } else {
        0
    }
}

/// Read the local relay's message limit from its NIP-11 document, now and every
/// [`LIMITS_REREAD`], while the publisher lives.
async fn learn_local_limits(url: RelayUrl, shared: std::sync::Weak<Common>) {
    loop {
        let addrs = crate::relay::resolve::Resolver::system()
            .pin(&url, None)
            .await;
        let caps = match addrs {
            Ok(addrs) => crate::relay::nip11::fetch(&url, &addrs, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let Some(common) = shared.upgrade() else {
            return;
        };
        match caps {
            Ok(caps) => {
                let stated = caps.max_message_length.map_or(0, |m| m as usize);
                let max = believed_limit(stated);
                let before = common.local_max_message.swap(max, Ordering::Relaxed);
                if before != max && max > 0 {
                    tracing::info!(relay = %url, max_message_length = max, "the local relay's message limit (NIP-11): larger events are refused, not sent");
                }
                if stated > 0 && max == 0 {
                    tracing::warn!(relay = %url, max_message_length = stated, floor = MIN_BELIEVED_LOCAL_LIMIT, "the local relay states a message limit too small to believe; ignoring it");
                }
            }
            Err(error) => {
                tracing::debug!(relay = %url, %error, "no NIP-11 document from the local relay");
            }
        }
        drop(common);
        tokio::time::sleep(LIMITS_REREAD).await;
    }
}

struct HeldWatch {
    kinds: Vec<nostr::Kind>,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
}

/// An event in flight on connection `owner`, and the copies waiting for its answer.
struct Flight {
    owner: u64,
    parked: Vec<Pending>,
}

impl Common {
    fn new(config: &PublisherConfig) -> Self {
        Common {
            queue: Mutex::default(),
            settled: Mutex::new(settled::Settled::new(config.purgatory_ttl)),
            refused: Mutex::new(refused::Refused::new(&config.refusals)),
            flights: Mutex::default(),
            next_connection: std::sync::atomic::AtomicU64::new(0),
            signatures: SignatureMemory::new(SIGNATURE_MEMORY),
            held_watch: Mutex::default(),
            last_stored: Mutex::default(),
            local_max_message: AtomicUsize::new(0),
        }
    }

    fn note_stored(&self, at: std::time::Instant) {
        if let Ok(mut last) = self.last_stored.lock() {
            *last = Some(last.map_or(at, |l| l.max(at)));
        }
    }

    /// Whether the relay stored some event after `since`.
    fn stored_since(&self, since: std::time::Instant) -> bool {
        self.last_stored
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|l| l > since)
    }

    /// The relay answered `OK true` for `event`, not purgatory: it says it holds it.
    fn report_held(&self, event: &Event) {
        if let Ok(mut watch) = self.held_watch.lock()
            && let Some(w) = watch.as_ref()
            && w.kinds.contains(&event.kind)
        {
            // Without its content: a patch can be large, and what is learned is in its tags.
            let copy = Event::new(
                event.id,
                event.pubkey,
                event.created_at,
                event.kind,
                event.tags.clone(),
                "",
                event.sig,
            );
            if w.tx.send(copy).is_err() {
                *watch = None;
            }
        }
    }

    /// `p` is no longer in flight on connection `owner` (answered, lost, or given back), or
    /// its claim is dropped: the copies other connections parked on that flight join it, to
    /// share what happens to it next.
    fn land(&self, owner: u64, p: &mut Pending) {
        if let Ok(mut flights) = self.flights.lock()
            && flights.get(&p.event.id).is_some_and(|f| f.owner == owner)
            && let Some(f) = flights.remove(&p.event.id)
        {
            for copy in f.parked {
                p.origins.extend(copy.origins);
            }
        }
    }

    /// Every remembered refusal goes (the relay may answer otherwise now: it restarted,
    /// knows who we are, or the worker's repos changed).
    fn forget_refusals(&self) {
        if let Ok(mut r) = self.refused.lock() {
            r.forget_all();
        }
    }
}

/// How often the scaler looks at the connections' signals.
const SCALE_EVERY: Duration = Duration::from_millis(250);

impl Publisher {
    /// Start `config.connections` connections to the local relay; they share one queue. The
    /// handle finishes when every `Publisher` clone is dropped and all events are answered.
    pub fn spawn(
        config: PublisherConfig,
        metrics: PublisherMetrics,
    ) -> (Publisher, JoinHandle<()>) {
        let (tx, rx) = fair::channel(
            config.queue_capacity,
            config.queue_per_source,
            config.queue_reserve,
        );
        let stats = Arc::new(PublisherStats::default());
        let gauges = Arc::new(Gauges::default());
        let shared = Arc::new(Common::new(&config));
        tokio::spawn(learn_local_limits(
            config.local_relay.clone(),
            Arc::downgrade(&shared),
        ));
        let supervisor = tokio::spawn(run_connections(
            config,
            metrics,
            stats.clone(),
            gauges,
            rx,
            shared.clone(),
        ));
        (Publisher { tx, stats, shared }, supervisor)
    }

    /// The checks an event from a remote passes before [`publish`](Self::publish) (see
    /// [`SignatureMemory::validate`]); a copy of an event already verified through this
    /// publisher skips the signature check.
    /// An event the local relay's stated message limit cannot carry is refused here too:
    /// sent, it would cost the connection (a frame over the limit is dropped with it) and
    /// end set aside after all, holding its session's cursor for good.
    pub fn validate(&self, event: &Event, max_bytes: usize) -> Result<Validated, EventRejection> {
        let local = self
            .local_max_message()
            .map(|m| m.saturating_sub(EVENT_FRAME_OVERHEAD))
            .filter(|m| *m < max_bytes);
        match self
            .shared
            .signatures
            .validate(event, local.unwrap_or(max_bytes))
        {
            Err(EventRejection::Oversize { bytes, max }) if local.is_some() => {
                Err(EventRejection::OverLocalLimit { bytes, max })
            }
            other => other,
        }
    }

    /// The local relay's message limit from its NIP-11 document, once read.
    pub fn local_max_message(&self) -> Option<usize> {
        Some(self.shared.local_max_message.load(Ordering::Relaxed)).filter(|m| *m > 0)
    }

    /// Queue `event` for the local relay; waits while the queue is full.
    pub async fn publish(
        &self,
        event: Event,
        origin: Option<Arc<SourceCounters>>,
    ) -> Result<(), PublisherClosed> {
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        // Not queued after all — the publisher stopped, or the caller gave up waiting for
        // room (a session told to stop) — it is not counted as submitted.
        let guard = Uncounted(&self.stats.submitted);
        // Events without an origin (seeding, tests) share one source.
        let source = origin.as_ref().map_or(0, |o| Arc::as_ptr(o) as usize);
        self.tx
            .send(
                source,
                Pending {
                    event,
                    attempts: 0,
                    failures: 0,
                    first_failure: None,
                    last_failure: None,
                    own_failures: 0,
                    strikes: 0,
                    origins: vec![origin],
                },
            )
            .await
            .map_err(|_| PublisherClosed)?;
        std::mem::forget(guard);
        Ok(())
    }

    /// Changes whenever a connection to the local relay is lost or made: what was read from
    /// the relay before a change may no longer be held (it may have restarted without its
    /// data).
    pub fn local_generation(&self) -> u64 {
        self.shared
            .settled
            .lock()
            .map(|s| s.generation())
            .unwrap_or(u64::MAX)
    }

    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }

    /// The worker read `event` from the local relay (its feed: an announcement, maintainers
    /// or a root event of its repos, whoever published it): the relay may now take the
    /// events it refused that wait for it, so those refusals are forgotten and the next copy
    /// of each is sent (see [`refused`]).
    pub fn relay_holds(&self, event: &Event) {
        if let Ok(mut r) = self.shared.refused.lock() {
            r.held(event);
        }
    }

    /// Every event of `kinds` the local relay answers `OK true` for, not purgatory (it says
    /// it holds it), from now on, once per answer and without its content. The worker
    /// learns its repos' roots from these as well as from its feed: a relay may drop live
    /// events for a reader that fell behind (nostr-relay-builder skips what a connection's
    /// 1,024-event broadcast buffer lost, silently), and a root the feed never hears of is
    /// never synced until a full reconciliation. An event released from purgatory later
    /// gets no answer, so it is learned from the feed only. Replaces an earlier watcher.
    pub fn watch_held(&self, kinds: &[nostr::Kind]) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut w) = self.shared.held_watch.lock() {
            *w = Some(HeldWatch {
                kinds: kinds.to_vec(),
                tx,
            });
        }
        rx
    }
}

/// Run the connections: the floor at once, more while the local relay limits each one (see
/// [`scaling`]). Ends when every connection has (the queue closed and every event
/// answered); a connection that panicked ends it too, so the worker's liveness sees it.
async fn run_connections(
    config: PublisherConfig,
    metrics: PublisherMetrics,
    stats: Arc<PublisherStats>,
    gauges: Arc<Gauges>,
    rx: fair::FairReceiver<Pending>,
    shared: Arc<Common>,
) {
    let mut scaler = scaling::Scaler::new(config.connections, config.max_connections);
    let mut conns = JoinSet::new();
    let spawn = |conns: &mut JoinSet<()>, fresh: bool| {
        let conn = PublisherConn::new(
            config.clone(),
            metrics.clone(),
            stats.clone(),
            gauges.clone(),
            rx.clone(),
            shared.clone(),
            fresh,
        );
        conns.spawn(conn.run());
    };
    for _ in 0..scaler.min() {
        spawn(&mut conns, false);
    }
    gauges.open.store(scaler.min(), Ordering::Relaxed);
    metrics.publisher_connections.set(scaler.min() as i64);
    let mut look = tokio::time::interval(SCALE_EVERY);
    loop {
        tokio::select! {
            joined = conns.join_next() => match joined {
                None => return,
                Some(Err(e)) if e.is_panic() => {
                    tracing::error!(relay = %config.local_relay, error = %e, "a publisher connection panicked");
                    return;
                }
                Some(_) => {
                    scaler.forget_unanswered();
                    metrics.publisher_connections.set(gauges.open.load(Ordering::Relaxed) as i64);
                }
            },
            _ = look.tick() => {
                let backlog = !rx.is_empty()
                    || shared.queue.lock().map(|q| !q.is_empty()).unwrap_or(false);
                let signals = scaling::Signals {
                    pushed_back: gauges.pushed_back.swap(0, Ordering::Relaxed),
                    backlog,
                    fresh_accepted: gauges.fresh_accepted.swap(0, Ordering::Relaxed),
                    fresh_limited: gauges.fresh_limited.swap(0, Ordering::Relaxed),
                    taken: gauges.taken.swap(0, Ordering::Relaxed),
                };
                let open = gauges.open.load(Ordering::Relaxed);
                let add = scaler.grow(std::time::Instant::now(), open, signals);
                if add > 0 {
                    // Counted first: a new connection that fails at once retires against
                    // the count that includes it.
                    gauges.open.fetch_add(add, Ordering::Relaxed);
                    for _ in 0..add {
                        spawn(&mut conns, true);
                    }
                    tracing::info!(relay = %config.local_relay, open = open + add, "events wait for the local relay; opening more connections");
                }
                metrics.publisher_connections.set(gauges.open.load(Ordering::Relaxed) as i64);
            }
        }
    }
}

/// Publish `events` to `url` over a short-lived publisher and wait until the relay answered
/// for every one (seeding relays in the demo, benchmarks and tests).
pub async fn publish_all(
    url: &RelayUrl,
    events: impl IntoIterator<Item = Event>,
) -> Arc<PublisherStats> {
    let (p, _task) = Publisher::spawn(
        PublisherConfig::new(url.clone()),
        PublisherMetrics::default(),
    );
    for e in events {
        if p.publish(e, None).await.is_err() {
            break;
        }
    }
    while p.stats().outstanding() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stats().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stated_message_limit_too_small_to_be_true_is_not_acted_on() {
        // strfry's 128 KiB and nostr-relay-builder's 5.25 MB are believed.
        assert_eq!(believed_limit(131_072), 131_072);
        assert_eq!(believed_limit(5_250_000), 5_250_000);
        assert_eq!(
            believed_limit(MIN_BELIEVED_LOCAL_LIMIT),
            MIN_BELIEVED_LOCAL_LIMIT
        );
        // A typo or a unit mistaken would refuse nearly every event as if the relay had.
        for stated in [0, 5, 10, 1_000, MIN_BELIEVED_LOCAL_LIMIT - 1] {
            assert_eq!(believed_limit(stated), 0, "{stated}");
        }
    }
}
