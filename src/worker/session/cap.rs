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

    /// The relay refused a REQ for its cap: `named` when it said which (CLOSED); `None` for
    /// a NOTICE, which names none. A relay checks the cap when a REQ arrives but may answer
    /// earlier REQs later (nostr-rs-relay sends EOSE from its query pool), so a NOTICE cannot
    /// be placed: no subscription is taken back on a guess (a wrong guess would leave one of
    /// the relay's slots held by a subscription we no longer track). Instead the refusals are
    /// counted against what we believe open, the live subscriptions are re-planned within
    /// the cap (a refused live REQ is among them or not: the re-plan covers both), and a
    /// refused historic page times out and is retried within the cap.
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
        let now = Instant::now();
        match named {
            Some(refused) => {
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
            }
            None => {
                conn.unplaced_refusals += 1;
                conn.live_gap_since.get_or_insert(super::report::unix_now());
                conn.live_retry_at = Some(now);
            }
        }
        let open = (conn.live.len() + conn.historic.len() + conn.fetches.len())
            .saturating_sub(conn.unplaced_refusals);
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
