//! NIP-77 for one filter: read the local relay's set, reconcile it with the remote, queue
//! fetches by id for what is missing; fall back to REQ pagination whenever that fails.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use nostr::{ClientMessage, EventId, Filter, SubscriptionId};

use super::{LocalDone, NegSub, Queued, Work};
use crate::nostr::negentropy::NegSession;
use crate::nostr::pagination::Paginator;
use crate::relay::local_index;
use crate::worker::session::{Conn, Session, SessionError};

impl Session {
    /// Read the local relay's set for `filter` in the background; the result comes back
    /// through `conn.local_rx`.
    pub(super) fn start_local_read(&self, conn: &mut Conn, batch: u64, filter: Filter) {
        if self.config.local_relay.is_some() {
            self.spawn_local_read(conn, batch, filter, None);
        }
    }

    /// The one background read of the local relay's set both uses share; it takes a
    /// historic slot until its `LocalDone` is handled.
    fn spawn_local_read(
        &self,
        conn: &mut Conn,
        batch: u64,
        filter: Filter,
        then_page: Option<(Paginator, u64)>,
    ) {
        let Some(local) = self.config.local_relay.clone() else {
            return;
        };
        let connect = self.config.connect.clone();
        let timeout = self.config.batch_timeout.max(Duration::from_secs(30));
        let tx = conn.local_tx.clone();
        conn.locals_pending += 1;
        tokio::spawn(async move {
            let result =
                local_index::local_items(&local, filter.clone(), 5_000, &connect, timeout).await;
            let _ = tx.send(LocalDone {
                batch,
                then_page,
                filter,
                result,
            });
        });
    }

    /// Read the local relay's set for the paginator's filter into the batch's `held` in the
    /// background (whole-range REQ pagination), then send its first page. The read takes a
    /// historic slot like negentropy's, so a reconciliation reads no more at once than it
    /// pages; a failed read only skips nothing.
    pub(super) fn start_held_read(&self, conn: &mut Conn, batch: u64, page: Paginator) {
        if self.config.local_relay.is_none() {
            conn.queue.push(Queued {
                batch,
                work: Work::Page(page),
                not_before: Instant::now(),
            });
            return;
        }
        let filter = page.base().clone();
        let generation = self.publisher.local_generation();
        self.spawn_local_read(conn, batch, filter, Some((page, generation)));
    }

    pub(in crate::worker::session) async fn on_local_done(
        &mut self,
        conn: &mut Conn,
        done: LocalDone,
    ) -> Result<(), SessionError> {
        conn.locals_pending = conn.locals_pending.saturating_sub(1);
        if let Some((page, generation)) = done.then_page {
            let Some(b) = conn.batches.get_mut(&done.batch) else {
                return Ok(()); // the batch is over already
            };
            match done.result {
                Ok(items) => {
                    if b.held_generation != generation {
                        b.held.clear();
                        b.held_generation = generation;
                    }
                    b.held.extend(items.into_iter().map(|(id, _)| id));
                }
                Err(e) => {
                    tracing::debug!(relay = %self.url, error = %e, "local set unavailable; every event of this filter is handed over");
                }
            }
            return self.send_page(conn, done.batch, page).await;
        }
        let items = match done.result {
            Ok(items) if self.use_negentropy(conn) => items,
            Ok(_) => {
                self.fallback_to_req(conn, done.batch, done.filter, "negentropy unsupported");
                return Ok(());
            }
            Err(e) if local_index::is_too_large(&e) => {
                self.fallback_to_req(
                    conn,
                    done.batch,
                    done.filter,
                    &format!("local set unavailable: {e}"),
                );
                return Ok(());
            }
            Err(e) => {
                // Our relay is unreachable for now: ask again later rather than fall back to
                // a `since` query, which would miss what a whole-range reconciliation is for
                // (and nothing can be published meanwhile anyway).
                tracing::debug!(relay = %self.url, error = %e, "local set unavailable; reconciling later");
                let at = Instant::now() + self.config.batch_retry;
                super::retry_later(conn, done.batch, Work::Neg(done.filter), at);
                return Ok(());
            }
        };
        let (neg, init) = match NegSession::open(&items, self.config.neg_frame_limit) {
            Ok(x) => x,
            Err(e) => {
                self.fallback_to_req(conn, done.batch, done.filter, &e.to_string());
                return Ok(());
            }
        };
        conn.next_id += 1;
        let id = SubscriptionId::new(format!("neg-{}", conn.next_id));
        conn.writer
            .send(&ClientMessage::NegOpen {
                subscription_id: Cow::Owned(id.clone()),
                filter: Cow::Owned(done.filter.clone()),
                id_size: None,
                initial_message: Cow::Owned(init),
            })
            .await
            .map_err(SessionError::Write)?;
        conn.negs.insert(
            id,
            NegSub {
                batch: done.batch,
                filter: done.filter,
                neg,
                last_activity: Instant::now(),
            },
        );
        Ok(())
    }

    pub(in crate::worker::session) async fn on_neg_msg(
        &mut self,
        conn: &mut Conn,
        id: SubscriptionId,
        message: &str,
    ) -> Result<(), SessionError> {
        let Some(mut n) = conn.negs.remove(&id) else {
            return Ok(());
        };
        n.last_activity = Instant::now();
        match n.neg.on_message(message) {
            Ok(Some(next)) => {
                conn.writer
                    .send(&ClientMessage::NegMsg {
                        subscription_id: Cow::Owned(id.clone()),
                        message: Cow::Owned(next),
                    })
                    .await
                    .map_err(SessionError::Write)?;
                conn.negs.insert(id, n);
            }
            Ok(None) => {
                conn.writer
                    .send(&ClientMessage::NegClose {
                        subscription_id: Cow::Owned(id),
                    })
                    .await
                    .map_err(SessionError::Write)?;
                conn.neg_support = Some(true);
                self.neg_learned = Some(true);
                let need = n.neg.need();
                tracing::debug!(relay = %self.url, batch = n.batch, need = need.len(), "negentropy reconciliation done");
                self.neg_ids += need.len() as u64;
                self.metrics
                    .negentropy_ids_requested
                    .inc_by(need.len() as u64);
                if need.is_empty() {
                    self.filter_done(conn, n.batch, false);
                    return Ok(());
                }
                let chunks: Vec<Vec<EventId>> = need
                    .chunks(self.config.id_chunk.max(1))
                    .map(<[EventId]>::to_vec)
                    .collect();
                if let Some(b) = conn.batches.get_mut(&n.batch) {
                    b.open += chunks.len() - 1;
                }
                let filter = std::sync::Arc::new(n.filter);
                for ids in chunks {
                    conn.queue.push(Queued {
                        batch: n.batch,
                        work: Work::Fetch {
                            filter: filter.clone(),
                            ids,
                            retried: false,
                        },
                        not_before: Instant::now(),
                    });
                }
            }
            Err(e) => {
                let _ = conn
                    .writer
                    .send(&ClientMessage::NegClose {
                        subscription_id: Cow::Owned(id),
                    })
                    .await;
                self.fallback_to_req(conn, n.batch, n.filter, &e.to_string());
            }
        }
        Ok(())
    }

    /// The relay does not do negentropy: every reconciliation in flight falls back.
    pub(in crate::worker::session) fn negentropy_unsupported(
        &mut self,
        conn: &mut Conn,
        why: &str,
    ) {
        if conn.neg_support != Some(false) {
            tracing::info!(relay = %self.url, %why, "relay does not support NIP-77; using REQ pagination");
        }
        conn.neg_support = Some(false);
        self.neg_learned = Some(false);
        let open: Vec<NegSub> = conn.negs.drain().map(|(_, n)| n).collect();
        for n in open {
            self.fallback_to_req(conn, n.batch, n.filter, why);
        }
    }

    /// Give up on negentropy for one filter and page through it with REQs instead.
    pub(in crate::worker::session) fn fallback_to_req(
        &mut self,
        conn: &mut Conn,
        batch: u64,
        filter: Filter,
        why: &str,
    ) {
        tracing::debug!(relay = %self.url, %why, "historic filter falls back to REQ pagination");
        self.metrics
            .historic_method
            .with_label_values(&["req-fallback"])
            .inc();
        let mut filter = filter;
        if let Some(b) = conn.batches.get_mut(&batch) {
            b.negentropy = false;
            if let Some(since) = b.fallback_since {
                filter = filter.since(since);
            }
        }
        let limit = self.page_limit(&conn.caps);
        conn.queue.push(Queued {
            batch,
            work: Work::Page(Paginator::new(filter, limit)),
            not_before: Instant::now(),
        });
    }
}
