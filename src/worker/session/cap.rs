//! The relay's subscription cap, learned from its refusals. Many relays cap concurrent
//! subscriptions per connection without publishing it (nostr-relay-builder: 500, refused by
//! `CLOSED "rate-limited: too many REQs"`). A refused REQ believed open is a silent loss, so
//! each refusal takes that subscription back and re-plans within what the relay was seen to
//! hold.

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
            // Neither published nor learned: assume the smallest common default. A relay
            // that refuses with a NOTICE names no REQ, so going over its cap would go
            // unnoticed and starve historic work.
            (None, None) => self.config.assumed_subscription_cap,
            (a, b) => a.or(b),
        }
    }

    /// The relay refused the REQ `refused` for its cap (a CLOSED naming it). The
    /// subscription is taken back and the cap is at most the number believed open when that
    /// REQ was sent (`open_before`; an over-estimate while refusals are still on their way,
    /// never an under-estimate): the refusals of a burst arrive one by one, so the smallest
    /// value seen is kept. (A NOTICE refusal names no REQ and, since relays may answer earlier REQs
    /// after refusing later ones, cannot be placed; it is not handled yet.)
    pub(super) async fn on_subscription_cap(
        &mut self,
        conn: &mut Conn,
        refused: SubscriptionId,
        open_before: Option<usize>,
        text: &str,
    ) -> Result<(), SessionError> {
        self.metrics
            .closed_subscriptions
            .with_label_values(&["subscription-cap"])
            .inc();
        let now = Instant::now();
        // Historic work waits a moment: the live re-plan frees what it needs.
        let retry_at = now + self.config.batch_retry;
        if conn.live.remove(&refused).is_some() {
            conn.live_gap_since.get_or_insert(super::report::unix_now());
            conn.live_retry_at = Some(now);
        } else if let Some(h) = conn.historic.remove(&refused) {
            historic::retry_later(conn, h.batch, Work::Page(h.paginator), retry_at);
        } else if let Some(f) = conn.fetches.remove(&refused) {
            historic::retry_later(conn, f.batch, f.into_work(), retry_at);
        }
        let open = open_before
            .unwrap_or_else(|| conn.live.len() + conn.historic.len() + conn.fetches.len());
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
        // Live may hold every slot (the refused REQ was historic): re-plan it within the cap
        // so historic work gets its share.
        let live_budget = learned
            .saturating_sub(self.config.max_historic_subscriptions.min(learned / 2))
            .max(1);
        if conn.live.len() > live_budget {
            conn.live_retry_at.get_or_insert(now);
        }
        let err = format!(
            "relay refused a subscription over its cap (about {learned}): {}",
            truncate(text, 300)
        );
        self.publish_state(|s| s.last_error = Some(err));
        Ok(())
    }
}
