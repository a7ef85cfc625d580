//! Real relays on loopback for tests: nostr-relay-builder's `LocalRelay` with explicit limits,
//! and a minimal reader to compare what a relay holds with what a test expects.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use grasp_sync::nostr::RelayUrl;
use grasp_sync::relay::connection::{self, ConnectOptions, Incoming};
use nostr::{ClientMessage, Event, EventId, Filter, RelayMessage, SubscriptionId};
use nostr_relay_builder::prelude::{
    LocalRelay, MemoryDatabase, MemoryDatabaseOptions, RateLimit, RelayBuilder, RelayBuilderNip42,
    RelayBuilderNip42Mode,
};

/// A nostr-relay-builder relay with limits set for tests: `notes_per_minute` per connection
/// (nostr-relay-builder's default, and ngit-grasp's, is 60), generous REQ and query limits.
pub async fn local_relay(notes_per_minute: u32) -> (LocalRelay, RelayUrl) {
    start(builder(notes_per_minute)).await
}

/// Like [`local_relay`], on a given port.
pub async fn local_relay_on(port: u16, notes_per_minute: u32) -> (LocalRelay, RelayUrl) {
    start(builder(notes_per_minute).port(port)).await
}

/// Like [`local_relay`], listening on `ip` (e.g. an address pods can reach).
pub async fn local_relay_at(ip: IpAddr, notes_per_minute: u32) -> (LocalRelay, RelayUrl) {
    start(builder(notes_per_minute).addr(ip)).await
}

/// Like [`local_relay`], but requiring NIP-42 authentication for reading or writing.
pub async fn auth_relay(mode: RelayBuilderNip42Mode) -> (LocalRelay, RelayUrl) {
    start(builder(1_000_000).nip42(RelayBuilderNip42 { mode })).await
}

/// Like [`local_relay`], with these rate limits (e.g. the stock REQ cap of 500 per
/// connection, or a smaller one).
pub async fn local_relay_with(limits: RateLimit) -> (LocalRelay, RelayUrl) {
    start(builder(limits.notes_per_minute).rate_limit(limits)).await
}

fn builder(notes_per_minute: u32) -> RelayBuilder {
    RelayBuilder::default()
        .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .database(MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: true,
            max_events: Some(1_000_000),
        }))
        .rate_limit(RateLimit {
            max_reqs: 10_000,
            notes_per_minute,
        })
        .default_filter_limit(100_000)
        .max_filter_limit(100_000)
}

/// nostr-relay-builder with every default untouched (60 events/min/connection, 500 events
/// per REQ without limit, 75,000 events stored).
pub async fn default_local_relay() -> (LocalRelay, RelayUrl) {
    start(RelayBuilder::default().addr(IpAddr::V4(Ipv4Addr::LOCALHOST))).await
}

async fn start(builder: RelayBuilder) -> (LocalRelay, RelayUrl) {
    let relay = LocalRelay::new(builder);
    relay.run().await.expect("start LocalRelay");
    let url = RelayUrl::parse(&relay.url().await.to_string()).expect("relay URL");
    (relay, url)
}

/// Every event `url` returns for `filter` (limit set high), read until EOSE.
pub async fn fetch(url: &RelayUrl, filter: Filter) -> Vec<Event> {
    let (mut w, mut r) = connection::connect(url, &ConnectOptions::default())
        .await
        .expect("connect to relay");
    let sub = SubscriptionId::new("fetch");
    let filter = if filter.limit.is_none() {
        filter.limit(1_000_000)
    } else {
        filter
    };
    w.send(&ClientMessage::req(sub.clone(), vec![filter]))
        .await
        .expect("send REQ");
    let mut out = Vec::new();
    let read = async {
        loop {
            match r.recv().await {
                Ok(Incoming::Message(RelayMessage::Event { event, .. })) => {
                    out.push(event.into_owned())
                }
                Ok(Incoming::Message(RelayMessage::EndOfStoredEvents(_))) => break,
                Ok(Incoming::Message(RelayMessage::Closed { message, .. })) => {
                    panic!("fetch CLOSED: {message}")
                }
                Ok(_) => {}
                Err(e) => panic!("fetch failed: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("EOSE within 30 s");
    w.close().await;
    out
}

pub async fn fetch_ids(url: &RelayUrl, filter: Filter) -> BTreeSet<EventId> {
    fetch(url, filter).await.into_iter().map(|e| e.id).collect()
}

/// Publish `events` to `url` and wait until the relay has answered for all of them.
pub async fn publish(url: &RelayUrl, events: &[nostr::Event]) {
    let all = grasp_sync::worker::publisher::publish_all(url, events.iter().cloned());
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("events published within 60 s");
}

/// Wait (up to `deadline`) until the relay at `url` holds every event of `want`, then
/// assert it holds nothing else.
pub async fn holds_exactly(
    url: &RelayUrl,
    want: &BTreeSet<EventId>,
    deadline: std::time::Duration,
) {
    let got = super::eventually(
        "the local relay to hold the expected set",
        deadline,
        || async {
            let got = fetch_ids(url, Filter::new()).await;
            got.is_superset(want).then_some(got)
        },
    )
    .await;
    let extra: Vec<_> = got.difference(want).collect();
    assert!(
        extra.is_empty(),
        "unexpected events on the local relay: {extra:?}"
    );
}
