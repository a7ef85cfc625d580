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
    label("w2").await;
    w2.apply_status("held", &status(200)).await.unwrap();
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
