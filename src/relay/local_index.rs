//! What the local relay already holds for a filter, as `(id, created_at)` pairs — the item
//! set for negentropy against a remote. Read with paginated REQs (loopback, and the local
//! relay is ours); only ids and timestamps are kept.

use std::collections::HashSet;
use std::time::Duration;

use nostr::{ClientMessage, EventId, Filter, RelayMessage, SubscriptionId, Timestamp};

use super::connection::{self, ConnectOptions, Incoming};
use crate::nostr::RelayUrl;
use crate::nostr::pagination::{Paginator, Step};

/// Most items read for one filter; beyond that negentropy is not worth its memory and the
/// caller falls back to REQ pagination against the remote.
pub const MAX_ITEMS: usize = 2_000_000;

const TOO_LARGE: &str = "local set exceeds";

/// Whether a [`local_items`] error says the set is too large to reconcile (as opposed to the
/// local relay being unreachable for now).
pub fn is_too_large(error: &str) -> bool {
    error.starts_with(TOO_LARGE)
}

pub async fn local_items(
    local: &RelayUrl,
    filter: Filter,
    page_limit: usize,
    connect: &ConnectOptions,
    timeout: Duration,
) -> Result<Vec<(EventId, Timestamp)>, String> {
    let work = async {
        let (mut w, mut r) = connection::connect(local, connect)
            .await
            .map_err(|e| e.to_string())?;
        let mut paginator = Paginator::new(filter, page_limit);
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        let mut n = 0u64;
        loop {
            n += 1;
            let sub = SubscriptionId::new(format!("local-{n}"));
            w.send(&ClientMessage::req(sub.clone(), vec![paginator.current()]))
                .await
                .map_err(|e| e.to_string())?;
            let mut page = Vec::new();
            loop {
                match r.recv().await.map_err(|e| e.to_string())? {
                    Incoming::Message(RelayMessage::Event {
                        subscription_id,
                        event,
                    }) if subscription_id.as_ref() == &sub => {
                        page.push((event.id, event.created_at));
                    }
                    Incoming::Message(RelayMessage::EndOfStoredEvents(id))
                        if id.as_ref() == &sub =>
                    {
                        break;
                    }
                    Incoming::Message(RelayMessage::Closed {
                        subscription_id,
                        message,
                    }) if subscription_id.as_ref() == &sub => {
                        return Err(format!("local relay closed the query: {message}"));
                    }
                    _ => {}
                }
            }
            let _ = w.send(&ClientMessage::close(sub)).await;
            for item in &page {
                if seen.insert(item.0) {
                    items.push(*item);
                }
            }
            if items.len() > MAX_ITEMS {
                return Err(format!("{TOO_LARGE} {MAX_ITEMS} events"));
            }
            if paginator.on_page(&page) == Step::Done {
                break;
            }
        }
        w.close().await;
        Ok(items)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("reading the local set timed out after {timeout:?}"))?
}
