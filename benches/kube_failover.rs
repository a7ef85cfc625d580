//! Kubernetes mode at scale: RelaySyncs held by three `grasp-sync worker` processes (release
//! build) against the real test API server; one scripted relay reachable under many URLs.
//! Measures crash failover (SIGKILL → every relay of the victim Live elsewhere) p50/p99,
//! graceful handover (SIGTERM → the same), status writes per relay per minute at steady
//! state, and controller/worker RSS.
//!
//!     cargo bench --bench kube_failover
//!     GRASP_SYNC_BENCH_RELAYS=200 GRASP_SYNC_BENCH_KILLS=5 cargo bench --bench kube_failover
//!
//! Leases use the production defaults (15 s, renewed every 5 s) unless
//! GRASP_SYNC_BENCH_LEASE (e.g. `6s`) is set.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use grasp_sync::crd::naming::object_name;
use grasp_sync::crd::{CONTROLLER_MANAGER, Phase, RelaySync, RelaySyncSpec, WORKER_LABEL};
use grasp_sync::nostr::RelayUrl;
use grasp_sync::testing::scripted_relay::{Script, ScriptedRelay};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use support::cluster::Cluster;
use support::free_port;
use support::procs::GraspSync;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Worker {
    proc: GraspSync,
    metrics_port: u16,
}

fn start_worker(cluster: &Cluster, name: &str, lease: &(String, String)) -> Worker {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let proc = cluster.worker(
        name,
        &[
            "--metrics-addr",
            &addr,
            "--status-interval",
            "30s",
            "--lease-duration",
            &lease.0,
            "--lease-renew",
            &lease.1,
        ],
    );
    Worker {
        proc,
        metrics_port: port,
    }
}

async fn status_writes(port: u16) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("grasp_sync_status_writes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until every object is labelled, not held by `excluded`, and Live by its labelled
/// worker; returns how long that took.
async fn wait_all_live(
    cluster: &Cluster,
    n: usize,
    excluded: Option<&str>,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let objects = cluster.objects().await;
        let ok = objects.len() == n
            && objects.iter().all(|o| {
                let label = o.labels().get(WORKER_LABEL);
                let s = o.status.as_ref();
                label.is_some()
                    && label.map(String::as_str) != excluded
                    && s.and_then(|s| s.worker.as_ref()) == label
                    && s.and_then(|s| s.phase) == Some(Phase::Live)
            });
        if ok {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "relays not all Live within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn owners(objects: &[RelaySync]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in objects {
        if let Some(w) = o.labels().get(WORKER_LABEL) {
            *m.entry(w.clone()).or_default() += 1;
        }
    }
    m
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    grasp_sync::relay::tls::install_default_crypto();
    let n = env_usize("GRASP_SYNC_BENCH_RELAYS", 1000);
    let kills = env_usize("GRASP_SYNC_BENCH_KILLS", 10);
    let lease_secs = std::env::var("GRASP_SYNC_BENCH_LEASE")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(15));
    let lease = (
        humantime::format_duration(lease_secs).to_string(),
        humantime::format_duration((lease_secs / 3).max(Duration::from_secs(1))).to_string(),
    );
    println!(
        "kube_failover: {n} RelaySyncs, 3 workers, {kills} kills, lease {} renewed every {}",
        lease.0, lease.1
    );
    let cluster = Cluster::start("bench").await;
    let relay = ScriptedRelay::start(Script::default())
        .await
        .expect("relay");

    // The objects as discovery would write them: one relay URL (a path of the one relay)
    // and one repo each.
    let api = Api::<RelaySync>::namespaced(cluster.admin.clone(), &cluster.ns);
    let t = Instant::now();
    for i in 0..n {
        let url = RelayUrl::parse(&format!("{}/r{i}", relay.url())).expect("url");
        let name = object_name(&url);
        let spec = RelaySyncSpec {
            url: url.to_string(),
            bootstrap: None,
            repos: vec![format!("30617:{:064x}:repo-{i}", i + 1)],
            paused: None,
        };
        api.patch(
            &name,
            &PatchParams::apply(CONTROLLER_MANAGER).force(),
            &Patch::Apply(&RelaySync::new(&name, spec)),
        )
        .await
        .expect("create RelaySync");
    }
    println!("created {n} RelaySyncs in {:.1?}", t.elapsed());

    let controller = cluster.controller(
        "c0",
        &["--leader-lease-duration", "15s", "--leader-renew", "3s"],
    );
    let mut workers: BTreeMap<String, Worker> = BTreeMap::new();
    let t = Instant::now();
    for w in ["w0", "w1", "w2"] {
        workers.insert(w.to_string(), start_worker(&cluster, w, &lease));
    }
    let first = wait_all_live(&cluster, n, None, Duration::from_secs(600)).await;
    println!(
        "cold start: all {n} Live in {:.1?} (workers started {:.1?} ago); spread {:?}",
        first,
        t.elapsed(),
        owners(&cluster.objects().await)
    );

    // Steady state: status writes per relay per minute, and memory. First let the writes
    // that follow a cold start (cursors appearing one status interval later) pass.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let window = Duration::from_secs(120);
    let mut before = 0.0;
    for w in workers.values() {
        before += status_writes(w.metrics_port).await;
    }
    tokio::time::sleep(window).await;
    let mut after = 0.0;
    for w in workers.values() {
        after += status_writes(w.metrics_port).await;
    }
    println!(
        "steady state: {:.0} status writes in {window:?} → {:.3} writes/relay/min",
        after - before,
        (after - before) / n as f64 / (window.as_secs_f64() / 60.0)
    );
    print_rss("RSS at steady state", &controller, &workers);

    // Crash failover: SIGKILL one worker, time until its relays are Live elsewhere; then
    // bring it back and let the ring settle before the next kill.
    let mut crash = Vec::new();
    for k in 0..kills {
        let victim = ["w0", "w1", "w2"][k % 3].to_string();
        let held = owners(&cluster.objects().await)
            .get(&victim)
            .copied()
            .unwrap_or(0);
        let w = workers.remove(&victim).expect("running");
        w.proc.kill();
        let took = wait_all_live(&cluster, n, Some(&victim), Duration::from_secs(300)).await;
        println!("kill {k}: {victim} held {held} relays → all Live elsewhere in {took:.1?}");
        crash.push(took.as_secs_f64());
        workers.insert(victim.clone(), start_worker(&cluster, &victim, &lease));
        wait_balanced(&cluster, n, &victim).await;
    }
    crash.sort_by(f64::total_cmp);
    println!(
        "crash failover over {} kills: p50 {:.1} s, p99 {:.1} s, max {:.1} s",
        crash.len(),
        percentile(&crash, 50.0),
        percentile(&crash, 99.0),
        crash.last().copied().unwrap_or(f64::NAN)
    );

    // Graceful handover: SIGTERM (sessions closed, final status, Lease released).
    let mut graceful = Vec::new();
    for victim in ["w0", "w1", "w2"] {
        let w = workers.remove(victim).expect("running");
        let t = Instant::now();
        let status = w.proc.terminate(Duration::from_secs(60)).await;
        let stopped = t.elapsed();
        let took =
            t.elapsed() + wait_all_live(&cluster, n, Some(victim), Duration::from_secs(300)).await;
        println!(
            "graceful {victim}: exit {status} after {stopped:.1?}; all Live elsewhere in {took:.1?}"
        );
        graceful.push(took.as_secs_f64());
        workers.insert(victim.to_string(), start_worker(&cluster, victim, &lease));
        wait_balanced(&cluster, n, victim).await;
    }
    graceful.sort_by(f64::total_cmp);
    println!(
        "graceful handover: p50 {:.1} s, max {:.1} s",
        percentile(&graceful, 50.0),
        graceful.last().copied().unwrap_or(f64::NAN)
    );
    print_rss("RSS at the end", &controller, &workers);
}

fn print_rss(when: &str, controller: &GraspSync, workers: &BTreeMap<String, Worker>) {
    println!(
        "{when}: controller {} MiB; workers {}",
        controller.rss_kib().unwrap_or(0) / 1024,
        workers
            .iter()
            .map(|(k, w)| format!("{k} {} MiB", w.proc.rss_kib().unwrap_or(0) / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// After `back` rejoined: every relay Live, `back` holding some again.
async fn wait_balanced(cluster: &Cluster, n: usize, back: &str) {
    let start = Instant::now();
    loop {
        wait_all_live(cluster, n, None, Duration::from_secs(300)).await;
        if owners(&cluster.objects().await)
            .get(back)
            .copied()
            .unwrap_or(0)
            > 0
        {
            wait_all_live(cluster, n, None, Duration::from_secs(300)).await;
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{back} never got relays back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
