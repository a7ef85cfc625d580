//! Discovery against a real local relay: announcements and deletions become exactly the
//! expected RelaySync objects in the store, removals wait for the grace period, and an
//! unreachable local relay is waited for, not fatal.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use grasp_sync::controller::discovery::metrics::DiscoveryMetrics;
use grasp_sync::controller::discovery::targets::TargetPolicy;
use grasp_sync::controller::discovery::{self, DiscoveryConfig};
use grasp_sync::nostr::RelayUrl;
use grasp_sync::relay::address_policy::AddressPolicy;
use grasp_sync::store::RelaySyncStore;
use grasp_sync::store::memory::MemoryStore;
use nostr::{EventBuilder, Keys, Kind, Tag, TagKind};
use support::{nip34, relays};

const DEADLINE: Duration = Duration::from_secs(30);

/// url → repos (identifiers), as the store holds them.
async fn snapshot(store: &MemoryStore) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in store.list().await.unwrap() {
        let entry = out.entry(o.spec.url.clone()).or_default();
        for r in o.spec.repos {
            entry.insert(r.rsplit(':').next().unwrap().to_string());
        }
    }
    out
}

async fn converges_to(store: &MemoryStore, want: &[(&str, &[&str])]) {
    let want: BTreeMap<String, BTreeSet<String>> = want
        .iter()
        .map(|(u, ids)| (u.to_string(), ids.iter().map(|s| s.to_string()).collect()))
        .collect();
    let mut last = BTreeMap::new();
    let reached = tokio::time::timeout(DEADLINE, async {
        loop {
            last = snapshot(store).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "store never matched.\n want {want:?}\n have {last:?}"
    );
}

fn config(local: RelayUrl) -> DiscoveryConfig {
    let mut c = DiscoveryConfig::new(
        local,
        TargetPolicy {
            service_domain: "git.ours.example".into(),
            addresses: AddressPolicy::default(),
            max_relays: 16,
        },
    );
    c.grace = Duration::from_millis(1500);
    c.debounce = Duration::from_millis(50);
    c.health.base_backoff = Duration::from_millis(100);
    c.health.max_backoff = Duration::from_millis(500);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_become_relay_sync_objects_and_shrink_with_grace() {
    let (_relay, local) = relays::local_relay(1_000_000).await;
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let a1 = nip34::announce(
        &alice,
        "alpha",
        &[
            "wss://r1.example",
            "wss://r2.example/",
            "wss://git.ours.example",
        ],
        100,
    );
    let b1 = nip34::announce(
        &bob,
        "beta",
        &[
            "wss://R2.example",
            "ws://10.1.2.3:7777",
            "http://nope.example",
        ],
        100,
    );
    relays::publish(&local, &[a1, b1.clone()]).await;

    let store = Arc::new(MemoryStore::new());
    let mut cfg = config(local.clone());
    cfg.bootstrap = BTreeSet::from([RelayUrl::parse("wss://boot.example").unwrap()]);
    let metrics = DiscoveryMetrics::default();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(discovery::run(cfg, store.clone(), metrics.clone(), stop));

    converges_to(
        &store,
        &[
            ("wss://boot.example", &[]),
            ("wss://r1.example", &["alpha"]),
            ("wss://r2.example", &["alpha", "beta"]),
        ],
    )
    .await;
    assert!(
        metrics
            .discovery_rejected_targets
            .with_label_values(&["own_service"])
            .get()
            >= 1
    );
    assert!(
        metrics
            .discovery_rejected_targets
            .with_label_values(&["address_refused"])
            .get()
            >= 1
    );
    assert!(
        metrics
            .discovery_rejected_targets
            .with_label_values(&["invalid_url"])
            .get()
            >= 1
    );

    // alice replaces her announcement without r2: after the grace, r2 keeps only beta and
    // r1 keeps alpha. A relay discovered later (r3) shows up.
    let a2 = nip34::announce(
        &alice,
        "alpha",
        &["wss://r1.example", "wss://r3.example"],
        200,
    );
    relays::publish(&local, &[a2]).await;
    converges_to(
        &store,
        &[
            ("wss://boot.example", &[]),
            ("wss://r1.example", &["alpha"]),
            ("wss://r2.example", &["beta"]),
            ("wss://r3.example", &["alpha"]),
        ],
    )
    .await;

    // bob deletes his announcement (NIP-09): r2's object goes after the grace period.
    let deletion = EventBuilder::new(Kind::EventDeletion, "")
        .tag(Tag::custom(
            TagKind::a(),
            [format!("30617:{}:beta", bob.public_key().to_hex())],
        ))
        .sign_with_keys(&bob)
        .unwrap();
    relays::publish(&local, &[deletion]).await;
    converges_to(
        &store,
        &[
            ("wss://boot.example", &[]),
            ("wss://r1.example", &["alpha"]),
            ("wss://r3.example", &["alpha"]),
        ],
    )
    .await;

    stop_tx.send(true).unwrap();
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("discovery stops")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_local_relay_is_waited_for() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let local = RelayUrl::parse(&format!("ws://127.0.0.1:{port}")).unwrap();
    let store = Arc::new(MemoryStore::new());
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(discovery::run(
        config(local.clone()),
        store.clone(),
        DiscoveryMetrics::default(),
        stop,
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !task.is_finished(),
        "discovery gave up on an unreachable local relay"
    );
    assert!(store.list().await.unwrap().is_empty());

    // The relay comes up on that port: discovery connects and does its job.
    let (_relay, url) = relays::local_relay_on(port, 1_000_000).await;
    assert_eq!(url, local);
    relays::publish(
        &local,
        &[nip34::announce(
            &Keys::generate(),
            "late",
            &["wss://r9.example"],
            1,
        )],
    )
    .await;
    converges_to(&store, &[("wss://r9.example", &["late"])]).await;
}
