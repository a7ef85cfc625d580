//! Routing of what the relay sends: events to the publisher, EOSE/CLOSED/NEG-* to the
//! subscription they belong to, AUTH and NOTICE to the connection's state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A hand-over to the publisher that took this long means it was full (back-pressure).
const BLOCKED: Duration = Duration::from_millis(50);

/// Invalid events (bad id or signature) on one connection before it may be cut off for
/// sending more invalid than valid ones.
const INVALID_TOLERATED: u64 = 128;

use nostr::filter::MatchEventOptions;
use nostr::{ClientMessage, Event, Filter, RelayMessage};

use super::historic::{Queued, Work};
use super::{Conn, Session, SessionError};
use crate::nostr::negentropy::notice_means_unsupported;
use crate::nostr::outcome::{Outcome, means_subscription_cap, notice_means_rate_limited};
use crate::nostr::pagination::Step;
use crate::nostr::remote_text::clean;
use crate::worker::publisher::{EventRejection, Validated};

impl Session {
    pub(super) async fn on_message(
        &mut self,
        conn: &mut Conn,
        msg: RelayMessage<'static>,
    ) -> Result<(), SessionError> {
        self.route(conn, msg).await?;
        if conn.notice_refusals.pending() {
            self.place_notice_refusals(conn).await?;
        }
        Ok(())
    }

    async fn route(
        &mut self,
        conn: &mut Conn,
        msg: RelayMessage<'static>,
    ) -> Result<(), SessionError> {
        match msg {
            RelayMessage::Event {
                subscription_id,
                event,
            } => {
                conn.answered_by_event(subscription_id.as_ref());
                let event = event.into_owned();
                let historic_source = if self.reconciling {
                    "daily"
                } else if self.cursor.is_some() {
                    "reconnect"
                } else {
                    "startup"
                };
                // Only what the subscription asked for is taken: anything else a relay sends
                // (validly signed or not) is not ours to publish, nor may it steer pagination.
                let matches = |fs: &[Filter]| {
                    fs.iter()
                        .any(|f| f.match_event(&event, MatchEventOptions::default()))
                };
                let sid = subscription_id.as_ref();
                let source = if let Some(h) = conn.historic.get_mut(sid) {
                    h.last_activity = Instant::now();
                    if !h.paginator.matches(&event) {
                        None
                    } else {
                        h.paginator.page_event(event.id, event.created_at);
                        // Paged through (it steers pagination) but not sent again: the
                        // local relay holds it — unless the publisher's connection to it
                        // changed since it was read (it may have restarted without its data).
                        if let Some(b) = conn.batches.get_mut(&h.batch)
                            && b.held.contains(&event.id)
                        {
                            if b.held_generation != self.publisher.local_generation() {
                                b.held.clear();
                            } else if event.verify_id() {
                                // A copy of what the relay holds: a valid event of this
                                // connection, as if handed over.
                                self.conn_valid += 1;
                                self.received += 1;
                                self.metrics
                                    .events
                                    .with_label_values(&[historic_source])
                                    .inc();
                                self.metrics.events_already_held.inc();
                                return Ok(());
                            }
                        }
                        Some(historic_source)
                    }
                } else if let Some(f) = conn.fetches.get_mut(sid) {
                    f.last_activity = Instant::now();
                    let asked =
                        f.requested.remove(&event.id) || matches(std::slice::from_ref(&*f.filter));
                    asked.then_some(historic_source)
                } else if let Some(fs) = conn.live.get(sid).or_else(|| conn.retiring_filters(sid)) {
                    matches(fs).then_some("live")
                } else {
                    // A late event for a subscription we already closed: taken if the live
                    // plan would take it.
                    conn.live.values().any(|fs| matches(fs)).then_some("live")
                };
                let Some(source) = source else {
                    self.metrics
                        .events_rejected
                        .with_label_values(&["outside_filter"])
                        .inc();
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(relay = %self.url, id = %event.id, sub = %sid, "dropping an event outside its subscription's filter");
                    return Ok(());
                };
                self.received += 1;
                self.metrics.events.with_label_values(&[source]).inc();
                self.forward(event).await
            }
            RelayMessage::EndOfStoredEvents(id) => {
                let id = id.into_owned();
                conn.answered(&id);
                if conn.live.contains_key(&id) {
                    conn.live_answers = true;
                    self.live_answers_learned = true;
                }
                if !self.refusal_streaks.is_empty()
                    && let Some(print) = conn.filter_print(&id)
                {
                    // Served: a later refusal of this filter starts from the shortest delay.
                    self.refusal_streaks.remove(&print);
                }
                if let Some(mut h) = conn.historic.remove(&id) {
                    conn.writer
                        .send(&ClientMessage::close(id))
                        .await
                        .map_err(SessionError::Write)?;
                    match h.paginator.end_page() {
                        // While cap NOTICEs are being placed, no REQ goes out.
                        Step::Next(_) if conn.notice_refusals.pending() => {
                            conn.queue.push(Queued {
                                batch: h.batch,
                                work: Work::Page(h.paginator),
                                not_before: Instant::now(),
                            });
                        }
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
                        .map_err(SessionError::Write)?;
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
                        self.fallback_to_req(conn, f.batch, Arc::unwrap_or_clone(f.filter), &why);
                    }
                } else if !conn.live.contains_key(&id) && conn.retiring_filters(&id).is_none() {
                    // A subscription we no longer track (taken back as refused, or replaced)
                    // that the relay did open: close it, or it holds one of the relay's
                    // slots for the rest of the connection.
                    conn.writer
                        .send(&ClientMessage::close(id))
                        .await
                        .map_err(SessionError::Write)?;
                }
                self.release_retiring(conn).await
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
                let req = conn.answered(&id);
                // A subscription we keep open for its replacement, which may not be in place
                // yet: a gap from when it was refused (its REQ), or from now.
                let retiring = conn.drop_retiring(&id, req.as_ref().map(|u| u.sent_at));
                let known = retiring
                    || conn.historic.contains_key(&id)
                    || conn.fetches.contains_key(&id)
                    || conn.live.contains_key(&id);
                if !known {
                    // Some relays close a subscription after its EOSE; we are done with it.
                    tracing::debug!(relay = %self.url, sub = %id, reason = %clean(&message, 300), "CLOSED for a finished subscription");
                    return Ok(());
                }
                if means_subscription_cap(&message) {
                    return self.on_subscription_cap(conn, id, req, &message).await;
                }
                let outcome = Outcome::classify(false, &message);
                self.metrics
                    .closed_subscriptions
                    .with_label_values(&[outcome.label()])
                    .inc();
                tracing::info!(relay = %self.url, sub = %id, reason = %clean(&message, 300), "relay closed a subscription");
                if outcome == Outcome::RateLimited {
                    self.health.on_rate_limited(Instant::now());
                }
                if outcome == Outcome::AuthRequired {
                    self.publish_state(|s| {
                        s.last_error = Some(format!(
                            "relay requires NIP-42 authentication and no key is configured: {}",
                            clean(&message, 500)
                        ))
                    });
                }
                let retry_at = match self.health.rate_limited_until(Instant::now()) {
                    Some(t) => t,
                    None if outcome.is_refusal() => {
                        // The relay will not serve this filter as it is: asking again every
                        // few seconds only adds load. Retry on a growing delay, and say so.
                        let streak = match conn.filter_print(&id) {
                            Some(print) => {
                                if self.refusal_streaks.len() >= super::MAX_REFUSAL_STREAKS {
                                    self.refusal_streaks.clear();
                                }
                                let n = self.refusal_streaks.entry(print).or_insert(0);
                                *n = n.saturating_add(1);
                                *n
                            }
                            None => 1,
                        };
                        let delay = self
                            .config
                            .batch_retry
                            .saturating_mul(1 << (streak - 1).min(16))
                            .min(self.config.health.max_backoff);
                        let err = format!(
                            "relay refused a subscription (retry in {}s): {}",
                            delay.as_secs(),
                            clean(&message, 500)
                        );
                        self.publish_state(|s| s.last_error = Some(err));
                        Instant::now() + delay
                    }
                    None => Instant::now() + self.config.batch_retry,
                };
                // The same page is retried (the paginator did not advance); live coverage is
                // gone from now and rebuilt once the relay lets us (after a cool-down, after
                // authenticating, or after the retry delay), never in a tight loop.
                conn.take_back(&id, retry_at, retry_at, None);
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
                    let err = format!("NIP-42 authentication refused: {}", clean(&message, 500));
                    self.publish_state(|s| s.last_error = Some(err));
                }
                Ok(())
            }
            RelayMessage::Notice(text) => {
                if means_subscription_cap(&text) {
                    // Counted as "subscription-cap" once placed.
                    conn.notice_refusals.on_notice(&text, Instant::now());
                } else if !conn.negs.is_empty() && notice_means_unsupported(&text) {
                    self.negentropy_unsupported(conn, &text);
                } else if notice_means_rate_limited(&text) {
                    self.health.on_rate_limited(Instant::now());
                    self.metrics
                        .closed_subscriptions
                        .with_label_values(&["notice-rate-limited"])
                        .inc();
                }
                tracing::debug!(relay = %self.url, notice = %clean(&text, 200), "NOTICE");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Validate and hand an event to the publisher (waiting while its queue is full, which
    /// stops us reading from the relay).
    async fn forward(&mut self, event: Event) -> Result<(), SessionError> {
        let checked = self.publisher.validate(&event, self.config.max_event_bytes);
        if checked == Ok(Validated::Known) {
            self.metrics.signatures_known.inc();
        }
        if let Err(rejection) = checked {
            self.metrics
                .events_rejected
                .with_label_values(&[rejection.label()])
                .inc();
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(relay = %self.url, id = %event.id, reason = %rejection, "dropping invalid event");
            if !matches!(
                rejection,
                EventRejection::Oversize { .. } | EventRejection::OverLocalLimit { .. }
            ) {
                self.conn_invalid += 1;
                // Each costs a signature check; a relay sending mostly forgeries is cut off
                // and retried on a growing backoff rather than read for ever.
                if self.conn_invalid >= INVALID_TOLERATED && self.conn_invalid > self.conn_valid {
                    self.health.on_misconduct();
                    return Err(SessionError::MostlyInvalid {
                        invalid: self.conn_invalid,
                        valid: self.conn_valid,
                    });
                }
            }
            return Ok(());
        }
        self.conn_valid += 1;
        self.counters.submitted.fetch_add(1, Ordering::Release);
        let started = Instant::now();
        let publish = self.publisher.publish(event, Some(self.counters.clone()));
        let Some(handed) = super::unless_stopped(&mut self.stop, publish).await else {
            // Never handed over, so never answered: it must not count as pending.
            self.counters.submitted.fetch_sub(1, Ordering::Release);
            return Err(SessionError::Stopped);
        };
        if started.elapsed() >= BLOCKED {
            // We stopped reading while the publisher was full: the relay was not idle.
            self.unblocked_at = Instant::now();
        }
        handed.map_err(|e| {
            // Never handed over, so never answered: it must not count as pending.
            self.counters.submitted.fetch_sub(1, Ordering::Release);
            SessionError::PublisherClosed(e)
        })
    }
}
