//! The relay's subscription cap, learned from its refusals. Many relays cap concurrent
//! subscriptions per connection without publishing it (nostr-relay-builder: 500, refused by
//! `CLOSED "rate-limited: too many REQs"`). A refused REQ believed open is a silent loss, so
//! each refusal takes that subscription back and re-plans within what the relay was seen to
//! hold.
//!
//! A refusal by NOTICE (nostr-rs-relay: "Subscription error: Maximum concurrent subscription
//! count reached") names no REQ, and nostr-rs-relay answers an accepted `limit: 0` REQ with
//! nothing at all, so an unanswered REQ is not a refused one. The relay handles a
//! connection's messages in order and refuses at once, so: no new REQ is sent while NOTICEs
//! are being placed; after a short grace every NOTICE about what was sent has arrived. If as
//! many REQs sent shortly before are unanswered as there were refusals, those are the refused
//! ones; otherwise all of them are closed and sent again within the new cap, so none is
//! believed open on a guess. Every refused REQ found at least the cap open, so with k
//! refusals the cap is at most the k-th largest count of subscriptions believed open when a
//! suspect was sent. While placing, no page continues and a set change leaves a live gap
//! (its historic work may run before its live REQs).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nostr::{ClientMessage, SubscriptionId};

use super::Unanswered;
use super::{Conn, Session, SessionError};
use crate::nostr::remote_text::clean;

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

    /// Place the NOTICE refusals once they can be placed (see the module's note).
    pub(super) async fn place_notice_refusals(
        &mut self,
        conn: &mut Conn,
    ) -> Result<(), SessionError> {
        let believed_open = conn.believed_open();
        let Some(placed) = conn.notice_refusals.place(
            Instant::now(),
            NOTICE_GRACE,
            self.config.batch_timeout,
            &conn.unanswered,
            believed_open,
        ) else {
            return Ok(());
        };
        self.metrics
            .closed_subscriptions
            .with_label_values(&["subscription-cap"])
            .inc_by(placed.refusals as u64);
        let retry_at = Instant::now() + self.config.batch_retry;
        for id in placed.refused.iter().chain(&placed.unsure) {
            let req = conn.answered(id);
            let sent_at = req.as_ref().map(|u| u.sent_at);
            if conn.drop_retiring(id, sent_at) {
                // Replaced since it was sent, and kept open for its replacement: what it was
                // to cover was not covered from when it was sent.
                conn.writer
                    .send(&ClientMessage::close(id.clone()))
                    .await
                    .map_err(SessionError::Write)?;
                continue;
            }
            let ours = conn.live.contains_key(id)
                || conn.historic.contains_key(id)
                || conn.fetches.contains_key(id);
            if !ours {
                continue; // closed by us already
            }
            // Possibly open (unsure), or refused: a CLOSE is harmless then, and what we
            // count stays what the relay holds.
            conn.writer
                .send(&ClientMessage::close(id.clone()))
                .await
                .map_err(SessionError::Write)?;
            conn.take_back(id, retry_at, Instant::now(), sent_at);
        }
        tracing::debug!(relay = %self.url, refusals = placed.refusals, refused = placed.refused.len(), resent = placed.unsure.len(), cap = placed.held, "placed subscription-cap NOTICEs");
        self.learn_cap(conn, placed.held, &placed.text);
        // Whatever waited for the placement may go now.
        conn.live_retry_at.get_or_insert(Instant::now());
        Ok(())
    }

    /// The relay refused the REQ `refused` for its cap (a CLOSED naming it). The
    /// subscription is taken back and the cap is at most the number believed open when that
    /// REQ was sent (`open_before`; an over-estimate while refusals are still on their way,
    /// never an under-estimate): the refusals of a burst arrive one by one, so the smallest
    /// value seen is kept. (NOTICE refusals: [`Session::place_notice_refusals`].)
    pub(super) async fn on_subscription_cap(
        &mut self,
        conn: &mut Conn,
        refused: SubscriptionId,
        req: Option<super::Unanswered>,
        text: &str,
    ) -> Result<(), SessionError> {
        self.metrics
            .closed_subscriptions
            .with_label_values(&["subscription-cap"])
            .inc();
        let now = Instant::now();
        // Historic work waits a moment: the live re-plan frees what it needs.
        conn.take_back(
            &refused,
            now + self.config.batch_retry,
            now,
            req.as_ref().map(|u| u.sent_at),
        );
        let open = req
            .map(|u| u.open_before)
            .unwrap_or_else(|| conn.believed_open());
        self.learn_cap(conn, open, text);
        Ok(())
    }

    /// The relay holds at most `bound` subscriptions per connection: keep the smallest bound
    /// seen and re-plan within it.
    fn learn_cap(&mut self, conn: &mut Conn, bound: usize, text: &str) {
        let now = Instant::now();
        let learned = self.sub_cap.map_or(bound, |c| c.min(bound)).max(1);
        match self.sub_cap {
            None => {
                tracing::info!(relay = %self.url, cap = learned, reason = %clean(text, 200), "relay caps subscriptions per connection; re-planning within it")
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
            clean(text, 300)
        );
        self.publish_state(|s| s.last_error = Some(err));
    }
}

/// How long after the first cap NOTICE the others about REQs already sent have arrived; and
/// how long a REQ must go unrefused before it counts as open for the cursor.
pub(super) const NOTICE_GRACE: Duration = Duration::from_secs(1);

/// Cap refusals read as NOTICEs and not yet placed on the REQs they refused. While any are
/// pending, no REQ is sent.
#[derive(Debug, Default)]
pub(super) struct NoticeRefusals {
    count: usize,
    /// When the first unplaced NOTICE was read.
    since: Option<Instant>,
    /// The last NOTICE's text.
    text: String,
}

/// NOTICE refusals placed on REQs.
#[derive(Debug, PartialEq)]
pub(super) struct Placed {
    pub refusals: usize,
    /// REQs the relay refused.
    pub refused: Vec<SubscriptionId>,
    /// REQs it may have refused: to be closed and sent again.
    pub unsure: Vec<SubscriptionId>,
    /// The relay holds at most this many subscriptions.
    pub held: usize,
    pub text: String,
}

impl NoticeRefusals {
    pub fn on_notice(&mut self, text: &str, now: Instant) {
        self.count += 1;
        self.since.get_or_insert(now);
        self.text = clean(text, 300).to_string();
    }

    pub fn pending(&self) -> bool {
        self.count > 0
    }

    /// Place the refusals on `unanswered` (every REQ not answered yet, ours or already
    /// closed by us, oldest first), of which those sent within `window` before the first
    /// NOTICE are suspects: at once if no more suspects are left than refusals (then they
    /// are the refused ones), else after `grace` (then all of them are unsure).
    ///
    /// The cap: every refused REQ found at least the cap open, and we believed at least as
    /// many open when we sent it, so with k refusals among the suspects the cap is at most
    /// the k-th largest count among them. (Counting at placement would under-count what we
    /// closed meanwhile, and a cap learned too low is never raised.) With no suspect left,
    /// `believed_open` less the refusals.
    pub fn place(
        &mut self,
        now: Instant,
        grace: Duration,
        window: Duration,
        unanswered: &VecDeque<Unanswered>,
        believed_open: usize,
    ) -> Option<Placed> {
        let since = self.since?;
        let mut suspects: Vec<&Unanswered> = Vec::new();
        for u in unanswered {
            if u.sent_at + window >= since && !suspects.iter().any(|s| s.id == u.id) {
                suspects.push(u);
            }
        }
        let exact = suspects.len() <= self.count;
        if !exact && now < since + grace {
            return None;
        }
        let held = if suspects.is_empty() {
            believed_open.saturating_sub(self.count)
        } else {
            let mut counts: Vec<usize> = suspects.iter().map(|s| s.open_before).collect();
            counts.sort_unstable_by(|a, b| b.cmp(a));
            counts[self.count.min(counts.len()) - 1]
        };
        let ids: Vec<SubscriptionId> = suspects.iter().map(|s| s.id.clone()).collect();
        let (refused, unsure) = if exact {
            (ids, Vec::new())
        } else {
            (Vec::new(), ids)
        };
        let placed = Placed {
            refusals: self.count,
            refused,
            unsure,
            held: held.max(1),
            text: std::mem::take(&mut self.text),
        };
        self.count = 0;
        self.since = None;
        Some(placed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(1);
    const WINDOW: Duration = Duration::from_secs(10);

    /// REQs sent at `at`, each believing `open` subscriptions open (then one more each).
    fn sent(names: &[&str], at: Instant, open: usize) -> VecDeque<Unanswered> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Unanswered {
                id: SubscriptionId::new(*n),
                sent_at: at,
                open_before: open + i,
                seq: i as u64 + 1,
                replaces: false,
            })
            .collect()
    }

    fn ids(names: &[&str]) -> Vec<SubscriptionId> {
        names.iter().map(|n| SubscriptionId::new(*n)).collect()
    }

    #[test]
    fn nothing_to_place_without_a_notice() {
        let mut n = NoticeRefusals::default();
        assert!(!n.pending());
        let t0 = Instant::now();
        assert_eq!(n.place(t0, GRACE, WINDOW, &sent(&["a"], t0, 0), 5), None);
    }

    #[test]
    fn as_many_unanswered_as_refusals_are_the_refused_ones() {
        let t0 = Instant::now();
        let mut n = NoticeRefusals::default();
        n.on_notice("max subscriptions", t0);
        n.on_notice("max subscriptions", t0);
        assert!(n.pending());
        // c found 8 open, d 9: the cap is at most 8.
        let p = n
            .place(t0, GRACE, WINDOW, &sent(&["c", "d"], t0, 8), 10)
            .expect("placed at once");
        assert_eq!(p.refused, ids(&["c", "d"]));
        assert!(p.unsure.is_empty());
        assert_eq!((p.refusals, p.held), (2, 8));
        assert!(!n.pending());
    }

    #[test]
    fn more_unanswered_than_refusals_waits_for_the_grace_then_all_are_unsure() {
        let t0 = Instant::now();
        let mut n = NoticeRefusals::default();
        n.on_notice("too many subscriptions", t0);
        // a and b accepted and never answered (limit 0 on nostr-rs-relay), c refused.
        let unanswered = sent(&["a", "b", "c"], t0, 0);
        assert_eq!(n.place(t0 + GRACE / 2, GRACE, WINDOW, &unanswered, 3), None);
        let p = n
            .place(t0 + GRACE, GRACE, WINDOW, &unanswered, 3)
            .expect("placed");
        assert!(p.refused.is_empty());
        assert_eq!(p.unsure, ids(&["a", "b", "c"]));
        // One refusal: the REQ that found the most open (c, 2) is the bound.
        assert_eq!(p.held, 2);
    }

    #[test]
    fn what_we_closed_before_the_placement_does_not_lower_the_cap() {
        let t0 = Instant::now();
        let mut n = NoticeRefusals::default();
        // 20 REQs, the last 4 refused by a cap of 16; 3 pages ended while waiting, so only
        // 17 are believed open at placement. The cap learned must not fall below 16.
        let names: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let unanswered = sent(&refs, t0, 0);
        for _ in 0..4 {
            n.on_notice("too many subscriptions", t0);
        }
        let p = n
            .place(t0 + GRACE, GRACE, WINDOW, &unanswered, 17)
            .expect("placed");
        assert_eq!(p.held, 16);
    }

    #[test]
    fn reqs_sent_long_before_the_notice_are_not_suspects() {
        let t0 = Instant::now();
        let mut unanswered = sent(&["old"], t0, 0);
        let later = t0 + WINDOW * 2;
        unanswered.extend(sent(&["new"], later, 1));
        let mut n = NoticeRefusals::default();
        n.on_notice("too many subscriptions", later);
        let p = n
            .place(later, GRACE, WINDOW, &unanswered, 2)
            .expect("placed at once");
        assert_eq!(p.refused, ids(&["new"]));
        assert_eq!(p.held, 1);
    }

    #[test]
    fn a_notice_with_nothing_unanswered_still_lowers_the_cap() {
        let t0 = Instant::now();
        let mut n = NoticeRefusals::default();
        n.on_notice("too many subscriptions", t0);
        let p = n
            .place(t0, GRACE, WINDOW, &VecDeque::new(), 4)
            .expect("settled at once");
        assert!(p.refused.is_empty() && p.unsure.is_empty());
        assert_eq!(p.held, 3);
    }
}
