//! Into a local relay built on nostr-relay-builder — the demo's GRASP-01-like relay — at its
//! stock ingress limits (60 events a minute and 500 REQs per connection, ngit-grasp's) and
//! with the limits raised out of the way: time until the relay holds 100 % of the demo
//! corpus's expected set, events/s, the most publisher connections open at once, what the
//! publisher sent and answered from memory, and the same set published straight into an
//! identical relay by a plain publisher as the ceiling an over-the-wire syncer can approach
//! (the default connection cap at stock limits, 4 connections with the limits raised). An idle
//! window after completion, with a full reconciliation due in it, counts what grasp-sync sends
//! the relay when there is nothing new. `cores` is this process's CPU over the ceiling's timed
//! publish (the local relay and the plain publisher): a ceiling that keeps the machine's cores
//! busy bounds what any syncer beside the same relay can reach.
//!
//!     cargo bench --bench local_ingress
//!     GRASP_SYNC_BENCH_STOCK=50,200 GRASP_SYNC_BENCH_RAISED=1000,5000 cargo bench --bench local_ingress
//!
//! Knobs: `GRASP_SYNC_BENCH_STOCK` / `_RAISED` (repository counts, comma-separated; empty
//! skips), `GRASP_SYNC_BENCH_IDLE` (the idle window after the first size of each, `0s` skips;
//! the reconciliation period is set just under it), `GRASP_SYNC_BENCH_SEED`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../tests/support/cpu.rs"]
mod cpu;

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
        "{:<7} {:>6} {:>7} {:>9} {:>9} {:>6} {:>9} {:>9} {:>10} {:>10} {:>6} {:>8} {:>11}",
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
        "cores",
        "of ceil",
        "idle sends"
    );
    // This process's CPU, sampled every 50 ms: the ceiling's timed part is known only by its
    // length once it returns.
    let samples: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let sampler = {
        let samples = samples.clone();
        let me = std::process::id();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let mut s = samples.lock().unwrap_or_else(|e| e.into_inner());
                s.push((Instant::now(), cpu::ticks(me)));
                // Only the last minutes matter.
                if s.len() > 20_000 {
                    s.drain(..10_000);
                }
            }
        })
    };
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
            let ceiling_cores = cores_during(&samples, Instant::now() - ceiling, Instant::now());
            let secs = report.elapsed.as_secs_f64();
            let rate = report.synced as f64 / secs.max(1e-3);
            let ceiling_rate = n as f64 / ceiling.as_secs_f64().max(1e-3);
            println!(
                "{:<7} {:>6} {:>7} {:>8.1}s {:>9.0} {:>6} {:>9} {:>9} {:>9.1}s {:>10.0} {:>6.2} {:>7.0}% {:>11}",
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
                ceiling_cores,
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
    sampler.abort();
}

/// Cores busy between `from` and `to`: CPU seconds between the samples closest inside that
/// window, over the wall time between them (NaN if the window holds under two samples).
fn cores_during(samples: &Mutex<Vec<(Instant, u64)>>, from: Instant, to: Instant) -> f64 {
    let s = samples.lock().unwrap_or_else(|e| e.into_inner());
    let inside: Vec<&(Instant, u64)> = s.iter().filter(|(t, _)| *t >= from && *t <= to).collect();
    match (inside.first(), inside.last()) {
        (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
            cpu::seconds(*c0, *c1) / t1.duration_since(*t0).as_secs_f64()
        }
        _ => f64::NAN,
    }
}
