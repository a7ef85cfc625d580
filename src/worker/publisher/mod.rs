//! Hands synced events to the local relay over the wire and reads every `OK`.
//!
//! The local relay is the authority (it applies its own write policy) and often the
//! bottleneck (per-connection ingress limits). So the publisher:
//! - takes events through a bounded queue; a session that cannot enqueue stops reading from
//!   its remote (backpressure instead of unbounded buffering);
//! - keeps a bounded number of events in flight and matches each `OK` to its event;
//! - paces itself with a token bucket per connection that adapts to `rate-limited:` answers
//!   (see [`super::pacing`]), and hands refused events to whichever connection has room;
//! - after a lost connection or a missing `OK` resends everything that was in flight;
//! - can spread the load over several connections (relays limit ingress per connection) and
//!   authenticate with NIP-42 so an operator can exempt the syncer by key;
//! - counts every final answer by reason. A policy refusal (`blocked:`, `invalid:`, …) is
//!   final and never retried in a loop. Nothing taken from a remote disappears without being
//!   counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nostr::{ClientMessage, Event, EventBuilder, EventId, JsonUtil, Keys, RelayMessage};
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::nostr::outcome::Outcome;
use crate::relay::connection::{self, ConnectOptions, Incoming};
use metrics::PublisherMetrics;
use pacing::Pacer;

pub mod metrics;
pub mod pacing;
use crate::nostr::RelayUrl;

#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub local_relay: RelayUrl,
    /// Events that may wait in the queue before senders block.
    pub queue_capacity: usize,
    /// Events sent and not yet answered.
    pub max_in_flight: usize,
    /// An event without `OK` after this long is sent again.
    pub ok_timeout: Duration,
    /// Attempts for `error:` answers before giving up on an event (counted as `gave_up`).
    /// `rate-limited:` is retried without limit: it is about pace, not content.
    pub max_error_attempts: u32,
    /// Pause after `auth-required:` so our AUTH is answered before we resend.
    pub auth_pause: Duration,
    pub connect: ConnectOptions,
    /// NIP-42 identity, so an operator can exempt the syncer from the relay's limits by key.
    pub auth_keys: Option<Keys>,
    /// Connections to the local relay; relays limit ingress per connection.
    pub connections: usize,
    /// Ceiling on events per second per connection (None: as fast as the relay accepts;
    /// the pace adapts to `rate-limited:` answers either way).
    pub max_rate: Option<f64>,
}

impl PublisherConfig {
    pub fn new(local_relay: RelayUrl) -> Self {
        PublisherConfig {
            local_relay,
            queue_capacity: 1024,
            max_in_flight: 64,
            ok_timeout: Duration::from_secs(15),
            max_error_attempts: 5,
            auth_pause: Duration::from_millis(500),
            connect: ConnectOptions::default(),
            auth_keys: None,
            connections: 1,
            max_rate: None,
        }
    }

    /// Publishing over `connections` (at least one) connections, authenticating with
    /// `auth_keys` when the local relay asks.
    pub fn with(local_relay: RelayUrl, connections: usize, auth_keys: Option<nostr::Keys>) -> Self {
        PublisherConfig {
            connections: connections.max(1),
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
}

impl PublisherStats {
    /// Events submitted and not yet finally answered.
    pub fn outstanding(&self) -> u64 {
        let done = self.accepted.load(Ordering::Relaxed)
            + self.duplicate.load(Ordering::Relaxed)
            + self.refused.load(Ordering::Relaxed)
            + self.gave_up.load(Ordering::Relaxed);
        self.submitted.load(Ordering::Relaxed).saturating_sub(done)
    }
}

#[derive(Debug, Error)]
#[error("the publisher has stopped")]
pub struct PublisherClosed;

struct Pending {
    event: Event,
    attempts: u32,
    /// One entry per `publish` call for this event: the same event often arrives through
    /// several subscriptions, and each delivery must get its answer.
    origins: Vec<Option<Arc<SourceCounters>>>,
}

/// Cheap to clone; every session holds one.
#[derive(Clone)]
pub struct Publisher {
    tx: async_channel::Sender<Pending>,
    stats: Arc<PublisherStats>,
}

/// Totals across a publisher's connections, for the gauges.
#[derive(Default)]
struct Gauges {
    retry: AtomicI64,
    in_flight: AtomicI64,
}

impl Publisher {
    /// Start `config.connections` connections to the local relay; they share one queue. The
    /// handle finishes when every `Publisher` clone is dropped and all events are answered.
    pub fn spawn(
        config: PublisherConfig,
        metrics: PublisherMetrics,
    ) -> (Publisher, JoinHandle<()>) {
        let (tx, rx) = async_channel::bounded(config.queue_capacity.max(1));
        let stats = Arc::new(PublisherStats::default());
        let gauges = Arc::new(Gauges::default());
        let shared = Arc::new(Mutex::new(VecDeque::new()));
        let workers: Vec<JoinHandle<()>> = (0..config.connections.max(1))
            .map(|_| {
                let task = Worker {
                    pacer: Pacer::new(config.max_rate, Instant::now()),
                    config: config.clone(),
                    metrics: metrics.clone(),
                    stats: stats.clone(),
                    gauges: gauges.clone(),
                    reported: (0, 0),
                    rx: rx.clone(),
                    shared: shared.clone(),
                    retry: VecDeque::new(),
                    in_flight: HashMap::new(),
                    pause: None,
                    challenge: None,
                    auth_pending: None,
                };
                tokio::spawn(task.run())
            })
            .collect();
        let supervisor = tokio::spawn(async move {
            for w in workers {
                let _ = w.await;
            }
        });
        (Publisher { tx, stats }, supervisor)
    }

    /// Queue `event` for the local relay; waits while the queue is full.
    pub async fn publish(
        &self,
        event: Event,
        origin: Option<Arc<SourceCounters>>,
    ) -> Result<(), PublisherClosed> {
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Pending {
                event,
                attempts: 0,
                origins: vec![origin],
            })
            .await
            .map_err(|_| {
                self.stats.submitted.fetch_sub(1, Ordering::Relaxed);
                PublisherClosed
            })
    }

    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }
}

struct InFlight {
    pending: Pending,
    sent_at: Instant,
}

struct Worker {
    config: PublisherConfig,
    metrics: PublisherMetrics,
    stats: Arc<PublisherStats>,
    gauges: Arc<Gauges>,
    /// What this worker last added to the shared gauges (retry, in flight).
    reported: (i64, i64),
    pacer: Pacer,
    rx: async_channel::Receiver<Pending>,
    /// Events any connection may send again (refused as rate-limited on one connection: another
    /// may have room). Locked only for a push or pop, never across an await.
    shared: Arc<Mutex<VecDeque<Pending>>>,
    /// Events this connection must send again (no answer in time, transient errors, lost
    /// connection, waiting for authentication).
    retry: VecDeque<Pending>,
    in_flight: HashMap<EventId, InFlight>,
    pause: Option<Instant>,
    /// The latest AUTH challenge on this connection, not yet answered.
    challenge: Option<String>,
    auth_pending: Option<EventId>,
}

enum Step {
    Reconnect,
    Finished,
}

impl Worker {
    async fn run(mut self) {
        let mut delay = Duration::from_millis(200);
        loop {
            match connection::connect(&self.config.local_relay, &self.config.connect).await {
                Ok((mut writer, mut reader)) => {
                    delay = Duration::from_millis(200);
                    self.challenge = None;
                    self.auth_pending = None;
                    tracing::debug!(relay = %self.config.local_relay, "publisher connected");
                    // Whatever was in flight on the previous connection may never have arrived.
                    let lost: Vec<_> = self.in_flight.drain().map(|(_, f)| f.pending).collect();
                    for p in lost.into_iter().rev() {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        self.metrics.publish_retries.inc();
                        self.retry.push_front(p);
                    }
                    match self.serve(&mut writer, &mut reader).await {
                        Step::Finished => {
                            writer.close().await;
                            return;
                        }
                        Step::Reconnect => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(relay = %self.config.local_relay, error = %e, retry_in = ?delay, "local relay unreachable");
                }
            }
            if self.rx.is_closed()
                && self.rx.is_empty()
                && self.retry.is_empty()
                && self.in_flight.is_empty()
            {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    async fn serve(
        &mut self,
        writer: &mut connection::ConnWriter,
        reader: &mut connection::ConnReader,
    ) -> Step {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            self.update_gauges();
            let now = Instant::now();
            if self.pause.is_some_and(|p| p <= now) {
                self.pause = None;
            }
            if let Err(step) = self.answer_challenge(writer).await {
                return step;
            }
            // Send what waits — this connection's retries, then shared ones — in order, while
            // there is room and the pace allows.
            let mut wake = self.pause;
            while self.pause.is_none() && self.in_flight.len() < self.config.max_in_flight {
                let Some(p) = self.retry.pop_front().or_else(|| self.pop_shared()) else {
                    break;
                };
                if let Err(at) = self.pacer.take(now) {
                    self.retry.push_front(p);
                    wake = Some(at);
                    break;
                }
                if let Err(step) = self.send(writer, p).await {
                    return step;
                }
            }
            // Take a new event only when it can go out at once: nothing waits here, the pace
            // allows, there is room in flight. Otherwise it stays in the bounded queue, which
            // pushes back on the sessions.
            let ready = match self.pacer.peek(now) {
                Ok(()) => true,
                Err(at) => {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                    false
                }
            };
            let can_take = ready
                && self.retry.is_empty()
                && self.pause.is_none()
                && self.in_flight.len() < self.config.max_in_flight
                && !(self.rx.is_closed() && self.rx.is_empty());
            if self.rx.is_closed()
                && self.rx.is_empty()
                && self.retry.is_empty()
                && self.in_flight.is_empty()
                && self.shared_is_empty()
            {
                return Step::Finished;
            }
            tokio::select! {
                incoming = reader.recv() => match incoming {
                    Ok(Incoming::Message(msg)) => self.on_message(msg),
                    Ok(Incoming::Malformed { .. }) => self.metrics.malformed_messages.inc(),
                    Err(e) => {
                        tracing::warn!(relay = %self.config.local_relay, error = %e, in_flight = self.in_flight.len(), "publisher connection lost");
                        return Step::Reconnect;
                    }
                },
                next = self.rx.recv(), if can_take => {
                    if let Ok(p) = next {
                        if self.pacer.take(Instant::now()).is_err() {
                            self.retry.push_front(p);
                        } else if let Err(step) = self.send(writer, p).await {
                            return step;
                        }
                    }
                }
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = tick.tick() => self.expire_in_flight(),
            }
        }
    }

    async fn send(
        &mut self,
        writer: &mut connection::ConnWriter,
        mut p: Pending,
    ) -> Result<(), Step> {
        let id = p.event.id;
        // Already on its way: share that attempt's answer instead of sending it twice (a
        // second entry under the same id would overwrite the first and lose its answer).
        if let Some(flight) = self.in_flight.get_mut(&id) {
            flight.pending.origins.append(&mut p.origins);
            return Ok(());
        }
        p.attempts += 1;
        let msg = ClientMessage::event(p.event.clone());
        let result = writer.send(&msg).await;
        self.in_flight.insert(
            id,
            InFlight {
                pending: p,
                sent_at: Instant::now(),
            },
        );
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(relay = %self.config.local_relay, error = %e, "publisher send failed");
                Err(Step::Reconnect)
            }
        }
    }

    async fn answer_challenge(&mut self, writer: &mut connection::ConnWriter) -> Result<(), Step> {
        let (Some(keys), Some(challenge)) = (&self.config.auth_keys, self.challenge.take()) else {
            return Ok(());
        };
        let Ok(relay) = nostr::RelayUrl::parse(self.config.local_relay.as_str()) else {
            return Ok(());
        };
        let Ok(event) = EventBuilder::auth(challenge, relay).sign_with_keys(keys) else {
            return Ok(());
        };
        self.auth_pending = Some(event.id);
        writer.send(&ClientMessage::auth(event)).await.map_err(|e| {
            tracing::warn!(relay = %self.config.local_relay, error = %e, "publisher send failed");
            Step::Reconnect
        })
    }

    fn on_message(&mut self, msg: RelayMessage<'static>) {
        let (event_id, status, message) = match msg {
            RelayMessage::Auth { challenge } => {
                self.challenge = Some(challenge.into_owned());
                return;
            }
            RelayMessage::Ok {
                event_id,
                status,
                message,
            } => (event_id, status, message),
            _ => return,
        };
        if self.auth_pending == Some(event_id) {
            self.auth_pending = None;
            if status {
                tracing::info!(relay = %self.config.local_relay, "publisher authenticated (NIP-42)");
                self.pause = None;
            } else {
                tracing::warn!(relay = %self.config.local_relay, reason = %message, "local relay refused our NIP-42 authentication");
            }
            return;
        }
        let Some(flight) = self.in_flight.remove(&event_id) else {
            return;
        };
        self.metrics
            .publish_latency_seconds
            .observe(flight.sent_at.elapsed().as_secs_f64());
        let outcome = Outcome::classify(status, &message);
        self.metrics
            .publish_outcomes
            .with_label_values(&[outcome.label()])
            .inc();
        let sent_at = flight.sent_at;
        let p = flight.pending;
        let copies = p.origins.len() as u64;
        let retry = match outcome {
            Outcome::RateLimited => true,
            Outcome::Error => p.attempts < self.config.max_error_attempts,
            // With a key we answer the challenge and send again; without, it is final.
            Outcome::AuthRequired => {
                self.config.auth_keys.is_some() && p.attempts < self.config.max_error_attempts
            }
            _ => false,
        };
        let is_final = !retry;
        if is_final {
            for o in p.origins.iter().flatten() {
                o.resolved.fetch_add(1, Ordering::Release);
            }
        }
        match outcome {
            Outcome::Accepted => {
                self.pacer.on_accepted();
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                // Later copies of the same event are duplicates of this one.
                self.stats
                    .duplicate
                    .fetch_add(copies - 1, Ordering::Relaxed);
                if let Some(Some(o)) = p.origins.first() {
                    o.published.fetch_add(1, Ordering::Relaxed);
                }
            }
            Outcome::Duplicate => {
                self.stats.duplicate.fetch_add(copies, Ordering::Relaxed);
            }
            Outcome::RateLimited => {
                self.pacer.on_rate_limited(Instant::now(), sent_at);
                tracing::debug!(relay = %self.config.local_relay, pace = ?self.pacer.rate(), "local relay rate-limits us");
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.metrics.publish_retries.inc();
                self.push_shared(p);
            }
            Outcome::Error | Outcome::AuthRequired if retry => {
                if outcome == Outcome::AuthRequired {
                    // Give the AUTH round trip a moment before resending.
                    self.pause = Some(Instant::now() + self.config.auth_pause);
                }
                self.requeue(p)
            }
            Outcome::Error => {
                self.stats.gave_up.fetch_add(copies, Ordering::Relaxed);
                self.metrics
                    .publish_outcomes
                    .with_label_values(&["gave_up"])
                    .inc();
                for o in p.origins.iter().flatten() {
                    o.rejected.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(id = %event_id, attempts = p.attempts, reason = %message, "local relay keeps failing on an event; giving up on it");
            }
            _ => {
                self.stats.refused.fetch_add(copies, Ordering::Relaxed);
                for o in p.origins.iter().flatten() {
                    o.rejected.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(id = %event_id, kind = p.event.kind.as_u16(), reason = %message, "local relay refused event");
            }
        }
    }

    fn pop_shared(&self) -> Option<Pending> {
        self.shared.lock().ok()?.pop_front()
    }

    fn push_shared(&mut self, p: Pending) {
        match self.shared.lock() {
            Ok(mut q) => q.push_back(p),
            // A poisoned lock means another connection panicked; keep the event here.
            Err(_) => self.retry.push_back(p),
        }
    }

    fn shared_is_empty(&self) -> bool {
        self.shared.lock().map(|q| q.is_empty()).unwrap_or(true)
    }

    fn shared_len(&self) -> usize {
        self.shared.lock().map(|q| q.len()).unwrap_or(0)
    }

    fn requeue(&mut self, p: Pending) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.publish_retries.inc();
        self.retry.push_back(p);
    }

    fn expire_in_flight(&mut self) {
        let timeout = self.config.ok_timeout;
        let expired: Vec<EventId> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.sent_at.elapsed() >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(f) = self.in_flight.remove(&id) {
                tracing::debug!(%id, "no OK from the local relay in time; resending");
                self.requeue(f.pending);
            }
        }
    }

    fn update_gauges(&mut self) {
        let now = (self.retry.len() as i64, self.in_flight.len() as i64);
        let retry = self
            .gauges
            .retry
            .fetch_add(now.0 - self.reported.0, Ordering::Relaxed)
            + now.0
            - self.reported.0;
        let in_flight = self
            .gauges
            .in_flight
            .fetch_add(now.1 - self.reported.1, Ordering::Relaxed)
            + now.1
            - self.reported.1;
        self.reported = now;
        self.metrics
            .publish_queue_depth
            .set(retry + (self.rx.len() + self.shared_len()) as i64);
        self.metrics.publish_in_flight.set(in_flight);
        if let Some(rate) = self.pacer.rate() {
            self.metrics.publish_rate_limit.set(rate);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
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

/// Why an event from a remote relay is not published at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EventRejection {
    #[error("event id does not match its content")]
    InvalidId,
    #[error("invalid signature")]
    InvalidSignature,
    #[error("event is {bytes} bytes, over the {max}-byte limit")]
    Oversize { bytes: usize, max: usize },
}

impl EventRejection {
    pub fn label(self) -> &'static str {
        match self {
            EventRejection::InvalidId => "invalid_id",
            EventRejection::InvalidSignature => "invalid_signature",
            EventRejection::Oversize { .. } => "oversize",
        }
    }
}

/// The checks every event from a remote passes before it is published: size first (cheap),
/// then id, then signature.
pub fn validate(event: &Event, max_bytes: usize) -> Result<(), EventRejection> {
    let bytes = event.as_json().len();
    if bytes > max_bytes {
        return Err(EventRejection::Oversize {
            bytes,
            max: max_bytes,
        });
    }
    if !event.verify_id() {
        return Err(EventRejection::InvalidId);
    }
    if !event.verify_signature() {
        return Err(EventRejection::InvalidSignature);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Kind};

    #[test]
    fn validation_catches_tampering_and_size() {
        let keys = Keys::generate();
        let ev = EventBuilder::new(Kind::TextNote, "hello")
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(validate(&ev, 1024), Ok(()));

        let mut json: serde_json::Value = serde_json::from_str(&ev.as_json()).unwrap();
        json["content"] = "tampered".into();
        let tampered = Event::from_json(json.to_string()).unwrap();
        assert_eq!(validate(&tampered, 1024), Err(EventRejection::InvalidId));

        let other = EventBuilder::new(Kind::TextNote, "other")
            .sign_with_keys(&keys)
            .unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&ev.as_json()).unwrap();
        json["sig"] = other.sig.to_string().into();
        let bad_sig = Event::from_json(json.to_string()).unwrap();
        assert_eq!(
            validate(&bad_sig, 1024),
            Err(EventRejection::InvalidSignature)
        );

        let big = EventBuilder::new(Kind::TextNote, "x".repeat(2000))
            .sign_with_keys(&keys)
            .unwrap();
        assert!(matches!(
            validate(&big, 1024),
            Err(EventRejection::Oversize { max: 1024, .. })
        ));
    }
}
