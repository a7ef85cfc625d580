//! Worker Leases on a real kube-apiserver: held and renewed, counted live by the controller's
//! view, expired Leases not counted, and released on a graceful stop.

mod support;

use std::time::Duration;

use grasp_sync::coordination::membership::{self, LeaseConfig};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::{KubeEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_held_renewed_counted_and_released() {
    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = env.client().await.unwrap();
    let ns = env.namespace("lease").await.unwrap();
    let config = LeaseConfig {
        duration: Duration::from_secs(6),
        renew_every: Duration::from_millis(500),
        owner: None,
    };
    let w0 = membership::hold(client.clone(), &ns, "w0", config.clone())
        .await
        .unwrap();
    let w1 = membership::hold(client.clone(), &ns, "w1", config.clone())
        .await
        .unwrap();

    // A Lease that stopped being renewed long ago: its worker is dead.
    let stale: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": membership::lease_name("w9")},
        "spec": {"holderIdentity": "w9", "leaseDurationSeconds": 5, "renewTime": "2020-01-01T00:00:00.000000Z"}
    }))
    .unwrap();
    Api::<Lease>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &stale)
        .await
        .unwrap();

    let live = membership::live_workers(client.clone(), &ns, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(live.into_iter().collect::<Vec<_>>(), ["w0", "w1"]);
    assert!(*w0.held().borrow());

    // Renewal keeps it fresh past its duration.
    let api = Api::<Lease>::namespaced(client.clone(), &ns);
    let first = api
        .get(&membership::lease_name("w0"))
        .await
        .unwrap()
        .spec
        .unwrap()
        .renew_time
        .unwrap()
        .0;
    eventually("a renewal", Duration::from_secs(10), || async {
        let now = api
            .get(&membership::lease_name("w0"))
            .await
            .ok()?
            .spec?
            .renew_time?
            .0;
        (now > first).then_some(())
    })
    .await;

    // A graceful stop marks the Lease released (and keeps it, so a StatefulSet pod coming
    // back under its name can be waited for): no longer live.
    w1.release().await;
    let live = membership::live_workers(client.clone(), &ns, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(live.into_iter().collect::<Vec<_>>(), ["w0"]);
    let released = api
        .get(&membership::lease_name("w1"))
        .await
        .expect("the released Lease stays");
    assert!(membership::is_released(&released));
    // Taken again under the same name, the mark is gone and the worker is live.
    let w1 = membership::hold(client.clone(), &ns, "w1", config.clone())
        .await
        .unwrap();
    let again = api.get(&membership::lease_name("w1")).await.unwrap();
    assert!(
        !again
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(membership::RELEASED_ANNOTATION)
    );
    let live = membership::live_workers(client.clone(), &ns, Timestamp::now())
        .await
        .unwrap();
    assert_eq!(live.into_iter().collect::<Vec<_>>(), ["w0", "w1"]);
    w1.release().await;
    w0.release().await;
}
