//! Historic sync of a session: batches of filters, each run by NIP-77 negentropy against
//! the local relay's set (then fetched by id) or by paginated REQ/EOSE, with timeouts,
//! retries and fallbacks; a batch confirms its items when all its work is done.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::{Duration, Instant};

use nostr::{ClientMessage, EventId, Filter, SubscriptionId, Timestamp};

use super::{Conn, Session, SyncSet};
use crate::nostr::filters::{self, RepoScope};
use crate::nostr::negentropy::NegSession;
use crate::nostr::pagination::Paginator;
use crate::relay::local_index;

/// Items a historic batch confirms when all its filters are done.
#[derive(Debug, Clone)]
pub(super) enum Items {
    Announcements,
    Repos(Vec<RepoScope>),
    Roots(Vec<EventId>),
}

pub(super) struct Batch {
    pub(super) items: Items,
    /// Units of work (filters, id fetches) not yet finished.
    pub(super) open: usize,
    pub(super) failed: bool,
    pub(super) negentropy: bool,
    pub(super) started: Instant,
}

/// A historic REQ in flight: one page of one filter.
pub(super) struct HistoricSub {
    pub(super) batch: u64,
    pub(super) paginator: Paginator,
    pub(super) page: Vec<(EventId, Timestamp)>,
    pub(super) last_activity: Instant,
}

/// A negentropy reconciliation in flight.
pub(super) struct NegSub {
    pub(super) batch: u64,
    pub(super) filter: Filter,
    pub(super) neg: NegSession,
    pub(super) last_activity: Instant,
}

/// A REQ by ids for events negentropy found missing.
pub(super) struct FetchSub {
    pub(super) batch: u64,
    pub(super) filter: Filter,
    pub(super) requested: HashSet<EventId>,
    pub(super) retried: bool,
    pub(super) last_activity: Instant,
}

pub(super) enum Work {
    /// REQ/EOSE pagination of a filter.
    Page(Paginator),
    /// Negentropy for a filter (first reading the local relay's set for it).
    Neg(Filter),
    /// Fetch these ids; `filter` is the semantic filter to fall back to.
    Fetch {
        filter: Filter,
        ids: Vec<EventId>,
        retried: bool,
    },
}

/// Historic work waiting for a free subscription slot (or a retry time).
pub(super) struct Queued {
    pub(super) batch: u64,
    pub(super) work: Work,
    pub(super) not_before: Instant,
}

pub(super) struct LocalDone {
    pub(super) batch: u64,
    pub(super) filter: Filter,
    pub(super) result: Result<Vec<(EventId, Timestamp)>, String>,
}

impl FetchSub {
    /// The same fetch again, for what has not arrived yet.
    pub(super) fn into_work(self) -> Work {
        Work::Fetch {
            filter: self.filter,
            ids: self.requested.into_iter().collect(),
            retried: self.retried,
        }
    }
}

/// Queue `work` of `batch` again for `not_before`, marking the batch as having failed once.
pub(super) fn retry_later(conn: &mut Conn, batch: u64, work: Work, not_before: Instant) {
    if let Some(b) = conn.batches.get_mut(&batch) {
        b.failed = true;
    }
    conn.queue.push(Queued {
        batch,
        work,
        not_before,
    });
}

impl Session {
    /// Queue historic batches: with `only = None`, every layer for the whole set (items already
    /// confirmed are fetched from `since` only); otherwise just the given items, in full.
    pub(super) fn queue_historic(
        &mut self,
        conn: &mut Conn,
        only: Option<SyncSet>,
        layer1: bool,
        since: Option<Timestamp>,
    ) {
        let (new, old) = match only {
            Some(items) => (items, SyncSet::default()),
            None => {
                let new = SyncSet {
                    repos: self
                        .set
                        .repos
                        .difference(&self.confirmed.repos)
                        .cloned()
                        .collect(),
                    roots: self
                        .set
                        .roots
                        .difference(&self.confirmed.roots)
                        .copied()
                        .collect(),
                };
                let old = SyncSet {
                    repos: self
                        .set
                        .repos
                        .intersection(&self.confirmed.repos)
                        .cloned()
                        .collect(),
                    roots: self
                        .set
                        .roots
                        .intersection(&self.confirmed.roots)
                        .copied()
                        .collect(),
                };
                (new, old)
            }
        };
        let limit = self.page_limit(&conn.caps);
        if layer1 {
            self.add_batch(
                conn,
                Items::Announcements,
                vec![filters::layer1()],
                since,
                limit,
            );
        }
        for (set, since) in [(new, None), (old, since)] {
            let repos: Vec<RepoScope> = set.repos.into_iter().collect();
            for part in repos.chunks(self.config.chunk.max(1)) {
                let fs = filters::layer2(part, self.config.chunk);
                self.add_batch(conn, Items::Repos(part.to_vec()), fs, since, limit);
            }
            let roots: Vec<EventId> = set.roots.into_iter().collect();
            for part in roots.chunks(self.config.chunk.max(1)) {
                let fs = filters::layer3(part, self.config.chunk);
                self.add_batch(conn, Items::Roots(part.to_vec()), fs, since, limit);
            }
        }
    }

    pub(super) fn add_batch(
        &mut self,
        conn: &mut Conn,
        items: Items,
        fs: Vec<Filter>,
        since: Option<Timestamp>,
        limit: usize,
    ) {
        conn.next_id += 1;
        let batch = conn.next_id;
        let fs = filters::with_since(fs, since);
        let negentropy = self.use_negentropy(conn);
        conn.batches.insert(
            batch,
            Batch {
                items,
                open: fs.len(),
                failed: false,
                negentropy,
                started: Instant::now(),
            },
        );
        for f in fs {
            let work = if negentropy {
                Work::Neg(f)
            } else {
                Work::Page(Paginator::new(f, limit))
            };
            conn.queue.push(Queued {
                batch,
                work,
                not_before: Instant::now(),
            });
        }
    }

    pub(super) fn use_negentropy(&self, conn: &Conn) -> bool {
        self.config.negentropy
            && self.config.local_relay.is_some()
            && conn.neg_support != Some(false)
    }

    /// Give up on negentropy for one filter and page through it with REQs instead.
    pub(super) fn fallback_to_req(
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
        if let Some(b) = conn.batches.get_mut(&batch) {
            b.negentropy = false;
        }
        let limit = self.page_limit(&conn.caps);
        conn.queue.push(Queued {
            batch,
            work: Work::Page(Paginator::new(filter, limit)),
            not_before: Instant::now(),
        });
    }

    /// Read the local relay's set for `filter` in the background; the result comes back
    /// through `conn.local_rx`.
    pub(super) fn start_local_read(&self, conn: &mut Conn, batch: u64, filter: Filter) {
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
                filter,
                result,
            });
        });
    }

    pub(super) async fn on_local_done(
        &mut self,
        conn: &mut Conn,
        done: LocalDone,
    ) -> Result<(), String> {
        conn.locals_pending = conn.locals_pending.saturating_sub(1);
        let items = match done.result {
            Ok(items) if self.use_negentropy(conn) => items,
            Ok(_) => {
                self.fallback_to_req(conn, done.batch, done.filter, "negentropy unsupported");
                return Ok(());
            }
            Err(e) => {
                self.fallback_to_req(
                    conn,
                    done.batch,
                    done.filter,
                    &format!("local set unavailable: {e}"),
                );
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
            .map_err(|e| e.to_string())?;
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

    pub(super) async fn send_fetch(
        &mut self,
        conn: &mut Conn,
        batch: u64,
        filter: Filter,
        ids: Vec<EventId>,
        retried: bool,
    ) -> Result<(), String> {
        conn.next_id += 1;
        let id = SubscriptionId::new(format!("ids-{}", conn.next_id));
        let req = Filter::new().ids(ids.iter().copied()).limit(ids.len());
        conn.writer
            .send(&ClientMessage::req(id.clone(), vec![req]))
            .await
            .map_err(|e| e.to_string())?;
        conn.fetches.insert(
            id,
            FetchSub {
                batch,
                filter,
                requested: ids.into_iter().collect(),
                retried,
                last_activity: Instant::now(),
            },
        );
        Ok(())
    }

    pub(super) async fn on_neg_msg(
        &mut self,
        conn: &mut Conn,
        id: SubscriptionId,
        message: &str,
    ) -> Result<(), String> {
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
                    .map_err(|e| e.to_string())?;
                conn.negs.insert(id, n);
            }
            Ok(None) => {
                conn.writer
                    .send(&ClientMessage::NegClose {
                        subscription_id: Cow::Owned(id),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                conn.neg_support = Some(true);
                let need = n.neg.need();
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
                for ids in chunks {
                    conn.queue.push(Queued {
                        batch: n.batch,
                        work: Work::Fetch {
                            filter: n.filter.clone(),
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
    pub(super) fn negentropy_unsupported(&mut self, conn: &mut Conn, why: &str) {
        if conn.neg_support != Some(false) {
            tracing::info!(relay = %self.url, %why, "relay does not support NIP-77; using REQ pagination");
        }
        conn.neg_support = Some(false);
        let open: Vec<NegSub> = conn.negs.drain().map(|(_, n)| n).collect();
        for n in open {
            self.fallback_to_req(conn, n.batch, n.filter, why);
        }
    }

    /// Start queued historic pages while subscription slots are free and we are not
    /// cooling down.
    pub(super) async fn pump_queue(&mut self, conn: &mut Conn) -> Result<(), String> {
        let now = Instant::now();
        if self.health.rate_limited_until(now).is_some() {
            return Ok(());
        }
        let mut budget = self.config.max_historic_subscriptions;
        if let Some(max) = conn.caps.max_subscriptions {
            budget = budget.min((max as usize).saturating_sub(conn.live.len()).max(1));
        }
        let limit = self.page_limit(&conn.caps);
        while conn.active_historic() < budget {
            let Some(pos) = conn.queue.iter().position(|q| q.not_before <= now) else {
                break;
            };
            let q = conn.queue.swap_remove(pos);
            match q.work {
                Work::Page(p) => self.send_page(conn, q.batch, p).await?,
                Work::Neg(f) if self.use_negentropy(conn) => {
                    self.start_local_read(conn, q.batch, f)
                }
                Work::Neg(f) => {
                    self.send_page(conn, q.batch, Paginator::new(f, limit))
                        .await?
                }
                Work::Fetch {
                    filter,
                    ids,
                    retried,
                } => self.send_fetch(conn, q.batch, filter, ids, retried).await?,
            }
        }
        self.metrics.subscriptions.set(
            (conn.live.len() + conn.historic.len() + conn.negs.len() + conn.fetches.len()) as i64,
        );
        Ok(())
    }

    pub(super) async fn send_page(
        &mut self,
        conn: &mut Conn,
        batch: u64,
        paginator: Paginator,
    ) -> Result<(), String> {
        conn.next_id += 1;
        let id = SubscriptionId::new(format!("hist-{}", conn.next_id));
        conn.writer
            .send(&ClientMessage::req(id.clone(), vec![paginator.current()]))
            .await
            .map_err(|e| e.to_string())?;
        conn.historic.insert(
            id,
            HistoricSub {
                batch,
                paginator,
                page: Vec::new(),
                last_activity: Instant::now(),
            },
        );
        Ok(())
    }

    pub(super) fn filter_done(&mut self, conn: &mut Conn, batch: u64, failed: bool) {
        let Some(b) = conn.batches.get_mut(&batch) else {
            return;
        };
        b.failed |= failed;
        b.open = b.open.saturating_sub(1);
        if b.open > 0 {
            return;
        }
        let b = conn.batches.remove(&batch).expect("present");
        let outcome = if b.failed { "recovered" } else { "confirmed" };
        self.metrics
            .historic_batches
            .with_label_values(&[outcome])
            .inc();
        let method = if b.negentropy { "negentropy" } else { "req" };
        self.metrics
            .historic_method
            .with_label_values(&[method])
            .inc();
        self.metrics
            .historic_batch_seconds
            .with_label_values(&[method])
            .observe(b.started.elapsed().as_secs_f64());
        match b.items {
            Items::Announcements => {}
            Items::Repos(rs) => self.confirmed.repos.extend(rs),
            Items::Roots(ids) => self.confirmed.roots.extend(ids),
        }
    }

    pub(super) async fn check_timeouts(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let timeout = self.config.batch_timeout;
        let stale: Vec<SubscriptionId> = conn
            .historic
            .iter()
            .filter(|(_, h)| now.duration_since(h.last_activity) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let Some(h) = conn.historic.remove(&id) else {
                continue;
            };
            let _ = conn.writer.send(&ClientMessage::close(id.clone())).await;
            self.metrics
                .historic_batches
                .with_label_values(&["timeout"])
                .inc();
            tracing::warn!(relay = %self.url, sub = %id, "historic batch got no EOSE in time; will retry");
            self.publish_state(|s| {
                s.last_error = Some(format!(
                    "historic batch timed out after {timeout:?} without EOSE"
                ))
            });
            retry_later(
                conn,
                h.batch,
                Work::Page(h.paginator),
                now + self.config.batch_retry,
            );
        }
        let stale: Vec<SubscriptionId> = conn
            .negs
            .iter()
            .filter(|(_, n)| now.duration_since(n.last_activity) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let Some(n) = conn.negs.remove(&id) else {
                continue;
            };
            let _ = conn
                .writer
                .send(&ClientMessage::NegClose {
                    subscription_id: Cow::Owned(id),
                })
                .await;
            // Never answered at all: the relay ignores NEG-OPEN.
            if n.neg.rounds() == 0 {
                self.negentropy_unsupported(conn, "no answer to NEG-OPEN");
            }
            self.fallback_to_req(conn, n.batch, n.filter, "negentropy timed out");
        }
        let stale: Vec<SubscriptionId> = conn
            .fetches
            .iter()
            .filter(|(_, f)| now.duration_since(f.last_activity) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let Some(f) = conn.fetches.remove(&id) else {
                continue;
            };
            let _ = conn.writer.send(&ClientMessage::close(id)).await;
            self.metrics
                .historic_batches
                .with_label_values(&["timeout"])
                .inc();
            let batch = f.batch;
            retry_later(conn, batch, f.into_work(), now + self.config.batch_retry);
        }
    }
}
