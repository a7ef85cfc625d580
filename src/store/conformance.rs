//! The behaviour every [`RelaySyncStore`] must have, as one async test routine. The
//! in-memory store runs it in unit tests; the Kubernetes store runs it against a real API
//! server. It panics on the first violation. It leaves two objects behind
//! (`conformance-a`, `conformance-c`) so callers can check persistence.

use std::time::Duration;

use super::{RelaySyncStore, StoreError};
use crate::crd::{Phase, RelaySyncSpec, RelaySyncStatus};

const PK: &str = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";

fn spec(url: &str, repos: &[&str]) -> RelaySyncSpec {
    RelaySyncSpec {
        url: url.to_string(),
        bootstrap: None,
        repos: repos.iter().map(|r| format!("30617:{PK}:{r}")).collect(),
        paused: None,
    }
}

async fn changed_since<S: RelaySyncStore>(store: &S, rev: u64) {
    let mut rx = store.changes();
    let wait = async {
        loop {
            if *rx.borrow_and_update() > rev {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the store announced the change within 10 s");
}

pub async fn run<S: RelaySyncStore>(store: &S) {
    for name in ["conformance-a", "conformance-b", "conformance-c"] {
        store.delete(name).await.expect("clean slate");
    }

    // Create.
    let rev = *store.changes().borrow();
    let a = store
        .apply_spec("conformance-a", &spec("wss://a.example", &["x", "y"]))
        .await
        .expect("create");
    assert_eq!(a.generation, 1);
    assert_eq!(a.spec.repos.len(), 2);
    assert!(a.status.is_none());
    changed_since(store, rev).await;
    let got = store.get("conformance-a").await.unwrap().expect("stored");
    assert_eq!(got.spec, a.spec);

    // Applying the same spec changes nothing; a different one bumps the generation.
    let same = store
        .apply_spec("conformance-a", &spec("wss://a.example", &["x", "y"]))
        .await
        .unwrap();
    assert_eq!(same.generation, 1);
    let changed = store
        .apply_spec("conformance-a", &spec("wss://a.example", &["x"]))
        .await
        .unwrap();
    assert_eq!(changed.generation, 2);

    // Status is written separately, leaves spec and generation alone, and survives the next
    // spec change.
    let status = RelaySyncStatus {
        worker: Some("w0".into()),
        observed_generation: Some(2),
        phase: Some(Phase::Live),
        cursor: Some(1_700_000_000),
        ..RelaySyncStatus::default()
    };
    let rev = *store.changes().borrow();
    store
        .apply_status("conformance-a", &status)
        .await
        .expect("status");
    changed_since(store, rev).await;
    let got = store.get("conformance-a").await.unwrap().unwrap();
    assert_eq!(got.status.as_ref().and_then(|s| s.phase), Some(Phase::Live));
    assert_eq!(got.generation, 2);
    assert_eq!(got.spec.repos.len(), 1);
    let after = store
        .apply_spec("conformance-a", &spec("wss://a.example", &["x", "z"]))
        .await
        .unwrap();
    assert_eq!(after.generation, 3);
    let got = store.get("conformance-a").await.unwrap().unwrap();
    assert_eq!(
        got.status.as_ref().and_then(|s| s.cursor),
        Some(1_700_000_000)
    );

    // Status of a missing object is an error; deleting a missing object is not.
    match store.apply_status("conformance-missing", &status).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("status of a missing object: {other:?}"),
    }
    store
        .delete("conformance-missing")
        .await
        .expect("idempotent delete");

    // Invalid specs are refused with the field named.
    match store
        .apply_spec("conformance-bad", &spec("https://a.example", &[]))
        .await
    {
        Err(e) => assert!(e.to_string().contains("url"), "{e}"),
        Ok(_) => panic!("an https URL was stored"),
    }

    // List and delete.
    store
        .apply_spec("conformance-b", &spec("wss://b.example", &["x"]))
        .await
        .unwrap();
    store
        .apply_spec("conformance-c", &spec("wss://c.example", &[]))
        .await
        .unwrap();
    let names: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .filter(|n| n.starts_with("conformance-"))
        .collect();
    assert_eq!(names, ["conformance-a", "conformance-b", "conformance-c"]);
    let rev = *store.changes().borrow();
    store.delete("conformance-b").await.unwrap();
    changed_since(store, rev).await;
    assert!(store.get("conformance-b").await.unwrap().is_none());
}
