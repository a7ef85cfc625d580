//! What the local relay already holds for a filter, as `(id, created_at)` pairs — the item
//! set for negentropy against a remote. Read with paginated REQs (loopback, and the local
//! relay is ours); only ids and timestamps are kept.

use std::time::Duration;

use nostr::{ClientMessage, EventId, Filter, RelayMessage, SubscriptionId, Timestamp};

use super::connection::{self, ConnectOptions, Incoming};
use crate::nostr::RelayUrl;
use crate::nostr::pagination::{Paginator, Step};

/// Most items read for one filter (about 10 MiB); beyond that negentropy is not worth its
/// memory and the caller falls back to REQ pagination against the remote, which streams.
pub const MAX_ITEMS: usize = 250_000;

/// Reads running at once in this process: each holds up to `MAX_ITEMS` items, and the
/// sessions of a worker would otherwise start one per historic slot of every relay.
const CONCURRENT_READS: usize = 4;
static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONCURRENT_READS);

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
        // Waiting for a turn counts against the timeout: the caller retries later.
        let _turn = READS.acquire().await.map_err(|e| e.to_string())?;
        let (mut w, mut r) = connection::connect(local, connect)
            .await
            .map_err(|e| e.to_string())?;
        let mut paginator = Paginator::new(filter, page_limit);
        let mut items = Vec::new();
        let mut n = 0u64;
        loop {
            n += 1;
            let sub = SubscriptionId::new(format!("local-{n}"));
            w.send(&ClientMessage::req(sub.clone(), vec![paginator.current()]))
                .await
                .map_err(|e| e.to_string())?;
            paginator.start_page();
            loop {
                match r.recv().await.map_err(|e| e.to_string())? {
                    Incoming::Message(RelayMessage::Event {
                        subscription_id,
                        event,
                    }) if subscription_id.as_ref() == &sub => {
                        paginator.page_event(event.id, event.created_at);
                        items.push((event.id, event.created_at));
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
            // Pages overlap at their boundary second: repeats are removed at the end.
            if items.len() > MAX_ITEMS + page_limit {
                return Err(format!("{TOO_LARGE} {MAX_ITEMS} events"));
            }
            if paginator.end_page() == Step::Done {
                break;
            }
        }
        w.close().await;
        items.sort_unstable();
        items.dedup();
        if items.len() > MAX_ITEMS {
            return Err(format!("{TOO_LARGE} {MAX_ITEMS} events"));
        }
        Ok(items)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("reading the local set timed out after {timeout:?}"))?
}
