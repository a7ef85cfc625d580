//! The demo at a small size: every expected event arrives and nothing else does.

use std::time::Duration;

use grasp_sync::modes::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_delivers_exactly_the_expected_set() {
    let report = demo::run(DemoOptions {
        repos: 12,
        timeout: Duration::from_secs(120),
        nostr_rs_relay: None,
        stock_limits: false,
        progress: false,
        seed: 3,
        reconcile_every: None,
        idle_window: None,
    })
    .await
    .expect("demo runs");
    assert!(report.expected > 250, "{report}");
    assert_eq!(report.missing, 0, "{report}");
    assert_eq!(report.extra, 0, "{report}");
    assert!(
        report.noise_events > 0 && report.forged_events > 0,
        "{report}"
    );
    // nostr-rs-relay joins when the test environment installed it.
    assert!(report.relays.len() >= 2, "{report}");
}

/// Into a local relay at the stock limits of nostr-relay-builder (ngit-grasp's: 60 events a
/// minute per connection), with default flags: one publisher connection took 180 s for a
/// quarter of 50 repositories; the connections grow, and 30 repositories complete well
/// within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_at_stock_limits_delivers_exactly_the_expected_set() {
    let report = demo::run(DemoOptions {
        repos: 30,
        timeout: Duration::from_secs(60),
        nostr_rs_relay: None,
        stock_limits: true,
        progress: false,
        seed: 5,
        reconcile_every: None,
        idle_window: None,
    })
    .await
    .expect("demo runs");
    assert!(report.expected > 300, "{report}");
    assert_eq!(report.missing, 0, "{report}");
    assert_eq!(report.extra, 0, "{report}");
}

/// The benchmark's ceiling (`cargo bench --bench local_ingress`) publishes the same corpus
/// straight into an identical relay: it must be the whole expected set, every event taken.
#[tokio::test]
async fn the_direct_publish_ceiling_delivers_the_expected_set() {
    let opts = DemoOptions {
        repos: 20,
        timeout: Duration::from_secs(60),
        nostr_rs_relay: None,
        stock_limits: false,
        progress: false,
        seed: 7,
        reconcile_every: None,
        idle_window: None,
    };
    let (n, took) = demo::direct_publish(&opts, 4)
        .await
        .expect("every expected event taken");
    assert!(n > 200, "{n} events");
    assert!(took < Duration::from_secs(60));
}

/// After a complete sync, a full reconciliation offers the local relay nothing it refused on
/// policy grounds: the first sync's refusals are remembered across the repos it learned
/// meanwhile (each forgets only the refusals about itself) and answer the reconciliation's
/// copies. Before, every learned repo forgot every refusal, and the reconciliation sent
/// each refused event again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_reconciliation_sends_nothing_the_relay_refused_before() {
    let report = demo::run(DemoOptions {
        repos: 50,
        timeout: Duration::from_secs(120),
        nostr_rs_relay: None,
        stock_limits: false,
        progress: false,
        seed: 11,
        // Any 12 s window holds a reconciliation every 10 s, however long the sync took. The
        // refusal memory's TTL (1 h) outlasts the period here, as it does between an
        // operator's reconciliations only when set so.
        reconcile_every: Some(Duration::from_secs(10)),
        idle_window: Some(Duration::from_secs(12)),
    })
    .await
    .expect("demo runs");
    assert!(report.ok(), "{report}");
    let (idle, _) = report.idle.as_ref().expect("complete, then idle");
    assert!(
        idle.get("refused-before").copied().unwrap_or(0) > 0,
        "no reconciliation offered the refused events in the idle window:\n{report}"
    );
    let sends = report.idle_sends().unwrap_or(0);
    assert!(
        sends * 100 <= report.expected as u64,
        "{sends} sends in the idle window, over 1 % of {}:\n{report}",
        report.expected
    );
}
