//! Live subscriptions (Layers 1–3 from now on) and changes to what the session syncs.

use std::collections::BTreeMap;

use nostr::{ClientMessage, SubscriptionId};

use super::{Conn, Session, SessionError, SyncSet};
use crate::crd::RelayCapabilities;
use crate::nostr::live_plan::{self, LiveKey, PlannedReq};

impl Session {
    /// Bring the live subscriptions in line with the whole set, re-sending only what changed:
    /// the plan is keyed and stable ([`live_plan`]), a changed REQ replaces its open
    /// subscription in place (same id), REQs no longer planned are closed first, so the
    /// count never exceeds the plan and a set change opens no gap. REQs that are not open
    /// (refused, closed by the relay, or a new connection) are sent afresh. Any live gap is
    /// backfilled once they are out.
    pub(super) async fn open_live(&mut self, conn: &mut Conn) -> Result<(), SessionError> {
        if conn.notice_refusals.pending() {
            // Sent once the refusals are placed (which sets `live_retry_at`). Historic work
            // for items added meanwhile may run first: what it misses until then is a gap.
            conn.live_gap_since.get_or_insert(super::report::unix_now());
            return Ok(());
        }
        let cap = self.subscription_cap(conn);
        // Leave room for historic work under the relay's subscription limit.
        let max_reqs = cap.map(|m| {
            m.saturating_sub(self.config.max_historic_subscriptions.min(m / 2))
                .max(1)
        });
        let max_filters = self.max_filters(&conn.caps);
        // A relay that publishes no filter limit may take more filters per REQ rather than
        // more REQs — up to twice our default, since a REQ too large for its message limit
        // costs the connection.
        let stretch = if conn.caps.max_filters.is_none() {
            max_filters.max(self.config.default_max_filters.max(1) * 2)
        } else {
            max_filters
        };
        let mut plan = self.planner.plan(
            &self.set.repos,
            &self.set.roots,
            live_plan::Limits {
                chunk: self.config.chunk,
                max_filters,
                max_filters_stretch: stretch,
                max_reqs,
                max_bytes: self.config.max_req_bytes,
            },
        );
        // More than the relay takes on one connection: open what fits and keep the rest as a
        // standing gap (it holds the cursor) rather than have the excess refused.
        let overflow_before = conn.live_overflow;
        let overflow = match max_reqs {
            Some(max) if plan.len() > max => plan.split_off(max),
            _ => Vec::new(),
        };
        conn.live_overflow = overflow.len();
        conn.live_planned = plan.len();
        // What does not fit is polled instead (`poll_overflow`): the same filters, as
        // historic queries.
        conn.overflow_filters = overflow
            .iter()
            .flat_map(|r| r.filters.iter().cloned())
            .map(|mut f| {
                f.limit = None;
                f
            })
            .collect();
        if conn.live_overflow > 0 {
            let err = format!(
                "the live set needs {} subscriptions; the relay allows about {} per connection: {} not open",
                plan.len() + conn.live_overflow,
                cap.unwrap_or(0),
                conn.live_overflow
            );
            if overflow_before == 0 {
                tracing::warn!(relay = %self.url, overflow = conn.live_overflow, "live set larger than the relay's subscription cap");
            } else {
                tracing::debug!(relay = %self.url, overflow = conn.live_overflow, "live set still larger than the relay's subscription cap");
            }
            self.publish_state(|s| s.last_error = Some(err));
        }
        // What is planned and open now; a planned REQ whose subscription is gone (refused,
        // closed by the relay) no longer counts as open.
        let Conn {
            live, live_plan, ..
        } = conn;
        live_plan.retain(|_, (id, _)| live.contains_key(id));
        let wanted: BTreeMap<LiveKey, PlannedReq> = plan.into_iter().map(|r| (r.key, r)).collect();
        let stale: Vec<LiveKey> = conn
            .live_plan
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            if let Some((id, _)) = conn.live_plan.remove(&key) {
                conn.live.remove(&id);
                conn.writer
                    .send(&ClientMessage::close(id))
                    .await
                    .map_err(SessionError::Write)?;
            }
        }
        let mut sent = 0usize;
        for (key, req) in wanted {
            let print = req.fingerprint;
            let id = match conn.live_plan.get(&key) {
                Some((_, p)) if *p == print => continue,
                // Replaced in place: the relay overwrites the subscription with this id.
                Some((id, _)) => id.clone(),
                None => {
                    conn.next_id += 1;
                    SubscriptionId::new(format!("live-{}", conn.next_id))
                }
            };
            let msg = ClientMessage::req(id.clone(), req.filters.to_vec());
            sent += nostr::JsonUtil::as_json(&msg).len();
            conn.writer.send(&msg).await.map_err(SessionError::Write)?;
            conn.sent_req(&id);
            conn.live.insert(id.clone(), req.filters);
            conn.live_plan.insert(key, (id, print));
        }
        self.metrics.live_req_bytes.inc_by(sent as u64);
        if let Some(gap) = conn.live_gap_since.take() {
            let since = gap.saturating_sub(self.config.slack.as_secs());
            tracing::info!(relay = %self.url, since, "backfilling the live gap");
            self.backfill(conn, nostr::Timestamp::from(since));
        }
        Ok(())
    }

    /// Live REQs that do not fit under the relay's cap are polled: every `overflow_poll`, a
    /// historic batch over their filters from the previous poll's start (less the slack).
    /// The standing gap still holds the cursor; this keeps the events coming.
    pub(super) fn poll_overflow(&mut self, conn: &mut Conn, now: std::time::Instant) {
        // One poll at a time, and none while historic batches run: they fetch up to now and
        // hold the cursor anyway; the first poll after them reads from the connection's start.
        let running = conn
            .overflow_batch
            .is_some_and(|b| conn.batches.contains_key(&b))
            || conn
                .batches
                .values()
                .any(|b| !matches!(b.items, super::historic::Items::Backfill));
        if conn.overflow_filters.is_empty() || now < conn.overflow_poll_at || running {
            return;
        }
        conn.overflow_poll_at = now + self.config.overflow_poll;
        let start = super::report::unix_now();
        let from = conn
            .overflow_polled_from
            .replace(start)
            .unwrap_or(conn.connected_at);
        let since = nostr::Timestamp::from(from.saturating_sub(self.config.slack.as_secs()));
        let fs = conn.overflow_filters.clone();
        conn.overflow_batch = Some(self.poll_batch(conn, fs, since));
    }

    pub(super) async fn on_set(
        &mut self,
        conn: &mut Conn,
        set: SyncSet,
        seq: u64,
    ) -> Result<(), SessionError> {
        let changed = set != self.set;
        let added = self.replace_set(set, seq);
        if !changed {
            return Ok(());
        }
        self.open_live(conn).await?;
        self.queue_historic(conn, Some(added), false, None, false);
        Ok(())
    }

    /// Take `set` as what the session syncs (connected or not) and report it applied, with
    /// counts that describe it; returns the items it adds.
    pub(super) fn replace_set(&mut self, set: SyncSet, seq: u64) -> SyncSet {
        let added = SyncSet {
            repos: set.repos.difference(&self.set.repos).cloned().collect(),
            roots: set.roots.difference(&self.set.roots).copied().collect(),
        };
        // Removed items stop being synced: drop them from the confirmed set too, so that a
        // later re-add fetches them in full.
        self.confirmed.repos.retain(|r| set.repos.contains(r));
        self.confirmed.roots.retain(|r| set.roots.contains(r));
        self.fetched.repos.retain(|r| set.repos.contains(r));
        self.fetched.roots.retain(|r| set.roots.contains(r));
        self.unproven_states.retain(|r| set.repos.contains(r));
        self.set = set;
        self.confirmed_view = None;
        let (repos, roots) = (self.set.repos.len(), self.set.roots.len());
        let view = self.confirmed_view();
        self.publish_state(|s| {
            s.applied_set = seq;
            s.repos = repos;
            s.roots = roots;
            s.confirmed_repos = view.repos;
            s.confirmed_roots = view.roots;
        });
        added
    }

    fn max_filters(&self, caps: &RelayCapabilities) -> usize {
        caps.max_filters
            .map(|n| n as usize)
            .unwrap_or(self.config.default_max_filters)
            .max(1)
    }
}
