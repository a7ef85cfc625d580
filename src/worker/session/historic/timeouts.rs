//! Historic subscriptions that went quiet: retry them later, or fall back from negentropy.

use std::borrow::Cow;
use std::time::Instant;

use nostr::{ClientMessage, SubscriptionId};

use super::{Work, retry_later};
use crate::worker::session::{Conn, Session};

impl Session {
    pub(in crate::worker::session) async fn check_timeouts(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let timeout = self.config.batch_timeout;
        // Silence while we were not reading (publisher back-pressure) is not the relay's.
        let unblocked = self.unblocked_at;
        let idle = |last: Instant| now.duration_since(last.max(unblocked));
        // A page that keeps trickling is never silent: it also has an absolute deadline
        // (from its REQ, or from when back-pressure last held us up).
        let deadline = self.config.page_deadline;
        let stale: Vec<SubscriptionId> = conn
            .historic
            .iter()
            .filter(|(_, h)| idle(h.last_activity) >= timeout || idle(h.opened_at) >= deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let Some(h) = conn.historic.remove(&id) else {
                continue;
            };
            let _ = conn.writer.send(&ClientMessage::close(id.clone())).await;
            self.metrics
                .historic_batches
                .with_label_values(&["timeout"])
                .inc();
            let why = if idle(h.last_activity) >= timeout {
                format!("historic batch timed out after {timeout:?} without EOSE")
            } else {
                format!("historic page not finished within {deadline:?} (events trickle, no EOSE)")
            };
            tracing::warn!(relay = %self.url, sub = %id, %why, "historic batch will be retried");
            self.publish_state(|s| s.last_error = Some(why));
            retry_later(
                conn,
                h.batch,
                Work::Page(h.paginator),
                now + self.config.batch_retry,
            );
        }
        let stale: Vec<SubscriptionId> = conn
            .negs
            .iter()
            .filter(|(_, n)| idle(n.last_activity) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let Some(n) = conn.negs.remove(&id) else {
                continue;
            };
            let _ = conn
                .writer
                .send(&ClientMessage::NegClose {
                    subscription_id: Cow::Owned(id),
                })
                .await;
            // Never answered at all: the relay ignores NEG-OPEN.
            if n.neg.rounds() == 0 {
                self.negentropy_unsupported(conn, "no answer to NEG-OPEN");
            }
            self.fallback_to_req(conn, n.batch, n.filter, "negentropy timed out");
        }
        let stale: Vec<SubscriptionId> = conn
            .fetches
            .iter()
            .filter(|(_, f)| idle(f.last_activity) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let Some(f) = conn.fetches.remove(&id) else {
                continue;
            };
            let _ = conn.writer.send(&ClientMessage::close(id)).await;
            self.metrics
                .historic_batches
                .with_label_values(&["timeout"])
                .inc();
            let batch = f.batch;
            retry_later(conn, batch, f.into_work(), now + self.config.batch_retry);
        }
    }
}
