//! The relay's subscription cap, learned from its refusals. Many relays cap concurrent
//! subscriptions per connection without publishing it (nostr-rs-relay: 32, refused by a
//! NOTICE naming no subscription; nostr-relay-builder: 500, refused by `CLOSED
//! "rate-limited: too many REQs"`). A refused REQ believed open is a silent loss, so each
//! refusal takes that subscription back and re-plans within what the relay was seen to hold.

use std::time::Instant;

use nostr::SubscriptionId;

use super::historic::{self, Work};
use super::report::truncate;
use super::{Conn, Session, SessionError};

impl Session {
    /// The most subscriptions the relay takes on one connection, if known (learned or
    /// published in NIP-11).
    pub(super) fn subscription_cap(&self, conn: &Conn) -> Option<usize> {
        let published = conn.caps.max_subscriptions.map(|m| m as usize);
        match (self.sub_cap, published) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The relay refused a REQ for its cap: `named` when it said which (CLOSED), otherwise
    /// (a NOTICE) the newest REQ it has not answered — a relay checks the cap when a REQ
    /// arrives but may answer earlier REQs later (nostr-rs-relay sends EOSE from its query
    /// pool), so a refusal is for the latest ones. That subscription is taken back, and the
    /// cap is the number still believed open: refusals of a burst arrive one by one, each
    /// lowering it, so the smallest value seen is kept.
    pub(super) async fn on_subscription_cap(
        &mut self,
        conn: &mut Conn,
        named: Option<SubscriptionId>,
        text: &str,
    ) -> Result<(), SessionError> {
        self.metrics
            .closed_subscriptions
            .with_label_values(&["subscription-cap"])
            .inc();
        let believed_open = |c: &Conn, id: &SubscriptionId| {
            c.live.contains_key(id) || c.historic.contains_key(id) || c.fetches.contains_key(id)
        };
        let refused = named.or_else(|| {
            conn.unanswered
                .iter()
                .rev()
                .map(|(id, _)| id)
                .find(|id| believed_open(conn, id))
                .cloned()
        });
        let Some(refused) = refused else {
            tracing::debug!(relay = %self.url, notice = %truncate(text, 200), "subscription cap refusal with no REQ outstanding");
            return Ok(());
        };
        conn.answered(&refused);
        // Historic work waits a moment: the live re-plan (next tick) frees what it needs.
        let now = Instant::now();
        let retry_at = now + self.config.batch_retry;
        if conn.live.remove(&refused).is_some() {
            // Live coverage has a hole: re-plan within the cap at once, then backfill.
            conn.live_gap_since.get_or_insert(super::report::unix_now());
            conn.live_retry_at = Some(now);
        } else if let Some(h) = conn.historic.remove(&refused) {
            historic::retry_later(conn, h.batch, Work::Page(h.paginator), retry_at);
        } else if let Some(f) = conn.fetches.remove(&refused) {
            historic::retry_later(conn, f.batch, f.into_work(), retry_at);
        }
        let open = conn.live.len() + conn.historic.len() + conn.fetches.len();
        let learned = self.sub_cap.map_or(open, |c| c.min(open)).max(1);
        match self.sub_cap {
            None => {
                tracing::info!(relay = %self.url, cap = learned, reason = %truncate(text, 200), "relay caps subscriptions per connection; re-planning within it")
            }
            Some(c) if c != learned => {
                tracing::debug!(relay = %self.url, cap = learned, "subscription cap lowered")
            }
            Some(_) => {}
        }
        self.sub_cap = Some(learned);
        let err = format!(
            "relay refused a subscription over its cap (about {learned}): {}",
            truncate(text, 300)
        );
        self.publish_state(|s| s.last_error = Some(err));
        Ok(())
    }
}
