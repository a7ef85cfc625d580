//! The local feed (a worker's and discovery's self-subscription to the local relay) against
//! real relays that cap what one connection may ask: nostr-relay-builder's REQ cap (`CLOSED
//! "rate-limited: too many REQs"`), a cap refused by NOTICE, transient refusals, and stored
//! events larger than a session's message limit. Whatever the relay refuses, the feed loads
//! everything on one connection and then streams what is stored next.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use grasp_sync::nostr::RelayUrl;
use grasp_sync::relay::backoff::HealthConfig;
use grasp_sync::relay::connection::{self, ConnectOptions, Incoming};
use grasp_sync::relay::feed::{self, FeedEvent, FeedHandle};
use grasp_sync::testing::scripted_relay::{CapRefusal, Script, ScriptedRelay};
use nostr::{
    Alphabet, ClientMessage, Event, EventBuilder, EventId, Filter, Keys, Kind, RelayMessage,
    SingleLetterTag, Tag,
};
use nostr_relay_builder::prelude::RateLimit;
use support::relays;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(60);

/// `repos` issues, one per repo, each tagging its repo's coordinate.
fn issues(keys: &Keys, repos: usize) -> Vec<Event> {
    (0..repos)
        .map(|i| {
            EventBuilder::new(Kind::from(1621), format!("issue {i}"))
                .tag(Tag::parse(["a", &coordinate(keys, i)]).expect("a tag"))
                .sign_with_keys(keys)
                .expect("sign")
        })
        .collect()
}

fn coordinate(keys: &Keys, i: usize) -> String {
    format!("30617:{}:repo-{i}", keys.public_key())
}

/// Filters as a worker asks for its repos: a few coordinates each.
fn filters(keys: &Keys, repos: usize, per_filter: usize) -> Vec<Filter> {
    let coords: Vec<String> = (0..repos).map(|i| coordinate(keys, i)).collect();
    coords
        .chunks(per_filter)
        .map(|part| {
            Filter::new().kind(Kind::from(1621)).custom_tags(
                SingleLetterTag::lowercase(Alphabet::A),
                part.iter().cloned(),
            )
        })
        .collect()
}

fn fast_health() -> HealthConfig {
    HealthConfig {
        base_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        ..HealthConfig::default()
    }
}

fn limits() -> feed::FeedLimits {
    feed::FeedLimits {
        retry: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
        ..feed::FeedLimits::default()
    }
}

/// What a feed said until it first loaded.
#[derive(Default, Debug)]
struct Seen {
    ids: BTreeSet<EventId>,
    refusals: Vec<(bool, String, Option<usize>)>,
    disconnects: Vec<String>,
}

/// Read the feed until `Synced`, failing after the deadline.
async fn until_synced(rx: &mut mpsc::Receiver<FeedEvent>) -> Seen {
    let mut seen = Seen::default();
    tokio::time::timeout(DEADLINE, async {
        loop {
            match rx.recv().await.expect("the feed runs") {
                FeedEvent::Event(e) | FeedEvent::Reread(e) => {
                    seen.ids.insert(e.id);
                }
                FeedEvent::Synced => return,
                FeedEvent::Loading => {}
                FeedEvent::Refused {
                    live, reason, cap, ..
                } => seen.refusals.push((live, reason, cap)),
                FeedEvent::Disconnected { error, .. } => seen.disconnects.push(error),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the feed did not load within {DEADLINE:?}; so far: {} events, refusals {:?}, disconnects {:?}", seen.ids.len(), seen.refusals.iter().take(5).collect::<Vec<_>>(), seen.disconnects.iter().take(5).collect::<Vec<_>>()));
    seen
}

/// Wait for `id` on the feed (after it loaded): the live stream.
async fn until_event(rx: &mut mpsc::Receiver<FeedEvent>, id: EventId) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let FeedEvent::Event(e) = rx.recv().await.expect("the feed runs")
                && e.id == id
            {
                return;
            }
        }
    })
    .await
    .expect("the event stored after the feed loaded was streamed");
}

fn start(url: &RelayUrl, filters: Vec<Filter>) -> (FeedHandle, mpsc::Receiver<FeedEvent>) {
    feed::spawn_with(
        url.clone(),
        filters,
        fast_health(),
        ConnectOptions::default(),
        limits(),
    )
}

/// A loaded feed reads the stored events again every `reread_every` with its live REQs left
/// open: an event stored without being streamed (nostr-relay-builder skips what a slow reader
/// missed) comes as `Reread`, the re-read ends with `Synced`, and what is stored next is
/// still streamed.
#[tokio::test]
async fn a_loaded_feed_reads_the_stored_events_again() {
    let relay = ScriptedRelay::start(Script::default())
        .await
        .expect("scripted relay");
    let keys = Keys::generate();
    let stored = issues(&keys, 20);
    relay.add(stored.iter().cloned());
    let (_feed, mut rx) = feed::spawn_with(
        relay.url(),
        filters(&keys, 20, 10),
        fast_health(),
        ConnectOptions::default(),
        feed::FeedLimits {
            reread_every: Some(Duration::from_millis(300)),
            ..limits()
        },
    );
    assert_eq!(until_synced(&mut rx).await.ids.len(), 20);
    let unstreamed = EventBuilder::new(Kind::from(1621), "stored, never streamed")
        .tag(Tag::parse(["a", &coordinate(&keys, 3)]).expect("a tag"))
        .sign_with_keys(&keys)
        .expect("sign");
    relay.add_silently([unstreamed.clone()]);
    tokio::time::timeout(DEADLINE, async {
        let mut found = false;
        loop {
            match rx.recv().await.expect("the feed runs") {
                FeedEvent::Reread(e) if e.id == unstreamed.id => found = true,
                FeedEvent::Event(e) => assert_ne!(e.id, unstreamed.id, "it was never streamed"),
                FeedEvent::Synced if found => return,
                FeedEvent::Disconnected { error, .. } => panic!("disconnected: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the re-read found the event the stream never delivered");
    let live = EventBuilder::new(Kind::from(1621), "streamed after a re-read")
        .tag(Tag::parse(["a", &coordinate(&keys, 17)]).expect("a tag"))
        .sign_with_keys(&keys)
        .expect("sign");
    relay.add([live.clone()]);
    until_event(&mut rx, live.id).await;
}

/// nostr-relay-builder at its stock REQ cap (500, here 5 so a test can pass it): a worker
/// with more repos than the cap allows subscriptions used to have its feed refused and
/// reconnect forever, and no session ever started. Seen failing before the feed kept within
/// the cap: no `Synced`, one disconnect after another.
#[tokio::test]
async fn a_feed_over_the_relays_req_cap_loads_everything_on_one_connection() {
    let (_relay, url) = relays::local_relay_with(RateLimit {
        max_reqs: 5,
        notes_per_minute: 1_000_000,
    })
    .await;
    let keys = Keys::generate();
    let stored = issues(&keys, 600);
    relays::publish(&url, &stored).await;
    // 60 filters: 60 historic pages and two live REQs, twelve times the cap.
    let (_feed, mut rx) = start(&url, filters(&keys, 600, 10));
    let seen = until_synced(&mut rx).await;
    assert!(seen.disconnects.is_empty(), "{:?}", seen.disconnects);
    let want: BTreeSet<EventId> = stored.iter().map(|e| e.id).collect();
    assert_eq!(seen.ids, want, "every stored event, nothing else");
    assert!(
        seen.refusals
            .iter()
            .all(|(_, _, cap)| cap.is_some_and(|c| c <= 5)),
        "refused for the cap only, and the cap learned: {:?}",
        seen.refusals
    );
    // Live, for the last repo (in the last live REQ).
    let late = EventBuilder::new(Kind::from(1621), "late")
        .tag(Tag::parse(["a", &coordinate(&keys, 599)]).expect("a tag"))
        .sign_with_keys(&keys)
        .expect("sign");
    relays::publish(&url, std::slice::from_ref(&late)).await;
    until_event(&mut rx, late.id).await;
}

/// A relay that refuses over its cap by NOTICE, naming no REQ (nostr-rs-relay's way): the
/// feed starts the connection again within the cap the NOTICE implies, and loads.
#[tokio::test]
async fn a_cap_refused_by_notice_is_learned_and_the_feed_loads() {
    let relay = ScriptedRelay::start(Script {
        max_subscriptions: Some(4),
        cap_refusal: CapRefusal::Notice,
        ..Script::default()
    })
    .await
    .expect("scripted relay");
    let keys = Keys::generate();
    let stored = issues(&keys, 200);
    relay.add(stored.iter().cloned());
    let (_feed, mut rx) = start(&relay.url(), filters(&keys, 200, 10));
    // Each connection refused ends; the one within the cap loads.
    let seen = until_synced(&mut rx).await;
    let want: BTreeSet<EventId> = stored.iter().map(|e| e.id).collect();
    assert_eq!(seen.ids, want, "every stored event, nothing else");
    assert!(
        !seen.disconnects.is_empty() && seen.disconnects.len() <= 3,
        "the cap learned within a few connections: {:?}",
        seen.disconnects
    );
}

/// Transient refusals (`CLOSED "rate-limited: slow down"`, load rather than a cap) are sent
/// again on the same connection; they used to end it.
#[tokio::test]
async fn transient_refusals_are_retried_on_the_same_connection() {
    let relay = ScriptedRelay::start(Script {
        closed_rate_limited_first: 6,
        ..Script::default()
    })
    .await
    .expect("scripted relay");
    let keys = Keys::generate();
    let stored = issues(&keys, 50);
    relay.add(stored.iter().cloned());
    let (_feed, mut rx) = start(&relay.url(), filters(&keys, 50, 10));
    let seen = until_synced(&mut rx).await;
    let want: BTreeSet<EventId> = stored.iter().map(|e| e.id).collect();
    assert_eq!(seen.ids, want);
    assert!(seen.disconnects.is_empty(), "{:?}", seen.disconnects);
    assert_eq!(
        relay.counters().connections.load(Ordering::SeqCst),
        1,
        "one connection throughout"
    );
    assert_eq!(
        seen.refusals.len(),
        6,
        "each refusal reported: {:?}",
        seen.refusals
    );
    assert!(seen.refusals.iter().all(|(_, _, cap)| cap.is_none()));
}

/// The local relay holds whatever its users pushed; a patch can be larger than the 1 MiB a
/// session reads from a remote relay. Such an event ended the feed's connection and came
/// first on the next, forever (seen failing so).
#[tokio::test]
async fn a_stored_event_larger_than_a_mebibyte_is_read() {
    let (_relay, url) = relays::local_relay(1_000_000).await;
    let keys = Keys::generate();
    let big = EventBuilder::new(Kind::from(1617), "x".repeat(3 * 1024 * 1024))
        .tag(Tag::parse(["a", &coordinate(&keys, 0)]).expect("a tag"))
        .sign_with_keys(&keys)
        .expect("sign");
    publish_raw(&url, &big).await;
    let small = issues(&keys, 1);
    relays::publish(&url, &small).await;
    let f = Filter::new()
        .kinds([Kind::from(1617), Kind::from(1621)])
        .custom_tag(
            SingleLetterTag::lowercase(Alphabet::A),
            coordinate(&keys, 0),
        );
    let (_feed, mut rx) = start(&url, vec![f]);
    let seen = until_synced(&mut rx).await;
    assert!(seen.disconnects.is_empty(), "{:?}", seen.disconnects);
    assert_eq!(seen.ids, BTreeSet::from([big.id, small[0].id]));
}

/// Publish one event over a plain connection (the publisher refuses events this large).
async fn publish_raw(url: &RelayUrl, event: &Event) {
    let opts = ConnectOptions {
        max_message_bytes: 16 * 1024 * 1024,
        ..ConnectOptions::default()
    };
    let (mut w, mut r) = connection::connect(url, &opts).await.expect("connect");
    w.send(&ClientMessage::event(event.clone()))
        .await
        .expect("send");
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Incoming::Message(RelayMessage::Ok {
                event_id, status, ..
            }) = r.recv().await.expect("read")
                && event_id == event.id
            {
                assert!(status, "the relay took the large event");
                return;
            }
        }
    })
    .await
    .expect("OK within the deadline");
}

/// A relay that never ends a history page (no EOSE, no CLOSED) must not hold a place in the
/// window for ever: the page is closed and asked again after `page_silence`, on the same
/// connection, and the feed does not claim to have loaded.
#[tokio::test]
async fn a_history_page_the_relay_never_ends_is_asked_again() {
    let relay = ScriptedRelay::start(Script {
        no_eose: true,
        ..Script::default()
    })
    .await
    .expect("scripted relay");
    let keys = Keys::generate();
    relay.add(issues(&keys, 5));
    let (_feed, mut rx) = feed::spawn_with(
        relay.url(),
        filters(&keys, 5, 5),
        fast_health(),
        ConnectOptions::default(),
        feed::FeedLimits {
            page_silence: Duration::from_millis(300),
            ..limits()
        },
    );
    let mut silent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while silent < 3 {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("pages asked again within the deadline")
            .expect("the feed runs");
        match ev {
            FeedEvent::Refused { live, reason, .. } if reason.contains("no answer") => {
                assert!(!live);
                silent += 1;
            }
            FeedEvent::Synced => panic!("loaded without an end of stored events"),
            FeedEvent::Disconnected { error, .. } => panic!("disconnected: {error}"),
            _ => {}
        }
    }
    assert_eq!(relay.counters().connections.load(Ordering::SeqCst), 1);
    // One live REQ, the page, and the page asked again.
    assert!(relay.counters().reqs.load(Ordering::SeqCst) >= 4);
}

/// A relay that refuses everything (here on policy grounds: the feed does not authenticate)
/// is asked again on a doubling delay, and what the feed asks again does not grow: a refused
/// live REQ's history is queued once, not once per refusal (which made the REQs grow
/// without bound: seen failing so, over 300 REQs in 4 s).
#[tokio::test]
async fn a_relay_refusing_everything_is_asked_at_a_bounded_pace() {
    let relay = ScriptedRelay::start(Script {
        closed_with: Some("restricted: members only".into()),
        ..Script::default()
    })
    .await
    .expect("scripted relay");
    let keys = Keys::generate();
    let (_feed, mut rx) = start(&relay.url(), filters(&keys, 50, 10));
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut refusals = 0;
    while let Ok(ev) = tokio::time::timeout_at(until, rx.recv()).await {
        match ev.expect("the feed runs") {
            FeedEvent::Refused { .. } => refusals += 1,
            FeedEvent::Synced => panic!("loaded while every REQ was refused"),
            FeedEvent::Disconnected { error, .. } => panic!("disconnected: {error}"),
            _ => {}
        }
    }
    let reqs = relay.counters().reqs.load(Ordering::SeqCst);
    // Six subscriptions (one live REQ, five pages), each asked again at most every 500 ms.
    assert!(refusals >= 12, "asked again: {refusals} refusals");
    println!("{reqs} REQs, {refusals} refusals in 4 s");
    assert!(reqs <= 6 * 12, "{reqs} REQs in 4 s");
}
