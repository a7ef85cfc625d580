//! Live subscriptions (Layers 1–3 from now on) and changes to what the session syncs.

use std::collections::BTreeMap;

use nostr::{ClientMessage, SubscriptionId};

use super::{Conn, Session, SessionError, SyncSet};
use crate::crd::RelayCapabilities;
use crate::nostr::live_plan::{self, LiveKey, PlannedReq};

impl Session {
    /// Bring the live subscriptions in line with the whole set, re-sending only what changed:
    /// the plan is keyed and stable ([`live_plan`]); changed REQs go out under new ids and
    /// the subscriptions they replace close once the new ones are in place
    /// ([`Session::release_retiring`]), or — without room under the relay's cap — replace
    /// them in place with a backfill of what could have moved. REQs that are not open
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
        let (mut changed, mut replaced) = (Vec::new(), 0usize);
        for (k, r) in &wanted {
            match conn.live_plan.get(k) {
                Some((_, print)) if *print == r.fingerprint => {}
                Some(_) => {
                    changed.push(*k);
                    replaced += 1;
                }
                None => changed.push(*k),
            }
        }
        let replaces = !stale.is_empty() || replaced > 0;
        // Make before break: every changed REQ goes out under a new id and what it replaces
        // stays open until the new ones are in place, if the relay's cap leaves room for
        // both at once. Otherwise they are replaced in place (a REQ with the id of an open
        // subscription overwrites it, NIP-01) after the stale ones are closed, and what that
        // may have left uncovered meanwhile is backfilled.
        // One slot stays free: historic work always gets one (`pump_queue`).
        let overlap = cap.is_none_or(|c| conn.believed_open() + changed.len() < c);
        // Replaced in place, a REQ changes atomically on a relay that handles a connection's
        // messages in order; items moving between REQs (a new layout, a group packed into
        // several REQs) are uncovered between two of them.
        let moving: std::collections::BTreeSet<LiveKey> = if overlap || !replaces {
            Default::default()
        } else if !stale.is_empty() || changed.len() > replaced {
            changed.iter().copied().collect()
        } else {
            // Most REQs of each group, before or after.
            let mut parts: std::collections::HashMap<(u8, u32), (usize, usize)> =
                Default::default();
            for k in wanted.keys() {
                if let Some(g) = live_plan::group_of(*k) {
                    parts.entry(g).or_default().0 += 1;
                }
            }
            for k in conn.live_plan.keys() {
                if let Some(g) = live_plan::group_of(*k) {
                    parts.entry(g).or_default().1 += 1;
                }
            }
            changed
                .iter()
                .filter(|k| {
                    live_plan::group_of(**k)
                        .and_then(|g| parts.get(&g))
                        .is_some_and(|(after, before)| (*after).max(*before) > 1)
                })
                .copied()
                .collect()
        };
        let mut sent = 0usize;
        let mut successors = Vec::new();
        let mut uncovered: Vec<nostr::Filter> = Vec::new();
        let mut moved_keys = Vec::new();
        if !overlap {
            // Room first: what earlier re-plans keep open goes now, and what it still covered
            // is read again with the rest.
            for r in std::mem::take(&mut conn.retiring) {
                uncovered.extend(r.filters.iter().cloned());
                conn.writer
                    .send(&ClientMessage::close(r.id))
                    .await
                    .map_err(SessionError::Write)?;
            }
        }
        let retiring_from = conn.retiring.len();
        for key in stale {
            if let Some((id, _)) = conn.live_plan.remove(&key)
                && let Some(filters) = conn.live.remove(&id)
            {
                // A key waiting for its re-read takes its items elsewhere: read them as they
                // were planned.
                if conn.moved_keys.remove(&key) {
                    conn.keep_for_reread(&filters);
                }
                if overlap {
                    conn.retire(id, filters);
                } else {
                    conn.writer
                        .send(&ClientMessage::close(id))
                        .await
                        .map_err(SessionError::Write)?;
                }
            }
        }
        for (key, req) in wanted {
            let print = req.fingerprint;
            let old = match conn.live_plan.get(&key) {
                Some((_, p)) if *p == print => continue,
                Some((id, _)) => Some(id.clone()),
                None => None,
            };
            if let Some(id) = &old
                && conn.moved_keys.contains(&key)
                && let Some(filters) = conn.live.get(id).cloned()
            {
                conn.keep_for_reread(&filters);
            }
            // Items polled until now may have moved into it: the poll read them last from
            // `overflow_polled_from`, and the REQ covers them only once in place.
            if moving.contains(&key) || overflow_before > 0 {
                moved_keys.push(key);
            }
            let id = match old {
                Some(id) if !overlap => id,
                fresh => {
                    if let Some(old) = fresh
                        && let Some(filters) = conn.live.remove(&old)
                    {
                        conn.retire(old, filters);
                    }
                    conn.next_id += 1;
                    SubscriptionId::new(format!("live-{}", conn.next_id))
                }
            };
            let msg = ClientMessage::req(id.clone(), req.filters.to_vec());
            sent += nostr::JsonUtil::as_json(&msg).len();
            conn.writer.send(&msg).await.map_err(SessionError::Write)?;
            conn.sent_req(&id);
            successors.push(id.clone());
            conn.live.insert(id.clone(), req.filters);
            conn.live_plan.insert(key, (id, print));
        }
        let successors = std::sync::Arc::new(successors);
        for r in &mut conn.retiring[retiring_from..] {
            r.successors = successors.clone();
        }
        if replaces {
            let how = if overlap { "overlapped" } else { "in_place" };
            self.metrics.live_replans.with_label_values(&[how]).inc();
        }
        self.metrics.live_req_bytes.inc_by(sent as u64);
        self.release_retiring(conn).await?;
        if !uncovered.is_empty() || !moved_keys.is_empty() {
            let mut since = super::report::unix_now();
            if overflow_before > 0 {
                since = since.min(conn.overflow_polled_from.unwrap_or(conn.connected_at));
            }
            let since = since.saturating_sub(self.config.slack.as_secs());
            conn.moved_since = if conn.moved_pending() {
                conn.moved_since.min(since)
            } else {
                since
            };
            conn.moved_keys.extend(moved_keys);
            conn.keep_for_reread(&uncovered);
        }
        self.backfill_when_in_place(conn);
        Ok(())
    }

    /// Close the retiring subscriptions whose replacements are in place. One whose
    /// replacements are still not in place after the batch timeout (only on a relay that
    /// answers live REQs: `resend_unanswered_live` has sent them again by then) is
    /// closed anyway, with a gap from when it was retired.
    pub(super) async fn release_retiring(&mut self, conn: &mut Conn) -> Result<(), SessionError> {
        if conn.retiring.is_empty() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let retiring = std::mem::take(&mut conn.retiring);
        let (mut release, mut keep) = (Vec::new(), Vec::new());
        {
            let pending = conn.not_in_place(now);
            // One answer per re-plan: its retiring subscriptions share their successors.
            let mut known: Vec<(*const Vec<SubscriptionId>, bool)> = Vec::new();
            for r in retiring {
                let key = std::sync::Arc::as_ptr(&r.successors);
                let in_place = match known.iter().find(|(k, _)| *k == key) {
                    Some((_, v)) => *v,
                    None => {
                        let v = r.successors.iter().all(|s| !pending.contains(s));
                        known.push((key, v));
                        v
                    }
                };
                if in_place {
                    release.push((r, false));
                } else if now.saturating_duration_since(r.since) >= self.config.batch_timeout {
                    release.push((r, true));
                } else {
                    keep.push(r);
                }
            }
        }
        conn.retiring = keep;
        for (r, overdue) in release {
            if overdue {
                conn.live_gap_from(Some(r.since));
                tracing::debug!(relay = %self.url, sub = %r.id, "replacement REQs not in place; closing the old subscription with a gap");
            }
            conn.writer
                .send(&ClientMessage::close(r.id))
                .await
                .map_err(SessionError::Write)?;
        }
        Ok(())
    }

    /// On a relay that answers live REQs, one unanswered for the batch timeout (counted
    /// from when we last read, like historic pages) may never have been registered (dropped,
    /// or stuck behind a query): it is sent again under its id — overwriting it if it is
    /// open, so coverage has no hole — and counts as a gap from when it was first sent.
    pub(super) async fn resend_unanswered_live(
        &mut self,
        conn: &mut Conn,
    ) -> Result<(), SessionError> {
        if !conn.live_answers {
            return Ok(());
        }
        let timeout = self.config.batch_timeout;
        let unblocked = self.unblocked_at;
        let overdue: Vec<SubscriptionId> = conn
            .unanswered
            .iter()
            .filter(|u| {
                u.sent_at.max(unblocked).elapsed() >= timeout && conn.live.contains_key(&u.id)
            })
            .map(|u| u.id.clone())
            .collect();
        for id in overdue {
            let req = conn.answered(&id);
            let Some(filters) = conn.live.get(&id).cloned() else {
                continue;
            };
            tracing::info!(relay = %self.url, sub = %id, "live REQ unanswered; sending it again");
            conn.live_gap_from(req.map(|u| u.sent_at));
            conn.writer
                .send(&ClientMessage::req(id.clone(), filters.to_vec()))
                .await
                .map_err(SessionError::Write)?;
            conn.sent_req(&id);
        }
        Ok(())
    }

    /// Send what waits for the live REQs to be in place: the backfill of a live gap (the whole
    /// set, from the gap's start less the slack) and the re-read of REQs replaced in place.
    /// Sent before them, a read could run before a REQ is registered on a relay that handles
    /// messages concurrently, and what arrived between the two would be missed with the
    /// cursor past it.
    pub(super) fn backfill_when_in_place(&mut self, conn: &mut Conn) {
        if conn.live_gap_since.is_none() && !conn.moved_pending() {
            return;
        }
        // A re-open is due (it backfills after it), or no REQ may go out yet.
        if conn.live_retry_at.is_some() || conn.notice_refusals.pending() {
            return;
        }
        let now = std::time::Instant::now();
        let pending = conn.not_in_place(now);
        if conn.live.keys().any(|id| pending.contains(id)) {
            return;
        }
        drop(pending);
        if let Some(gap) = conn.live_gap_since.take() {
            let mut since = gap.saturating_sub(self.config.slack.as_secs());
            if conn.moved_pending() {
                // The whole set covers the re-read too, from the earlier start.
                since = since.min(conn.moved_since);
                conn.moved_keys.clear();
                conn.moved.clear();
                conn.moved_prints.clear();
            }
            tracing::info!(relay = %self.url, since, "backfilling the live gap");
            self.backfill(conn, nostr::Timestamp::from(since));
            return;
        }
        // While historic work runs (it holds the cursor anyway) the re-read waits, so the
        // re-plans of a whole sync cost one read, from the earliest of them.
        if conn
            .batches
            .values()
            .any(|b| !matches!(b.items, super::historic::Items::Backfill))
        {
            return;
        }
        let mut fs = std::mem::take(&mut conn.moved);
        conn.moved_prints.clear();
        for key in std::mem::take(&mut conn.moved_keys) {
            if let Some((id, _)) = conn.live_plan.get(&key)
                && let Some(filters) = conn.live.get(id)
            {
                fs.extend(filters.iter().map(|f| {
                    let mut f = f.clone();
                    f.limit = None;
                    f
                }));
            }
        }
        if fs.is_empty() {
            return;
        }
        tracing::debug!(relay = %self.url, since = conn.moved_since, filters = fs.len(), "reading again what live REQs replaced in place could have missed");
        self.backfill_filters(conn, fs, nostr::Timestamp::from(conn.moved_since));
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
