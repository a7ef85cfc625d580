//! One relay session: connect, subscribe Layers 1–3 live, run historic batches, confirm them,
//! keep a cursor, survive disconnects and rate limits, and report state.
//!
//! The session owns its connection and all its bookkeeping in one task; nothing is shared
//! behind a lock, so nothing is ever held across a network wait. Callers talk to it through
//! [`SessionHandle`] (commands in, a `watch` of [`SessionState`] out).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nostr::{EventId, Filter, Keys, SubscriptionId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod auth;
mod cap;
mod dispatch;
mod error;
mod historic;
mod live;
pub mod metrics;
mod report;
mod run;

use error::SessionError;
use historic::{Batch, FetchSub, HistoricSub, LocalDone, NegSub, Queued};

use super::publisher::{Publisher, SourceCounters};
use crate::crd::{Phase, RelayCapabilities};
use crate::nostr::RelayUrl;
use crate::nostr::filters::{self, RepoScope};
use crate::nostr::root_digest::RootDigest;
use crate::relay::backoff::{Health, HealthConfig};
use crate::relay::connection::{ConnReader, ConnWriter, ConnectOptions};
use metrics::SessionMetrics;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub health: HealthConfig,
    pub connect: ConnectOptions,
    pub nip11_timeout: Duration,
    /// A historic page without EOSE (or any event) for this long fails its batch.
    pub batch_timeout: Duration,
    /// A historic page not finished this long after its REQ fails its batch however
    /// steadily events trickle in (time the publisher held us up does not count).
    pub page_deadline: Duration,
    /// Our `limit` per historic page (capped by the relay's `max_limit`).
    pub page_limit: usize,
    /// Items (repos or root ids) per filter.
    pub chunk: usize,
    /// Filters per REQ when NIP-11 does not say.
    pub default_max_filters: usize,
    /// Largest REQ sent, in bytes of JSON: relays bound message and frame sizes (nostr-rs-relay:
    /// 256 KiB frames by default) and drop the connection over them.
    pub max_req_bytes: usize,
    /// Historic REQs open at once.
    pub max_historic_subscriptions: usize,
    /// Subscriptions per connection assumed for a relay that neither publishes
    /// `max_subscriptions` (NIP-11) nor has refused one (strfry's default is 20,
    /// nostr-rs-relay's 32). `None`: no limit assumed.
    pub assumed_subscription_cap: Option<usize>,
    /// A reconnect resumes from `cursor - slack`.
    pub slack: Duration,
    pub max_event_bytes: usize,
    /// A failed batch is retried after this long.
    pub batch_retry: Duration,
    /// Live filters that do not fit under a relay's subscription cap are polled this often.
    pub overflow_poll: Duration,
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
    /// Resolves a relay's host once per connection attempt; the websocket and NIP-11 go to
    /// exactly the addresses it answered (and the policy checked).
    pub resolver: crate::relay::resolve::Resolver,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            health: HealthConfig::default(),
            connect: ConnectOptions::default(),
            nip11_timeout: Duration::from_secs(5),
            batch_timeout: Duration::from_secs(60),
            page_deadline: Duration::from_secs(600),
            page_limit: 500,
            chunk: filters::DEFAULT_CHUNK,
            default_max_filters: 10,
            max_req_bytes: 64 * 1024,
            max_historic_subscriptions: 8,
            assumed_subscription_cap: Some(20),
            slack: Duration::from_secs(15 * 60),
            max_event_bytes: 256 * 1024,
            batch_retry: Duration::from_secs(30),
            overflow_poll: Duration::from_secs(30),
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
            resolver: Default::default(),
        }
    }
}

/// What the session syncs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncSet {
    pub repos: BTreeSet<RepoScope>,
    pub roots: BTreeSet<EventId>,
}

impl SyncSet {
    pub fn is_empty(&self) -> bool {
        self.repos.is_empty() && self.roots.is_empty()
    }
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
    /// When the last full reconciliation (or the initial full sync) completed.
    pub last_reconciled: Option<SystemTime>,
    /// [`RootDigest`] (hex) of the roots whose history is confirmed.
    pub confirmed_roots_digest: Option<String>,
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
    /// Sequence number of the last sync set handed over by [`SessionHandle::set`] that the
    /// session has applied (0: the one it was started with).
    pub applied_set: u64,
    /// Not reported by the session: its supervisor sets it when a newer spec exists than the
    /// set this state describes, so no status built from it claims that spec confirmed.
    pub set_pending: bool,
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
            confirmed_roots_digest: None,
            last_reconciled: None,
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
            applied_set: 0,
            set_pending: false,
        }
    }
}

enum Command {
    /// A new sync set, with its hand-over sequence number.
    Set(SyncSet, u64),
    Stop,
}

pub struct SessionHandle {
    commands: mpsc::UnboundedSender<Command>,
    /// Set when the session is told to stop (dropped with the handle too): the session
    /// heeds it where a command would wait — connecting, or handing an event to a full
    /// publisher — so a stop never waits for the local relay or a slow remote one.
    stop: watch::Sender<bool>,
    /// Sequence number of the last set handed over.
    sets: std::sync::atomic::AtomicU64,
    state: watch::Receiver<SessionState>,
    task: JoinHandle<()>,
}

impl SessionHandle {
    /// Replace what the session syncs; only new items get historic batches. Returns the
    /// hand-over's sequence number: [`SessionState::applied_set`] reaches it once the
    /// session works on this set (until then its state describes the previous one).
    pub fn set(&self, set: SyncSet) -> u64 {
        let seq = self.sets.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let _ = self.commands.send(Command::Set(set, seq));
        seq
    }

    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Stop without waiting (the session closes its subscriptions and connection).
    pub fn abort_soon(&self) {
        let _ = self.commands.send(Command::Stop);
        self.stop.send_replace(true);
    }

    /// The session's task has ended although it was not stopped: it panicked.
    pub fn has_ended(&self) -> bool {
        self.task.is_finished()
    }

    /// Close subscriptions and the connection; returns the final state.
    pub async fn stop(self) -> SessionState {
        let _ = self.commands.send(Command::Stop);
        self.stop.send_replace(true);
        let _ = self.task.await;
        self.state.borrow().clone()
    }
}

/// Where a new session starts: from nothing, or from a persisted cursor.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Pass one only when the whole spec was confirmed (`confirmedGeneration` equals the
    /// spec's generation): every repo is then taken as confirmed up to it and fetched again
    /// from `cursor - slack` only.
    pub cursor: Option<u64>,
    /// The confirmed-roots digests persisted with the cursor (one per part of the relay's
    /// spec). Roots they do not all vouch for are fetched in full.
    pub confirmed_roots: Vec<RootDigest>,
    /// When the relay was last reconciled in full: the next reconciliation is due one period
    /// after it. Unknown: one period from now.
    pub last_reconciled: Option<SystemTime>,
}

impl Resume {
    /// A fresh start: everything is fetched in full.
    pub fn fresh() -> Resume {
        Resume::default()
    }
}

/// Start a session for `url`, from scratch or resuming (see [`Resume`]).
pub fn spawn(
    url: RelayUrl,
    set: SyncSet,
    resume: Resume,
    config: SessionConfig,
    publisher: Publisher,
    metrics: SessionMetrics,
) -> SessionHandle {
    let cursor = resume.cursor;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = SessionState {
        cursor,
        last_reconciled: resume.last_reconciled,
        repos: set.repos.len(),
        roots: set.roots.len(),
        ..SessionState::default()
    };
    let (state_tx, state_rx) = watch::channel(state);
    let confirmed = if cursor.is_some() {
        SyncSet {
            repos: set.repos.clone(),
            roots: RootDigest::confirmed_among(&set.roots, &resume.confirmed_roots),
        }
    } else {
        SyncSet::default()
    };
    let delay = run::reconcile_delay(config.reconcile_every);
    let reconcile_at = match resume.last_reconciled {
        Some(at) => {
            let due = at + delay;
            Instant::now() + due.duration_since(SystemTime::now()).unwrap_or_default()
        }
        None => Instant::now() + delay,
    };
    let session = Session {
        health: Health::new(config.health.clone()),
        config,
        url,
        set,
        unproven_states: confirmed.repos.clone(),
        states_abandoned: 0,
        states_retry_at: Instant::now(),
        confirmed,
        fetched: SyncSet::default(),
        confirmed_view: None,
        cursor,
        publisher,
        counters: Arc::new(SourceCounters::default()),
        metrics,
        commands: cmd_rx,
        stop: stop_rx,
        state: state_tx,
        received: 0,
        conn_valid: 0,
        conn_invalid: 0,
        gaps: 0,
        neg_ids: 0,
        reconciling: false,
        abandoned: 0,
        refusal_streaks: HashMap::new(),
        sub_cap: None,
        planner: Default::default(),
        unblocked_at: Instant::now(),
        reconcile_at,
        last_reconciled: resume.last_reconciled,
        neg_learned: None,
        live_answers_learned: false,
        // A fresh start fetches everything in full: that counts as a reconciliation.
        initial_sync: cursor.is_none(),
        bytes_before: 0,
        bytes_reported: 0,
    };
    SessionHandle {
        commands: cmd_tx,
        stop: stop_tx,
        sets: std::sync::atomic::AtomicU64::new(0),
        state: state_rx,
        task: tokio::spawn(session.run()),
    }
}

/// The confirmed part of a session's set, as status reports it.
#[derive(Debug, Clone)]
struct ConfirmedView {
    repos: usize,
    roots: usize,
    /// Hex [`RootDigest`] of the confirmed roots.
    digest: String,
}

struct Session {
    config: SessionConfig,
    url: RelayUrl,
    set: SyncSet,
    /// Items whose historic sync is confirmed (on this or an earlier connection).
    confirmed: SyncSet,
    /// What status says of the confirmed part of the set; `None` when stale (the set or
    /// the confirmed items changed). Kept because status is updated per message, and the
    /// intersections cost the whole set.
    confirmed_view: Option<ConfirmedView>,
    /// Items whose history the relay has served in full, waiting for our relay to answer
    /// for every event handed over before they count as confirmed.
    fetched: SyncSet,
    /// Repos taken as confirmed from a stored cursor whose state filter (by owner and
    /// maintainers) is not yet read over the whole range: the cursor vouches for the repo
    /// as it was scoped when it was written, and a maintainer added since — announced while
    /// no session ran, or before the session that learned it finished — has state events
    /// older than the cursor that nothing else would fetch. Every resume reads them, so the
    /// cursor does not wait for them (on a relay that cannot serve a read without `since`
    /// it would never move again).
    unproven_states: BTreeSet<RepoScope>,
    /// Reads of `unproven_states` cut short by a lost connection in a row, and when the
    /// next may start (as for an abandoned reconciliation).
    states_abandoned: u32,
    states_retry_at: Instant,
    cursor: Option<u64>,
    health: Health,
    publisher: Publisher,
    counters: Arc<SourceCounters>,
    metrics: SessionMetrics,
    commands: mpsc::UnboundedReceiver<Command>,
    /// See [`SessionHandle`]'s `stop`.
    stop: watch::Receiver<bool>,
    state: watch::Sender<SessionState>,
    received: u64,
    /// Events on this connection that passed and failed validation (id or signature).
    conn_valid: u64,
    conn_invalid: u64,
    gaps: u64,
    neg_ids: u64,
    /// A full reconciliation is running (its events count as `daily`).
    reconciling: bool,
    /// Reconciliations abandoned in a row (their connection was lost).
    abandoned: u32,
    /// For each filter (its fingerprint) the relay refused on policy grounds, how many
    /// times in a row: the delay before asking again doubles with each; the relay serving
    /// that filter (EOSE) clears it. Bounded by [`MAX_REFUSAL_STREAKS`].
    refusal_streaks: HashMap<u64, u32>,
    /// The relay's subscription cap per connection, learned from its refusals (kept across
    /// connections: it is the relay's policy).
    sub_cap: Option<usize>,
    /// Plans the live REQs at the cost of what changed (kept across connections: it
    /// depends only on the set and the limits).
    planner: crate::nostr::live_plan::Planner,
    /// When the session last resumed reading after the publisher held it up: timeouts
    /// measure the relay's silence, not our back-pressure, so none counts from before.
    unblocked_at: Instant,
    /// When the next full reconciliation is due. It belongs to the session, not to a
    /// connection: a relay that reconnects more often than the period must not postpone
    /// the safety net for ever.
    reconcile_at: Instant,
    last_reconciled: Option<SystemTime>,
    /// Whether the relay answered negentropy, as learned on an earlier connection.
    neg_learned: Option<bool>,
    /// The relay answered a live REQ on an earlier connection: a new one does not take a
    /// slow answer for a relay that never answers (see `Conn::live_answers`).
    live_answers_learned: bool,
    /// The first full sync of a fresh start has not completed yet.
    initial_sync: bool,
    /// Bytes read on earlier connections.
    bytes_before: u64,
    /// Bytes of the current connection already added to the metric.
    bytes_reported: u64,
}

enum End {
    Stop,
    Lost(SessionError),
}

/// `work`'s output, or `None` once the session is told to stop (or its handle is gone).
async fn unless_stopped<F: std::future::Future>(
    stop: &mut watch::Receiver<bool>,
    work: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => None,
        out = work => Some(out),
    }
}

/// Filters with a refusal streak remembered at most; past it the memory starts afresh (the
/// delays shrink; nothing is lost).
const MAX_REFUSAL_STREAKS: usize = 4096;

struct Conn {
    writer: ConnWriter,
    reader: ConnReader,
    caps: RelayCapabilities,
    /// Live subscriptions believed open, with their filters (what they may deliver).
    live: HashMap<SubscriptionId, Arc<Vec<Filter>>>,
    /// The live plan as sent: each key's subscription and the fingerprint of its filters.
    live_plan: std::collections::BTreeMap<crate::nostr::live_plan::LiveKey, (SubscriptionId, u64)>,
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
    /// Live REQs of the plan not opened because the relay's cap would refuse them: a
    /// standing gap that holds the cursor.
    live_overflow: usize,
    /// Live REQs of the plan, open or waiting to be re-opened: their slots under the
    /// relay's cap are not historic work's. Counting only the open ones let historic pages
    /// take the slot of a live REQ the relay had closed, so re-opening it was refused
    /// again — each refusal queuing another backfill, a livelock under load.
    live_planned: usize,
    /// The filters of those REQs, polled instead.
    overflow_filters: Vec<Filter>,
    overflow_poll_at: Instant,
    /// The overflow poll running now, if any (one at a time).
    overflow_batch: Option<u64>,
    /// Unix time the last overflow poll started (the next one reads from there).
    overflow_polled_from: Option<u64>,
    /// Unix time this connection was established.
    connected_at: u64,
    /// Unix time since which live coverage has a gap (a live subscription was closed);
    /// backfilled from there when the subscriptions are open again.
    live_gap_since: Option<u64>,
    /// REQs the relay has not answered yet (no EOSE, event or CLOSED), oldest first: when
    /// each was sent (a refusal that names no subscription, a NOTICE, is for one of those
    /// sent just before it) and how many subscriptions we believed open then (the relay
    /// handles messages in order, so a REQ refused for the cap proves the cap is at most
    /// that many; closes sent later do not count, as they would when the refusal is read).
    unanswered: std::collections::VecDeque<Unanswered>,
    /// Cap refusals by NOTICE not yet placed on the REQs they refused.
    notice_refusals: cap::NoticeRefusals,
    /// Live subscriptions a re-plan replaced, still open until the REQs that replace them
    /// are in place (see `Session::open_live`).
    retiring: Vec<Retiring>,
    /// The relay has answered a live (`limit: 0`) REQ on this connection; nostr-rs-relay
    /// answers them with nothing at all, so without this only the refusal grace can tell
    /// a REQ is in place.
    live_answers: bool,
    /// Live REQs replaced in place whose items could have moved, to be read again (their
    /// filters as planned then) from `moved_since`; they hold the cursor meanwhile.
    moved_keys: BTreeSet<crate::nostr::live_plan::LiveKey>,
    /// Filters of retiring subscriptions closed before their replacements were in place, to
    /// be read again with them (each once: `moved_prints`).
    moved: Vec<Filter>,
    moved_prints: HashSet<u64>,
    moved_since: u64,
    /// REQs sent on this connection (`Unanswered::seq`).
    reqs_sent: u64,
}

/// A live subscription kept open after a re-plan replaced it, until every REQ sent with
/// its replacement is in place: a relay may apply a CLOSE before a REQ sent earlier
/// (khatru handles each message concurrently) or register a REQ only after its stored
/// query, so closing first leaves the moved items uncovered meanwhile.
#[derive(Debug)]
struct Retiring {
    id: SubscriptionId,
    filters: Arc<Vec<Filter>>,
    /// The REQs sent with its replacement (shared by the subscriptions one re-plan retired).
    successors: Arc<Vec<SubscriptionId>>,
    since: Instant,
}

/// A REQ sent and not answered yet.
#[derive(Debug, Clone)]
struct Unanswered {
    id: SubscriptionId,
    sent_at: Instant,
    /// Subscriptions believed open when it was sent.
    open_before: usize,
    /// Its place among the REQs of the connection (see `Batch::after_live`).
    seq: u64,
    /// Sent under the id of a subscription believed open (a live REQ replaced in place, or
    /// sent again): an event on the id may be the earlier REQ's, so only EOSE or CLOSED
    /// answers it.
    replaces: bool,
}

impl Conn {
    /// Live coverage has a gap from `at` (now if `None`), or from earlier.
    fn live_gap_from(&mut self, at: Option<Instant>) {
        let ago = at.map_or(0, |t| t.elapsed().as_secs_f64().ceil() as u64);
        let from = report::unix_now().saturating_sub(ago);
        let gap = self.live_gap_since.get_or_insert(from);
        *gap = (*gap).min(from);
    }

    /// Keep `filters` (live ones: `limit: 0`) to be read again with the moved REQs.
    fn keep_for_reread(&mut self, filters: &[Filter]) {
        for f in filters {
            let mut f = f.clone();
            f.limit = None;
            let print = crate::nostr::live_plan::fingerprint(std::slice::from_ref(&f));
            if self.moved_prints.insert(print) {
                self.moved.push(f);
            }
        }
    }

    /// Keep live subscription `id` open until the REQs of the re-plan under way are in place.
    fn retire(&mut self, id: SubscriptionId, filters: Arc<Vec<Filter>>) {
        self.retiring.push(Retiring {
            id,
            filters,
            successors: Default::default(),
            since: Instant::now(),
        });
    }

    /// Drop retiring subscription `id` as refused or closed by the relay: coverage it was
    /// kept for has a gap from `at` (its REQ; now if `None`). Whether it was retiring.
    fn drop_retiring(&mut self, id: &SubscriptionId, at: Option<Instant>) -> bool {
        let Some(i) = self.retiring.iter().position(|r| r.id == *id) else {
            return false;
        };
        self.retiring.swap_remove(i);
        self.live_gap_from(at);
        true
    }

    /// A re-read of live REQs replaced in place is due.
    fn moved_pending(&self) -> bool {
        !self.moved_keys.is_empty() || !self.moved.is_empty()
    }

    /// Subscriptions we believe the relay holds open for us.
    fn believed_open(&self) -> usize {
        self.live.len() + self.historic.len() + self.fetches.len() + self.retiring.len()
    }

    /// Whether subscription `id` is a retiring one (see [`Retiring`]).
    fn retiring_filters(&self, id: &SubscriptionId) -> Option<&Arc<Vec<Filter>>> {
        self.retiring
            .iter()
            .find(|r| r.id == *id)
            .map(|r| &r.filters)
    }

    /// REQs not in place as far as we can tell: unanswered (no EOSE or CLOSED; a refusal is
    /// the refusal handling's gap) and — on a relay that does not answer live REQs — still
    /// within the grace after which an unrefused live REQ counts as open.
    fn not_in_place(&self, now: Instant) -> HashSet<&SubscriptionId> {
        self.unanswered
            .iter()
            .filter(|u| self.awaited(u, now))
            .map(|u| &u.id)
            .collect()
    }

    /// Whether unanswered REQ `u` is still awaited: on a relay that answers live REQs until
    /// it does; otherwise only within the refusal grace.
    fn awaited(&self, u: &Unanswered, now: Instant) -> bool {
        self.live_answers || now.saturating_duration_since(u.sent_at) < cap::NOTICE_GRACE
    }

    /// Whether `u` is a live REQ not in place (see [`Conn::not_in_place`]).
    fn live_pending(&self, u: &Unanswered, now: Instant) -> bool {
        self.live.contains_key(&u.id) && self.awaited(u, now)
    }

    /// Let go the batches whose live REQs (those sent before them) are in place. One whose
    /// wait is over goes anyway, with a live gap from the earliest REQ still not in place:
    /// its backfill, once they are, covers what the batch's read could have run ahead of.
    fn open_live_gates(&mut self, now: Instant) {
        if self.batches.values().all(|b| b.after_live.is_none()) {
            return;
        }
        let pending = self.unanswered.iter().filter(|u| self.live_pending(u, now));
        let (first, earliest) = pending.fold((u64::MAX, None::<Instant>), |(seq, at), u| {
            (
                seq.min(u.seq),
                Some(at.map_or(u.sent_at, |a| a.min(u.sent_at))),
            )
        });
        let mut overdue = false;
        for b in self.batches.values_mut() {
            if let Some((seq, until)) = b.after_live
                && (first > seq || now >= until)
            {
                overdue |= first <= seq;
                b.after_live = None;
            }
        }
        if overdue {
            self.live_gap_from(earliest);
        }
    }

    /// Record a REQ just sent, with how many subscriptions we believed open before it.
    fn sent_req(&mut self, id: &SubscriptionId) {
        let replaces = self.live.contains_key(id);
        let open = self.believed_open() - usize::from(replaces);
        self.reqs_sent += 1;
        self.unanswered.push_back(Unanswered {
            id: id.clone(),
            sent_at: Instant::now(),
            open_before: open,
            seq: self.reqs_sent,
            replaces,
        });
    }

    /// The relay answered the earliest REQ of `id` still unanswered (EOSE or CLOSED; REQs
    /// of one id, a subscription replaced in place, are answered in order).
    fn answered(&mut self, id: &SubscriptionId) -> Option<Unanswered> {
        let i = self.unanswered.iter().position(|u| u.id == *id)?;
        self.unanswered.remove(i)
    }

    /// An event arrived on `id`: it answers the REQ only if that is the one pending for the
    /// id (with a replacement pending too, the event may be for either filter).
    fn answered_by_event(&mut self, id: &SubscriptionId) {
        let mut pending = self
            .unanswered
            .iter()
            .enumerate()
            .filter(|(_, u)| u.id == *id);
        if let (Some((i, u)), None) = (pending.next(), pending.next())
            && !u.replaces
        {
            self.unanswered.remove(i);
        }
    }

    /// Take back a subscription the relay does not hold (any more): historic work is
    /// retried at `retry_at`; a live one leaves a gap from when its REQ was sent (`sent_at`;
    /// a refused REQ never covered anything) or from now, and the live plan is rebuilt at
    /// `live_at`.
    fn take_back(
        &mut self,
        id: &SubscriptionId,
        retry_at: Instant,
        live_at: Instant,
        sent_at: Option<Instant>,
    ) {
        if self.live.remove(id).is_some() {
            self.live_gap_from(sent_at);
            self.live_retry_at = Some(live_at);
        } else if let Some(h) = self.historic.remove(id) {
            historic::retry_later(self, h.batch, historic::Work::Page(h.paginator), retry_at);
        } else if let Some(f) = self.fetches.remove(id) {
            historic::retry_later(self, f.batch, f.into_work(), retry_at);
        }
    }

    /// The fingerprint of the filters subscription `id` asked for, if it is ours.
    fn filter_print(&self, id: &SubscriptionId) -> Option<u64> {
        if let Some(h) = self.historic.get(id) {
            return Some(crate::nostr::live_plan::fingerprint(&[h
                .paginator
                .current()]));
        }
        if let Some(f) = self.fetches.get(id) {
            return Some(crate::nostr::live_plan::fingerprint(std::slice::from_ref(
                &f.filter,
            )));
        }
        self.live_plan
            .values()
            .find(|(sid, _)| sid == id)
            .map(|(_, print)| *print)
    }

    fn active_historic(&self) -> usize {
        self.historic.len() + self.negs.len() + self.fetches.len() + self.locals_pending
    }
}
