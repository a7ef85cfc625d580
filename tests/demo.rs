//! The demo at a small size: every expected event arrives and nothing else does.

use std::time::Duration;

use grasp_sync::modes::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_delivers_exactly_the_expected_set() {
    let report = demo::run(DemoOptions {
        repos: 12,
        timeout: Duration::from_secs(120),
        nostr_rs_relay: None,
        progress: false,
        seed: 3,
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
