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

    /// The relay refused `refused` for its cap (`None`: a refusal we cannot place).
    ///
    /// Relays answer a connection's messages in order, so when the refusal arrives every
    /// subscription we hold that the relay has answered was open when it refused: their
    /// number is a lower bound of the cap (negentropy sessions are not counted: relays keep
    /// them apart from REQs). The largest such bound is kept (a conservative cap costs some
    /// parallelism, never events).
    pub(super) async fn on_subscription_cap(
        &mut self,
        conn: &mut Conn,
        refused: Option<SubscriptionId>,
        text: &str,
    ) -> Result<(), SessionError> {
        self.metrics
            .closed_subscriptions
            .with_label_values(&["subscription-cap"])
            .inc();
        let Some(refused) = refused else {
            tracing::debug!(relay = %self.url, notice = %truncate(text, 200), "subscription cap notice with no REQ outstanding");
            return Ok(());
        };
        let open =
            |id: &SubscriptionId| *id != refused && !conn.unanswered.iter().any(|(x, _)| x == id);
        let held = conn.live.keys().filter(|id| open(id)).count()
            + conn.historic.keys().filter(|id| open(id)).count()
            + conn.fetches.keys().filter(|id| open(id)).count();
        let learned = self.sub_cap.unwrap_or(0).max(held).max(1);
        if self.sub_cap != Some(learned) {
            tracing::info!(relay = %self.url, cap = learned, reason = %truncate(text, 200), "relay caps subscriptions per connection; re-planning within it");
            self.sub_cap = Some(learned);
        }
        let err = format!(
            "relay refused a subscription over its cap (about {learned}): {}",
            truncate(text, 300)
        );
        self.publish_state(|s| s.last_error = Some(err));
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
        Ok(())
    }
}
