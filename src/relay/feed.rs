//! A self-subscription to the local relay: everything it holds for some filters (paged),
//! then live — and again after every reconnect. Discovery feeds on announcements and
//! deletions this way; workers on the root events of their repos.
//!
//! The local relay is the authority on what was accepted, so this is how grasp-sync learns
//! what to sync. An unreachable local relay is retried with backoff, forever.
//!
//! The local relay limits what one connection may ask: nostr-relay-builder (ngit-grasp)
//! refuses a 501st open REQ with `CLOSED "rate-limited: too many REQs"`, strfry holds 20,
//! nostr-rs-relay refuses by NOTICE. A worker's filters grow with its repos (two per hundred),
//! so the feed never sends them all at once: the live filters go packed into a few REQs (at
//! most 50 filters and 64 KiB each), the historic ones page through a small window of
//! subscriptions, and a refusal that names its REQ does not end the connection — the refused
//! subscription is sent again later (a refused live one with its history read again, since
//! what was stored while it was refused was never streamed), and a refusal that says the
//! connection holds too many teaches the feed the relay's cap, which the plan then stays
//! within (kept across reconnects, never below two). A cap refused by NOTICE names no REQ:
//! the connection starts again within half of what was open. A history page that hears
//! nothing for a minute is asked again. All of this holds for a relay that answers one
//! connection's messages in order, as relays do.
//!
//! A live stream can also lose events without a word: nostr-relay-builder (ngit-grasp)
//! broadcasts new events through a bounded channel and skips what a lagging connection
//! missed. So once loaded, the feed reads the stored events again every
//! [`FeedLimits::reread_every`] on the same connection, live REQs left open, and hands
//! what those pages bring as [`FeedEvent::Reread`]: its consumer can tell what the stream
//! never delivered.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nostr::{ClientMessage, Event, EventId, Filter, RelayMessage, SubscriptionId, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::backoff::{Health, HealthConfig};
use super::connection::{self, ConnectOptions, Incoming};
use crate::nostr::RelayUrl;
use crate::nostr::filters::pack_within;
use crate::nostr::outcome::means_subscription_cap;
use crate::nostr::pagination::{Paginator, Step};
use crate::nostr::remote_text::clean;

/// The largest message the feed reads from the local relay. It holds whatever its users
/// pushed — a patch can be large — and one message over the limit would end the connection
/// and come back first on the next, forever.
pub const FEED_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug)]
pub enum FeedEvent {
    Event(Box<Event>),
    /// An event read again by a periodic re-read of the stored events: usually one already
    /// delivered; if not, the live stream lost it.
    Reread(Box<Event>),
    /// Everything stored for the current filters has been delivered on this connection (also
    /// said when a re-read ends).
    Synced,
    /// The feed is (re)reading the stored events: a new connection, or new filters.
    Loading,
    /// The local relay refused one of the feed's subscriptions; it is sent again after
    /// `retry_in`. `cap` is what the feed now believes the relay's subscription cap per
    /// connection to be, when the refusal said it holds too many.
    Refused {
        live: bool,
        reason: String,
        cap: Option<usize>,
        retry_in: Duration,
    },
    /// The connection failed; it is retried after `retry_in`.
    Disconnected {
        error: String,
        retry_in: Duration,
    },
}

/// How the feed spends the local relay's subscriptions on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedLimits {
    /// Historic subscriptions open at once (each pages through one filter).
    pub historic_window: usize,
    /// Filters packed into one live REQ (more when the relay's cap leaves the live REQs
    /// less room).
    pub live_filters_per_req: usize,
    /// Largest live REQ, in bytes of filters: relays bound a message's size (nostr-rs-relay
    /// and strfry: 128 KiB), and one over it costs the connection.
    pub live_req_bytes: usize,
    /// First wait before a refused subscription is sent again; it doubles with each
    /// refusal in a row, up to `retry_max`.
    pub retry: Duration,
    pub retry_max: Duration,
    /// A history page that hears nothing (no event, no EOSE) for this long is closed and
    /// asked again, as if refused: a relay that drops a REQ silently must not hold a place
    /// in the window for ever.
    pub page_silence: Duration,
    /// Once loaded, read every stored event again this often (`None`: never), the safety net
    /// under a live stream that may drop events.
    pub reread_every: Option<Duration>,
}

impl Default for FeedLimits {
    fn default() -> Self {
        FeedLimits {
            historic_window: 8,
            live_filters_per_req: 50,
            live_req_bytes: 64 * 1024,
            retry: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            page_silence: Duration::from_secs(60),
            reread_every: Some(DEFAULT_REREAD_EVERY),
        }
    }
}

/// How often a loaded feed reads the stored events again by default: it bounds how long an
/// event the live stream dropped stays unknown, and costs one read of the feed's history.
pub const DEFAULT_REREAD_EVERY: Duration = Duration::from_secs(600);

/// The smallest subscription cap the feed believes: one live REQ and one history page. A
/// lower guess (a NOTICE names no REQ, a limit per address phrased like a cap) would leave no
/// room for history at all, for the life of the process.
pub const MIN_CAP: usize = 2;

/// The live REQs for `filters`: at most `live_filters_per_req` filters and `live_req_bytes`
/// each — more filters per REQ when the relay's cap leaves the live REQs less room (one
/// subscription stays for history). The byte bound wins over the cap: a REQ over it costs
/// the connection, one over the cap only a refusal.
pub fn live_reqs(
    filters: Vec<Filter>,
    limits: &FeedLimits,
    cap: Option<usize>,
) -> Vec<Vec<Filter>> {
    let mut per_req = limits.live_filters_per_req.max(1);
    if let Some(cap) = cap {
        let live_room = cap.max(MIN_CAP) - 1;
        per_req = per_req.max(filters.len().div_ceil(live_room));
    }
    pack_within(filters, per_req, limits.live_req_bytes)
}

/// History pages open at once beside `live` live REQs, within the relay's cap when known
/// (at least one).
pub fn window(live: usize, limits: &FeedLimits, cap: Option<usize>) -> usize {
    let window = limits.historic_window.max(1);
    match cap {
        Some(cap) => window.min(cap.saturating_sub(live)).max(1),
        None => window,
    }
}

/// The wait before the `attempt`-th refusal in a row (from 1) of a subscription is retried.
pub fn retry_delay(limits: &FeedLimits, attempt: u32) -> Duration {
    super::backoff::doubled(
        limits.retry,
        attempt.saturating_sub(1),
        limits.retry_max.max(limits.retry),
    )
}

pub struct FeedHandle {
    filters: watch::Sender<Vec<Filter>>,
    task: JoinHandle<()>,
}

impl FeedHandle {
    /// Replace the filters; the feed re-subscribes (historic + live) on its connection.
    pub fn set_filters(&self, filters: Vec<Filter>) {
        self.filters.send_if_modified(|f| {
            if *f == filters {
                false
            } else {
                *f = filters;
                true
            }
        });
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for FeedHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start a feed with the default [`FeedLimits`]. Events arrive on the returned channel
/// (bounded: a slow consumer slows the feed, it never buffers without limit).
pub fn spawn(
    url: RelayUrl,
    filters: Vec<Filter>,
    health: HealthConfig,
    connect: ConnectOptions,
) -> (FeedHandle, mpsc::Receiver<FeedEvent>) {
    spawn_with(url, filters, health, connect, FeedLimits::default())
}

/// Start a feed that spends the local relay's subscriptions as `limits` say.
pub fn spawn_with(
    url: RelayUrl,
    filters: Vec<Filter>,
    health: HealthConfig,
    mut connect: ConnectOptions,
    limits: FeedLimits,
) -> (FeedHandle, mpsc::Receiver<FeedEvent>) {
    let (tx, rx) = mpsc::channel(1024);
    let (ftx, frx) = watch::channel(filters);
    connect.max_message_bytes = connect.max_message_bytes.max(FEED_MAX_MESSAGE_BYTES);
    let task = tokio::spawn(run(url, frx, health, connect, limits, tx));
    (FeedHandle { filters: ftx, task }, rx)
}

async fn run(
    url: RelayUrl,
    mut filters: watch::Receiver<Vec<Filter>>,
    health: HealthConfig,
    connect: ConnectOptions,
    limits: FeedLimits,
    tx: mpsc::Sender<FeedEvent>,
) {
    let mut health = Health::new(health);
    // The relay's subscription cap as learned from its refusals, kept across connections.
    let mut cap: Option<usize> = None;
    loop {
        if let Some(at) = health.next_retry_at() {
            tokio::time::sleep_until(at.into()).await;
        }
        let error = match connection::connect(&url, &connect).await {
            Ok((mut w, mut r)) => {
                health.on_connected(Instant::now());
                let mut feed = Feed::new(&mut w, &tx, &limits, &mut cap);
                match feed.serve(&mut r, &mut filters).await {
                    Ok(()) => return, // consumer gone
                    Err(e) => e,
                }
            }
            Err(e) => e.to_string(),
        };
        let retry_in = health.on_failure(Instant::now(), rand::random::<f64>());
        tracing::warn!(relay = %url, %error, ?retry_in, "local relay feed disconnected");
        if tx
            .send(FeedEvent::Disconnected { error, retry_in })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The consumer went away (`Gone`) or the connection failed (`Failed`).
enum Stop {
    Gone,
    Failed(String),
}

impl From<connection::ConnectionError> for Stop {
    fn from(e: connection::ConnectionError) -> Self {
        Stop::Failed(e.to_string())
    }
}

/// One historic filter being paged.
struct Historic {
    /// The filter as asked (a refused live REQ's filters are not queued twice).
    filter: Filter,
    pager: Paginator,
    /// The current page's (id, created_at).
    page: Vec<(EventId, Timestamp)>,
    /// Refusals in a row of this filter's current page.
    refusals: u32,
    /// Subscriptions believed open on the relay when this page's REQ was sent.
    sent_with: usize,
    /// When this page's REQ was sent or last brought an event.
    heard: Instant,
    /// Queued by a periodic re-read: its events go out as `Reread`.
    reread: bool,
}

/// One live REQ: a few filters packed together.
struct Live {
    filters: Vec<Filter>,
    refusals: u32,
    sent_with: usize,
}

/// The subscriptions of one connection.
struct Feed<'a> {
    w: &'a mut connection::ConnWriter,
    tx: &'a mpsc::Sender<FeedEvent>,
    limits: &'a FeedLimits,
    cap: &'a mut Option<usize>,
    next: u64,
    filters: usize,
    window: usize,
    live: HashMap<SubscriptionId, Live>,
    /// Refused live REQs, sent again (with their history) once due.
    live_waiting: Vec<(Instant, Live)>,
    historic: HashMap<SubscriptionId, Historic>,
    /// Historic pages waiting for a place in the window, once due.
    queued: VecDeque<(Instant, Historic)>,
    /// A refusal by cap of a live REQ: everything is laid out again within it, once due.
    replan_at: Option<Instant>,
    /// `Synced` has been sent since the last (re)subscription or re-read.
    synced: bool,
    /// `Loading` has been said and `Synced` not yet.
    loading: bool,
    /// The filters as last laid out, read again by a re-read.
    current: Vec<Filter>,
    /// When the next re-read starts (set once loaded).
    reread_at: Option<Instant>,
    /// A re-read is under way: history pages go one at a time.
    rereading: bool,
}

impl<'a> Feed<'a> {
    fn new(
        w: &'a mut connection::ConnWriter,
        tx: &'a mpsc::Sender<FeedEvent>,
        limits: &'a FeedLimits,
        cap: &'a mut Option<usize>,
    ) -> Self {
        Feed {
            w,
            tx,
            limits,
            cap,
            next: 0,
            filters: 0,
            window: 1,
            live: HashMap::new(),
            live_waiting: Vec::new(),
            historic: HashMap::new(),
            queued: VecDeque::new(),
            replan_at: None,
            synced: false,
            loading: false,
            current: Vec::new(),
            reread_at: None,
            rereading: false,
        }
    }

    async fn serve(
        &mut self,
        r: &mut connection::ConnReader,
        filters: &mut watch::Receiver<Vec<Filter>>,
    ) -> Result<(), String> {
        match self.run(r, filters).await {
            Ok(()) | Err(Stop::Gone) => Ok(()),
            Err(Stop::Failed(e)) => Err(e),
        }
    }

    async fn run(
        &mut self,
        r: &mut connection::ConnReader,
        filters: &mut watch::Receiver<Vec<Filter>>,
    ) -> Result<(), Stop> {
        let mut subscribe = true;
        loop {
            if subscribe || self.replan_at.is_some_and(|at| at <= Instant::now()) {
                subscribe = false;
                let current = filters.borrow_and_update().clone();
                self.subscribe(current).await?;
            }
            let now = Instant::now();
            self.pump(now).await?;
            let wake = self.next_wake(now);
            tokio::select! {
                msg = r.recv() => match msg? {
                    Incoming::Message(m) => self.on_message(m).await?,
                    Incoming::Malformed { .. } => {}
                },
                changed = filters.changed() => {
                    if changed.is_err() {
                        return Err(Stop::Gone);
                    }
                    subscribe = true;
                }
                () = sleep_until(wake), if wake.is_some() => {}
            }
        }
    }

    async fn say(&self, ev: FeedEvent) -> Result<(), Stop> {
        self.tx.send(ev).await.map_err(|_| Stop::Gone)
    }

    fn id(&mut self, kind: &str) -> SubscriptionId {
        self.next += 1;
        SubscriptionId::new(format!("feed-{kind}-{}", self.next))
    }

    fn open(&self) -> usize {
        self.live.len() + self.historic.len()
    }

    /// Whether the relay's cap (when known) leaves room for one more subscription.
    fn room(&self) -> bool {
        self.cap.is_none_or(|c| self.open() < c)
    }

    /// Close everything and lay `filters` out again: live REQs first, so nothing stored
    /// from now on falls between the stored set and the stream; history behind them.
    async fn subscribe(&mut self, filters: Vec<Filter>) -> Result<(), Stop> {
        let old: Vec<SubscriptionId> = self
            .live
            .drain()
            .map(|(id, _)| id)
            .chain(self.historic.drain().map(|(id, _)| id))
            .collect();
        for id in old {
            self.w.send(&ClientMessage::close(id)).await?;
        }
        self.live_waiting.clear();
        self.queued.clear();
        self.replan_at = None;
        self.synced = false;
        self.reread_at = None;
        self.rereading = false;
        self.current = filters.clone();
        self.filters = filters.len();
        let reqs = live_reqs(filters.clone(), self.limits, *self.cap);
        self.window = window(reqs.len(), self.limits, *self.cap);
        self.loading = true;
        self.say(FeedEvent::Loading).await?;
        let now = Instant::now();
        for chunk in reqs {
            self.send_live(Live {
                filters: chunk,
                refusals: 0,
                sent_with: 0,
            })
            .await?;
        }
        for f in filters {
            self.queued.push_back((now, historic(f)));
        }
        Ok(())
    }

    async fn send_live(&mut self, mut live: Live) -> Result<(), Stop> {
        let id = self.id("live");
        let filters: Vec<Filter> = live.filters.iter().cloned().map(|f| f.limit(0)).collect();
        self.w
            .send(&ClientMessage::req(id.clone(), filters))
            .await?;
        live.sent_with = self.open();
        self.live.insert(id, live);
        Ok(())
    }

    /// Send what is due at `now` and fits; say `Synced` once nothing is left to read.
    async fn pump(&mut self, now: Instant) -> Result<(), Stop> {
        self.expire_silent_pages(now).await?;
        if self.synced && self.reread_at.is_some_and(|at| at <= now) {
            // Live REQs stay open: what is stored from now on is streamed (or read here).
            self.reread_at = None;
            self.synced = false;
            self.rereading = true;
            for f in &self.current {
                let mut h = historic(f.clone());
                h.reread = true;
                self.queued.push_back((now, h));
            }
        }
        let mut i = 0;
        while i < self.live_waiting.len() {
            if self.live_waiting[i].0 <= now && self.room() {
                let (_, live) = self.live_waiting.swap_remove(i);
                // What was stored while it was refused was never streamed: read it again
                // (once: a filter already waiting for its history is not queued twice, so a
                // relay that keeps refusing does not grow the queue).
                for f in &live.filters {
                    let waiting = self
                        .queued
                        .iter()
                        .any(|(_, h)| h.filter == *f && h.pager.pages() == 0);
                    if !waiting {
                        self.queued.push_back((now, historic(f.clone())));
                    }
                }
                self.send_live(live).await?;
            } else {
                i += 1;
            }
        }
        // A re-read goes one page at a time: it is background work, and a connection slow
        // to read its pages is the very reader whose live events a relay drops.
        let window = if self.rereading { 1 } else { self.window };
        while self.historic.len() < window && self.room() {
            let Some(pos) = self.queued.iter().position(|(at, _)| *at <= now) else {
                break;
            };
            let Some((_, mut h)) = self.queued.remove(pos) else {
                break;
            };
            let id = self.id("hist");
            self.w
                .send(&ClientMessage::req(id.clone(), vec![h.pager.current()]))
                .await?;
            h.sent_with = self.open();
            h.heard = now;
            self.historic.insert(id, h);
        }
        if !self.synced
            && self.historic.is_empty()
            && self.queued.is_empty()
            && self.live_waiting.is_empty()
            && self.replan_at.is_none()
        {
            self.synced = true;
            self.loading = false;
            self.rereading = false;
            self.reread_at = self.limits.reread_every.map(|p| now + p);
            self.say(FeedEvent::Synced).await?;
        }
        Ok(())
    }

    /// When something waiting after `now` (the time `pump` was given) becomes due, or an
    /// open page has been silent too long.
    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let waiting = self
            .live_waiting
            .iter()
            .map(|(at, _)| *at)
            .chain(self.queued.iter().map(|(at, _)| *at))
            .filter(|at| *at > now);
        let silent = self
            .historic
            .values()
            .map(|h| h.heard + self.limits.page_silence);
        waiting
            .chain(silent)
            .chain(self.replan_at)
            .chain(self.reread_at.filter(|_| self.synced))
            .min()
    }

    /// Close and ask again the history pages that heard nothing for `page_silence`.
    async fn expire_silent_pages(&mut self, now: Instant) -> Result<(), Stop> {
        let silent: Vec<SubscriptionId> = self
            .historic
            .iter()
            .filter(|(_, h)| h.heard + self.limits.page_silence <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.w.send(&ClientMessage::close(id.clone())).await?;
            let reason = format!(
                "no answer to a history page within {:?}",
                self.limits.page_silence
            );
            self.refused(&id, &reason, now).await?;
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: RelayMessage<'_>) -> Result<(), Stop> {
        match msg {
            RelayMessage::Event {
                subscription_id,
                event,
            } => {
                let mut reread = false;
                if let Some(h) = self.historic.get_mut(subscription_id.as_ref()) {
                    h.page.push((event.id, event.created_at));
                    h.heard = Instant::now();
                    reread = h.reread;
                }
                // The local relay is ours, but events are still verified: a feed must not
                // let a forged announcement steer discovery.
                if event.verify().is_ok() {
                    let event = Box::new(event.into_owned());
                    self.say(if reread {
                        FeedEvent::Reread(event)
                    } else {
                        FeedEvent::Event(event)
                    })
                    .await?;
                }
            }
            RelayMessage::EndOfStoredEvents(id) => {
                let id = id.into_owned();
                if let Some(mut h) = self.historic.remove(&id) {
                    self.w.send(&ClientMessage::close(id)).await?;
                    if let Step::Next(_) = h.pager.on_page(&h.page) {
                        h.page.clear();
                        h.refusals = 0;
                        // Its next page goes first: a filter once started is finished.
                        self.queued.push_front((Instant::now(), h));
                    }
                }
            }
            RelayMessage::Closed {
                subscription_id,
                message,
            } => {
                let id = subscription_id.into_owned();
                self.refused(&id, &message, Instant::now()).await?;
            }
            RelayMessage::Notice(text) if means_subscription_cap(&text) => {
                // A refusal that names no REQ (nostr-rs-relay), read after everything sent
                // so far: which one is unknown, and so is how many were held. The
                // connection starts again within at most half of what was open.
                let guess = (self.open() / 2).max(MIN_CAP);
                let c = self.cap.map_or(guess, |old| old.min(guess));
                *self.cap = Some(c);
                return Err(Stop::Failed(format!(
                    "the local relay refused a feed subscription by NOTICE ({}); cap now {c}",
                    clean(&text, 200)
                )));
            }
            _ => {}
        }
        Ok(())
    }
}

impl Feed<'_> {
    /// Subscription `id` was refused (or went unanswered) for `message`: it is asked again
    /// after a delay that doubles with each refusal in a row, and a refusal for the cap
    /// teaches the feed the relay's cap.
    async fn refused(
        &mut self,
        id: &SubscriptionId,
        message: &str,
        now: Instant,
    ) -> Result<(), Stop> {
        let (live, sent_with, refusals) = if let Some(mut h) = self.historic.remove(id) {
            h.refusals += 1;
            h.page.clear();
            let out = (false, h.sent_with, h.refusals);
            self.queued
                .push_back((now + retry_delay(self.limits, h.refusals), h));
            out
        } else if let Some(mut l) = self.live.remove(id) {
            l.refusals += 1;
            let out = (true, l.sent_with, l.refusals);
            self.live_waiting
                .push((now + retry_delay(self.limits, l.refusals), l));
            out
        } else {
            return Ok(()); // one we closed
        };
        let retry_in = retry_delay(self.limits, refusals);
        let capped = means_subscription_cap(message);
        if capped {
            // The relay held `sent_with` when it refused: that is its cap, at most.
            let c = self
                .cap
                .map_or(sent_with, |c| c.min(sent_with))
                .max(MIN_CAP);
            *self.cap = Some(c);
            let live_now = self.live.len() + self.live_waiting.len();
            self.window = window(live_now, self.limits, Some(c));
            if live_now >= c {
                // The live REQs leave no room for history: everything is laid out again
                // within the cap.
                self.replan_at = Some(now + retry_in);
            }
        }
        if live && !self.loading {
            // Its history is read again once it is back: not loaded until then (the next
            // re-read is planned when it is).
            self.synced = false;
            self.loading = true;
            self.reread_at = None;
            self.say(FeedEvent::Loading).await?;
        }
        let reason = clean(message, 200);
        tracing::warn!(live, %reason, cap = ?*self.cap, ?retry_in, "the local relay refused a feed subscription; asking again later");
        self.say(FeedEvent::Refused {
            live,
            reason,
            cap: capped.then_some(*self.cap).flatten(),
            retry_in,
        })
        .await
    }
}

fn historic(f: Filter) -> Historic {
    Historic {
        pager: Paginator::new(f.clone(), 5_000),
        filter: f,
        page: Vec::new(),
        refusals: 0,
        sent_with: 0,
        heard: Instant::now(),
        reread: false,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(n: usize) -> Vec<Filter> {
        (0..n)
            .map(|i| Filter::new().identifier(format!("repo-{i}")))
            .collect()
    }

    #[test]
    fn without_a_known_cap_the_limits_decide() {
        let l = FeedLimits::default();
        assert!(live_reqs(Vec::new(), &l, None).is_empty());
        let reqs = live_reqs(filters(500), &l, None);
        assert_eq!(reqs.len(), 10);
        assert!(reqs.iter().all(|r| r.len() == 50));
        assert_eq!(window(10, &l, None), 8);
    }

    #[test]
    fn a_known_cap_holds_the_live_reqs_and_the_window() {
        let l = FeedLimits::default();
        // 500 filters, cap 5: four live REQs of 125 and one history page.
        let reqs = live_reqs(filters(500), &l, Some(5));
        assert_eq!(reqs.iter().map(Vec::len).collect::<Vec<_>>(), [125; 4]);
        assert_eq!(window(reqs.len(), &l, Some(5)), 1);
        // Room to spare: the window stays at its limit.
        assert_eq!(live_reqs(filters(100), &l, Some(20)).len(), 2);
        assert_eq!(window(2, &l, Some(20)), 8);
        assert_eq!(window(2, &l, Some(6)), 4);
        // The cap is kept whenever the byte bound allows it (below, where it does not).
        let unbounded = FeedLimits {
            live_req_bytes: usize::MAX,
            ..FeedLimits::default()
        };
        for cap in 1..40 {
            for n in [0, 1, 7, 50, 51, 499, 500, 5_000] {
                let live = live_reqs(filters(n), &unbounded, Some(cap)).len();
                let w = window(live, &l, Some(cap));
                assert!(w >= 1);
                assert!(
                    live + w <= cap.max(MIN_CAP),
                    "{n} filters, cap {cap}: {live} live + {w} historic"
                );
            }
        }
    }

    #[test]
    fn live_reqs_stay_within_the_byte_bound_whatever_the_cap() {
        let l = FeedLimits {
            live_req_bytes: 4 * 1024,
            ..FeedLimits::default()
        };
        let all = filters(1_000);
        for cap in [None, Some(2), Some(20)] {
            let reqs = live_reqs(all.clone(), &l, cap);
            assert_eq!(reqs.concat(), all, "every filter, in order");
            for r in &reqs {
                let bytes: usize = r
                    .iter()
                    .map(|f| nostr::JsonUtil::as_json(f).len() + 1)
                    .sum();
                assert!(bytes <= 4 * 1024, "{bytes} bytes with cap {cap:?}");
            }
        }
    }

    #[test]
    fn refusals_in_a_row_wait_longer_up_to_the_maximum() {
        let l = FeedLimits::default();
        let waits: Vec<u64> = (1..=8).map(|a| retry_delay(&l, a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(retry_delay(&l, u32::MAX), l.retry_max);
    }
}
