//! A small relay of our own, scriptable for the behaviours real relays show under load or
//! malice: capped pages, `CLOSED rate-limited:`, missing EOSE, disconnects mid-stream,
//! NOTICE storms, `OK false rate-limited:` to publishers, and raw (invalid or oversize)
//! events injected into answers. With the default script it is a plain NIP-01 relay without
//! NIP-77 (the demo uses it so). Binds loopback only; keeps everything in memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::nostr::RelayUrl;
use futures::{SinkExt, StreamExt};
use nostr::filter::MatchEventOptions;
use nostr::{
    ClientMessage, Event, EventId, Filter, JsonUtil, Kind, RelayMessage, SingleLetterTag,
    SubscriptionId,
};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Most events one REQ returns, whatever its `limit`.
    pub page_cap: Option<usize>,
    /// The first N REQs are answered `CLOSED "rate-limited: slow down"` (load, not a cap).
    pub closed_rate_limited_first: usize,
    /// Every REQ is answered `CLOSED` with this reason (a relay refusing the filters on
    /// policy grounds, e.g. `blocked: …`).
    pub closed_with: Option<String>,
    /// At most this many subscriptions per connection, not published in NIP-11. A REQ over
    /// it is refused the way `cap_refusal` says.
    pub max_subscriptions: Option<usize>,
    pub cap_refusal: CapRefusal,
    /// Never send EOSE.
    pub no_eose: bool,
    /// The first N EVENTs published to this relay get `OK false "rate-limited: …"`.
    pub ok_rate_limited_first: usize,
    /// The first N EVENTs published to this relay get `OK false` with this message (a
    /// transient failure: real GRASP relays send e.g. "Database query failed: …" with no
    /// standard prefix, or `error: …`).
    pub ok_failed_first: Option<(usize, String)>,
    /// This event always gets `OK false` with this message (a relay whose database cannot
    /// take one event, while it takes the rest).
    pub ok_failed_on: Option<(EventId, String)>,
    /// Accept at most this many EVENTs per second (token bucket, burst of one second);
    /// the excess gets `OK false "rate-limited: …"`.
    pub ok_rate_per_sec: Option<f64>,
    /// Close the connection after sending this many stored events, once per relay.
    pub disconnect_after_events: Option<usize>,
    /// The next N REQs drop their connection (no close handshake) instead of being answered:
    /// a relay that goes away in the middle of whatever the client just started.
    pub disconnect_on_reqs: usize,
    /// A REQ reading stored events without a `since` (a whole-history read) drops the
    /// connection: a relay, or a proxy in front of it, that cannot serve a long query.
    pub disconnect_on_unbounded_reqs: bool,
    /// Close every connection this long after it opened: a relay (or a NAT) that keeps
    /// dropping sessions.
    pub close_after: Option<std::time::Duration>,
    /// Drop the connection (no close handshake) on any frame longer than this, as relays do
    /// over their message limit.
    pub max_frame_bytes: Option<usize>,
    /// Served as the NIP-11 document (an HTTP request accepting `application/nostr+json`);
    /// without it such a request gets no answer a client can use.
    pub nip11: Option<String>,
    /// Sent to every new connection, N times.
    pub notice_storm: Option<(String, usize)>,
    /// Answer every REQ with every stored event, whatever its filters ask (a broken or
    /// hostile relay flooding subscriptions with unrelated, validly signed events).
    pub ignore_filters: bool,
    /// Raw event JSON appended to every REQ answer whose filters match the parsed event
    /// (signatures are not checked: that is the point).
    pub raw_events: Vec<String>,
    /// Send a NIP-42 AUTH challenge to every new connection and record the keys that answer
    /// it (`authenticated_keys`).
    pub auth_challenge: bool,
    /// Answer each EVENT's `OK` this late (the connection reads nothing meanwhile), as a
    /// busy relay does.
    pub ok_delay: Option<std::time::Duration>,
    /// Hold new events of some kinds back until their repository's git data arrives, as
    /// GRASP relays do (ngit-grasp).
    pub purgatory: Option<Purgatory>,
    /// Stream nothing to live subscriptions: stored events reach a client only by a query,
    /// as from nostr-relay-builder to a connection that fell over 1,024 new events behind
    /// (its broadcast buffer skips them, and nothing says so).
    pub live_drops: bool,
    /// Take up each REQ (its stored events, EOSE, live delivery) this long after it
    /// arrives, while every other message is handled at once: a relay that handles a
    /// connection's messages concurrently (khatru runs each in its own goroutine) and
    /// registers a subscription once its stored query is done. A CLOSE sent after a REQ
    /// then takes effect first.
    pub req_delay: Option<std::time::Duration>,
    /// Take up live REQs (every filter `limit: 0`) this long after they arrive, and other
    /// REQs at once: a later query can then run before an earlier live REQ is registered.
    pub live_req_delay: Option<std::time::Duration>,
    /// Take up each REQ after its own random delay up to this long, so a later REQ may be
    /// taken up before an earlier one of another id: khatru handles each message in its own
    /// goroutine. REQs of one id keep their order (khatru adds a listener per REQ, so
    /// there a re-used id only widens).
    pub req_jitter: Option<std::time::Duration>,
    /// Record every REQ as it is taken up, in order (`taken_up`).
    pub log_reqs: bool,
    /// Neither answer nor register REQs: a relay that drops what it cannot take up (or a
    /// proxy losing frames), while it goes on serving what it holds.
    pub ignore_reqs: bool,
}

/// A GRASP relay's purgatory: new repository announcements, state events and PRs are
/// accepted with `OK true "purgatory: …"` but not served (nor streamed) until git data for
/// their repository arrives; without it they are dropped after `expiry`. Sent again after
/// that (by a client: ngit-grasp refuses only what its own sync brings back), an event
/// enters purgatory again.
#[derive(Debug, Clone)]
pub struct Purgatory {
    pub kinds: Vec<Kind>,
    /// Dropped this long after it arrived without git data (30 min on ngit-grasp).
    pub expiry: std::time::Duration,
    /// Git data arrives by itself this long after the event (the relay fetching it from the
    /// clone URLs); `None`: only by [`ScriptedRelay::git_push`].
    pub git_data_after: Option<std::time::Duration>,
}

impl Default for Purgatory {
    fn default() -> Self {
        Purgatory {
            kinds: [30617u16, 30618, 1618]
                .into_iter()
                .map(Kind::from)
                .collect(),
            expiry: std::time::Duration::from_secs(1800),
            git_data_after: None,
        }
    }
}

/// ngit-grasp's answer to an event it holds back.
pub const PURGATORY_MESSAGE: &str = "purgatory: won't be served until git data arrives";

/// Events held back in purgatory, with when they arrived.
type Held = HashMap<EventId, (Event, std::time::Instant)>;

/// How a relay refuses a REQ over its subscription cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CapRefusal {
    /// nostr-rs-relay: `NOTICE "Subscription error: Maximum concurrent subscription count
    /// reached"`, naming no subscription.
    #[default]
    Notice,
    /// nostr-relay-builder: `CLOSED <id> "rate-limited: too many REQs"`.
    Closed,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicUsize,
    pub reqs: AtomicUsize,
    pub closes: AtomicUsize,
    pub events_served: AtomicUsize,
    pub events_received: AtomicUsize,
    pub live_connections: AtomicUsize,
    /// Most connections open at once since start (or since reset to the current count).
    pub max_live_connections: AtomicUsize,
    /// Subscriptions this relay closed on its own (`close_subscriptions`).
    pub closed_by_relay: AtomicUsize,
    /// REQs refused for the subscription cap.
    pub cap_refusals: AtomicUsize,
    /// EVENTs answered `purgatory:` (held back until git data arrives).
    pub purgatory_answers: AtomicUsize,
    /// REQs that arrived and wait out a delay (`req_delay`, `live_req_delay`, `req_jitter`).
    pub reqs_delayed: AtomicUsize,
    /// REQs dropped unanswered (`ignore_reqs`).
    pub reqs_ignored: AtomicUsize,
}

impl Counters {
    /// Start counting the maximum afresh from the connections open now.
    pub fn reset_max(&self) {
        self.max_live_connections.store(
            self.live_connections.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }
}

/// Decides whether an EVENT published to the relay is stored: `Err(reason)` refuses it
/// with `OK false "blocked: <reason>"`, as nostr-relay-builder does for its write policies.
pub type AcceptPolicy = Arc<dyn Fn(&Event) -> Result<(), String> + Send + Sync>;

struct Shared {
    policy: Mutex<Option<AcceptPolicy>>,
    served: Mutex<std::collections::HashSet<EventId>>,
    script: Mutex<Script>,
    /// (tokens, last refill) for `ok_rate_per_sec`.
    bucket: Mutex<(f64, std::time::Instant)>,
    store: Mutex<Stored>,
    /// `Script::raw_events`, each with its parse (if it parses).
    raw: Mutex<Vec<(String, Option<Event>)>>,
    live: broadcast::Sender<Event>,
    /// `CLOSED` reasons to send for every open subscription of every connection.
    closes: broadcast::Sender<String>,
    /// Connections open now go silent: nothing read or written again, no FIN.
    silence: broadcast::Sender<()>,
    counters: Counters,
    disconnected_once: Mutex<bool>,
    /// Keys that answered an AUTH challenge with a valid event.
    authenticated: Mutex<Vec<nostr::PublicKey>>,
    purgatory: Mutex<Held>,
    /// REQs taken up, in order (`Script::log_reqs`).
    taken_up: Mutex<Vec<(SubscriptionId, Vec<Filter>)>>,
}

impl Shared {
    /// Release what git data arrived for (by time, or `pushed` says so) into the store, and
    /// drop what waited too long. Called before every look at the store.
    fn settle(&self, pushed: impl Fn(&Event) -> bool) {
        let p = self
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .purgatory
            .clone();
        if let Some(p) = p {
            self.settle_purgatory(&p, pushed);
        }
    }

    /// [`Shared::settle`] with the script's purgatory in hand.
    fn settle_purgatory(&self, p: &Purgatory, pushed: impl Fn(&Event) -> bool) {
        let mut held = self.purgatory.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut released = Vec::new();
        let mut dropped = Vec::new();
        for (id, (e, at)) in held.iter() {
            let age = now.saturating_duration_since(*at);
            if pushed(e) || p.git_data_after.is_some_and(|d| age >= d) {
                released.push(*id);
            } else if age >= p.expiry {
                dropped.push(*id);
            }
        }
        for id in dropped {
            held.remove(&id);
        }
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        for id in released {
            if let Some((e, _)) = held.remove(&id)
                && store.insert(e.clone())
            {
                let _ = self.live.send(e);
            }
        }
    }
}

pub struct ScriptedRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for ScriptedRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedRelay {
    pub async fn start(script: Script) -> std::io::Result<ScriptedRelay> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    /// [`ScriptedRelay::start`] on a given address (port 0: any free port).
    pub async fn start_on(addr: SocketAddr, script: Script) -> std::io::Result<ScriptedRelay> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let raw = parse_raw(&script.raw_events);
        let shared = Arc::new(Shared {
            policy: Mutex::new(None),
            served: Mutex::new(Default::default()),
            bucket: Mutex::new((
                script.ok_rate_per_sec.unwrap_or(0.0),
                std::time::Instant::now(),
            )),
            script: Mutex::new(script),
            store: Mutex::new(Stored::default()),
            raw: Mutex::new(raw),
            live: broadcast::channel(10_000).0,
            closes: broadcast::channel(16).0,
            silence: broadcast::channel(16).0,
            counters: Counters::default(),
            disconnected_once: Mutex::new(false),
            authenticated: Mutex::new(Vec::new()),
            purgatory: Mutex::new(Held::default()),
            taken_up: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                conns.spawn(async move {
                    let document = s
                        .script
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .nip11
                        .clone();
                    let stream = match document {
                        Some(doc) => match answer_nip11(stream, &doc).await {
                            Some(stream) => stream,
                            None => return,
                        },
                        None => stream,
                    };
                    if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                        serve(ws, s).await;
                    }
                });
            }
        });
        Ok(ScriptedRelay { addr, shared, task })
    }

    pub fn url(&self) -> RelayUrl {
        // A socket address always forms a valid ws:// URL.
        RelayUrl::parse(&format!("ws://{}", self.addr)).unwrap_or_else(|_| unreachable!())
    }

    pub fn add(&self, events: impl IntoIterator<Item = Event>) {
        let mut store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        for e in events {
            if !store.contains(&e.id) {
                let _ = self.shared.live.send(e.clone());
                store.insert(e);
            }
        }
    }

    /// Store without delivering to live subscriptions: an event that only a historic query
    /// (or a reconciliation) finds.
    pub fn add_silently(&self, events: impl IntoIterator<Item = Event>) {
        let mut store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        for e in events {
            store.insert(e);
        }
    }

    /// Git data arrives for the repository `identifier` (its `d` tag, or the `a` tag of a
    /// PR): its events leave purgatory and are served.
    pub fn git_push(&self, identifier: &str) {
        let of_repo = |e: &Event| {
            e.tags.identifier() == Some(identifier)
                || e.tags.iter().any(|t| {
                    t.kind() == nostr::TagKind::a()
                        && t.content()
                            .is_some_and(|c| c.rsplit(':').next() == Some(identifier))
                })
        };
        self.shared.settle(of_repo);
    }

    /// Events held in purgatory now.
    pub fn in_purgatory(&self) -> usize {
        self.shared.settle(|_| false);
        self.shared
            .purgatory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Events this relay has accepted: served, or held in purgatory.
    pub fn accepted_ids(&self) -> Vec<EventId> {
        let mut ids = self.ids();
        ids.extend(
            self.shared
                .purgatory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied(),
        );
        ids
    }

    /// Stored (served) events.
    pub fn ids(&self) -> Vec<EventId> {
        self.shared.settle(|_| false);
        self.shared
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .iter()
            .map(|e| e.id)
            .collect()
    }

    /// Ids of stored events this relay has sent in answer to a REQ.
    pub fn served_ids(&self) -> std::collections::HashSet<EventId> {
        self.shared
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Close every open subscription on every connection with `CLOSED <reason>`, as a relay
    /// does when it sheds load or restarts a subscription backend. Counted in
    /// `closed_by_relay` once sent.
    pub fn close_subscriptions(&self, reason: &str) {
        let _ = self.shared.closes.send(reason.to_string());
    }

    /// Every connection open now goes silent without closing: it reads nothing (so answers
    /// no ping) and sends nothing, as after a NAT idle drop or a crash without FIN. New
    /// connections are served normally.
    pub fn silence_connections(&self) {
        let _ = self.shared.silence.send(());
    }

    pub fn set_script(&self, script: Script) {
        *self.shared.raw.lock().unwrap_or_else(|e| e.into_inner()) = parse_raw(&script.raw_events);
        *self.shared.script.lock().unwrap_or_else(|e| e.into_inner()) = script;
    }

    /// Refuse published EVENTs that `policy` refuses (a relay with acceptance rules, such
    /// as a GRASP relay in front of its repositories).
    pub fn set_policy(&self, policy: AcceptPolicy) {
        *self.shared.policy.lock().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }

    /// The REQs taken up so far, in order, with their filters (`Script::log_reqs`).
    pub fn taken_up(&self) -> Vec<(SubscriptionId, Vec<Filter>)> {
        self.shared
            .taken_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Keys that answered this relay's AUTH challenges (`Script::auth_challenge`).
    pub fn authenticated_keys(&self) -> Vec<nostr::PublicKey> {
        self.shared
            .authenticated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn parse_raw(raw: &[String]) -> Vec<(String, Option<Event>)> {
    raw.iter()
        .map(|r| (r.clone(), Event::from_json(r).ok()))
        .collect()
}

/// The stored events with the indexes a REQ needs, so a filter looks at its candidates
/// instead of every event (the demo runs this relay with tens of thousands of events).
#[derive(Default)]
struct Stored {
    events: Vec<Event>,
    by_id: HashMap<EventId, usize>,
    by_tag: HashMap<(SingleLetterTag, String), Vec<usize>>,
    by_kind: HashMap<Kind, Vec<usize>>,
}

impl Stored {
    fn contains(&self, id: &EventId) -> bool {
        self.by_id.contains_key(id)
    }

    fn insert(&mut self, e: Event) -> bool {
        if self.by_id.contains_key(&e.id) {
            return false;
        }
        let i = self.events.len();
        self.by_id.insert(e.id, i);
        for t in e.tags.iter() {
            if let (Some(letter), Some(value)) = (t.single_letter_tag(), t.content()) {
                self.by_tag
                    .entry((letter, value.to_string()))
                    .or_default()
                    .push(i);
            }
        }
        self.by_kind.entry(e.kind).or_default().push(i);
        self.events.push(e);
        true
    }

    /// Every event `f` could match (a superset; the caller still matches each).
    fn candidates<'a>(&'a self, f: &Filter) -> Box<dyn Iterator<Item = &'a Event> + 'a> {
        let mut positions: Vec<usize> = if let Some(ids) = &f.ids {
            ids.iter()
                .filter_map(|id| self.by_id.get(id).copied())
                .collect()
        } else if let Some((letter, values)) = f.generic_tags.iter().next() {
            values
                .iter()
                .flat_map(|v| {
                    self.by_tag
                        .get(&(*letter, v.clone()))
                        .into_iter()
                        .flatten()
                        .copied()
                })
                .collect()
        } else if let Some(kinds) = &f.kinds {
            kinds
                .iter()
                .flat_map(|k| self.by_kind.get(k).into_iter().flatten().copied())
                .collect()
        } else {
            return Box::new(self.events.iter());
        };
        positions.sort_unstable();
        positions.dedup();
        Box::new(positions.into_iter().map(move |i| &self.events[i]))
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn serve(ws: Ws, s: Arc<Shared>) {
    s.counters.connections.fetch_add(1, Ordering::SeqCst);
    let now = s.counters.live_connections.fetch_add(1, Ordering::SeqCst) + 1;
    s.counters
        .max_live_connections
        .fetch_max(now, Ordering::SeqCst);
    let (mut tx, mut rx) = ws.split();
    let mut live_rx = s.live.subscribe();
    let mut closes_rx = s.closes.subscribe();
    let mut silence_rx = s.silence.subscribe();
    let mut subs: HashMap<SubscriptionId, Vec<Filter>> = HashMap::new();

    let storm = s
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .notice_storm
        .clone();
    if let Some((text, n)) = storm {
        for _ in 0..n {
            if tx
                .send(Message::text(RelayMessage::notice(text.clone()).as_json()))
                .await
                .is_err()
            {
                break;
            }
        }
    }

    let challenge = s
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .auth_challenge;
    if challenge {
        let text = RelayMessage::auth(format!("challenge-{now}")).as_json();
        let _ = tx.send(Message::text(text)).await;
    }

    let close_at = s
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .close_after
        .map(|d| tokio::time::Instant::now() + d);
    // REQs waiting out their delay, in the order they are taken up.
    let mut delayed: std::collections::VecDeque<(tokio::time::Instant, SubscriptionId, String)> =
        Default::default();
    'conn: loop {
        let next_delayed = delayed.front().map(|(at, _, _)| *at);
        tokio::select! {
            _ = async {
                match next_delayed {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let Some((_, _, text)) = delayed.pop_front() else { continue };
                let Ok(msg) = ClientMessage::from_json(text.as_str()) else { continue };
                for reply in handle(&s, &mut subs, msg) {
                    match reply {
                        Reply::Send(text) => {
                            if tx.send(Message::text(text)).await.is_err() { break 'conn; }
                        }
                        Reply::Disconnect => break 'conn,
                    }
                }
            }
            _ = async {
                match close_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => break 'conn,
            frame = rx.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => {
                        let limit = s.script.lock().unwrap_or_else(|e| e.into_inner()).max_frame_bytes;
                        if limit.is_some_and(|max| text.len() > max) {
                            break 'conn;
                        }
                        text
                    }
                    // Pings are answered by tungstenite itself; nothing else carries NIP-01.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_))) => continue,
                    _ => break,
                };
                let Ok(msg) = ClientMessage::from_json(text.as_str()) else { continue };
                if let ClientMessage::Req { subscription_id, filters } = &msg {
                    let (delay, live_delay, jitter) = {
                        let script = s.script.lock().unwrap_or_else(|e| e.into_inner());
                        (script.req_delay, script.live_req_delay, script.req_jitter)
                    };
                    let live = filters.iter().all(|f| f.limit == Some(0));
                    let jitter = jitter.map(|j| j.mul_f64(rand::random::<f64>()));
                    let delay = [delay, live_delay.filter(|_| live), jitter]
                        .into_iter()
                        .flatten()
                        .max();
                    if let Some(d) = delay {
                        s.counters.reqs_delayed.fetch_add(1, Ordering::SeqCst);
                        // REQs of one id keep their order: khatru keeps a listener per
                        // REQ, so a re-used id only widens there, while relays that
                        // overwrite by id handle a connection's messages in order.
                        let id = subscription_id.clone().into_owned();
                        let at = delayed
                            .iter()
                            .filter(|(_, i, _)| *i == id)
                            .map(|(t, _, _)| *t)
                            .fold(tokio::time::Instant::now() + d, |a, b| a.max(b));
                        let pos = delayed.partition_point(|(t, _, _)| *t <= at);
                        delayed.insert(pos, (at, id, text.to_string()));
                        continue;
                    }
                }
                let replies = handle(&s, &mut subs, msg);
                for reply in replies {
                    match reply {
                        Reply::Send(text) => {
                            let delay = s.script.lock().unwrap_or_else(|e| e.into_inner()).ok_delay;
                            if let Some(d) = delay.filter(|_| text.starts_with("[\"OK\"")) {
                                tokio::time::sleep(d).await;
                            }
                            if tx.send(Message::text(text)).await.is_err() { break 'conn; }
                        }
                        Reply::Disconnect => break 'conn,
                    }
                }
            }
            _ = silence_rx.recv() => {
                s.counters.live_connections.fetch_sub(1, Ordering::SeqCst);
                // Hold the socket open and never touch it again.
                std::future::pending::<()>().await;
            }
            reason = closes_rx.recv() => {
                let Ok(reason) = reason else { continue };
                for id in std::mem::take(&mut subs).into_keys() {
                    let text = RelayMessage::closed(id, reason.clone()).as_json();
                    if tx.send(Message::text(text)).await.is_err() { break 'conn; }
                    s.counters.closed_by_relay.fetch_add(1, Ordering::SeqCst);
                }
            }
            ev = live_rx.recv() => {
                let Ok(ev) = ev else { continue };
                if s.script.lock().unwrap_or_else(|e| e.into_inner()).live_drops {
                    continue;
                }
                for (id, filters) in &subs {
                    if filters.iter().any(|f| f.match_event(&ev, MatchEventOptions::default())) {
                        let text = RelayMessage::event(id.clone(), ev.clone()).as_json();
                        if tx.send(Message::text(text)).await.is_err() { break 'conn; }
                    }
                }
            }
        }
    }
    s.counters.live_connections.fetch_sub(1, Ordering::SeqCst);
}

/// A NIP-11 request (HTTP, accepting `application/nostr+json`, no WebSocket upgrade) gets
/// `doc`; anything else is handed back unread for the WebSocket handshake.
async fn answer_nip11(
    mut stream: tokio::net::TcpStream,
    doc: &str,
) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    // Peek until the request's head is complete: nothing is consumed before the decision.
    let head = loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if n == buf.len() {
            return Some(stream);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
    if text.contains("upgrade: websocket") || !text.contains("application/nostr+json") {
        return Some(stream);
    }
    let mut consumed = vec![0u8; head];
    stream.read_exact(&mut consumed).await.ok()?;
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/nostr+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{doc}",
        doc.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    None
}

enum Reply {
    Send(String),
    Disconnect,
}

fn handle(
    s: &Shared,
    subs: &mut HashMap<SubscriptionId, Vec<Filter>>,
    msg: ClientMessage<'_>,
) -> Vec<Reply> {
    let mut script = s.script.lock().unwrap_or_else(|e| e.into_inner());
    match msg {
        ClientMessage::Event(ev) => {
            let ev = ev.into_owned();
            s.counters.events_received.fetch_add(1, Ordering::SeqCst);
            if let Some((n, text)) = &mut script.ok_failed_first
                && *n > 0
            {
                *n -= 1;
                return vec![Reply::Send(
                    RelayMessage::ok(ev.id, false, text.clone()).as_json(),
                )];
            }
            if let Some((id, text)) = &script.ok_failed_on
                && *id == ev.id
            {
                return vec![Reply::Send(
                    RelayMessage::ok(ev.id, false, text.clone()).as_json(),
                )];
            }
            if script.ok_rate_limited_first > 0 {
                script.ok_rate_limited_first -= 1;
                return vec![Reply::Send(
                    RelayMessage::ok(ev.id, false, "rate-limited: slow down").as_json(),
                )];
            }
            if let Some(rate) = script.ok_rate_per_sec {
                let mut b = s.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = std::time::Instant::now();
                b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(rate.max(1.0));
                b.1 = now;
                if b.0 < 1.0 {
                    return vec![Reply::Send(
                        RelayMessage::ok(ev.id, false, "rate-limited: slow down").as_json(),
                    )];
                }
                b.0 -= 1.0;
            }
            let policy = s.policy.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(Err(reason)) = policy.map(|p| p(&ev)) {
                return vec![Reply::Send(
                    RelayMessage::ok(ev.id, false, format!("blocked: {reason}")).as_json(),
                )];
            }
            if let Some(p) = &script.purgatory
                && p.kinds.contains(&ev.kind)
            {
                s.settle_purgatory(p, |_| false);
                let mut held = s.purgatory.lock().unwrap_or_else(|e| e.into_inner());
                let stored = s
                    .store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&ev.id);
                let message = if stored {
                    "duplicate: already have this event"
                } else {
                    held.entry(ev.id)
                        .or_insert_with(|| (ev.clone(), std::time::Instant::now()));
                    s.counters.purgatory_answers.fetch_add(1, Ordering::SeqCst);
                    PURGATORY_MESSAGE
                };
                return vec![Reply::Send(
                    RelayMessage::ok(ev.id, true, message).as_json(),
                )];
            }
            let ok = RelayMessage::ok(ev.id, true, "").as_json();
            let mut store = s.store.lock().unwrap_or_else(|e| e.into_inner());
            if !store.contains(&ev.id) {
                let _ = s.live.send(ev.clone());
                store.insert(ev);
            }
            vec![Reply::Send(ok)]
        }
        ClientMessage::Req {
            subscription_id,
            filters,
        } => {
            s.counters.reqs.fetch_add(1, Ordering::SeqCst);
            if script.log_reqs {
                s.taken_up.lock().unwrap_or_else(|e| e.into_inner()).push((
                    subscription_id.clone().into_owned(),
                    filters.iter().map(|f| f.as_ref().clone()).collect(),
                ));
            }
            if script.ignore_reqs {
                s.counters.reqs_ignored.fetch_add(1, Ordering::SeqCst);
                return Vec::new();
            }
            if script.disconnect_on_reqs > 0 {
                script.disconnect_on_reqs -= 1;
                return vec![Reply::Disconnect];
            }
            if script.disconnect_on_unbounded_reqs
                && filters
                    .iter()
                    .any(|f| f.since.is_none() && f.limit != Some(0))
            {
                return vec![Reply::Disconnect];
            }
            let sub_id = subscription_id.into_owned();
            if let Some(max) = script.max_subscriptions
                && !subs.contains_key(&sub_id)
                && subs.len() >= max
            {
                s.counters.cap_refusals.fetch_add(1, Ordering::SeqCst);
                let msg = match script.cap_refusal {
                    CapRefusal::Notice => RelayMessage::notice(
                        "Subscription error: Maximum concurrent subscription count reached",
                    ),
                    CapRefusal::Closed => {
                        RelayMessage::closed(sub_id, "rate-limited: too many REQs")
                    }
                };
                return vec![Reply::Send(msg.as_json())];
            }
            if let Some(reason) = &script.closed_with {
                return vec![Reply::Send(
                    RelayMessage::closed(sub_id, reason.clone()).as_json(),
                )];
            }
            if script.closed_rate_limited_first > 0 {
                script.closed_rate_limited_first -= 1;
                return vec![Reply::Send(
                    RelayMessage::closed(sub_id, "rate-limited: slow down").as_json(),
                )];
            }
            let filters: Vec<Filter> = filters.into_iter().map(|f| f.into_owned()).collect();
            let mut out = Vec::new();
            if let Some(p) = &script.purgatory {
                s.settle_purgatory(p, |_| false);
            }
            let store = s.store.lock().unwrap_or_else(|e| e.into_inner());
            if script.ignore_filters {
                for e in &store.events {
                    out.push(Reply::Send(
                        RelayMessage::event(sub_id.clone(), e.clone()).as_json(),
                    ));
                }
            }
            for f in &filters {
                // `limit: 0` asks for live events only: nothing stored to look at.
                if f.limit == Some(0) {
                    continue;
                }
                let mut matching: Vec<&Event> = store
                    .candidates(f)
                    .filter(|e| f.match_event(e, MatchEventOptions::default()))
                    .collect();
                matching.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
                let limit = f
                    .limit
                    .unwrap_or(usize::MAX)
                    .min(script.page_cap.unwrap_or(usize::MAX));
                for e in matching.into_iter().take(limit) {
                    out.push(Reply::Send(
                        RelayMessage::event(sub_id.clone(), e.clone()).as_json(),
                    ));
                    s.served
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(e.id);
                    let served = s.counters.events_served.fetch_add(1, Ordering::SeqCst) + 1;
                    if let Some(n) = script.disconnect_after_events {
                        let mut once = s
                            .disconnected_once
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        if !*once && served >= n {
                            *once = true;
                            out.push(Reply::Disconnect);
                            return out;
                        }
                    }
                }
            }
            // Raw events are stored events too: served to historic filters only, parsed once.
            let historic: Vec<&Filter> = filters.iter().filter(|f| f.limit != Some(0)).collect();
            let raw = s.raw.lock().unwrap_or_else(|e| e.into_inner());
            for (raw, parsed) in raw.iter() {
                if let Some(ev) = parsed
                    && historic
                        .iter()
                        .any(|f| f.match_event(ev, MatchEventOptions::default()))
                {
                    out.push(Reply::Send(format!(
                        "[\"EVENT\",{},{raw}]",
                        serde_json::Value::from(sub_id.as_str())
                    )));
                }
            }
            if !script.no_eose {
                out.push(Reply::Send(RelayMessage::eose(sub_id.clone()).as_json()));
            }
            // Live delivery only for subscriptions that asked for it; closed on CLOSE.
            subs.insert(sub_id, filters);
            out
        }
        // Like many relays without NIP-77: a NOTICE, no NEG-MSG.
        ClientMessage::NegOpen { .. } => {
            vec![Reply::Send(
                RelayMessage::notice("ERROR: bad msg: unknown cmd").as_json(),
            )]
        }
        ClientMessage::Auth(ev) => {
            let ev = ev.into_owned();
            let valid = ev.kind == Kind::Authentication && ev.verify().is_ok();
            if valid {
                s.authenticated
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ev.pubkey);
            }
            let message = if valid { "" } else { "invalid: bad AUTH event" };
            vec![Reply::Send(
                RelayMessage::ok(ev.id, valid, message).as_json(),
            )]
        }
        ClientMessage::Close(id) => {
            s.counters.closes.fetch_add(1, Ordering::SeqCst);
            subs.remove(id.as_ref());
            Vec::new()
        }
        _ => Vec::new(),
    }
}
