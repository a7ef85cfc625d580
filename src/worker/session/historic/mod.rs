//! Historic sync of a session: batches of filters, each run by NIP-77 negentropy against
//! the local relay's set (then fetched by id) or by paginated REQ/EOSE, with timeouts,
//! retries and fallbacks; a batch confirms its items when all its work is done.

mod negentropy;
mod req;
mod timeouts;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use nostr::{EventId, Filter, Timestamp};

use super::{Conn, Session, SessionError, SyncSet};
use crate::crd::RelayCapabilities;
use crate::nostr::filters::{self, RepoScope};
use crate::nostr::negentropy::NegSession;
use crate::nostr::pagination::Paginator;

/// Items a historic batch confirms when all its filters are done.
#[derive(Debug, Clone)]
pub(super) enum Items {
    Announcements,
    /// A backfill of a live gap: it confirms nothing (an unconfirmed item still needs its
    /// full history), but the cursor waits for it like for any batch.
    Backfill,
    Repos(Vec<RepoScope>),
    Roots(Vec<EventId>),
    /// The whole-range state filters of repos resumed as confirmed (see
    /// `Session::unproven_states`).
    States(Vec<RepoScope>),
}

pub(super) struct Batch {
    pub(super) items: Items,
    /// Units of work (filters, id fetches) not yet finished.
    pub(super) open: usize,
    pub(super) failed: bool,
    pub(super) negentropy: bool,
    pub(super) started: Instant,
    /// Where a fall-back to REQ pagination starts when negentropy covers the whole range.
    pub(super) fallback_since: Option<Timestamp>,
    /// What the local relay held for this batch's filters, each read just before its first
    /// page (whole-range REQ pagination only): events in it are not handed to the publisher
    /// again. Without negentropy, a full reconciliation pages through everything the remote
    /// holds, and every copy sent to a relay that has it costs its ingress allowance.
    pub(super) held: HashSet<EventId>,
    /// The publisher's local-connection generation when `held` was read: a relay that lost
    /// a connection since may have restarted without its data, and then `held` is dropped.
    pub(super) held_generation: u64,
    /// Made while live REQs were not in place: none of its work goes out until every live
    /// REQ sent before it (up to this `Unanswered::seq`) is, or until the deadline (then
    /// with a live gap; see `Conn::open_live_gates`). A relay that handles a connection's
    /// messages concurrently (khatru) may run a later REQ's query before an earlier live
    /// REQ is registered; what arrives between the two would be in neither.
    pub(super) after_live: Option<(u64, Instant)>,
}

/// A historic REQ in flight: one page of one filter.
pub(super) struct HistoricSub {
    pub(super) batch: u64,
    /// Also holds what the page in progress has brought so far (bounded).
    pub(super) paginator: Paginator,
    pub(super) last_activity: Instant,
    /// When the page was requested: a relay that trickles events never times out by
    /// silence, so a page also has an absolute deadline.
    pub(super) opened_at: Instant,
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
    pub(super) filter: Arc<Filter>,
    pub(super) requested: HashSet<EventId>,
    pub(super) retried: bool,
    pub(super) last_activity: Instant,
}

// A few per connection, moved a handful of times each: boxing the paginator would only add
// an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Work {
    /// REQ/EOSE pagination of a filter.
    Page(Paginator),
    /// Negentropy for a filter (first reading the local relay's set for it).
    Neg(Filter),
    /// REQ/EOSE pagination of a whole range, first reading what the local relay holds for
    /// the filter into the batch's `held`.
    ReadThenPage(Paginator),
    /// Fetch these ids; `filter` is the semantic filter to fall back to (shared by every
    /// chunk of one reconciliation's ids: it can be large).
    Fetch {
        filter: Arc<Filter>,
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
    /// Read for `Batch::held`, with the page to send once it is in (not for negentropy),
    /// and the publisher's generation when the read began.
    pub(super) then_page: Option<(Paginator, u64)>,
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
        whole_range: bool,
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
                whole_range,
            );
        }
        for (set, since) in [(new, None), (old, since)] {
            let repos: Vec<RepoScope> = set.repos.into_iter().collect();
            for part in repos.chunks(self.config.chunk.max(1)) {
                let fs = filters::layer2(part, self.config.chunk);
                self.add_batch(
                    conn,
                    Items::Repos(part.to_vec()),
                    fs,
                    since,
                    limit,
                    whole_range,
                );
            }
            let roots: Vec<EventId> = set.roots.into_iter().collect();
            for part in roots.chunks(self.config.chunk.max(1)) {
                let fs = filters::layer3(part, self.config.chunk);
                self.add_batch(
                    conn,
                    Items::Roots(part.to_vec()),
                    fs,
                    since,
                    limit,
                    whole_range,
                );
            }
        }
    }

    /// Read the state filters of the repos resumed as confirmed over the whole range (see
    /// `Session::unproven_states`): replaceable events, one per repo and maintainer, and a
    /// whole-range batch skips what our relay holds. Not while such a read is running, nor
    /// before `states_retry_at` (a connection lost during the last one: a relay that cannot
    /// serve a read without `since` is not asked on every connection).
    pub(in crate::worker::session) fn queue_states(&mut self, conn: &mut Conn) {
        let running = conn
            .batches
            .values()
            .any(|b| matches!(b.items, Items::States(_)));
        // Over negentropy, the repos' own whole-range batches cover their state filters
        // (see the batches' end below).
        let by_negentropy = self.config.negentropy && conn.neg_support == Some(true);
        if self.unproven_states.is_empty()
            || running
            || by_negentropy
            || Instant::now() < self.states_retry_at
        {
            return;
        }
        let limit = self.page_limit(&conn.caps);
        let unproven: Vec<RepoScope> = self.unproven_states.iter().cloned().collect();
        for part in unproven.chunks(self.config.chunk.max(1)) {
            let fs = filters::layer2_states(part, self.config.chunk);
            self.add_batch(conn, Items::States(part.to_vec()), fs, None, limit, true);
        }
    }

    /// Fetch again, from `since`, everything the set's live subscriptions would have
    /// delivered while they were not open (a live gap).
    pub(in crate::worker::session) fn backfill(&mut self, conn: &mut Conn, since: Timestamp) {
        let limit = self.page_limit(&conn.caps);
        let repos: Vec<RepoScope> = self.set.repos.iter().cloned().collect();
        let roots: Vec<EventId> = self.set.roots.iter().copied().collect();
        let mut fs = vec![filters::layer1()];
        for part in repos.chunks(self.config.chunk.max(1)) {
            fs.extend(filters::layer2(part, self.config.chunk));
        }
        for part in roots.chunks(self.config.chunk.max(1)) {
            fs.extend(filters::layer3(part, self.config.chunk));
        }
        self.add_batch(conn, Items::Backfill, fs, Some(since), limit, true);
    }

    /// Fetch again, from `since`, what `fs` (live filters replaced in place) would have
    /// delivered: read from `since` only, as the moment it covers is short and recent, where
    /// a whole-range read per re-plan would cost a reconciliation each time.
    pub(in crate::worker::session) fn backfill_filters(
        &mut self,
        conn: &mut Conn,
        fs: Vec<Filter>,
        since: Timestamp,
    ) {
        let limit = self.page_limit(&conn.caps);
        self.add_batch(conn, Items::Backfill, fs, Some(since), limit, false);
    }

    /// A batch polling live filters that do not fit under the relay's cap (see
    /// `poll_overflow`); it confirms nothing.
    pub(in crate::worker::session) fn poll_batch(
        &mut self,
        conn: &mut Conn,
        fs: Vec<Filter>,
        since: Timestamp,
    ) -> u64 {
        let limit = self.page_limit(&conn.caps);
        self.add_batch(conn, Items::Backfill, fs, Some(since), limit, false);
        conn.next_id
    }

    /// Queue one batch of `fs` from `since`. With `whole_range` (the batch covers a gap: a
    /// reconnect, a restart, a live-gap backfill) negentropy reconciles the filters over
    /// their whole range, and only a fall-back to REQ pagination reads from `since`: `since`
    /// filters on `created_at`, so an event dated before the gap but first served during it
    /// (a late rebroadcast) would escape it, while negentropy moves only the differences.
    /// On a relay without NIP-77 that is the full reconciliation's job.
    fn add_batch(
        &mut self,
        conn: &mut Conn,
        items: Items,
        fs: Vec<Filter>,
        since: Option<Timestamp>,
        limit: usize,
        whole_range: bool,
    ) {
        conn.next_id += 1;
        let batch = conn.next_id;
        let negentropy = self.use_negentropy(conn);
        let (since, fallback_since) = if negentropy && whole_range {
            (None, since)
        } else {
            (since, None)
        };
        let fs = filters::with_since(fs, since);
        let now = Instant::now();
        let waits = conn.unanswered.iter().any(|u| conn.live_pending(u, now));
        let after_live = waits.then(|| (conn.reqs_sent, now + self.config.batch_timeout));
        conn.batches.insert(
            batch,
            Batch {
                items,
                open: fs.len(),
                failed: false,
                negentropy,
                started: Instant::now(),
                fallback_since,
                held: HashSet::new(),
                held_generation: self.publisher.local_generation(),
                after_live,
            },
        );
        let read_held = !negentropy && since.is_none() && self.config.local_relay.is_some();
        for f in fs {
            if read_held {
                conn.queue.push(Queued {
                    batch,
                    work: Work::ReadThenPage(Paginator::new(f, limit)),
                    not_before: Instant::now(),
                });
                continue;
            }
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

    fn use_negentropy(&self, conn: &Conn) -> bool {
        self.config.negentropy
            && self.config.local_relay.is_some()
            && conn.neg_support != Some(false)
    }

    /// Start queued historic pages while subscription slots are free and we are not
    /// cooling down.
    pub(super) async fn pump_queue(&mut self, conn: &mut Conn) -> Result<(), SessionError> {
        let now = Instant::now();
        // While cap NOTICEs are being placed, nothing new may blur the count.
        if self.health.rate_limited_until(now).is_some() || conn.notice_refusals.pending() {
            return Ok(());
        }
        let mut budget = self.config.max_historic_subscriptions;
        if let Some(max) = self.subscription_cap(conn) {
            // Retiring subscriptions hold slots until their replacements are in place.
            let live = conn.live.len().max(conn.live_planned) + conn.retiring.len();
            budget = budget.min(max.saturating_sub(live).max(1));
        }
        let limit = self.page_limit(&conn.caps);
        conn.open_live_gates(now);
        while conn.active_historic() < budget {
            let batches = &conn.batches;
            let Some(pos) = conn.queue.iter().position(|q| {
                q.not_before <= now && batches.get(&q.batch).is_none_or(|b| b.after_live.is_none())
            }) else {
                break;
            };
            let q = conn.queue.swap_remove(pos);
            match q.work {
                Work::Page(p) => self.send_page(conn, q.batch, p).await?,
                Work::ReadThenPage(p) => self.start_held_read(conn, q.batch, p),
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
        self.metrics
            .subscriptions
            .set((conn.believed_open() + conn.negs.len()) as i64);
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
            Items::Announcements | Items::Backfill => {}
            // Served in full, but confirmed only once our relay has answered for every event
            // handed over: a crash before that must not resume these as done. An item that
            // left the set while its batch ran is not: re-added, it is fetched in full again.
            Items::Repos(rs) => {
                // Reconciled by negentropy (over the whole range: a repo's batch is never
                // bounded below otherwise), its state filter under today's maintainers too.
                if b.negentropy {
                    for r in &rs {
                        self.unproven_states.remove(r);
                    }
                }
                self.fetched
                    .repos
                    .extend(rs.into_iter().filter(|r| self.set.repos.contains(r)))
            }
            Items::Roots(ids) => self
                .fetched
                .roots
                .extend(ids.into_iter().filter(|id| self.set.roots.contains(id))),
            // The cursor waited for this batch like for any other, so from here on it
            // covers these scopes' state too.
            Items::States(rs) => {
                for r in &rs {
                    self.unproven_states.remove(r);
                }
                if self.unproven_states.is_empty() {
                    self.states_abandoned = 0;
                }
            }
        }
    }

    fn page_limit(&self, caps: &RelayCapabilities) -> usize {
        caps.max_limit
            .map(|m| (m as usize).min(self.config.page_limit))
            .unwrap_or(self.config.page_limit)
    }
}
