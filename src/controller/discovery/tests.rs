//! The discovery loop on an in-memory store, fed by hand, with paused time: debounce and
//! grace are exact, and no relay is involved.

use std::collections::{BTreeMap, BTreeSet};

use nostr::{Event, EventBuilder, Keys, Tag};
use tokio::task::JoinHandle;

use super::index::tests::announce;
use super::*;
use crate::relay::address_policy::AddressPolicy;
use crate::store::memory::MemoryStore;
use crate::store::{RelaySyncStore, StoreError};
use caps::RelayCaps;

const GRACE: Duration = Duration::from_secs(15 * 60);

fn delete(keys: &Keys, coordinate: &str) -> Event {
    EventBuilder::new(Kind::EventDeletion, "")
        .tag(Tag::parse(["a", coordinate]).unwrap())
        .sign_with_keys(keys)
        .unwrap()
}

struct Rig<S = MemoryStore> {
    store: Arc<S>,
    metrics: DiscoveryMetrics,
    feed: mpsc::Sender<FeedEvent>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn rig_with(adjust: impl FnOnce(&mut DiscoveryConfig)) -> Rig {
    rig_on(Arc::new(MemoryStore::new()), adjust)
}

/// Discovery over `store`, fed by hand.
fn rig_on<S: RelaySyncStore + 'static>(
    store: Arc<S>,
    adjust: impl FnOnce(&mut DiscoveryConfig),
) -> Rig<S> {
    let policy = TargetPolicy {
        service_domain: "git.ours.example".into(),
        addresses: AddressPolicy::default(),
        max_relays: 16,
    };
    let mut config = DiscoveryConfig::new(RelayUrl::parse("ws://127.0.0.1:7777").unwrap(), policy);
    config.bootstrap = BTreeSet::from([RelayUrl::parse("wss://boot.example").unwrap()]);
    config.grace = GRACE;
    adjust(&mut config);
    let metrics = DiscoveryMetrics::default();
    let (feed, events) = mpsc::channel(64);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(discover(
        config,
        events,
        store.clone(),
        metrics.clone(),
        stop_rx,
    ));
    Rig {
        store,
        metrics,
        feed,
        stop,
        task,
    }
}

impl<S: RelaySyncStore + 'static> Rig<S> {
    async fn send(&self, ev: FeedEvent) {
        self.feed.send(ev).await.unwrap();
    }
    async fn event(&self, e: Event) {
        self.send(FeedEvent::Event(Box::new(e))).await;
    }
    /// url → repo identifiers, as the store holds them.
    async fn objects(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for o in self.store.list().await.unwrap() {
            let entry = out.entry(o.spec.url.clone()).or_default();
            for r in o.spec.repos {
                entry.insert(r.rsplit(':').next().unwrap().to_string());
            }
        }
        out
    }
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
    }
}

fn want(entries: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    entries
        .iter()
        .map(|(u, ids)| (u.to_string(), ids.iter().map(|s| s.to_string()).collect()))
        .collect()
}

async fn pass(d: Duration) {
    let step = Duration::from_millis(100);
    let mut left = d;
    while !left.is_zero() {
        let s = step.min(left);
        tokio::time::sleep(s).await;
        left -= s;
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_written_before_the_stored_announcements_are_all_read() {
    let rig = rig();
    let alice = Keys::generate();
    rig.event(announce(&alice, "alpha", &["wss://r1.example"], 100))
        .await;
    pass(Duration::from_secs(5)).await;
    assert!(rig.objects().await.is_empty(), "a half-loaded index wrote");
    rig.send(FeedEvent::Synced).await;
    pass(Duration::from_secs(1)).await;
    assert_eq!(
        rig.objects().await,
        want(&[
            ("wss://boot.example", &[]),
            ("wss://r1.example", &["alpha"])
        ])
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_relay_dropped_by_a_newer_announcement_goes_only_after_the_grace_period() {
    let rig = rig();
    let alice = Keys::generate();
    rig.event(announce(
        &alice,
        "alpha",
        &[
            "wss://r1.example",
            "wss://r2.example",
            "wss://git.ours.example",
        ],
        100,
    ))
    .await;
    rig.send(FeedEvent::Synced).await;
    pass(Duration::from_secs(1)).await;
    assert_eq!(
        rig.objects().await,
        want(&[
            ("wss://boot.example", &[]),
            ("wss://r1.example", &["alpha"]),
            ("wss://r2.example", &["alpha"]),
        ])
    );
    assert_eq!(
        rig.metrics
            .discovery_rejected_targets
            .with_label_values(&["own_service"])
            .get(),
        1
    );
    // An older announcement changes nothing; a newer one drops r2.
    rig.event(announce(&alice, "alpha", &["wss://r1.example"], 50))
        .await;
    rig.event(announce(&alice, "alpha", &["wss://r1.example"], 200))
        .await;
    pass(GRACE - Duration::from_secs(60)).await;
    assert!(
        rig.objects().await.contains_key("wss://r2.example"),
        "removed before the grace period ran out"
    );
    pass(Duration::from_secs(120)).await;
    assert_eq!(
        rig.objects().await,
        want(&[
            ("wss://boot.example", &[]),
            ("wss://r1.example", &["alpha"])
        ])
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_deleted_announcement_removes_its_relays_after_the_grace_period_but_never_bootstrap() {
    let rig = rig();
    let (alice, bob) = (Keys::generate(), Keys::generate());
    let alpha = announce(&alice, "alpha", &["wss://r1.example"], 100);
    rig.event(alpha).await;
    rig.send(FeedEvent::Synced).await;
    pass(Duration::from_secs(1)).await;
    assert!(rig.objects().await.contains_key("wss://r1.example"));
    let coordinate = format!("30617:{}:alpha", alice.public_key().to_hex());
    // Somebody else's deletion does not count.
    rig.event(delete(&bob, &coordinate)).await;
    pass(GRACE + Duration::from_secs(60)).await;
    assert!(rig.objects().await.contains_key("wss://r1.example"));
    rig.event(delete(&alice, &coordinate)).await;
    pass(GRACE + Duration::from_secs(60)).await;
    assert_eq!(rig.objects().await, want(&[("wss://boot.example", &[])]));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn caps_bound_what_announcements_make_us_sync_and_are_counted() {
    let rig = rig_with(|c| {
        c.policy.max_relays = 3;
        c.caps = RelayCaps {
            per_host: 2,
            total: 5,
        };
    });
    let flood = Keys::generate();
    // One announcement listing many relays: only its first three are taken.
    let many: Vec<String> = (0..10).map(|i| format!("wss://m{i}.example")).collect();
    let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
    rig.event(announce(&flood, "many", &many, 100)).await;
    // Paths on one host: two are kept, the ones more repositories name.
    for (i, path) in ["a", "b", "c"].iter().enumerate() {
        let relays = [format!("wss://paths.example/{path}")];
        let relays: Vec<&str> = relays.iter().map(|s| s.as_str()).collect();
        rig.event(announce(&flood, &format!("p{i}"), &relays, 100))
            .await;
    }
    let alice = Keys::generate();
    rig.event(announce(&alice, "x", &["wss://paths.example/c"], 100))
        .await;
    rig.event(announce(&alice, "y", &["wss://paths.example/b"], 100))
        .await;
    rig.send(FeedEvent::Synced).await;
    pass(Duration::from_secs(1)).await;
    let objects = rig.objects().await;
    // 5 in all: the bootstrap relay, the two most-named paths, then two of m0..m2 (equal
    // counts: the smaller URLs).
    assert_eq!(
        objects.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
        [
            "wss://boot.example",
            "wss://m0.example",
            "wss://m1.example",
            "wss://paths.example/b",
            "wss://paths.example/c",
        ]
    );
    let gauge = |cap: &str| {
        rig.metrics
            .discovery_capped_relays
            .with_label_values(&[cap])
            .get()
    };
    assert_eq!(gauge("per_host"), 1, "paths.example/a");
    assert_eq!(gauge("total"), 1, "m2");
    assert_eq!(
        rig.metrics
            .discovery_rejected_targets
            .with_label_values(&["announcement_cap"])
            .get(),
        7
    );
    rig.stop().await;
}

/// A store whose API server refuses one object (say, over a size limit).
struct Refusing {
    inner: MemoryStore,
    refuse: String,
}

impl RelaySyncStore for Refusing {
    async fn list(&self) -> Result<Vec<crate::store::StoredRelaySync>, StoreError> {
        self.inner.list().await
    }
    async fn get(&self, name: &str) -> Result<Option<crate::store::StoredRelaySync>, StoreError> {
        self.inner.get(name).await
    }
    async fn apply_spec(
        &self,
        name: &str,
        spec: &crate::crd::RelaySyncSpec,
    ) -> Result<crate::store::StoredRelaySync, StoreError> {
        if name == self.refuse {
            return Err(StoreError::Invalid {
                name: name.to_string(),
                reason: "refused by the test".into(),
            });
        }
        self.inner.apply_spec(name, spec).await
    }
    async fn apply_status(
        &self,
        name: &str,
        status: &crate::crd::RelaySyncStatus,
    ) -> Result<(), StoreError> {
        self.inner.apply_status(name, status).await
    }
    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete(name).await
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes()
    }
}

#[tokio::test(start_paused = true)]
async fn one_refused_object_does_not_hold_up_the_others() {
    // The first object in name order is the one refused: before, the pass stopped there.
    let urls = ["wss://a1.example", "wss://a2.example", "wss://a3.example"];
    let mut names: Vec<String> = urls
        .iter()
        .map(|u| crate::crd::naming::object_name_part(&RelayUrl::parse(u).unwrap(), 0))
        .collect();
    names.sort();
    let rig = rig_on(
        Arc::new(Refusing {
            inner: MemoryStore::new(),
            refuse: names[0].clone(),
        }),
        |c| c.bootstrap.clear(),
    );
    let alice = Keys::generate();
    rig.event(announce(&alice, "alpha", &urls, 100)).await;
    rig.send(FeedEvent::Synced).await;
    pass(Duration::from_secs(2)).await;
    let mut have: Vec<String> = rig
        .store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    have.sort();
    assert_eq!(have, names[1..].to_vec(), "the others converge");
    let errors = rig
        .metrics
        .discovery_write_errors
        .with_label_values(&["apply"])
        .get();
    assert!(
        errors >= 2,
        "the refused object is retried and counted ({errors})"
    );
    rig.stop().await;
}
