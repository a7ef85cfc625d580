//! Into a local relay built on nostr-relay-builder — the demo's GRASP-01-like relay — at its
//! stock ingress limits (60 events a minute and 500 REQs per connection, ngit-grasp's) and
//! with the limits raised out of the way: time until the relay holds 100 % of the demo
//! corpus's expected set, events/s, the most publisher connections open at once, what the
//! publisher sent and answered from memory, and the same set published straight into an
//! identical relay by a plain publisher as the ceiling an over-the-wire syncer can approach
//! (the default connection cap at stock limits, 4 connections with the limits raised). An idle
//! window after completion, with a full reconciliation due in it, counts what grasp-sync sends
//! the relay when there is nothing new.
//!
//!     cargo bench --bench local_ingress
//!     GRASP_SYNC_BENCH_STOCK=50,200 GRASP_SYNC_BENCH_RAISED=1000,5000 cargo bench --bench local_ingress
//!
//! Knobs: `GRASP_SYNC_BENCH_STOCK` / `_RAISED` (repository counts, comma-separated; empty
//! skips), `GRASP_SYNC_BENCH_IDLE` (the idle window after the first size of each, `0s` skips;
//! the reconciliation period is set just under it), `GRASP_SYNC_BENCH_SEED`.

use std::time::Duration;

use grasp_sync::modes::demo::{self, DemoOptions};
use grasp_sync::worker::publisher::DEFAULT_MAX_CONNECTIONS;

fn sizes(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

#[tokio::main]
async fn main() {
    let stock = sizes("GRASP_SYNC_BENCH_STOCK", "50,200");
    let raised = sizes("GRASP_SYNC_BENCH_RAISED", "1000");
    let idle = std::env::var("GRASP_SYNC_BENCH_IDLE")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(70));
    let seed = std::env::var("GRASP_SYNC_BENCH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    println!(
        "{:<7} {:>6} {:>7} {:>9} {:>9} {:>6} {:>9} {:>9} {:>10} {:>10} {:>8} {:>11}",
        "limits",
        "repos",
        "events",
        "time",
        "events/s",
        "conns",
        "sends",
        "memory",
        "ceiling",
        "ceiling/s",
        "of ceil",
        "idle sends"
    );
    for (stock_limits, list, ceiling_connections) in
        [(true, &stock, DEFAULT_MAX_CONNECTIONS), (false, &raised, 4)]
    {
        for (i, repos) in list.iter().copied().enumerate() {
            let idle_window = (i == 0 && !idle.is_zero()).then_some(idle);
            let opts = DemoOptions {
                repos,
                timeout: Duration::from_secs(1_800),
                nostr_rs_relay: None,
                stock_limits,
                progress: false,
                seed,
                reconcile_every: idle_window.map(|w| w * 6 / 7),
                idle_window,
            };
            let report = demo::run(opts.clone()).await.expect("demo runs");
            assert!(
                report.ok(),
                "the relay holds exactly the expected set:\n{report}"
            );
            let (n, ceiling) = demo::direct_publish(&opts, ceiling_connections)
                .await
                .expect("direct publish");
            let secs = report.elapsed.as_secs_f64();
            let rate = report.synced as f64 / secs.max(1e-3);
            let ceiling_rate = n as f64 / ceiling.as_secs_f64().max(1e-3);
            println!(
                "{:<7} {:>6} {:>7} {:>8.1}s {:>9.0} {:>6} {:>9} {:>9} {:>9.1}s {:>10.0} {:>7.0}% {:>11}",
                if stock_limits { "stock" } else { "raised" },
                repos,
                report.expected,
                secs,
                rate,
                report.peak_connections,
                report.sends(),
                report.unsent(),
                ceiling.as_secs_f64(),
                ceiling_rate,
                100.0 * rate / ceiling_rate.max(1e-9),
                report
                    .idle_sends()
                    .map(|n| format!("{n} ({:.1}%)", 100.0 * n as f64 / report.expected as f64))
                    .unwrap_or_else(|| "-".into()),
            );
            if let Some((outcomes, window)) = &report.idle {
                println!(
                    "        idle {window:?}: {outcomes:?}; noise offered {}",
                    report.noise_events
                );
            }
        }
    }
}
