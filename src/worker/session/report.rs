//! What the session tells the outside: the phase and counters in its `watch`, and the
//! per-relay metrics.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{Conn, Session, SessionState};
use crate::crd::Phase;
use crate::nostr::root_digest::RootDigest;

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn to_system(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at >= now {
        SystemTime::now() + (at - now)
    } else {
        SystemTime::now() - (now - at)
    }
}

impl Session {
    /// The confirmed part of the set as status reports it, recomputed only when the set or
    /// the confirmed items changed (status is updated per message).
    pub(super) fn confirmed_view(&mut self) -> super::ConfirmedView {
        self.confirmed_view
            .get_or_insert_with(|| {
                let roots: Vec<_> = self.set.roots.intersection(&self.confirmed.roots).collect();
                super::ConfirmedView {
                    repos: self.set.repos.intersection(&self.confirmed.repos).count(),
                    roots: roots.len(),
                    digest: RootDigest::of(roots).to_hex(),
                }
            })
            .clone()
    }

    pub(super) fn update_phase(&mut self, conn: &Conn) {
        if self.counters.drained() && !self.fetched.is_empty() {
            let fetched = std::mem::take(&mut self.fetched);
            self.confirmed.repos.extend(fetched.repos);
            self.confirmed.roots.extend(fetched.roots);
            self.confirmed_view = None;
        }
        // The cursor moves forward while every historic batch is confirmed, the live
        // subscriptions are open (a gap holds it until its backfill is done), and the
        // publisher has answered for everything we gave it. (A resumed repo's state filter
        // is read over the whole range on every resume, whatever the cursor says.)
        if conn.batches.is_empty()
            && conn.historic.is_empty()
            && conn.live_retry_at.is_none()
            && conn.live_gap_since.is_none()
            && !conn.moved_pending()
            && conn.live_overflow == 0
            && !conn.notice_refusals.pending()
            && self.counters.drained()
        {
            // Not past the last moment the relay was heard from: a connection that died
            // without a FIN looks open until the pong deadline, and what the relay served in
            // that time never reached us.
            let heard = to_system(conn.reader.last_seen().into_std())
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // Nor past a REQ sent too recently for a refusal to have come back: a
            // subscription counts as open only once the relay has had its chance to refuse.
            let unacknowledged = conn
                .unanswered
                .iter()
                .rev()
                .take_while(|u| u.sent_at.elapsed() < super::cap::NOTICE_GRACE)
                .map(|u| u.sent_at)
                .min()
                .map(|at| unix_now().saturating_sub(at.elapsed().as_secs_f64().ceil() as u64));
            let upto = unix_now()
                .min(heard)
                .min(unacknowledged.unwrap_or(u64::MAX));
            self.cursor = Some(upto.max(self.cursor.unwrap_or(0)));
        }
        let now = Instant::now();
        let failed = conn.batches.values().any(|b| b.failed);
        // Served in full but not yet answered for by our relay: still syncing.
        // (Backfills and overflow polls are upkeep, not syncing: they hold the cursor only.)
        let pending = conn
            .batches
            .values()
            .any(|b| !matches!(b.items, super::historic::Items::Backfill))
            || !self.fetched.is_empty();
        let phase = if self.health.rate_limited_until(now).is_some() {
            Phase::RateLimited
        } else if pending && failed {
            Phase::LiveWithGaps
        } else if pending {
            Phase::Syncing
        } else if self.gaps > 0 || conn.live_retry_at.is_some() || conn.live_overflow > 0 {
            // Pagination gaps, or live subscriptions the relay closed and not yet reopened.
            Phase::LiveWithGaps
        } else {
            Phase::Live
        };
        let code = match phase {
            Phase::Syncing => 2,
            Phase::Live => 3,
            Phase::LiveWithGaps => 4,
            _ => 5,
        };
        self.metrics
            .relay_connected
            .with_label_values(&[self.url.as_str()])
            .set(code);
        let subs = conn.believed_open() + conn.negs.len();
        self.report_bytes(conn);
        let bytes = self.bytes_before + conn.reader.bytes();
        let neg_ids = self.neg_ids;
        let (repos, roots) = (self.set.repos.len(), self.set.roots.len());
        let view = self.confirmed_view();
        let cursor = self.cursor;
        let (received, gaps) = (self.received, self.gaps);
        let published = self.counters.published.load(Ordering::Relaxed);
        let rejected = self.counters.rejected.load(Ordering::Relaxed);
        let failures = self.health.consecutive_failures();
        let pending_events = self.counters.pending();
        self.publish_state(|s| {
            s.phase = phase;
            s.events_pending = pending_events;
            s.subscriptions = subs;
            s.repos = repos;
            s.roots = roots;
            s.confirmed_repos = view.repos;
            s.confirmed_roots = view.roots;
            s.confirmed_roots_digest = Some(view.digest);
            s.cursor = cursor;
            s.events_received = received;
            s.events_published = published;
            s.events_rejected = rejected;
            s.historic_gaps = gaps;
            s.bytes_received = bytes;
            s.negentropy_ids_requested = neg_ids;
            s.consecutive_failures = failures;
            s.next_retry_at = None;
        });
    }

    /// Add what the connection read since the last report to the bytes metric, labelled by
    /// whether this relay does negentropy.
    pub(super) fn report_bytes(&mut self, conn: &Conn) {
        let read = conn.reader.bytes();
        let method = if conn.neg_support == Some(true) {
            "negentropy"
        } else {
            "req"
        };
        self.metrics
            .bytes_received
            .with_label_values(&[method])
            .inc_by(read.saturating_sub(self.bytes_reported));
        self.bytes_reported = read;
    }

    pub(super) fn publish_state(&self, f: impl FnOnce(&mut SessionState)) {
        self.state.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }
}
