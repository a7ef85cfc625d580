//! The publisher against real local relays: everything arrives, push-back loses nothing,
//! and the counts say what happened.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use grasp_sync::testing::scripted_relay::Purgatory;
use grasp_sync::worker::publisher::metrics::PublisherMetrics;
use grasp_sync::worker::publisher::{Publisher, PublisherConfig};
use nostr::{Event, EventBuilder, EventId, Filter, Keys, Kind};
use support::eventually;
use support::hostile_relay::{HostileRelay, Script};
use support::relays;

fn corpus(n: usize) -> Vec<Event> {
    let keys: Vec<Keys> = (0..5).map(|_| Keys::generate()).collect();
    (0..n)
        .map(|i| {
            EventBuilder::new(Kind::from(1111), format!("comment {i}"))
                .sign_with_keys(&keys[i % keys.len()])
                .unwrap()
        })
        .collect()
}

fn ids(events: &[Event]) -> BTreeSet<EventId> {
    events.iter().map(|e| e.id).collect()
}

async fn publish_all(p: &Publisher, events: &[Event]) {
    for e in events {
        p.publish(e.clone(), None).await.unwrap();
    }
}

async fn drained(p: &Publisher, within: Duration) {
    eventually("publisher to drain", within, || async {
        (p.stats().outstanding() == 0).then_some(())
    })
    .await;
}

/// Publish `events` in the background until all of them are accepted (within `within`),
/// and return the most connections seen open meanwhile.
async fn accept_all_counting_connections(
    publisher: &Publisher,
    metrics: &PublisherMetrics,
    events: &[Event],
    within: Duration,
) -> i64 {
    let sending = {
        let publisher = publisher.clone();
        let events = events.to_vec();
        tokio::spawn(async move { publish_all(&publisher, &events).await })
    };
    let most = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let all = events.len() as u64;
    eventually("every event accepted", within, || {
        let most = most.clone();
        async move {
            most.fetch_max(metrics.publisher_connections.get(), Ordering::Relaxed);
            (publisher.stats().accepted.load(Ordering::Relaxed) == all).then_some(())
        }
    })
    .await;
    sending.await.unwrap();
    most.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_a_real_local_relay() {
    let (_relay, url) = relays::local_relay(100_000).await;
    let (publisher, _task) = Publisher::spawn(
        PublisherConfig::new(url.clone()),
        PublisherMetrics::default(),
    );
    let events = corpus(300);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(60)).await;

    assert_eq!(relays::fetch_ids(&url, Filter::new()).await, ids(&events));
    let s = publisher.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 300);
    assert_eq!(s.refused.load(Ordering::Relaxed), 0);

    // Publishing the same events again: answered `duplicate`, nothing new stored.
    publish_all(&publisher, &events[..10]).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(
        s.accepted.load(Ordering::Relaxed) + s.duplicate.load(Ordering::Relaxed),
        310
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_local_relay_loses_nothing() {
    let relay = HostileRelay::start(Script {
        ok_rate_limited_first: 10,
        ..Script::default()
    })
    .await;
    let config = PublisherConfig::new(relay.url());
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(config, metrics.clone());
    let events = corpus(100);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(60)).await;

    assert_eq!(
        relay.ids().into_iter().collect::<BTreeSet<_>>(),
        ids(&events)
    );
    let s = publisher.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 100);
    assert!(
        s.retries.load(Ordering::Relaxed) >= 10,
        "retries {}",
        s.retries.load(Ordering::Relaxed)
    );
    assert_eq!(
        metrics
            .publish_outcomes
            .with_label_values(&["rate-limited"])
            .get(),
        10
    );
}

/// Transient failures of the local relay, with or without a standard prefix, are retried
/// (after a pause), not taken as final refusals: every event ends up stored.
async fn transient_failures_are_retried(text: &str) {
    let relay = HostileRelay::start(Script {
        ok_failed_first: Some((6, text.to_string())),
        ..Script::default()
    })
    .await;
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(relay.url()), metrics.clone());
    let events = corpus(20);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(60)).await;
    assert_eq!(
        relay.ids().into_iter().collect::<BTreeSet<_>>(),
        ids(&events),
        "an event refused transiently ({text}) was never stored"
    );
    let s = publisher.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 20);
    assert_eq!(s.gave_up.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprefixed_failures_of_the_local_relay_are_retried() {
    transient_failures_are_retried("Database query failed: connection pool exhausted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_failures_of_the_local_relay_are_retried() {
    transient_failures_are_retried("error: database is locked").await;
}

/// A local relay that fails every write for longer than the publisher's error age (a full
/// disk, a locked database) loses no event: while it stores nothing, the failures are the
/// relay's, not the events', and every event is sent again until it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_relay_failing_every_write_for_longer_than_the_error_age_loses_nothing() {
    // Ten events, each failing about six times with the pause doubling from 50 ms: the
    // outage lasts seconds, many times the error age.
    let relay = HostileRelay::start(Script {
        ok_failed_first: Some((60, "error: database or disk is full".to_string())),
        ..Script::default()
    })
    .await;
    let mut config = PublisherConfig::new(relay.url());
    config.error_backoff = Duration::from_millis(50);
    config.max_error_age = Duration::from_millis(200);
    let (publisher, _task) = Publisher::spawn(config, PublisherMetrics::default());
    let events = corpus(10);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(60)).await;
    let s = publisher.stats();
    assert_eq!(
        s.gave_up.load(Ordering::Relaxed),
        0,
        "events given up while the relay stored nothing"
    );
    assert_eq!(
        relay.ids().into_iter().collect::<BTreeSet<_>>(),
        ids(&events)
    );
}

/// While the local relay fails every write, events waiting to be sent again count against
/// a connection's room: the connection stops taking new ones, the bounded queue fills, and
/// publishing waits — instead of every event queued moving into an unbounded retry list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_relay_failing_every_write_holds_the_publisher_back() {
    let relay = HostileRelay::start(Script {
        ok_failed_first: Some((usize::MAX, "error: database or disk is full".to_string())),
        ..Script::default()
    })
    .await;
    let mut config = PublisherConfig::new(relay.url());
    config.max_connections = 1;
    config.max_in_flight = 4;
    config.queue_capacity = 8;
    config.queue_per_source = 8;
    config.queue_reserve = 0;
    config.error_backoff = Duration::from_secs(30);
    let (publisher, _task) = Publisher::spawn(config, PublisherMetrics::default());
    let handed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let feeder = {
        let (publisher, handed) = (publisher.clone(), handed.clone());
        tokio::spawn(async move {
            for e in corpus(200) {
                publisher.publish(e, None).await.unwrap();
                handed.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    eventually(
        "the relay failing writes",
        Duration::from_secs(30),
        || async { (relay.counters().events_received.load(Ordering::SeqCst) >= 4).then_some(()) },
    )
    .await;
    // An absence over a window: with the retries unbounded, all 200 are taken within it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let taken = handed.load(Ordering::SeqCst);
    assert!(
        taken <= 4 + 8 + 1,
        "{taken} events taken while the relay stored nothing"
    );
    feeder.abort();
}

/// An event the local relay keeps failing on while it stores others in between is given up
/// once it is older than the error age and failed often enough that way: counted, and it
/// does not hold the rest back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_relay_keeps_failing_on_while_it_stores_others_is_given_up() {
    let events = corpus(100);
    let poison = events[0].id;
    let relay = HostileRelay::start(Script {
        ok_failed_on: Some((poison, "error: row too large".to_string())),
        ..Script::default()
    })
    .await;
    let mut config = PublisherConfig::new(relay.url());
    config.error_backoff = Duration::from_millis(20);
    config.max_error_age = Duration::from_millis(300);
    config.max_error_attempts = 3;
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(config, metrics.clone());
    // The others keep coming while it fails (a second of traffic), as on a working relay.
    for e in &events {
        publisher.publish(e.clone(), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drained(&publisher, Duration::from_secs(60)).await;
    let s = publisher.stats();
    assert_eq!(s.gave_up.load(Ordering::Relaxed), 1);
    assert_eq!(s.accepted.load(Ordering::Relaxed), 99);
    let mut expected = ids(&events);
    expected.remove(&poison);
    assert_eq!(relay.ids().into_iter().collect::<BTreeSet<_>>(), expected);
    assert_eq!(
        metrics
            .publish_outcomes
            .with_label_values(&["gave_up"])
            .get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_with_default_limits_holds_back_the_excess_without_dropping_it() {
    // nostr-relay-builder's defaults (ngit-grasp's too): 60 events per minute per connection.
    let (_relay, url) = relays::default_local_relay().await;
    let metrics = PublisherMetrics::default();
    // One connection, never more (the growth is tested below).
    let mut config = PublisherConfig::new(url.clone());
    config.max_connections = 1;
    let (publisher, _task) = Publisher::spawn(config, metrics.clone());
    let events = corpus(70);
    publish_all(&publisher, &events).await;

    eventually(
        "the relay to push back",
        Duration::from_secs(30),
        || async {
            (metrics
                .publish_outcomes
                .with_label_values(&["rate-limited"])
                .get()
                >= 1)
                .then_some(())
        },
    )
    .await;
    let s = publisher.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 60);
    assert_eq!(s.refused.load(Ordering::Relaxed), 0);
    // The ten it refused are still owed, not dropped.
    assert_eq!(s.outstanding(), 10);
    assert_eq!(relays::fetch_ids(&url, Filter::new()).await.len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_one_event_in_flight_each_get_their_answer() {
    // The same event often arrives through several subscriptions at once.
    let (_relay, url) = relays::local_relay(100_000).await;
    let (publisher, _task) = Publisher::spawn(
        PublisherConfig::new(url.clone()),
        PublisherMetrics::default(),
    );
    let events = corpus(20);
    for e in &events {
        for _ in 0..3 {
            publisher.publish(e.clone(), None).await.unwrap();
        }
    }
    drained(&publisher, Duration::from_secs(30)).await;
    let s = publisher.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 20);
    assert_eq!(s.duplicate.load(Ordering::Relaxed), 40);
    assert_eq!(relays::fetch_ids(&url, Filter::new()).await, ids(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_relay_requiring_auth_accepts_us_with_a_key_and_refuses_without() {
    use nostr_relay_builder::prelude::RelayBuilderNip42Mode;
    let (_relay, url) = relays::auth_relay(RelayBuilderNip42Mode::Write).await;
    let events = corpus(30);

    let (anonymous, _t) = Publisher::spawn(
        PublisherConfig::new(url.clone()),
        PublisherMetrics::default(),
    );
    publish_all(&anonymous, &events[..5]).await;
    drained(&anonymous, Duration::from_secs(30)).await;
    assert_eq!(anonymous.stats().refused.load(Ordering::Relaxed), 5);

    let mut config = PublisherConfig::new(url.clone());
    config.auth_keys = Some(Keys::generate());
    let (authed, _t) = Publisher::spawn(config, PublisherMetrics::default());
    publish_all(&authed, &events).await;
    drained(&authed, Duration::from_secs(30)).await;
    assert_eq!(authed.stats().accepted.load(Ordering::Relaxed), 30);
    assert_eq!(relays::fetch_ids(&url, Filter::new()).await, ids(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_multiply_a_per_connection_limit() {
    // nostr-relay-builder's default: 60 events per minute *per connection*. One connection
    // would need 2.5 minutes for 150 events; three take the first 150 at once.
    let (_relay, url) = relays::default_local_relay().await;
    let mut config = PublisherConfig::new(url.clone());
    config.connections = 3;
    config.max_connections = 3;
    let (publisher, _task) = Publisher::spawn(config, PublisherMetrics::default());
    let events = corpus(150);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(publisher.stats().accepted.load(Ordering::Relaxed), 150);
    assert_eq!(relays::fetch_ids(&url, Filter::new()).await, ids(&events));
}

/// A stock nostr-relay-builder relay (ngit-grasp's ingress: 60 events a minute per
/// connection) and the default flags: one connection would need five minutes for 360
/// events. The publisher opens more while the relay refuses and events wait, and closes
/// them again once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_grow_while_the_relay_limits_each_one_and_close_when_idle() {
    let (_relay, url) = relays::default_local_relay().await;
    let metrics = PublisherMetrics::default();
    let mut config = PublisherConfig::new(url.clone());
    config.idle_close = Duration::from_secs(2);
    let (publisher, _task) = Publisher::spawn(config, metrics.clone());
    let events = corpus(360);
    let most =
        accept_all_counting_connections(&publisher, &metrics, &events, Duration::from_secs(30))
            .await;
    assert!((7..=32).contains(&most), "{most} connections at most");
    assert_eq!(relays::fetch_ids(&url, Filter::new()).await, ids(&events));
    eventually(
        "idle connections to close",
        Duration::from_secs(20),
        || async { (metrics.publisher_connections.get() == 1).then_some(()) },
    )
    .await;
}

/// A relay that answers each connection's events one after another (a busy relay, or one
/// far away) and never pushes back: events wait behind one connection's answers, so the
/// publisher probes with more connections while that raises the relay's intake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_push_back_connections_grow_while_that_raises_the_intake() {
    let relay = HostileRelay::start(Script {
        ok_delay: Some(Duration::from_millis(4)),
        ..Script::default()
    })
    .await;
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(relay.url()), metrics.clone());
    let events = corpus(1_200);
    let most =
        accept_all_counting_connections(&publisher, &metrics, &events, Duration::from_secs(60))
            .await;
    assert!(most >= 2, "{most} connection(s) at most");
    assert_eq!(
        relay.ids().into_iter().collect::<BTreeSet<_>>(),
        ids(&events)
    );
}

/// A limit on the relay's whole ingress (one bucket for every connection): a new
/// connection is refused like the old one, so the publisher stops opening more and paces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_on_the_whole_ingress_opens_no_more_than_a_probe() {
    let relay = HostileRelay::start(Script {
        ok_rate_per_sec: Some(100.0),
        ..Script::default()
    })
    .await;
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(relay.url()), metrics.clone());
    let events = corpus(400);
    let most =
        accept_all_counting_connections(&publisher, &metrics, &events, Duration::from_secs(60))
            .await;
    assert!(
        most <= 2,
        "{most} connections for a limit no connection escapes"
    );
    assert_eq!(
        relay.ids().into_iter().collect::<BTreeSet<_>>(),
        ids(&events)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pace_adapts_to_a_rate_limited_local_relay() {
    let relay = HostileRelay::start(Script {
        ok_rate_per_sec: Some(100.0),
        ..Script::default()
    })
    .await;
    let config = PublisherConfig::new(relay.url());
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(config, metrics.clone());
    let events = corpus(400);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(60)).await;
    assert_eq!(
        relay.ids().into_iter().collect::<BTreeSet<_>>(),
        ids(&events)
    );
    let limited = metrics
        .publish_outcomes
        .with_label_values(&["rate-limited"])
        .get();
    // It bounced off the limit, then settled under it rather than hammering it.
    assert!(limited >= 1);
    assert!(limited < 150, "{limited} refusals for 400 events");
    let pace = metrics.publish_rate_limit.get();
    assert!(pace > 0.0 && pace < 400.0, "pace {pace}");
}

/// Defect 7 of the correctness issue (the poison pill): an event over the local relay's frame
/// limit (but under ours) makes it drop the connection every time. It used to be re-queued at
/// the front for ever, and everything behind it never went out. Now the events in flight at
/// a loss are sent again one at a time; the one the relay drops the connection on twice,
/// alone, is set aside (counted, never answered so its cursor holds) and the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_keeps_breaking_the_connection_is_set_aside_and_the_rest_flows() {
    let relay = HostileRelay::start(Script {
        max_frame_bytes: Some(4_000),
        ..Script::default()
    })
    .await;
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(relay.url()), metrics.clone());
    let before = corpus(10);
    let poison = EventBuilder::new(Kind::from(1111), "x".repeat(10_000))
        .sign_with_keys(&Keys::generate())
        .unwrap();
    let after = corpus(30);
    publish_all(&publisher, &before).await;
    publisher.publish(poison.clone(), None).await.unwrap();
    publish_all(&publisher, &after).await;
    let mut want = ids(&before);
    want.extend(ids(&after));
    eventually(
        "every other event stored",
        Duration::from_secs(60),
        || async {
            let have: BTreeSet<EventId> = relay.ids().into_iter().collect();
            have.is_superset(&want).then_some(())
        },
    )
    .await;
    eventually("the poison set aside", Duration::from_secs(30), || async {
        (publisher.stats().quarantined.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert!(!relay.ids().contains(&poison.id));
    assert_eq!(
        metrics
            .publish_outcomes
            .with_label_values(&["quarantined"])
            .get(),
        1
    );
    // It broke a handful of connections, not an endless stream of them.
    let connections = relay.counters().connections.load(Ordering::SeqCst);
    assert!(connections <= 6, "{connections} connections");
}

/// The same event reaches the publisher once from every remote relay that has it, often
/// after the first copy was answered: a later copy is answered from what the relay just
/// said it holds, not sent again (under a per-connection limit each send costs a second of
/// its budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_an_event_the_relay_just_took_are_not_sent_again() {
    let relay = HostileRelay::start(Script::default()).await;
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(relay.url()), metrics.clone());
    let events = corpus(20);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(30)).await;
    let received = || relay.counters().events_received.load(Ordering::SeqCst);
    assert_eq!(received(), 20);

    // The copies from a second remote relay, after the first were answered.
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 20, "a copy of a held event was sent again");
    let s = publisher.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 20);
    assert_eq!(s.duplicate.load(Ordering::Relaxed), 20);
    assert_eq!(
        metrics
            .publish_outcomes
            .with_label_values(&["already-held"])
            .get(),
        20
    );
}

/// A copy that reaches another connection while the first copy is in flight waits for that
/// answer instead of being sent too (each such send is a `duplicate:` that costs its
/// connection a second of a stock relay's allowance), and gets the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_in_flight_on_another_connection_are_not_sent_again() {
    let relay = HostileRelay::start(Script {
        ok_delay: Some(Duration::from_millis(300)),
        ..Script::default()
    })
    .await;
    let mut config = PublisherConfig::new(relay.url());
    (config.connections, config.max_connections) = (4, 4);
    // One event in flight per connection: a copy is taken by another connection while the
    // first copy waits for its answer.
    config.max_in_flight = 1;
    let (publisher, _task) = Publisher::spawn(config, PublisherMetrics::default());
    let events = corpus(10);
    // Three sources (sessions) deliver the same events: the fair queue serves them in turn,
    // and every connection takes from it.
    let sources: Vec<_> = (0..3)
        .map(|_| std::sync::Arc::new(grasp_sync::worker::publisher::SourceCounters::default()))
        .collect();
    for e in &events {
        for s in &sources {
            publisher.publish(e.clone(), Some(s.clone())).await.unwrap();
        }
    }
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(
        relay.counters().events_received.load(Ordering::SeqCst),
        10,
        "copies were sent while the first was in flight"
    );
    let st = publisher.stats();
    assert_eq!(st.accepted.load(Ordering::Relaxed), 10);
    assert_eq!(st.duplicate.load(Ordering::Relaxed), 20);
    for s in &sources {
        assert_eq!(
            s.resolved.load(Ordering::Relaxed),
            10,
            "every copy answered"
        );
    }
}

/// A copy of an event the relay refused on policy grounds is answered from that refusal,
/// not sent again (at stock limits each send costs a second of a connection's budget);
/// a reply refused for want of its parent is sent again once the relay took the parent, or
/// once the worker's feed read the parent at the relay (published by someone else); other
/// refusals stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_an_event_the_relay_refused_are_not_sent_again() {
    let relay = HostileRelay::start(Script::default()).await;
    // Like a GRASP relay: nothing that references an event it does not hold, and no spam.
    let taken = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let held = taken.clone();
    relay.set_policy(std::sync::Arc::new(move |e: &Event| {
        let mut held = held.lock().unwrap();
        if e.content.starts_with("spam") {
            return Err("not here".into());
        }
        if e.tags.event_ids().all(|r| held.contains(r)) {
            held.insert(e.id);
            Ok(())
        } else {
            Err("does not reference an accepted event".into())
        }
    }));
    let metrics = PublisherMetrics::default();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(relay.url()), metrics.clone());
    let keys = Keys::generate();
    let spam: Vec<Event> = (0..10)
        .map(|i| {
            EventBuilder::new(Kind::from(1111), format!("spam {i}"))
                .sign_with_keys(&keys)
                .unwrap()
        })
        .collect();
    let parent = EventBuilder::new(Kind::from(1621), "an issue")
        .sign_with_keys(&keys)
        .unwrap();
    let reply = EventBuilder::new(Kind::from(1111), "a reply")
        .tags([nostr::Tag::event(parent.id)])
        .sign_with_keys(&keys)
        .unwrap();
    // A reply to an issue someone will publish straight to the relay.
    let elsewhere = EventBuilder::new(Kind::from(1621), "an issue published by its author")
        .sign_with_keys(&keys)
        .unwrap();
    let waiting = EventBuilder::new(Kind::from(1111), "a reply to it")
        .tags([nostr::Tag::event(elsewhere.id)])
        .sign_with_keys(&keys)
        .unwrap();
    let mut refused = spam.clone();
    refused.push(reply.clone());
    refused.push(waiting.clone());
    let received = || relay.counters().events_received.load(Ordering::SeqCst);

    publish_all(&publisher, &refused).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 12);
    // The copies from a second remote relay.
    publish_all(&publisher, &refused).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 12, "a copy of a refused event was sent again");
    assert_eq!(publisher.stats().refused.load(Ordering::Relaxed), 24);
    let before = || {
        metrics
            .publish_outcomes
            .with_label_values(&["refused-before"])
            .get()
    };
    assert_eq!(before(), 12);

    // The parent is taken: the reply is sent again, and taken.
    publish_all(&publisher, std::slice::from_ref(&parent)).await;
    drained(&publisher, Duration::from_secs(30)).await;
    publish_all(&publisher, std::slice::from_ref(&reply)).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 14);
    assert!(taken.lock().unwrap().contains(&reply.id));

    // Its author publishes the other issue straight to the relay, and the worker's feed
    // reads it there: the reply waiting for it is sent again, and taken; the spam's
    // refusals stand.
    taken.lock().unwrap().insert(elsewhere.id);
    publisher.relay_holds(&elsewhere);
    let mut again = spam.clone();
    again.push(waiting.clone());
    publish_all(&publisher, &again).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 15, "only the reply that waited is sent again");
    assert!(taken.lock().unwrap().contains(&waiting.id));
    assert_eq!(before(), 22);
}

/// A GRASP relay accepts new announcements, state and PRs into a purgatory (`OK true
/// "purgatory: …"`) and serves them only once git data arrives. A copy sent meanwhile is
/// only answered the same way, at a second of a stock relay's allowance: copies from other
/// relays and from reconciliations are answered from memory until the purgatory TTL, and
/// sent again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_an_event_the_relay_holds_in_purgatory_are_not_sent_again() {
    let relay = HostileRelay::start(Script {
        purgatory: Some(Purgatory::default()),
        ..Script::default()
    })
    .await;
    let metrics = PublisherMetrics::default();
    let mut config = PublisherConfig::new(relay.url());
    config.purgatory_ttl = Duration::from_secs(3);
    let (publisher, _task) = Publisher::spawn(config, metrics.clone());
    // What the worker would learn from: nothing in purgatory (the relay does not serve it).
    let mut held = publisher.watch_held(&[Kind::from(30618)]);
    let keys = Keys::generate();
    let states: Vec<Event> = (0..5)
        .map(|i| {
            EventBuilder::new(Kind::from(30618), "")
                .tags([nostr::Tag::identifier(format!("repo-{i}"))])
                .sign_with_keys(&keys)
                .unwrap()
        })
        .collect();
    let received = || relay.counters().events_received.load(Ordering::SeqCst);
    let in_purgatory = || {
        metrics
            .publish_outcomes
            .with_label_values(&["in-purgatory"])
            .get()
    };

    publish_all(&publisher, &states).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 5);
    assert_eq!(relay.in_purgatory(), 5);
    assert!(relay.ids().is_empty(), "served before its git data arrived");
    // Copies from two more remote relays: answered from memory.
    publish_all(&publisher, &states).await;
    publish_all(&publisher, &states).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(
        received(),
        5,
        "a copy of an event in purgatory was sent again"
    );
    assert_eq!(in_purgatory(), 10);

    // Git data arrives for one repository: it is served, and its copies are duplicates.
    relay.git_push("repo-0");
    assert_eq!(relay.ids(), [states[0].id]);

    // Past the TTL, a copy is sent again (the relay may have dropped it meanwhile).
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish_all(&publisher, &states[1..]).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(received(), 9);
    assert_eq!(in_purgatory(), 10);
    assert!(
        held.try_recv().is_err(),
        "an event in purgatory was reported held"
    );
}

/// What the relay said it holds is forgotten when a connection to it is lost (it may have
/// restarted without it): copies published after that are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_connection_copies_are_sent_again() {
    let relay = HostileRelay::start(Script::default()).await;
    let (publisher, _task) = Publisher::spawn(
        PublisherConfig::new(relay.url()),
        PublisherMetrics::default(),
    );
    let events = corpus(20);
    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(30)).await;

    // An oversized event makes the relay drop the connection; then it takes it.
    relay.set_script(Script {
        max_frame_bytes: Some(4_000),
        ..Script::default()
    });
    let big = EventBuilder::new(Kind::from(1111), "x".repeat(10_000))
        .sign_with_keys(&Keys::generate())
        .unwrap();
    publisher.publish(big, None).await.unwrap();
    eventually(
        "the relay drops the connection",
        Duration::from_secs(10),
        || async { (relay.counters().connections.load(Ordering::SeqCst) >= 2).then_some(()) },
    )
    .await;
    relay.set_script(Script::default());
    drained(&publisher, Duration::from_secs(30)).await;
    let before = relay.counters().events_received.load(Ordering::SeqCst);

    publish_all(&publisher, &events).await;
    drained(&publisher, Duration::from_secs(30)).await;
    assert_eq!(
        relay.counters().events_received.load(Ordering::SeqCst) - before,
        20,
        "copies after a lost connection must reach the relay again"
    );
}
