//! The Kubernetes store against a real kube-apiserver passes the same conformance suite as
//! the in-memory store.

mod support;

use grasp_sync::store::RelaySyncStore;
use grasp_sync::store::conformance;
use grasp_sync::store::kube::KubeStore;
use support::KubeEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_store_passes_the_conformance_suite() {
    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = env.client().await.unwrap();
    support::kube_env::install_crd(&client).await;
    let ns = env.namespace("store").await.unwrap();
    let store = KubeStore::new(client, &ns);
    conformance::run(&store).await;
    // What the suite left behind is really in the API server.
    let names: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["conformance-a", "conformance-c"]);
}

/// A worker writes status only while the object is labelled for it: once the assigner has
/// moved it (or presumed the worker dead during a stall), the old worker's write is refused
/// by the API server and the new holder's status — cursor included — stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_label_cannot_change_status() {
    use grasp_sync::crd::{RelaySync, RelaySyncSpec, RelaySyncStatus, WORKER_LABEL};
    use grasp_sync::store::StoreError;
    use kube::api::{Api, Patch, PatchParams};
    use std::time::Duration;

    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = env.client().await.unwrap();
    support::kube_env::install_crd(&client).await;
    let ns = env.namespace("holder").await.unwrap();
    let controller = KubeStore::new(client.clone(), &ns);
    let spec = RelaySyncSpec {
        url: "wss://relay.example".into(),
        bootstrap: None,
        repos: Vec::new(),
        paused: None,
    };
    controller.apply_spec("held", &spec).await.unwrap();
    let api: Api<RelaySync> = Api::namespaced(client.clone(), &ns);
    let label = |worker: &'static str| {
        let api = api.clone();
        async move {
            let patch = serde_json::json!({"metadata": {"labels": {WORKER_LABEL: worker}}});
            api.patch("held", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    let status = |cursor: i64| RelaySyncStatus {
        cursor: Some(cursor),
        ..RelaySyncStatus::default()
    };
    let w1 = KubeStore::for_worker(client.clone(), &ns, "w1");
    let w2 = KubeStore::for_worker(client.clone(), &ns, "w2");

    // Not labelled yet: nobody's.
    let r = w1.apply_status("held", &status(1)).await;
    assert!(matches!(r, Err(StoreError::NotHeld(_))), "{r:?}");
    label("w1").await;
    w1.apply_status("held", &status(100)).await.unwrap();
    support::eventually(
        "w1's watch to see the relay",
        Duration::from_secs(10),
        || async { (!w1.seen_leaving("held")).then_some(()) },
    )
    .await;
    label("w2").await;
    w2.apply_status("held", &status(200)).await.unwrap();
    // w1's watch sees it leave: its final writes are skipped without a request.
    support::eventually(
        "w1's watch to see the relay leave",
        Duration::from_secs(10),
        || async { w1.seen_leaving("held").then_some(()) },
    )
    .await;
    support::eventually(
        "w2's watch to see the relay",
        Duration::from_secs(10),
        || async { (!w2.seen_leaving("held")).then_some(()) },
    )
    .await;
    // w1 lost it: refused, however recent its own view.
    assert!(matches!(
        w1.apply_status("held", &status(999)).await,
        Err(StoreError::NotHeld(_))
    ));
    let now = controller.get("held").await.unwrap().unwrap();
    assert_eq!(now.status.and_then(|s| s.cursor), Some(200));
    // A missing object is still reported as missing.
    assert!(matches!(
        w2.apply_status("gone", &status(1)).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A worker's store wakes its supervisor for what it acts on (objects, spec, labels), not for
/// its own status writes; the controller's store, which waits for status acknowledgements,
/// still hears every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_s_store_is_not_woken_by_status_alone() {
    use grasp_sync::crd::{RelaySync, RelaySyncSpec, RelaySyncStatus, WORKER_LABEL};
    use kube::api::{Api, Patch, PatchParams};
    use std::time::Duration;
    use support::eventually;

    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = env.client().await.unwrap();
    support::kube_env::install_crd(&client).await;
    let ns = env.namespace("quiet").await.unwrap();
    let controller = KubeStore::new(client.clone(), &ns);
    let mut spec = RelaySyncSpec {
        url: "wss://relay.example".into(),
        bootstrap: None,
        repos: Vec::new(),
        paused: None,
    };
    controller.apply_spec("held", &spec).await.unwrap();
    let patch = serde_json::json!({"metadata": {"labels": {WORKER_LABEL: "w1"}}});
    Api::<RelaySync>::namespaced(client.clone(), &ns)
        .patch("held", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let w1 = KubeStore::for_worker(client.clone(), &ns, "w1");
    // Its watch has listed (the first announcement) and holds the object.
    eventually("w1 to see its object", Duration::from_secs(10), || async {
        (*w1.changes().borrow() > 0 && w1.snapshot().await.ok()?.len() == 1).then_some(())
    })
    .await;
    let worker_rev = *w1.changes().borrow();
    let controller_rev = *controller.changes().borrow();
    for c in 1..=3 {
        let status = RelaySyncStatus {
            cursor: Some(c),
            ..RelaySyncStatus::default()
        };
        w1.apply_status("held", &status).await.unwrap();
    }
    // The watch delivered the writes (the cache holds the last), without a wake-up.
    eventually(
        "w1's cache to hold its last write",
        Duration::from_secs(10),
        || async {
            let objects = w1.snapshot().await.ok()?;
            (objects.first()?.status.as_ref()?.cursor == Some(3)).then_some(())
        },
    )
    .await;
    assert_eq!(
        *w1.changes().borrow(),
        worker_rev,
        "woken by its own status"
    );
    eventually(
        "the controller to hear of it",
        Duration::from_secs(10),
        || async { (*controller.changes().borrow() > controller_rev).then_some(()) },
    )
    .await;
    // A spec change wakes the worker.
    spec.repos = vec![format!("30617:{}:repo", "a".repeat(64))];
    controller.apply_spec("held", &spec).await.unwrap();
    eventually(
        "w1 to hear of the spec change",
        Duration::from_secs(10),
        || async { (*w1.changes().borrow() > worker_rev).then_some(()) },
    )
    .await;
}

/// Reading a snapshot while the watch is still listing must not steal the wake-up of a task
/// waiting for the cache (the assigner): it once did, and the controller never assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_while_listing_does_not_strand_a_cache_waiter() {
    use std::time::Duration;

    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = env.client().await.unwrap();
    support::kube_env::install_crd(&client).await;
    let ns = env.namespace("waiter").await.unwrap();
    for _ in 0..5 {
        let store = KubeStore::new(client.clone(), &ns);
        let cache = store.cache();
        let waiter = tokio::spawn(async move { cache.wait_until_ready().await.is_ok() });
        let ready = async {
            loop {
                let _ = store.snapshot().await;
                if waiter.is_finished() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("the cache waiter woke up");
    }
}
