//! Live subscriptions (Layers 1–3 from now on) and changes to what the session syncs.

use nostr::{ClientMessage, EventId, SubscriptionId};

use super::{Conn, Session, SessionError, SyncSet};
use crate::crd::RelayCapabilities;
use crate::nostr::filters::{self, RepoScope};

impl Session {
    /// (Re)open the live subscriptions for the whole set. Without a known subscription cap:
    /// new ones first, then close the old, so no event falls between them. Under a cap:
    /// close first (never more than the relay allows), then open, and backfill the moment
    /// between. Any live gap is backfilled once the new subscriptions are out.
    pub(super) async fn open_live(&mut self, conn: &mut Conn) -> Result<(), SessionError> {
        let repos: Vec<RepoScope> = self.set.repos.iter().cloned().collect();
        let roots: Vec<EventId> = self.set.roots.iter().copied().collect();
        let cap = self.subscription_cap(conn);
        // Leave room for historic work under the relay's subscription limit.
        let max_reqs = cap.map(|m| {
            m.saturating_sub(self.config.max_historic_subscriptions.min(m / 2))
                .max(1)
        });
        let mut plan = filters::plan_live(
            &repos,
            &roots,
            self.config.chunk,
            self.max_filters(&conn.caps),
            max_reqs,
        );
        if let Some(max) = max_reqs
            && plan.len() > max
            && conn.caps.max_filters.is_none()
        {
            // The relay publishes no filter limit: more filters per REQ rather than more
            // REQs than it takes — up to twice our default, since a relay also limits the
            // size of a message (a REQ too large for it costs the connection).
            let all: Vec<_> = plan.into_iter().flatten().collect();
            let per_req = all
                .len()
                .div_ceil(max)
                .min(self.config.default_max_filters.max(1) * 2);
            plan = filters::pack(all, per_req);
        }
        let per_req = plan.iter().map(Vec::len).max().unwrap_or(1);
        let mut plan = filters::pack_within(
            plan.into_iter().flatten().collect(),
            per_req,
            self.config.max_req_bytes,
        );
        // More than the relay takes on one connection: open what fits and keep the rest as a
        // standing gap (it holds the cursor) rather than have the excess refused.
        conn.live_overflow = match max_reqs {
            Some(max) if plan.len() > max => plan.split_off(max).len(),
            _ => 0,
        };
        if conn.live_overflow > 0 {
            let err = format!(
                "the live set needs {} subscriptions; the relay allows about {} per connection: {} not open",
                plan.len() + conn.live_overflow,
                cap.unwrap_or(0),
                conn.live_overflow
            );
            tracing::warn!(relay = %self.url, overflow = conn.live_overflow, "live set larger than the relay's subscription cap");
            self.publish_state(|s| s.last_error = Some(err));
        }
        let old: Vec<SubscriptionId> = conn.live.keys().cloned().collect();
        conn.live.clear();
        if cap.is_some() && !old.is_empty() {
            conn.live_gap_since.get_or_insert(super::report::unix_now());
            for id in &old {
                conn.writer
                    .send(&ClientMessage::close(id.clone()))
                    .await
                    .map_err(SessionError::Write)?;
            }
        }
        for req in plan {
            conn.next_id += 1;
            let id = SubscriptionId::new(format!("live-{}", conn.next_id));
            conn.writer
                .send(&ClientMessage::req(id.clone(), req))
                .await
                .map_err(SessionError::Write)?;
            conn.sent_req(&id);
            conn.live.insert(id, ());
        }
        if cap.is_none() {
            for id in old {
                conn.writer
                    .send(&ClientMessage::close(id))
                    .await
                    .map_err(SessionError::Write)?;
            }
        }
        if let Some(gap) = conn.live_gap_since.take() {
            let since = gap.saturating_sub(self.config.slack.as_secs());
            tracing::info!(relay = %self.url, since, "backfilling the live gap");
            self.backfill(conn, nostr::Timestamp::from(since));
        }
        Ok(())
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
        self.queue_historic(conn, Some(added), false, None);
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
        self.set = set;
        let (repos, roots) = (self.set.repos.len(), self.set.roots.len());
        let confirmed_repos = self.set.repos.intersection(&self.confirmed.repos).count();
        let confirmed_roots = self.set.roots.intersection(&self.confirmed.roots).count();
        self.publish_state(|s| {
            s.applied_set = seq;
            s.repos = repos;
            s.roots = roots;
            s.confirmed_repos = confirmed_repos;
            s.confirmed_roots = confirmed_roots;
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
