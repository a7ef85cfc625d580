//! One relay session: connect, subscribe Layers 1–3 live, run historic batches, confirm them,
//! keep a cursor, survive disconnects and rate limits, and report state.
//!
//! The session owns its connection and all its bookkeeping in one task; nothing is shared
//! behind a lock, so nothing is ever held across a network wait. Callers talk to it through
//! [`SessionHandle`] (commands in, a `watch` of [`SessionState`] out).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nostr::{
    ClientMessage, Event, EventBuilder, EventId, Keys, RelayMessage, SubscriptionId, Timestamp,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod historic;
pub mod metrics;

use historic::{Batch, FetchSub, HistoricSub, LocalDone, NegSub, Queued, Work};

use super::publisher::{Publisher, SourceCounters, validate};
use crate::crd::{Phase, RelayCapabilities};
use crate::nostr::RelayUrl;
use crate::nostr::filters::{self, RepoScope};
use crate::nostr::negentropy::notice_means_unsupported;
use crate::nostr::outcome::{Outcome, notice_means_rate_limited};
use crate::nostr::pagination::Step;
use crate::relay::backoff::{Health, HealthConfig, HealthState};
use crate::relay::connection::{self, ConnReader, ConnWriter, ConnectOptions, Incoming};
use crate::relay::nip11;
use metrics::SessionMetrics;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub health: HealthConfig,
    pub connect: ConnectOptions,
    pub nip11_timeout: Duration,
    /// A historic page without EOSE (or any event) for this long fails its batch.
    pub batch_timeout: Duration,
    /// Our `limit` per historic page (capped by the relay's `max_limit`).
    pub page_limit: usize,
    /// Items (repos or root ids) per filter.
    pub chunk: usize,
    /// Filters per REQ when NIP-11 does not say.
    pub default_max_filters: usize,
    /// Historic REQs open at once.
    pub max_historic_subscriptions: usize,
    /// A reconnect resumes from `cursor - slack`.
    pub slack: Duration,
    pub max_event_bytes: usize,
    /// A failed batch is retried after this long.
    pub batch_retry: Duration,
    /// The local relay, whose set negentropy reconciles against. Without it (or with
    /// `negentropy` off) historic sync uses REQ pagination only.
    pub local_relay: Option<RelayUrl>,
    pub negentropy: bool,
    /// Ids per REQ when fetching what negentropy found missing (relays cap id lists).
    pub id_chunk: usize,
    /// Negentropy frame size limit in bytes (0 = unlimited).
    pub neg_frame_limit: u64,
    /// NIP-42 identity for relays that require authentication.
    pub auth_keys: Option<Keys>,
    /// A full reconciliation of every item runs at a random time in this range after
    /// connecting (and again after each), catching anything live delivery missed.
    pub reconcile_every: (Duration, Duration),
    /// Checked (with a fresh DNS lookup) before every connection: a relay whose name now
    /// points into a private or cluster network is not connected to.
    pub addresses: Option<crate::relay::address_policy::AddressPolicy>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            health: HealthConfig::default(),
            connect: ConnectOptions::default(),
            nip11_timeout: Duration::from_secs(5),
            batch_timeout: Duration::from_secs(60),
            page_limit: 500,
            chunk: filters::DEFAULT_CHUNK,
            default_max_filters: 10,
            max_historic_subscriptions: 8,
            slack: Duration::from_secs(15 * 60),
            max_event_bytes: 256 * 1024,
            batch_retry: Duration::from_secs(30),
            local_relay: None,
            negentropy: true,
            id_chunk: 100,
            neg_frame_limit: 60_000,
            auth_keys: None,
            reconcile_every: (
                Duration::from_secs(23 * 3600),
                Duration::from_secs(25 * 3600),
            ),
            addresses: None,
        }
    }
}

/// What the session syncs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncSet {
    pub repos: BTreeSet<RepoScope>,
    pub roots: BTreeSet<EventId>,
}

/// A snapshot for status reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub phase: Phase,
    pub last_connected: Option<SystemTime>,
    pub last_disconnected: Option<SystemTime>,
    pub consecutive_failures: u32,
    pub next_retry_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub repos: usize,
    pub confirmed_repos: usize,
    pub roots: usize,
    pub confirmed_roots: usize,
    /// Unix seconds up to which everything matching the filters is known synced.
    pub cursor: Option<u64>,
    pub capabilities: RelayCapabilities,
    pub subscriptions: usize,
    pub events_received: u64,
    pub events_published: u64,
    pub events_rejected: u64,
    /// Handed to the publisher and not yet answered by the local relay.
    pub events_pending: u64,
    /// Bytes of messages received from the relay over all connections.
    pub bytes_received: u64,
    /// Event ids requested after negentropy reconciliation.
    pub negentropy_ids_requested: u64,
    pub historic_gaps: u64,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            phase: Phase::Pending,
            last_connected: None,
            last_disconnected: None,
            consecutive_failures: 0,
            next_retry_at: None,
            last_error: None,
            repos: 0,
            confirmed_repos: 0,
            roots: 0,
            confirmed_roots: 0,
            cursor: None,
            capabilities: RelayCapabilities::default(),
            subscriptions: 0,
            events_received: 0,
            events_published: 0,
            events_rejected: 0,
            events_pending: 0,
            bytes_received: 0,
            negentropy_ids_requested: 0,
            historic_gaps: 0,
        }
    }
}

enum Command {
    Set(SyncSet),
    Stop,
}

pub struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<SessionState>,
    task: JoinHandle<()>,
}

impl SessionHandle {
    /// Replace what the session syncs; only new items get historic batches.
    pub fn set(&self, set: SyncSet) {
        let _ = self.commands.send(Command::Set(set));
    }

    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Stop without waiting (the session closes its subscriptions and connection).
    pub fn abort_soon(&self) {
        let _ = self.commands.send(Command::Stop);
    }

    /// Close subscriptions and the connection; returns the final state.
    pub async fn stop(self) -> SessionState {
        let _ = self.commands.send(Command::Stop);
        let _ = self.task.await;
        self.state.borrow().clone()
    }
}

/// Start a session for `url`. With a `cursor`, every item of `set` is taken as confirmed up to
/// it (pass one only when the whole set was confirmed, e.g. `confirmedGeneration` equals the
/// spec's generation) and is fetched again from `cursor - slack` only.
pub fn spawn(
    url: RelayUrl,
    set: SyncSet,
    cursor: Option<u64>,
    config: SessionConfig,
    publisher: Publisher,
    metrics: SessionMetrics,
) -> SessionHandle {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let state = SessionState {
        cursor,
        repos: set.repos.len(),
        roots: set.roots.len(),
        ..SessionState::default()
    };
    let (state_tx, state_rx) = watch::channel(state);
    let confirmed = if cursor.is_some() {
        set.clone()
    } else {
        SyncSet::default()
    };
    let session = Session {
        health: Health::new(config.health.clone()),
        config,
        url,
        set,
        confirmed,
        cursor,
        publisher,
        counters: Arc::new(SourceCounters::default()),
        metrics,
        commands: cmd_rx,
        state: state_tx,
        received: 0,
        gaps: 0,
        neg_ids: 0,
        reconciling: false,
        bytes_before: 0,
        bytes_reported: 0,
    };
    SessionHandle {
        commands: cmd_tx,
        state: state_rx,
        task: tokio::spawn(session.run()),
    }
}

struct Session {
    config: SessionConfig,
    url: RelayUrl,
    set: SyncSet,
    /// Items whose historic sync is confirmed (on this or an earlier connection).
    confirmed: SyncSet,
    cursor: Option<u64>,
    health: Health,
    publisher: Publisher,
    counters: Arc<SourceCounters>,
    metrics: SessionMetrics,
    commands: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<SessionState>,
    received: u64,
    gaps: u64,
    neg_ids: u64,
    /// A full reconciliation is running (its events count as `daily`).
    reconciling: bool,
    /// Bytes read on earlier connections.
    bytes_before: u64,
    /// Bytes of the current connection already added to the metric.
    bytes_reported: u64,
}

enum End {
    Stop,
    Lost(String),
}

struct Conn {
    writer: ConnWriter,
    reader: ConnReader,
    caps: RelayCapabilities,
    live: HashMap<SubscriptionId, ()>,
    historic: HashMap<SubscriptionId, HistoricSub>,
    queue: Vec<Queued>,
    batches: HashMap<u64, Batch>,
    next_id: u64,
    /// NIP-11 says yes/no; `None` = unknown, so try and fall back.
    neg_support: Option<bool>,
    negs: HashMap<SubscriptionId, NegSub>,
    fetches: HashMap<SubscriptionId, FetchSub>,
    locals_pending: usize,
    local_tx: mpsc::UnboundedSender<LocalDone>,
    local_rx: mpsc::UnboundedReceiver<LocalDone>,
    authenticated: bool,
    /// Our AUTH event awaiting its OK.
    auth_pending: Option<EventId>,
    /// Live subscriptions were closed by the relay; re-open them at this time.
    live_retry_at: Option<Instant>,
    reconcile_at: Instant,
}

impl Conn {
    fn active_historic(&self) -> usize {
        self.historic.len() + self.negs.len() + self.fetches.len() + self.locals_pending
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_system(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

impl Session {
    async fn run(mut self) {
        let label = self.url.to_string();
        self.metrics.relays_tracked.inc();
        loop {
            // Wait for the backoff / cool-down, handling commands meanwhile.
            while !self.health.may_connect(Instant::now()) {
                let wake = self
                    .health
                    .next_retry_at()
                    .into_iter()
                    .chain(self.health.rate_limited_until(Instant::now()))
                    .max()
                    .unwrap_or_else(Instant::now);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    cmd = self.commands.recv() => match cmd {
                        Some(Command::Set(set)) => { self.set = set; self.publish_state(|_| {}); }
                        Some(Command::Stop) | None => return self.finish(),
                    }
                }
            }

            self.publish_state(|s| s.phase = Phase::Connecting);
            self.metrics
                .relay_connected
                .with_label_values(&[&label])
                .set(1);
            if let Some(policy) = &self.config.addresses
                && let Err(e) = policy.check_resolved(&self.url).await
            {
                self.metrics
                    .connection_attempts
                    .with_label_values(&[&label, "refused"])
                    .inc();
                self.on_disconnect(e.to_string());
                continue;
            }
            let caps = nip11::fetch(&self.url, self.config.nip11_timeout).await;
            if let Err(e) = &caps {
                tracing::debug!(relay = %self.url, error = %e, "no usable NIP-11 document; using defaults");
            }
            let nip11_doc = caps.as_ref().ok().cloned();
            let caps = caps.unwrap_or_default();
            let conn = match connection::connect(&self.url, &self.config.connect).await {
                Ok((writer, reader)) => {
                    let (local_tx, local_rx) = mpsc::unbounded_channel();
                    Conn {
                        writer,
                        reader,
                        caps,
                        live: HashMap::new(),
                        historic: HashMap::new(),
                        queue: Vec::new(),
                        batches: HashMap::new(),
                        next_id: 0,
                        neg_support: nip11_doc.map(|c| c.negentropy),
                        negs: HashMap::new(),
                        fetches: HashMap::new(),
                        locals_pending: 0,
                        local_tx,
                        local_rx,
                        authenticated: false,
                        auth_pending: None,
                        live_retry_at: None,
                        reconcile_at: Instant::now() + self.reconcile_delay(),
                    }
                }
                Err(e) => {
                    self.metrics
                        .connection_attempts
                        .with_label_values(&[&label, "failure"])
                        .inc();
                    self.on_disconnect(e.to_string());
                    continue;
                }
            };
            self.metrics
                .connection_attempts
                .with_label_values(&[&label, "success"])
                .inc();
            self.metrics.relays_connected.inc();
            self.health.on_connected(Instant::now());
            let caps = conn.caps.clone();
            self.publish_state(|s| {
                s.last_connected = Some(SystemTime::now());
                s.capabilities = caps;
                s.last_error = None;
            });
            let mut conn = conn;
            let end = self.connected(&mut conn).await;
            self.report_bytes(&conn);
            self.bytes_before += conn.reader.bytes();
            self.bytes_reported = 0;
            self.metrics.relays_connected.dec();
            self.metrics.subscriptions.set(0);
            match end {
                End::Stop => return self.finish(),
                End::Lost(reason) => self.on_disconnect(reason),
            }
        }
    }

    fn finish(&mut self) {
        self.metrics.relays_tracked.dec();
        self.metrics
            .relay_connected
            .with_label_values(&[self.url.as_str()])
            .set(0);
        self.publish_state(|s| s.subscriptions = 0);
    }

    fn on_disconnect(&mut self, reason: String) {
        let now = Instant::now();
        let delay = self.health.on_failure(now, rand::random::<f64>());
        tracing::info!(relay = %self.url, %reason, retry_in = ?delay, "relay disconnected");
        let phase = match self.health.state(now) {
            HealthState::Dead => Phase::Dead,
            HealthState::RateLimited => Phase::RateLimited,
            _ => Phase::Backoff,
        };
        self.metrics
            .relay_connected
            .with_label_values(&[self.url.as_str()])
            .set(5);
        let failures = self.health.consecutive_failures();
        let pending_events = self.counters.pending();
        self.publish_state(|s| {
            s.phase = phase;
            s.events_pending = pending_events;
            s.last_disconnected = Some(SystemTime::now());
            s.consecutive_failures = failures;
            s.next_retry_at = Some(to_system(now + delay));
            s.last_error = Some(truncate(&reason, 1000));
            s.subscriptions = 0;
        });
    }

    fn max_filters(&self, caps: &RelayCapabilities) -> usize {
        caps.max_filters
            .map(|n| n as usize)
            .unwrap_or(self.config.default_max_filters)
            .max(1)
    }

    fn page_limit(&self, caps: &RelayCapabilities) -> usize {
        caps.max_limit
            .map(|m| (m as usize).min(self.config.page_limit))
            .unwrap_or(self.config.page_limit)
    }

    /// The connected part of a session. Returns why it ended.
    async fn connected(&mut self, conn: &mut Conn) -> End {
        let since = self
            .cursor
            .map(|c| Timestamp::from(c.saturating_sub(self.config.slack.as_secs())));
        // What a new connection must fetch: everything not confirmed, and — when resuming —
        // what arrived for confirmed items while we were away.
        if let Err(e) = self.open_live(conn).await {
            return End::Lost(e);
        }
        self.queue_historic(conn, None, true, since);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            if let Err(e) = self.pump_queue(conn).await {
                return End::Lost(e);
            }
            self.update_phase(conn);
            tokio::select! {
                incoming = conn.reader.recv() => {
                    let msg = match incoming {
                        Ok(Incoming::Message(m)) => m,
                        Ok(Incoming::Malformed { len, error }) => {
                            self.metrics.malformed_messages.inc();
                            tracing::debug!(relay = %self.url, len, %error, "malformed message");
                            continue;
                        }
                        Err(e) => return End::Lost(e.to_string()),
                    };
                    if let Err(e) = self.on_message(conn, msg).await {
                        return End::Lost(e);
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Set(set)) => {
                        if let Err(e) = self.on_set(conn, set).await {
                            return End::Lost(e);
                        }
                    }
                    Some(Command::Stop) | None => {
                        let subs = conn.live.keys().chain(conn.historic.keys()).chain(conn.fetches.keys());
                        for id in subs {
                            let _ = conn.writer.send(&ClientMessage::close(id.clone())).await;
                        }
                        for id in conn.negs.keys() {
                            let close = ClientMessage::NegClose {
                                subscription_id: std::borrow::Cow::Borrowed(id),
                            };
                            let _ = conn.writer.send(&close).await;
                        }
                        conn.writer.close().await;
                        return End::Stop;
                    }
                },
                Some(done) = conn.local_rx.recv() => {
                    if let Err(e) = self.on_local_done(conn, done).await {
                        return End::Lost(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.on_tick(conn).await {
                        return End::Lost(e);
                    }
                }
            }
        }
    }

    /// (Re)open the live subscriptions for the whole set: new ones first, then close the old,
    /// so no event falls between them.
    async fn open_live(&mut self, conn: &mut Conn) -> Result<(), String> {
        let repos: Vec<RepoScope> = self.set.repos.iter().cloned().collect();
        let roots: Vec<EventId> = self.set.roots.iter().copied().collect();
        // Leave room for historic work under the relay's subscription limit.
        let max_reqs = conn.caps.max_subscriptions.map(|m| {
            (m as usize).saturating_sub(self.config.max_historic_subscriptions.min(m as usize / 2))
        });
        let plan = filters::plan_live(
            &repos,
            &roots,
            self.config.chunk,
            self.max_filters(&conn.caps),
            max_reqs,
        );
        let old: Vec<SubscriptionId> = conn.live.keys().cloned().collect();
        conn.live.clear();
        for req in plan {
            conn.next_id += 1;
            let id = SubscriptionId::new(format!("live-{}", conn.next_id));
            conn.writer
                .send(&ClientMessage::req(id.clone(), req))
                .await
                .map_err(|e| e.to_string())?;
            conn.live.insert(id, ());
        }
        for id in old {
            conn.writer
                .send(&ClientMessage::close(id))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        conn: &mut Conn,
        msg: RelayMessage<'static>,
    ) -> Result<(), String> {
        match msg {
            RelayMessage::Event {
                subscription_id,
                event,
            } => {
                let event = event.into_owned();
                let historic_source = if self.reconciling {
                    "daily"
                } else if self.cursor.is_some() {
                    "reconnect"
                } else {
                    "startup"
                };
                let source = if let Some(h) = conn.historic.get_mut(subscription_id.as_ref()) {
                    h.page.push((event.id, event.created_at));
                    h.last_activity = Instant::now();
                    historic_source
                } else if let Some(f) = conn.fetches.get_mut(subscription_id.as_ref()) {
                    f.requested.remove(&event.id);
                    f.last_activity = Instant::now();
                    historic_source
                } else if conn.live.contains_key(subscription_id.as_ref()) {
                    "live"
                } else {
                    // A late event for a subscription we already closed: still an event.
                    "live"
                };
                self.received += 1;
                self.metrics.events.with_label_values(&[source]).inc();
                self.forward(event).await
            }
            RelayMessage::EndOfStoredEvents(id) => {
                let id = id.into_owned();
                if let Some(mut h) = conn.historic.remove(&id) {
                    conn.writer
                        .send(&ClientMessage::close(id))
                        .await
                        .map_err(|e| e.to_string())?;
                    let page = std::mem::take(&mut h.page);
                    match h.paginator.on_page(&page) {
                        Step::Next(_) => {
                            self.send_page(conn, h.batch, h.paginator).await?;
                        }
                        Step::Done => {
                            self.gaps += h.paginator.gaps().len() as u64;
                            self.filter_done(conn, h.batch, false);
                        }
                    }
                } else if let Some(f) = conn.fetches.remove(&id) {
                    conn.writer
                        .send(&ClientMessage::close(id))
                        .await
                        .map_err(|e| e.to_string())?;
                    if f.requested.is_empty() {
                        self.filter_done(conn, f.batch, false);
                    } else if !f.retried {
                        // Relays are lossy with id lists; ask once more for the rest.
                        conn.queue.push(Queued {
                            batch: f.batch,
                            work: Work::Fetch {
                                filter: f.filter,
                                ids: f.requested.into_iter().collect(),
                                retried: true,
                            },
                            not_before: Instant::now(),
                        });
                    } else {
                        // Still missing: page through the semantic filter instead. The
                        // batch waits for that one unit of work in place of this fetch.
                        let why = format!("{} ids never arrived", f.requested.len());
                        self.fallback_to_req(conn, f.batch, f.filter, &why);
                    }
                }
                Ok(())
            }
            RelayMessage::NegMsg {
                subscription_id,
                message,
            } => {
                self.on_neg_msg(conn, subscription_id.into_owned(), &message)
                    .await
            }
            RelayMessage::NegErr {
                subscription_id,
                message,
            } => {
                if let Some(n) = conn.negs.remove(subscription_id.as_ref()) {
                    // "closed:" is a timeout on their side; anything else means no negentropy
                    // for this relay on this connection.
                    if !message.starts_with("closed") {
                        self.negentropy_unsupported(conn, &message);
                    }
                    self.fallback_to_req(conn, n.batch, n.filter, &message);
                }
                Ok(())
            }
            RelayMessage::Closed {
                subscription_id,
                message,
            } => {
                let id = subscription_id.into_owned();
                let known = conn.historic.contains_key(&id)
                    || conn.fetches.contains_key(&id)
                    || conn.live.contains_key(&id);
                if !known {
                    // Some relays close a subscription after its EOSE; we are done with it.
                    tracing::debug!(relay = %self.url, sub = %id, reason = %message, "CLOSED for a finished subscription");
                    return Ok(());
                }
                let outcome = Outcome::classify(false, &message);
                self.metrics
                    .closed_subscriptions
                    .with_label_values(&[outcome.label()])
                    .inc();
                tracing::info!(relay = %self.url, sub = %id, reason = %message, "relay closed a subscription");
                if outcome == Outcome::RateLimited {
                    self.health.on_rate_limited(Instant::now());
                }
                if outcome == Outcome::AuthRequired {
                    self.publish_state(|s| {
                        s.last_error = Some(format!(
                            "relay requires NIP-42 authentication and no key is configured: {}",
                            truncate(&message, 500)
                        ))
                    });
                }
                let retry_at = self
                    .health
                    .rate_limited_until(Instant::now())
                    .unwrap_or_else(|| Instant::now() + self.config.batch_retry);
                if let Some(h) = conn.historic.remove(&id) {
                    // Retry the same page later; the paginator did not advance.
                    historic::retry_later(conn, h.batch, Work::Page(h.paginator), retry_at);
                } else if let Some(f) = conn.fetches.remove(&id) {
                    historic::retry_later(conn, f.batch, f.into_work(), retry_at);
                } else if conn.live.remove(&id).is_some() {
                    // Live coverage is gone: rebuild all live subscriptions once the relay lets
                    // us (after a cool-down, after authenticating, or after the retry delay),
                    // never in a tight loop.
                    conn.live_retry_at = Some(retry_at);
                }
                Ok(())
            }
            RelayMessage::Auth { challenge } => self.authenticate(conn, &challenge).await,
            RelayMessage::Ok {
                event_id,
                status,
                message,
            } if conn.auth_pending == Some(event_id) => {
                conn.auth_pending = None;
                if status {
                    tracing::info!(relay = %self.url, "authenticated (NIP-42)");
                    conn.authenticated = true;
                    // Whatever waited for authentication may go now.
                    let now = Instant::now();
                    for q in conn.queue.iter_mut() {
                        q.not_before = q.not_before.min(now);
                    }
                    if conn.live_retry_at.is_some() {
                        conn.live_retry_at = Some(now);
                    }
                } else {
                    let err = format!("NIP-42 authentication refused: {}", truncate(&message, 500));
                    self.publish_state(|s| s.last_error = Some(err));
                }
                Ok(())
            }
            RelayMessage::Notice(text) => {
                if !conn.negs.is_empty() && notice_means_unsupported(&text) {
                    self.negentropy_unsupported(conn, &text);
                } else if notice_means_rate_limited(&text) {
                    self.health.on_rate_limited(Instant::now());
                    self.metrics
                        .closed_subscriptions
                        .with_label_values(&["notice-rate-limited"])
                        .inc();
                }
                tracing::debug!(relay = %self.url, notice = %truncate(&text, 200), "NOTICE");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Validate and hand an event to the publisher (waiting while its queue is full, which
    /// stops us reading from the relay).
    async fn forward(&mut self, event: Event) -> Result<(), String> {
        if let Err(rejection) = validate(&event, self.config.max_event_bytes) {
            self.metrics
                .events_rejected
                .with_label_values(&[rejection.label()])
                .inc();
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(relay = %self.url, id = %event.id, reason = %rejection, "dropping invalid event");
            return Ok(());
        }
        self.counters.submitted.fetch_add(1, Ordering::Release);
        self.publisher
            .publish(event, Some(self.counters.clone()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Answer an AUTH challenge when we have a key.
    async fn authenticate(&mut self, conn: &mut Conn, challenge: &str) -> Result<(), String> {
        let Some(keys) = &self.config.auth_keys else {
            return Ok(());
        };
        if conn.authenticated {
            return Ok(());
        }
        let relay = nostr::RelayUrl::parse(self.url.as_str()).map_err(|e| e.to_string())?;
        let event = EventBuilder::auth(challenge, relay)
            .sign_with_keys(keys)
            .map_err(|e| e.to_string())?;
        conn.auth_pending = Some(event.id);
        conn.writer
            .send(&ClientMessage::auth(event))
            .await
            .map_err(|e| e.to_string())
    }

    fn reconcile_delay(&self) -> Duration {
        let (lo, hi) = self.config.reconcile_every;
        let hi = hi.max(lo);
        lo + (hi - lo).mul_f64(rand::random::<f64>())
    }

    /// Periodic work on the connection: re-opening closed live subscriptions and the full
    /// reconciliation.
    async fn on_tick(&mut self, conn: &mut Conn) -> Result<(), String> {
        let now = Instant::now();
        if conn.live_retry_at.is_some_and(|t| t <= now)
            && self.health.rate_limited_until(now).is_none()
        {
            conn.live_retry_at = None;
            self.open_live(conn).await?;
        }
        if self.reconciling && conn.batches.is_empty() {
            self.reconciling = false;
        }
        if now >= conn.reconcile_at && conn.batches.is_empty() {
            conn.reconcile_at = now + self.reconcile_delay();
            tracing::info!(relay = %self.url, "full reconciliation");
            self.metrics
                .historic_batches
                .with_label_values(&["reconciliation"])
                .inc();
            self.reconciling = true;
            let all = self.set.clone();
            self.queue_historic(conn, Some(all), true, None);
        }
        self.check_timeouts(conn).await;
        Ok(())
    }

    async fn on_set(&mut self, conn: &mut Conn, set: SyncSet) -> Result<(), String> {
        if set == self.set {
            return Ok(());
        }
        let added = SyncSet {
            repos: set.repos.difference(&self.set.repos).cloned().collect(),
            roots: set.roots.difference(&self.set.roots).copied().collect(),
        };
        // Removed items stop being synced: drop them from the confirmed set too, so that a
        // later re-add fetches them in full.
        self.confirmed.repos.retain(|r| set.repos.contains(r));
        self.confirmed.roots.retain(|r| set.roots.contains(r));
        self.set = set;
        self.open_live(conn).await?;
        self.queue_historic(conn, Some(added), false, None);
        Ok(())
    }

    fn update_phase(&mut self, conn: &Conn) {
        // The cursor moves forward while every historic batch is confirmed, the live
        // subscriptions are open, and the publisher has answered for everything we gave it.
        if conn.batches.is_empty() && conn.historic.is_empty() && self.counters.drained() {
            self.cursor = Some(unix_now().max(self.cursor.unwrap_or(0)));
        }
        let now = Instant::now();
        let failed = conn.batches.values().any(|b| b.failed);
        let pending = !conn.batches.is_empty();
        let phase = if self.health.rate_limited_until(now).is_some() {
            Phase::RateLimited
        } else if pending && failed {
            Phase::LiveWithGaps
        } else if pending {
            Phase::Syncing
        } else if self.gaps > 0 {
            Phase::LiveWithGaps
        } else {
            Phase::Live
        };
        let code = match phase {
            Phase::Syncing => 2,
            Phase::Live => 3,
            Phase::LiveWithGaps => 4,
            _ => 5,
        };
        self.metrics
            .relay_connected
            .with_label_values(&[self.url.as_str()])
            .set(code);
        let subs = conn.live.len() + conn.historic.len() + conn.negs.len() + conn.fetches.len();
        self.report_bytes(conn);
        let bytes = self.bytes_before + conn.reader.bytes();
        let neg_ids = self.neg_ids;
        let (repos, roots) = (self.set.repos.len(), self.set.roots.len());
        let confirmed_repos = self.set.repos.intersection(&self.confirmed.repos).count();
        let confirmed_roots = self.set.roots.intersection(&self.confirmed.roots).count();
        let cursor = self.cursor;
        let (received, gaps) = (self.received, self.gaps);
        let published = self.counters.published.load(Ordering::Relaxed);
        let rejected = self.counters.rejected.load(Ordering::Relaxed);
        let failures = self.health.consecutive_failures();
        let pending_events = self.counters.pending();
        self.publish_state(|s| {
            s.phase = phase;
            s.events_pending = pending_events;
            s.subscriptions = subs;
            s.repos = repos;
            s.roots = roots;
            s.confirmed_repos = confirmed_repos;
            s.confirmed_roots = confirmed_roots;
            s.cursor = cursor;
            s.events_received = received;
            s.events_published = published;
            s.events_rejected = rejected;
            s.historic_gaps = gaps;
            s.bytes_received = bytes;
            s.negentropy_ids_requested = neg_ids;
            s.consecutive_failures = failures;
            s.next_retry_at = None;
        });
    }

    /// Add what the connection read since the last report to the bytes metric, labelled by
    /// whether this relay does negentropy.
    fn report_bytes(&mut self, conn: &Conn) {
        let read = conn.reader.bytes();
        let method = if conn.neg_support == Some(true) {
            "negentropy"
        } else {
            "req"
        };
        self.metrics
            .bytes_received
            .with_label_values(&[method])
            .inc_by(read.saturating_sub(self.bytes_reported));
        self.bytes_reported = read;
    }

    fn publish_state(&self, f: impl FnOnce(&mut SessionState)) {
        self.state.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
