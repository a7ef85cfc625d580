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
