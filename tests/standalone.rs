//! Standalone mode end to end against real relays on loopback: discovery from the local
//! relay, historic and live sync from three kinds of remote, discovery of an announcement
//! that arrives later from a remote, status in the store, and a graceful stop that saves
//! cursors.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use grasp_sync::crd::Phase;
use grasp_sync::modes::standalone::{self, StandaloneOptions};
use grasp_sync::relay::address_policy::AddressPolicy;
use grasp_sync::store::RelaySyncStore;
use nostr::EventId;
use support::eventually;
use support::hostile_relay::{HostileRelay, Script};
use support::nip34;
use support::relays;

const DEADLINE: Duration = Duration::from_secs(60);

/// Wait until the store holds exactly `n` RelaySyncs, every one reported Live.
async fn all_live<S: RelaySyncStore>(store: &S, n: usize) {
    eventually(&format!("{n} Live relays"), DEADLINE, || async {
        let list = store.list().await.unwrap();
        let live = list
            .iter()
            .filter(|o| o.status.as_ref().and_then(|s| s.phase) == Some(Phase::Live))
            .count();
        (list.len() == n && live == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_syncs_historic_live_and_later_discovered_repos() {
    let (_local_relay, local) = relays::local_relay(1_000_000).await;
    let (_ra, a) = relays::local_relay(1_000_000).await; // NIP-77
    let rs = support::nostr_rs_relay::NostrRsRelay::start().await; // third party, no NIP-77
    let b = rs.url();
    let hostile = HostileRelay::start(Script {
        page_cap: Some(50),
        ..Script::default()
    })
    .await;
    let c = hostile.url();
    let (_rd, d) = relays::local_relay(1_000_000).await;

    // alpha is announced on our relay and lists the three remotes (and us).
    let alpha = nip34::fixture("alpha");
    let ann_alpha = nip34::announcement(
        &alpha,
        &[
            a.to_string(),
            b.to_string(),
            c.to_string(),
            "wss://git.ours.example".into(),
        ],
    );
    relays::publish(&local, std::slice::from_ref(&ann_alpha)).await;
    // Its events are spread over the remotes, with noise beside them.
    let (on_a, rest) = alpha.expected.split_at(3);
    let (on_b, on_c) = rest.split_at(2);
    relays::publish(&a, &[on_a, &alpha.noise[..1]].concat()).await;
    relays::publish(&b, &[on_b, &alpha.noise[1..2]].concat()).await;
    hostile.add(on_c.iter().cloned().chain(alpha.noise[2..].iter().cloned()));

    let mut opts = StandaloneOptions::new(local.clone(), "git.ours.example");
    opts.addresses = AddressPolicy::allow_all();
    opts.http_addr = "127.0.0.1:0".parse().unwrap();
    opts.grace = Duration::from_secs(2);
    opts.status_interval = Duration::from_millis(200);
    opts.session.health.base_backoff = Duration::from_millis(200);
    opts.session.batch_timeout = Duration::from_secs(3);
    opts.session.nip11_timeout = Duration::from_secs(1);
    let running = standalone::start(opts).await.expect("standalone starts");

    let mut want: BTreeSet<EventId> = nip34::ids(&alpha.expected);
    want.insert(ann_alpha.id);
    relays::holds_exactly(&local, &want, DEADLINE).await;

    // Every relay reports Live in the store.
    let store = running.store.clone();
    all_live(store.as_ref(), 3).await;

    // Live: a new comment on alpha's root at nostr-rs-relay arrives.
    let live = nip34::comments(alpha.root.id, 1, 0);
    relays::publish(&b, &live).await;
    want.insert(live[0].id);
    relays::holds_exactly(&local, &want, DEADLINE).await;

    // beta is announced on remote a (not on our relay): it arrives through Layer 1, our relay
    // accepts it, discovery adds its relays — including d, which nobody mentioned before —
    // and beta's events on d are synced.
    let beta = nip34::fixture("beta");
    let ann_beta = nip34::announcement(&beta, &[a.to_string(), d.to_string()]);
    relays::publish(&d, &beta.expected).await;
    relays::publish(&a, std::slice::from_ref(&ann_beta)).await;
    want.insert(ann_beta.id);
    want.extend(nip34::ids(&beta.expected));
    relays::holds_exactly(&local, &want, DEADLINE).await;

    // The HTTP endpoint serves metrics and status.
    let base = format!("http://{}", running.http_addr);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ngit_sync_relays_connected_total"));
    let status: Vec<grasp_sync::observability::http::StatusEntry> = serde_json::from_str(
        &reqwest::get(format!("{base}/status"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status.len(), 4);
    // /healthz names the loops it watches, all running.
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let body = health.text().await.unwrap();
    for task in ["publisher", "discovery", "supervisor"] {
        assert!(body.contains(&format!("{task}: running")), "{body}");
    }

    // A graceful stop saves every relay's cursor: once every relay, d included, has synced
    // its history (a relay stopped before that has no cursor to save).
    all_live(store.as_ref(), 4).await;
    running.stop().await;
    for o in store.list().await.unwrap() {
        let s = o.status.expect("status written");
        assert!(s.cursor.is_some(), "{} has no cursor", o.name);
    }
}

/// The key the local relay may exempt from its limits is the publisher's alone: a remote
/// relay's AUTH challenge is answered with the remote key (by default one generated per
/// process), so no remote ever holds a signature of the exempted key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_relays_never_see_the_local_relay_s_key() {
    let (_local_relay, local) = relays::local_relay(1_000_000).await;
    let remote = HostileRelay::start(Script {
        auth_challenge: true,
        ..Script::default()
    })
    .await;
    let f = nip34::fixture("authed");
    remote.add(f.expected.iter().cloned());
    let ann = nip34::announcement(&f, &[remote.url().to_string()]);
    relays::publish(&local, std::slice::from_ref(&ann)).await;

    let local_key = nostr::Keys::generate();
    let remote_key = nostr::Keys::generate();
    let mut opts = StandaloneOptions::new(local.clone(), "git.ours.example");
    opts.addresses = AddressPolicy::allow_all();
    opts.http_addr = "127.0.0.1:0".parse().unwrap();
    opts.auth_keys = Some(local_key.clone());
    opts.remote_auth_keys = Some(remote_key.clone());
    let running = standalone::start(opts).await.expect("standalone starts");
    let mut want = nip34::ids(&f.expected);
    want.insert(ann.id);
    relays::holds_exactly(&local, &want, DEADLINE).await;
    let keys = eventually("an answered challenge", DEADLINE, || {
        let keys = remote.authenticated_keys();
        async move { (!keys.is_empty()).then_some(keys) }
    })
    .await;
    assert!(
        keys.iter().all(|k| *k == remote_key.public_key()),
        "the remote saw {keys:?}; the local relay's key is {}",
        local_key.public_key()
    );
    running.stop().await;
}

/// nostr-relay-builder (ngit-grasp) streams a new event to a connection only while that
/// connection keeps within 1,024 events of the newest; past that it skips them and says
/// nothing (seen at 5,000 repos in the demo: about 220 roots the worker's feed never heard
/// of, so none of their comments were synced). A root our own publisher delivered is
/// learned from the relay's `OK` too. Here the local relay streams nothing live at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_the_local_relay_never_streams_to_the_feed_are_synced() {
    let local_relay = HostileRelay::start(Script {
        live_drops: true,
        ..Script::default()
    })
    .await;
    let local = local_relay.url();
    let (_ra, a) = relays::local_relay(1_000_000).await;
    let f = nip34::fixture("unstreamed");
    relays::publish(&a, &f.expected).await;
    let ann = nip34::announcement(&f, &[a.to_string()]);
    // Stored before the start: the feed's history read finds it.
    local_relay.add([ann.clone()]);

    let mut opts = StandaloneOptions::new(local.clone(), "git.ours.example");
    opts.addresses = AddressPolicy::allow_all();
    opts.http_addr = "127.0.0.1:0".parse().unwrap();
    opts.session.nip11_timeout = Duration::from_secs(1);
    let running = standalone::start(opts).await.expect("standalone starts");
    let mut want = nip34::ids(&f.expected);
    want.insert(ann.id);
    // The root's replies, status and quote are fetched only once the root is known.
    relays::holds_exactly(&local, &want, DEADLINE).await;
    let learned = running
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|m| m.name() == "grasp_sync_facts_from_publisher_total")
        .flat_map(|m| m.get_metric())
        .map(|m| m.get_counter().value())
        .sum::<f64>();
    assert!(learned >= 1.0, "the root was not learned from our delivery");
    running.stop().await;
}

/// The sum of a counter's series in a running standalone's registry.
fn counter(running: &standalone::Standalone, name: &str) -> f64 {
    running
        .metrics
        .registry
        .gather()
        .iter()
        .filter(|m| m.name() == name)
        .flat_map(|m| m.get_metric())
        .map(|m| m.get_counter().value())
        .sum()
}

/// A standalone syncer whose feeds read `local` again every second.
async fn rereading(local: &grasp_sync::nostr::RelayUrl) -> standalone::Standalone {
    let mut opts = StandaloneOptions::new(local.clone(), "git.ours.example");
    opts.addresses = AddressPolicy::allow_all();
    opts.http_addr = "127.0.0.1:0".parse().unwrap();
    opts.session.nip11_timeout = Duration::from_secs(1);
    opts.local_reread_every = Some(Duration::from_secs(1));
    standalone::start(opts).await.expect("standalone starts")
}

/// A relay's live stream can lose events (nostr-relay-builder skips what a slow reader
/// missed). A root published straight to our relay, and never streamed to the worker's feed,
/// is found by the feed's periodic re-read, and its replies on the remote are synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_the_local_relay_never_streamed_is_found_by_the_re_read() {
    let local_relay = HostileRelay::start(Script::default()).await;
    let local = local_relay.url();
    let (_ra, a) = relays::local_relay(1_000_000).await;
    let f = nip34::fixture("reread-root");
    relays::publish(&a, &f.expected).await;
    let ann = nip34::announcement(&f, &[a.to_string()]);
    local_relay.add([ann.clone()]);
    let running = rereading(&local).await;
    let mut want = nip34::ids(&f.expected);
    want.insert(ann.id);
    relays::holds_exactly(&local, &want, DEADLINE).await;

    // Published to our relay only (its replies went to the remote), and lost by the stream.
    let late = nostr::EventBuilder::new(nostr::Kind::from(1621), "an issue sent here only")
        .tag(nostr::Tag::custom(
            nostr::TagKind::custom("a"),
            [f.scope.coordinate.to_string()],
        ))
        .sign_with_keys(&nostr::Keys::generate())
        .expect("sign");
    local_relay.add_silently([late.clone()]);
    let replies = nip34::comments(late.id, 3, 0);
    relays::publish(&a, &replies).await;
    want.insert(late.id);
    want.extend(nip34::ids(&replies));
    relays::holds_exactly(&local, &want, DEADLINE).await;
    assert!(counter(&running, "grasp_sync_local_feed_reread_found_total") >= 1.0);
    running.stop().await;
}

/// The same for discovery: an announcement our relay stored but never streamed is found by
/// the re-read, and its repo is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_the_local_relay_never_streamed_is_found_by_the_re_read() {
    let local_relay = HostileRelay::start(Script::default()).await;
    let local = local_relay.url();
    let (_ra, a) = relays::local_relay(1_000_000).await;
    let first = nip34::fixture("reread-first");
    let second = nip34::fixture("reread-second");
    relays::publish(&a, &first.expected).await;
    relays::publish(&a, &second.expected).await;
    let first_ann = nip34::announcement(&first, &[a.to_string()]);
    local_relay.add([first_ann.clone()]);
    let running = rereading(&local).await;
    // The first repo synced: discovery has read what was stored at the start.
    let mut want = nip34::ids(&first.expected);
    want.insert(first_ann.id);
    relays::holds_exactly(&local, &want, DEADLINE).await;

    let second_ann = nip34::announcement(&second, &[a.to_string()]);
    local_relay.add_silently([second_ann.clone()]);
    want.extend(nip34::ids(&second.expected));
    want.insert(second_ann.id);
    relays::holds_exactly(&local, &want, DEADLINE).await;
    assert!(counter(&running, "grasp_sync_discovery_reread_found_total") >= 1.0);
    running.stop().await;
}
