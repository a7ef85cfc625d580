//! One connection to the local relay. Connections share the queue and the events refused as
//! rate-limited; the pace, the events in flight and other retries are per connection, because
//! that is how a relay limits and answers.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nostr::{ClientMessage, EventBuilder, EventId};

use super::metrics::PublisherMetrics;
use super::pacing::Pacer;
use super::{Gauges, Pending, PublisherConfig, PublisherStats};
use crate::relay::connection::{self, Incoming};

mod answers;

struct InFlight {
    pending: Pending,
    sent_at: Instant,
    /// The refusal memory's generation when it was sent.
    refused_generation: u64,
}

pub(super) struct PublisherConn {
    config: PublisherConfig,
    metrics: PublisherMetrics,
    stats: Arc<PublisherStats>,
    gauges: Arc<Gauges>,
    /// What this connection last added to the shared gauges (retry, in flight).
    reported: (i64, i64),
    pacer: Pacer,
    rx: super::fair::FairReceiver<Pending>,
    /// What the connections share: events any connection may send again (refused as
    /// rate-limited on one connection: another may have room), and what the relay said it
    /// holds. Locked only briefly, never across an await.
    shared: Arc<super::Common>,
    /// The generation of the settled-events memory this connection was made in.
    settled_generation: u64,
    /// This connection's number (the owner of the flights it sends).
    number: u64,
    /// This connection has been connected before (a new connection is a reconnect).
    connected_before: bool,
    /// Events this connection must send again (no answer in time, transient errors, lost
    /// connection, waiting for authentication).
    retry: VecDeque<Pending>,
    /// Retries after a transient failure, each not before its time.
    delayed: Vec<(Instant, Pending)>,
    in_flight: HashMap<EventId, InFlight>,
    /// After a lost connection, this many sends go out one at a time: if the relay drops the
    /// connection again, the event alone in flight is the likely cause (a frame over its
    /// limit, an event that crashes it).
    single: usize,
    pause: Option<Instant>,
    /// The latest AUTH challenge on this connection, not yet answered.
    challenge: Option<String>,
    auth_pending: Option<EventId>,
    /// Opened by a growth step: accepted answers still to see before it tells the scaler
    /// the relay gave it room of its own (0: nothing to tell).
    fresh: u32,
    /// When this connection last had something to send or await.
    busy_at: Instant,
}

/// Accepted answers in a row that show a new connection has room of its own.
const FRESH_PROBE: u32 = 5;

/// Connections lost with an event alone in flight before it is set aside.
const QUARANTINE_STRIKES: u32 = 2;

enum Step {
    Reconnect,
    Finished,
}

impl PublisherConn {
    pub(super) fn new(
        config: PublisherConfig,
        metrics: PublisherMetrics,
        stats: Arc<PublisherStats>,
        gauges: Arc<Gauges>,
        rx: super::fair::FairReceiver<Pending>,
        shared: Arc<super::Common>,
        fresh: bool,
    ) -> Self {
        let number = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        PublisherConn {
            number,
            fresh: if fresh { FRESH_PROBE } else { 0 },
            busy_at: Instant::now(),
            pacer: Pacer::new(config.max_rate, Instant::now()),
            config,
            metrics,
            stats,
            gauges,
            reported: (0, 0),
            rx,
            shared,
            settled_generation: 0,
            connected_before: false,
            retry: VecDeque::new(),
            delayed: Vec::new(),
            in_flight: HashMap::new(),
            single: 0,
            pause: None,
            challenge: None,
            auth_pending: None,
        }
    }

    pub(super) async fn run(mut self) {
        let mut delay = Duration::from_millis(200);
        loop {
            match connection::connect(&self.config.local_relay, &self.config.connect).await {
                Ok((mut writer, mut reader)) => {
                    delay = Duration::from_millis(200);
                    self.challenge = None;
                    self.auth_pending = None;
                    tracing::debug!(relay = %self.config.local_relay, "publisher connected");
                    if let Ok(mut s) = self.shared.settled.lock() {
                        // Connected again: the relay may have restarted meanwhile.
                        if self.connected_before {
                            s.clear();
                        }
                        self.settled_generation = s.generation();
                    }
                    if self.connected_before {
                        self.shared.forget_refusals();
                    }
                    self.connected_before = true;
                    // Whatever was in flight on the previous connection may never have arrived
                    // (its parked copies joined it when that connection was lost).
                    let lost: Vec<_> = self.in_flight.drain().map(|(_, f)| f.pending).collect();
                    // Lost while sending one event alone: that event gets a strike.
                    let alone = self.single > 0 && lost.len() == 1;
                    if !alone && !lost.is_empty() {
                        self.single = lost.len();
                    }
                    for mut p in lost.into_iter().rev() {
                        if alone {
                            p.strikes += 1;
                            if p.strikes >= QUARANTINE_STRIKES {
                                self.quarantine(p);
                                self.single = self.single.saturating_sub(1);
                                continue;
                            }
                        }
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        self.metrics.publish_retries.inc();
                        self.retry.push_front(p);
                    }
                    match self.serve(&mut writer, &mut reader).await {
                        Step::Finished => {
                            writer.close().await;
                            return;
                        }
                        Step::Reconnect => {
                            // The relay may have restarted without what it said it holds.
                            if let Ok(mut s) = self.shared.settled.lock() {
                                s.clear();
                            }
                            self.shared.forget_refusals();
                            // Copies parked on what was in flight here join it now, not
                            // after however long reconnecting takes; later copies are sent
                            // by whichever connection takes them.
                            self.land_all();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(relay = %self.config.local_relay, error = %e, retry_in = ?delay, "local relay unreachable");
                    // Beyond the floor (a relay capping connections per address, say), it
                    // hands what it holds to the others and closes, rather than keeping
                    // those events unanswered until it gets through.
                    if self.retire() {
                        self.hand_over_everything();
                        return;
                    }
                }
            }
            if self.done() {
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
            // Retries whose pause is over join the others.
            let mut i = 0;
            while i < self.delayed.len() {
                if self.delayed[i].0 <= now {
                    let (_, p) = self.delayed.swap_remove(i);
                    self.retry.push_back(p);
                } else {
                    i += 1;
                }
            }
            // Send what waits — this connection's retries, then shared ones — in order, while
            // there is room and the pace allows.
            let mut wake = [self.pause, self.delayed.iter().map(|(at, _)| *at).min()]
                .into_iter()
                .flatten()
                .min();
            // One at a time also while probing whether the relay gives a new connection
            // room of its own: under a limit on its whole ingress, a burst would only be
            // refused.
            let max_in_flight = if self.single > 0 || self.fresh > 0 {
                1
            } else {
                self.config.max_in_flight
            };
            while self.pause.is_none() && self.in_flight.len() < max_in_flight {
                let Some(p) = self.retry.pop_front().or_else(|| self.pop_shared()) else {
                    break;
                };
                let Some(p) = self.answer_without_sending(p) else {
                    continue;
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
            // Events waiting out a transient failure count against the room too: a relay
            // failing every write must not have a connection hoard the queue's events.
            let can_take = ready
                && self.retry.is_empty()
                && self.pause.is_none()
                && self.in_flight.len() + self.delayed.len() < max_in_flight
                && !(self.rx.is_closed() && self.rx.is_empty());
            if self.done() {
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
                    if let Some(p) = next.and_then(|p| self.answer_without_sending(p)) {
                        if self.pacer.take(Instant::now()).is_err() {
                            self.retry.push_front(p);
                        } else if let Err(step) = self.send(writer, p).await {
                            return step;
                        }
                    }
                }
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = tick.tick() => {
                    self.expire_in_flight();
                    if self.retire_when_idle() {
                        return Step::Finished;
                    }
                }
            }
        }
    }

    async fn send(
        &mut self,
        writer: &mut connection::ConnWriter,
        mut p: Pending,
    ) -> Result<(), Step> {
        let id = p.event.id;
        // Callers pass what `answer_without_sending` left (which also claimed its flight, so
        // copies taken since wait for this send's answer): a second entry under the same id
        // would overwrite the first and lose its answer.
        debug_assert!(!self.in_flight.contains_key(&id), "sent twice at once");
        p.attempts += 1;
        let msg = ClientMessage::event(p.event.clone());
        // Noted before the send: a forgetting after it voids the answer's refusal.
        let refused_generation = self
            .shared
            .refused
            .lock()
            .map(|r| r.generation())
            .unwrap_or(u64::MAX);
        let result = writer.send(&msg).await;
        self.in_flight.insert(
            id,
            InFlight {
                pending: p,
                sent_at: Instant::now(),
                refused_generation,
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

    fn pop_shared(&self) -> Option<Pending> {
        self.shared.queue.lock().ok()?.pop_front()
    }

    fn push_shared(&mut self, p: Pending) {
        match self.shared.queue.lock() {
            Ok(mut q) => q.push_back(p),
            // A poisoned lock means another connection panicked; keep the event here.
            Err(_) => self.retry.push_back(p),
        }
    }

    /// Whether the local relay said just now that it holds `id` (on any connection).
    fn settled_holds(&self, id: &nostr::EventId) -> bool {
        self.shared
            .settled
            .lock()
            .is_ok_and(|mut s| s.holds(id, Instant::now()))
    }

    /// Remember that the local relay holds `id` (said on this connection).
    pub(super) fn settle(&self, id: nostr::EventId) {
        if let Ok(mut s) = self.shared.settled.lock() {
            s.insert(id, Instant::now(), self.settled_generation);
        }
    }

    /// Remember that the local relay holds `id` in purgatory (said on this connection).
    pub(super) fn hold_in_purgatory(&self, id: nostr::EventId) {
        if let Ok(mut s) = self.shared.settled.lock() {
            s.insert_purgatory(id, Instant::now(), self.settled_generation);
        }
    }

    /// Whether the local relay said within the purgatory TTL that it holds `id` there.
    fn in_purgatory(&self, id: &nostr::EventId) -> bool {
        self.shared
            .settled
            .lock()
            .is_ok_and(|mut s| s.in_purgatory(id, Instant::now()))
    }

    /// `p`, unless it needs no send of its own — a copy of an event in flight here or on
    /// another connection (it shares that attempt's answer), of one the relay just said it
    /// holds, or of one it refused on policy grounds — so that it takes none of the pace's
    /// budget. Every event goes through here before `send`.
    fn answer_without_sending(&mut self, mut p: Pending) -> Option<Pending> {
        if let Some(flight) = self.in_flight.get_mut(&p.event.id) {
            flight.pending.origins.append(&mut p.origins);
            return None;
        }
        // In flight on another connection (or about to be): this copy waits for that
        // answer. Otherwise this connection claims the flight in the same look, so two
        // connections never both send it. Asked before the memories: the owner remembers
        // an answer before it lands its flight, so a copy finds one or the other.
        if let Ok(mut flights) = self.shared.flights.lock() {
            match flights.get_mut(&p.event.id) {
                Some(f) if f.owner != self.number => {
                    f.parked.push(p);
                    return None;
                }
                Some(_) => {}
                None => {
                    flights.insert(
                        p.event.id,
                        super::Flight {
                            owner: self.number,
                            parked: Vec::new(),
                        },
                    );
                }
            }
        }
        if self.settled_holds(&p.event.id) {
            self.shared.land(self.number, &mut p);
            self.answer_settled(p, "already-held");
            return None;
        }
        if self.in_purgatory(&p.event.id) {
            self.shared.land(self.number, &mut p);
            self.answer_settled(p, "in-purgatory");
            return None;
        }
        let refusal = self
            .shared
            .refused
            .lock()
            .ok()
            .and_then(|mut r| r.refusal(&p.event.id, Instant::now()));
        if let Some(outcome) = refusal {
            self.shared.land(self.number, &mut p);
            self.answer_refused(p, outcome);
            return None;
        }
        // Claimed: sent next, or kept at the front of `retry` until the pace allows.
        Some(p)
    }

    /// Everything whose flight this connection holds — in flight, or claimed and waiting
    /// in `retry` for the pace — takes back the copies parked on it (the connection is
    /// lost, or gives everything up).
    fn land_all(&mut self) {
        for f in self.in_flight.values_mut() {
            self.shared.land(self.number, &mut f.pending);
        }
        for p in self.retry.iter_mut() {
            self.shared.land(self.number, p);
        }
    }

    /// A copy of an event the relay refused on policy grounds a moment ago: answered as its
    /// refusal would be, without a send.
    fn answer_refused(&mut self, p: Pending, outcome: crate::nostr::outcome::Outcome) {
        let copies = p.origins.len() as u64;
        self.stats.refused.fetch_add(copies, Ordering::Relaxed);
        for o in p.origins.iter().flatten() {
            o.rejected.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics
            .publish_outcomes
            .with_label_values(&["refused-before"])
            .inc();
        tracing::debug!(id = %p.event.id, kind = p.event.kind.as_u16(), outcome = outcome.label(), "refused by the local relay a moment ago; not sent again");
        p.resolve();
    }

    /// A copy of an event the relay said it holds (served, or in purgatory): answered as
    /// its `duplicate:` would be, without a send; counted under `outcome`.
    fn answer_settled(&mut self, p: Pending, outcome: &str) {
        let copies = p.origins.len() as u64;
        self.stats.duplicate.fetch_add(copies, Ordering::Relaxed);
        self.metrics
            .publish_outcomes
            .with_label_values(&[outcome])
            .inc();
        p.resolve();
    }

    fn shared_is_empty(&self) -> bool {
        self.shared
            .queue
            .lock()
            .map(|q| q.is_empty())
            .unwrap_or(true)
    }

    fn shared_len(&self) -> usize {
        self.shared.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    fn requeue(&mut self, p: Pending) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.publish_retries.inc();
        self.retry.push_back(p);
    }

    fn requeue_after(&mut self, p: Pending, at: Instant) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.publish_retries.inc();
        self.delayed.push((at, p));
    }

    /// Set `p` aside: the local relay dropped the connection each time it was sent alone.
    /// Its senders get no answer, so their cursors do not pass it; a restart (or a later
    /// reconciliation) offers it again.
    fn quarantine(&mut self, p: Pending) {
        // Every delivery merged into it stays unanswered; each counts, so `outstanding()`
        // can return to zero.
        self.stats
            .quarantined
            .fetch_add(p.origins.len() as u64, Ordering::Relaxed);
        for o in p.origins.iter().flatten() {
            o.quarantined.fetch_add(1, Ordering::Release);
        }
        self.metrics
            .publish_outcomes
            .with_label_values(&["quarantined"])
            .inc();
        tracing::warn!(
            relay = %self.config.local_relay,
            id = %p.event.id,
            kind = p.event.kind.as_u16(),
            bytes = nostr::JsonUtil::as_json(&p.event).len(),
            strikes = p.strikes,
            "the local relay drops the connection whenever this event is sent; set aside (its relays' cursors hold until a restart)"
        );
    }

    /// Nothing to send or await, here or in the queues every connection serves.
    fn idle(&self) -> bool {
        self.retry.is_empty()
            && self.delayed.is_empty()
            && self.in_flight.is_empty()
            && self.rx.is_empty()
            && self.shared_is_empty()
    }

    /// Idle, and nothing more will come: the publisher is finished.
    fn done(&self) -> bool {
        self.rx.is_closed() && self.idle()
    }

    /// Beyond the floor, a connection with nothing to do for `idle_close` closes: the growth
    /// that opened it was for a backlog that is gone.
    fn retire_when_idle(&mut self) -> bool {
        let now = Instant::now();
        if !self.idle() {
            self.busy_at = now;
            return false;
        }
        now.duration_since(self.busy_at) >= self.config.idle_close && self.retire()
    }

    /// Take this connection off the count if that leaves at least the floor open.
    fn retire(&self) -> bool {
        let floor = self.config.connections.max(1);
        self.gauges
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n > floor).then(|| n - 1)
            })
            .is_ok()
    }

    /// Everything this connection holds goes to the queue every connection serves (sent
    /// again there: what was in flight may never have arrived).
    fn hand_over_everything(&mut self) {
        self.land_all();
        let in_flight: Vec<Pending> = self.in_flight.drain().map(|(_, f)| f.pending).collect();
        let delayed: Vec<Pending> = self.delayed.drain(..).map(|(_, p)| p).collect();
        let retry: Vec<Pending> = self.retry.drain(..).collect();
        for p in in_flight.into_iter().chain(retry).chain(delayed) {
            self.push_shared(p);
        }
        self.update_gauges();
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
            if let Some(mut f) = self.in_flight.remove(&id) {
                tracing::debug!(%id, "no OK from the local relay in time; resending");
                self.shared.land(self.number, &mut f.pending);
                self.requeue(f.pending);
            }
        }
    }

    fn update_gauges(&mut self) {
        let now = (
            (self.retry.len() + self.delayed.len()) as i64,
            self.in_flight.len() as i64,
        );
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
        if let Ok(s) = self.shared.settled.lock() {
            self.metrics.publish_settled.set(s.len() as i64);
            self.metrics.publish_purgatory.set(s.purgatory_len() as i64);
        }
        if let Ok(r) = self.shared.refused.lock() {
            self.metrics.publish_refused_remembered.set(r.len() as i64);
        }
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
