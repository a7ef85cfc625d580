//! The session task: wait out backoff, connect, run the connection's event loop, and turn
//! how it ended into the next backoff.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use nostr::{ClientMessage, Timestamp};
use tokio::sync::mpsc;

use super::report::to_system;
use super::{Command, Conn, End, Session, SessionError};
use crate::crd::Phase;
use crate::nostr::remote_text::clean;
use crate::relay::address_policy::SsrfError;
use crate::relay::backoff::{HealthState, doubled};
use crate::relay::connection::{self, Incoming};
use crate::relay::nip11;

impl Session {
    pub(super) async fn run(mut self) {
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
                        Some(Command::Set(set, seq)) => {
                            // Added items are unconfirmed, so the next connection fetches them
                            // in full.
                            self.replace_set(set, seq);
                        }
                        Some(Command::Stop) | None => return self.finish(),
                    }
                }
            }

            self.publish_state(|s| s.phase = Phase::Connecting);
            self.metrics
                .relay_connected
                .with_label_values(&[&label])
                .set(1);
            let pin = self
                .config
                .resolver
                .pin(&self.url, self.config.addresses.as_ref());
            let Some(pinned) = super::unless_stopped(&mut self.stop, pin).await else {
                return self.finish();
            };
            let addrs = match pinned {
                Ok(addrs) => addrs,
                Err(e) => {
                    // A name that does not resolve is a failed attempt; one that resolves
                    // where we do not go is a refusal.
                    let result = match e {
                        SsrfError::Dns { .. } => "failure",
                        _ => "refused",
                    };
                    self.metrics
                        .connection_attempts
                        .with_label_values(&[&label, result])
                        .inc();
                    self.on_disconnect(SessionError::AddressRefused(e));
                    continue;
                }
            };
            let fetch = nip11::fetch(&self.url, &addrs, self.config.nip11_timeout);
            let Some(caps) = super::unless_stopped(&mut self.stop, fetch).await else {
                return self.finish();
            };
            if let Err(e) = &caps {
                tracing::debug!(relay = %self.url, error = %e, "no usable NIP-11 document; using defaults");
            }
            let nip11_doc = caps.as_ref().ok().cloned();
            let caps = caps.unwrap_or_default();
            let connect = connection::connect_to(&self.url, &addrs, &self.config.connect);
            let Some(connected) = super::unless_stopped(&mut self.stop, connect).await else {
                return self.finish();
            };
            let conn = match connected {
                Ok((writer, reader)) => {
                    let (local_tx, local_rx) = mpsc::unbounded_channel();
                    Conn {
                        writer,
                        reader,
                        caps,
                        live: HashMap::new(),
                        live_plan: Default::default(),
                        historic: HashMap::new(),
                        queue: Vec::new(),
                        batches: HashMap::new(),
                        next_id: 0,
                        // What an earlier connection learned counts when NIP-11 is silent:
                        // it decides whether a gap is reconciled over the whole range.
                        neg_support: nip11_doc.map(|c| c.negentropy).or(self.neg_learned),
                        negs: HashMap::new(),
                        fetches: HashMap::new(),
                        locals_pending: 0,
                        local_tx,
                        local_rx,
                        authenticated: false,
                        auth_pending: None,
                        live_retry_at: None,
                        live_gap_since: None,
                        live_overflow: 0,
                        live_planned: 0,
                        overflow_filters: Vec::new(),
                        overflow_poll_at: Instant::now(),
                        overflow_batch: None,
                        overflow_polled_from: None,
                        connected_at: super::report::unix_now(),
                        unanswered: std::collections::VecDeque::new(),
                        notice_refusals: Default::default(),
                        retiring: Vec::new(),
                        live_answers: self.live_answers_learned,
                        moved_keys: Default::default(),
                        moved: Vec::new(),
                        moved_prints: Default::default(),
                        moved_since: 0,
                        reqs_sent: 0,
                    }
                }
                Err(e) => {
                    self.metrics
                        .connection_attempts
                        .with_label_values(&[&label, "failure"])
                        .inc();
                    self.on_disconnect(SessionError::Connect(e));
                    continue;
                }
            };
            self.metrics
                .connection_attempts
                .with_label_values(&[&label, "success"])
                .inc();
            self.metrics.relays_connected.inc();
            self.health.on_connected(Instant::now());
            (self.conn_valid, self.conn_invalid) = (0, 0);
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
                End::Stop | End::Lost(SessionError::Stopped) => return self.finish(),
                End::Lost(err) => {
                    self.abandon_reconciliation();
                    if conn
                        .batches
                        .values()
                        .any(|b| matches!(b.items, super::historic::Items::States(_)))
                    {
                        self.states_abandoned += 1;
                        self.states_retry_at = Instant::now()
                            + abandoned_retry(self.states_abandoned, self.config.reconcile_every.0);
                    }
                    self.on_disconnect(err);
                }
            }
        }
    }

    fn finish(&mut self) {
        self.metrics.relays_tracked.dec();
        self.metrics.forget_relay(self.url.as_str());
        self.publish_state(|s| s.subscriptions = 0);
    }

    /// A reconciliation cut short by a lost connection did not happen: the next connection
    /// resumes from the cursor, which is no substitute for the whole range, so finishing its
    /// catch-up must not be reported as `lastReconciled`. It is due again at once.
    /// On a relay that drops every connection before one completes, it is retried on a
    /// growing delay rather than on every connection (each attempt re-reads the whole range).
    fn abandon_reconciliation(&mut self) {
        if self.reconciling {
            self.reconciling = false;
            self.abandoned += 1;
            self.reconcile_at =
                Instant::now() + abandoned_retry(self.abandoned, self.config.reconcile_every.0);
        }
    }

    fn on_disconnect(&mut self, err: SessionError) {
        let now = Instant::now();
        let delay = self.health.on_failure(now, rand::random::<f64>());
        let reason = err.to_string();
        tracing::info!(relay = %self.url, %reason, cause = err.label(), retry_in = ?delay, "relay disconnected");
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
            s.last_error = Some(clean(&reason, 1000));
            s.subscriptions = 0;
        });
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
        // A (re)connection follows a gap: negentropy covers the whole range.
        self.queue_historic(conn, None, true, since, true);
        self.queue_states(conn);
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
                        Err(e) => return End::Lost(SessionError::Read(e)),
                    };
                    if let Err(e) = self.on_message(conn, msg).await {
                        return End::Lost(e);
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Set(set, seq)) => {
                        if let Err(e) = self.on_set(conn, set, seq).await {
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

    /// Periodic work on the connection: re-opening closed live subscriptions and the full
    /// reconciliation.
    async fn on_tick(&mut self, conn: &mut Conn) -> Result<(), SessionError> {
        if conn.notice_refusals.pending() {
            self.place_notice_refusals(conn).await?;
        }
        let now = Instant::now();
        if conn.live_retry_at.is_some_and(|t| t <= now)
            && self.health.rate_limited_until(now).is_none()
        {
            conn.live_retry_at = None;
            self.open_live(conn).await?;
        }
        // A REQ unanswered for this long is past every use of the record (a NOTICE refers
        // to what was sent just before it; a live REQ counts as open after the grace), and
        // a relay that never answers an accepted `limit: 0` REQ would grow it without end.
        self.resend_unanswered_live(conn).await?;
        let stale = self.config.batch_timeout * 2;
        conn.unanswered.retain(|u| u.sent_at.elapsed() < stale);
        self.release_retiring(conn).await?;
        self.backfill_when_in_place(conn);
        // Done once every batch is served and our relay has answered for all it was handed
        // (or set it aside): a crash before that must not count as a reconciliation that
        // happened.
        if (self.reconciling || self.initial_sync)
            && conn.batches.is_empty()
            && self.counters.settled()
        {
            // It read every repo's state over the whole range.
            if self.reconciling {
                self.unproven_states.clear();
                self.states_abandoned = 0;
            }
            self.reconciling = false;
            self.abandoned = 0;
            self.initial_sync = false;
            let at = SystemTime::now();
            self.last_reconciled = Some(at);
            self.publish_state(|s| s.last_reconciled = Some(at));
        }
        if now >= self.reconcile_at && conn.batches.is_empty() {
            self.reconcile_at = now + reconcile_delay(self.config.reconcile_every);
            tracing::info!(relay = %self.url, "full reconciliation");
            self.metrics
                .historic_batches
                .with_label_values(&["reconciliation"])
                .inc();
            self.reconciling = true;
            let all = self.set.clone();
            self.queue_historic(conn, Some(all), true, None, false);
        }
        self.queue_states(conn);
        self.poll_overflow(conn, now);
        self.check_timeouts(conn).await;
        Ok(())
    }
}

/// When a reconciliation abandoned for the `n`th time in a row is due again: at once the
/// first time (the next connection), then after 30 s, doubling, never later than the
/// reconciliation period.
pub(super) fn abandoned_retry(n: u32, period: Duration) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => doubled(Duration::from_secs(30), n - 2, period),
    }
}

/// A random moment in `[lo, hi]` from now, so relays do not reconcile in step.
pub(super) fn reconcile_delay((lo, hi): (Duration, Duration)) -> Duration {
    let hi = hi.max(lo);
    lo + (hi - lo).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_reconciliation_is_retried_on_a_growing_delay_up_to_the_period() {
        let day = Duration::from_secs(86_400);
        let secs = |n: u32| abandoned_retry(n, day).as_secs();
        assert_eq!([secs(1), secs(2), secs(3), secs(4)], [0, 30, 60, 120]);
        assert_eq!(secs(50), 86_400);
        assert_eq!(secs(u32::MAX), 86_400);
        assert_eq!(abandoned_retry(3, Duration::from_secs(40)).as_secs(), 40);
    }
}
