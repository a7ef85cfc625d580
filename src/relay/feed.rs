//! A self-subscription to the local relay: everything it holds for some filters (paged),
//! then live — and again after every reconnect. Discovery feeds on announcements and
//! deletions this way; workers on the root events of their repos.
//!
//! The local relay is the authority on what was accepted, so this is how grasp-sync learns
//! what to sync. An unreachable local relay is retried with backoff, forever.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nostr::{ClientMessage, Event, EventId, Filter, RelayMessage, SubscriptionId, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::backoff::{Health, HealthConfig};
use super::connection::{self, ConnectOptions, Incoming};
use crate::nostr::RelayUrl;
use crate::nostr::pagination::{Paginator, Step};

#[derive(Debug)]
pub enum FeedEvent {
    Event(Box<Event>),
    /// Everything stored for the current filters has been delivered on this connection.
    Synced,
    /// The connection failed; it is retried after `retry_in`.
    Disconnected {
        error: String,
        retry_in: Duration,
    },
}

pub struct FeedHandle {
    filters: watch::Sender<Vec<Filter>>,
    task: JoinHandle<()>,
}

impl FeedHandle {
    /// Replace the filters; the feed re-subscribes (historic + live) on its connection.
    pub fn set_filters(&self, filters: Vec<Filter>) {
        self.filters.send_if_modified(|f| {
            if *f == filters {
                false
            } else {
                *f = filters;
                true
            }
        });
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for FeedHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start a feed. Events arrive on the returned channel (bounded: a slow consumer slows the
/// feed, it never buffers without limit).
pub fn spawn(
    url: RelayUrl,
    filters: Vec<Filter>,
    health: HealthConfig,
    connect: ConnectOptions,
) -> (FeedHandle, mpsc::Receiver<FeedEvent>) {
    let (tx, rx) = mpsc::channel(1024);
    let (ftx, frx) = watch::channel(filters);
    let task = tokio::spawn(run(url, frx, health, connect, tx));
    (FeedHandle { filters: ftx, task }, rx)
}

async fn run(
    url: RelayUrl,
    mut filters: watch::Receiver<Vec<Filter>>,
    health: HealthConfig,
    connect: ConnectOptions,
    tx: mpsc::Sender<FeedEvent>,
) {
    let mut health = Health::new(health);
    loop {
        if let Some(at) = health.next_retry_at() {
            tokio::time::sleep_until(at.into()).await;
        }
        let error = match connection::connect(&url, &connect).await {
            Ok((mut w, mut r)) => {
                health.on_connected(Instant::now());
                match serve(&mut w, &mut r, &mut filters, &tx).await {
                    Ok(()) => return, // consumer gone
                    Err(e) => e,
                }
            }
            Err(e) => e.to_string(),
        };
        let retry_in = health.on_failure(Instant::now(), rand::random::<f64>());
        tracing::warn!(relay = %url, %error, ?retry_in, "local relay feed disconnected");
        if tx
            .send(FeedEvent::Disconnected { error, retry_in })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// One connection. `Ok(())` when the consumer went away, `Err` when the connection failed.
async fn serve(
    w: &mut connection::ConnWriter,
    r: &mut connection::ConnReader,
    filters: &mut watch::Receiver<Vec<Filter>>,
    tx: &mpsc::Sender<FeedEvent>,
) -> Result<(), String> {
    let mut next = 0u64;
    let mut live: Vec<SubscriptionId> = Vec::new();
    // Historic subscriptions: paginator and the current page's (id, created_at).
    let mut historic: HashMap<SubscriptionId, (Paginator, Vec<(EventId, Timestamp)>)> =
        HashMap::new();
    let mut subscribe = true;
    loop {
        if subscribe {
            subscribe = false;
            let current = filters.borrow_and_update().clone();
            // Live first, so nothing falls between the stored set and the stream.
            let old = std::mem::take(&mut live);
            if !current.is_empty() {
                next += 1;
                let id = SubscriptionId::new(format!("feed-live-{next}"));
                let live_filters: Vec<Filter> =
                    current.iter().cloned().map(|f| f.limit(0)).collect();
                w.send(&ClientMessage::req(id.clone(), live_filters))
                    .await
                    .map_err(|e| e.to_string())?;
                live.push(id);
            }
            for id in old.into_iter().chain(historic.drain().map(|(id, _)| id)) {
                w.send(&ClientMessage::close(id))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            for f in current {
                next += 1;
                let id = SubscriptionId::new(format!("feed-hist-{next}"));
                let p = Paginator::new(f, 5_000);
                w.send(&ClientMessage::req(id.clone(), vec![p.current()]))
                    .await
                    .map_err(|e| e.to_string())?;
                historic.insert(id, (p, Vec::new()));
            }
            if historic.is_empty() && tx.send(FeedEvent::Synced).await.is_err() {
                return Ok(());
            }
        }
        tokio::select! {
            msg = r.recv() => {
                let msg = match msg.map_err(|e| e.to_string())? {
                    Incoming::Message(m) => m,
                    Incoming::Malformed { .. } => continue,
                };
                match msg {
                    RelayMessage::Event { subscription_id, event } => {
                        if let Some((_, page)) = historic.get_mut(subscription_id.as_ref()) {
                            page.push((event.id, event.created_at));
                        }
                        // The local relay is ours, but events are still verified: a feed must
                        // not let a forged announcement steer discovery.
                        if event.verify().is_ok()
                            && tx.send(FeedEvent::Event(Box::new(event.into_owned()))).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                    RelayMessage::EndOfStoredEvents(id) => {
                        let id = id.into_owned();
                        if let Some((mut p, page)) = historic.remove(&id) {
                            w.send(&ClientMessage::close(id)).await.map_err(|e| e.to_string())?;
                            if let Step::Next(f) = p.on_page(&page) {
                                next += 1;
                                let id = SubscriptionId::new(format!("feed-hist-{next}"));
                                w.send(&ClientMessage::req(id.clone(), vec![f]))
                                    .await
                                    .map_err(|e| e.to_string())?;
                                historic.insert(id, (p, Vec::new()));
                            } else if historic.is_empty() && tx.send(FeedEvent::Synced).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    RelayMessage::Closed { message, .. } => {
                        return Err(format!("local relay closed the feed: {message}"));
                    }
                    _ => {}
                }
            }
            changed = filters.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                subscribe = true;
            }
        }
    }
}
