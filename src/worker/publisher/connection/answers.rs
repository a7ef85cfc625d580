//! What the local relay answers on a connection: AUTH challenges, and the `OK` that settles
//! (or sends back for retry) each event in flight.

use crate::nostr::remote_text::clean;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nostr::RelayMessage;

use super::PublisherConn;
use crate::nostr::outcome::Outcome;

impl PublisherConn {
    pub(super) fn on_message(&mut self, msg: RelayMessage<'static>) {
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
                self.shared.forget_refusals();
            } else {
                tracing::warn!(relay = %self.config.local_relay, reason = %clean(&message, 300), "local relay refused our NIP-42 authentication");
            }
            return;
        }
        let Some(flight) = self.in_flight.remove(&event_id) else {
            return;
        };
        self.single = self.single.saturating_sub(1);
        self.metrics
            .publish_latency_seconds
            .observe(flight.sent_at.elapsed().as_secs_f64());
        let outcome = Outcome::classify(status, &message);
        self.metrics
            .publish_outcomes
            .with_label_values(&[outcome.label()])
            .inc();
        if self.fresh > 0 {
            // The first answers of a connection a growth step opened: did the relay give it
            // room of its own? A per-connection limit gives a new connection a whole fresh
            // budget; a limit on the whole ingress refuses it within its first few.
            match outcome {
                Outcome::RateLimited => {
                    self.gauges.fresh_limited.fetch_add(1, Ordering::Relaxed);
                    self.fresh = 0;
                }
                Outcome::Accepted | Outcome::Duplicate => {
                    self.fresh -= 1;
                    if self.fresh == 0 {
                        self.gauges.fresh_accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
        let sent_at = flight.sent_at;
        let refused_generation = flight.refused_generation;
        // Held, and served: ngit-grasp's `OK true "purgatory: …"` is neither (it drops the
        // event unless git data arrives), so a later copy must still be sent. The answer is
        // remembered before the copies parked on this send are taken: a copy that finds no
        // flight any more finds the memory.
        let held = matches!(outcome, Outcome::Accepted | Outcome::Duplicate);
        if held {
            self.gauges.taken.fetch_add(1, Ordering::Relaxed);
        }
        if held && message.trim_start().starts_with("purgatory") {
            self.hold_in_purgatory(event_id);
        } else if held {
            self.settle(event_id);
            self.shared.report_held(&flight.pending.event);
        }
        if held {
            // Refusals waiting for this event (a reply for its parent) may be taken now.
            if let Ok(mut r) = self.shared.refused.lock() {
                r.held(&flight.pending.event);
            }
        } else if outcome.is_refusal() {
            // Both locks, in this order (as `settle` then `held` take them on another
            // connection): an event this refusal waits for, held meanwhile, is seen here or
            // forgets it there.
            if let (Ok(mut settled), Ok(mut r)) =
                (self.shared.settled.lock(), self.shared.refused.lock())
            {
                let now = Instant::now();
                r.insert(
                    &flight.pending.event,
                    outcome,
                    &message,
                    now,
                    refused_generation,
                    |id| settled.holds(id, now),
                );
            }
        }
        let mut p = flight.pending;
        self.shared.land(self.number, &mut p);
        let copies = p.origins.len() as u64;
        // No standard prefix on a refusal: real relays send those for failures of their own
        // ("Database query failed: …"), so it is treated like `error:`.
        let transient = outcome == Outcome::Error || (outcome == Outcome::Other && !status);
        // Stored, not held back in purgatory (a relay whose disk is full may still take
        // events into its purgatory's memory).
        if outcome == Outcome::Accepted && !message.trim_start().starts_with("purgatory") {
            self.shared.note_stored(Instant::now());
        }
        if transient {
            let now = Instant::now();
            p.failures += 1;
            p.first_failure.get_or_insert(now);
            // The relay stored something between this event's last failure and this one:
            // this failure is the event's, not the relay's.
            if p.last_failure
                .is_some_and(|last| self.shared.stored_since(last))
            {
                p.own_failures += 1;
            }
            p.last_failure = Some(now);
        }
        let retry = match outcome {
            Outcome::RateLimited => true,
            // Final only for an event the relay keeps failing on while it stores others:
            // while it stores nothing, the failure is the relay's and it is waited out.
            _ if transient => {
                p.first_failure
                    .is_some_and(|t| t.elapsed() < self.config.max_error_age)
                    || p.own_failures < self.config.max_error_attempts
            }
            // With a key we answer the challenge and send again; without, it is final.
            Outcome::AuthRequired => {
                self.config.auth_keys.is_some() && p.attempts < self.config.max_error_attempts
            }
            _ => false,
        };
        let is_final = !retry;
        if is_final {
            p.resolve();
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
                self.gauges.pushed_back.fetch_add(1, Ordering::Relaxed);
                self.pacer.on_rate_limited(Instant::now(), sent_at);
                tracing::debug!(relay = %self.config.local_relay, pace = ?self.pacer.rate(), "local relay rate-limits us");
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.metrics.publish_retries.inc();
                self.push_shared(p);
            }
            _ if transient && retry => {
                let delay = self
                    .config
                    .error_backoff
                    .saturating_mul(1 << (p.failures - 1).min(16))
                    .min(std::time::Duration::from_secs(60));
                tracing::debug!(id = %event_id, failures = p.failures, ?delay, reason = %clean(&message, 300), "local relay failed on an event; retrying");
                self.requeue_after(p, Instant::now() + delay);
            }
            Outcome::AuthRequired if retry => {
                // Give the AUTH round trip a moment before resending.
                self.pause = Some(Instant::now() + self.config.auth_pause);
                self.requeue(p)
            }
            _ if transient => {
                self.stats.gave_up.fetch_add(copies, Ordering::Relaxed);
                self.metrics
                    .publish_outcomes
                    .with_label_values(&["gave_up"])
                    .inc();
                for o in p.origins.iter().flatten() {
                    o.rejected.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!(id = %event_id, attempts = p.attempts, reason = %clean(&message, 300), "local relay keeps failing on an event; giving up on it");
            }
            _ => {
                self.stats.refused.fetch_add(copies, Ordering::Relaxed);
                for o in p.origins.iter().flatten() {
                    o.rejected.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(id = %event_id, kind = p.event.kind.as_u16(), reason = %clean(&message, 300), "local relay refused event");
            }
        }
    }
}
