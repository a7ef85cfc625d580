//! Kubernetes mode at scale: RelaySyncs held by `grasp-sync worker` processes (release build)
//! named as the pods of a StatefulSet `gs`, against the real test API server; one scripted
//! relay reachable under many URLs. The controller runs as the chart runs it
//! (`--worker-statefulset gs`, restart grace). Measures:
//!
//! - cold start (every relay Live);
//! - steady state with events flowing: status writes per relay per minute (and the Lease
//!   writes beside them), controller and worker RSS, and the RSS of a worker holding nothing
//!   (so the cost per relay held is the difference);
//! - crash failover (SIGKILL → every relay of the victim Live elsewhere) p50/p99;
//! - the API server's write floor: one metadata write per object, as many in flight as the
//!   assigner keeps, with the API server's and etcd's CPU per write;
//! - graceful handover (scale the StatefulSet down, SIGTERM its last pod → its relays Live
//!   elsewhere) p50/p99, each beside the floor for its writes (a label and a status write
//!   per relay moved);
//! - a rolling restart of every worker (SIGTERM, the pod comes back under its name): relays
//!   moved, relays held by two workers at once, time until each pod's relays are Live again.
//!
//! ```text
//! cargo bench --bench kube_failover
//! GRASP_SYNC_BENCH_RELAYS=5000 GRASP_SYNC_BENCH_WORKERS=8 cargo bench --bench kube_failover
//! ```
//!
//! Other knobs: GRASP_SYNC_BENCH_KILLS (10), GRASP_SYNC_BENCH_HANDOVERS (5),
//! GRASP_SYNC_BENCH_STEADY (steady-state window, 7m: longer than
//! the 6 min in which a relay's progress is written once), GRASP_SYNC_BENCH_LEASE (the worker
//! Lease duration; default the chart's, renewed every third of it), GRASP_SYNC_BENCH_ROLLING=0
//! (no rolling restart).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use grasp_sync::controller::assignment::ring::{DEFAULT_VNODES, Ring};
use grasp_sync::crd::naming::object_name;
use grasp_sync::crd::{
    CONTROLLER_MANAGER, DRAIN_LABEL, Phase, RelaySync, RelaySyncSpec, WORKER_LABEL,
};
use grasp_sync::nostr::RelayUrl;
use grasp_sync::testing::scripted_relay::{Script, ScriptedRelay};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use nostr::{EventBuilder, Keys, Kind, Tag, TagKind};
use support::cluster::Cluster;
use support::cpu;
use support::free_port;
use support::procs::GraspSync;

/// The chart's defaults (deploy/helm/grasp-sync/values.yaml).
const CHART_LEASE: &str = "6s";
const CHART_STATUS_INTERVAL: &str = "30s";
const RESTART_GRACE: &str = "30s";
const MAX_WORKERS: usize = 8;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_duration(name: &str, default: &str) -> Duration {
    let v = std::env::var(name).unwrap_or_else(|_| default.to_string());
    humantime::parse_duration(&v).unwrap_or_else(|e| panic!("{name}={v}: {e}"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).ceil() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(what: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{what} over {} runs: p50 {:.1} s, p99 {:.1} s, max {:.1} s",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

struct Bench {
    cluster: Cluster,
    /// Every RelaySync as a watch sees it (a bench that listed 5,000 objects four times a
    /// second would load the API server it measures).
    objects: Store<RelaySync>,
    n: usize,
    lease: (String, String),
    workers: BTreeMap<String, Worker>,
    /// Writes a second the API server took in the write-floor measurement (0 until then).
    write_rate: f64,
}

struct Worker {
    proc: GraspSync,
    metrics_port: u16,
}

fn pod(i: usize) -> String {
    format!("gs-{i}")
}

impl Bench {
    fn start_worker(&mut self, name: &str) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let proc = self.cluster.worker(
            name,
            &[
                "--metrics-addr",
                &addr,
                "--status-interval",
                CHART_STATUS_INTERVAL,
                "--lease-duration",
                &self.lease.0,
                "--lease-renew",
                &self.lease.1,
            ],
        );
        self.workers.insert(
            name.to_string(),
            Worker {
                proc,
                metrics_port: port,
            },
        );
    }

    /// Labels of every object (the record of who holds what).
    fn labels(&self) -> BTreeMap<String, Option<String>> {
        self.objects
            .state()
            .iter()
            .map(|o| (o.name_any(), o.labels().get(WORKER_LABEL).cloned()))
            .collect()
    }

    /// True once every object is labelled, not for `excluded`, and Live by its labelled
    /// worker.
    fn all_live(&self, excluded: Option<&str>) -> bool {
        let objects = self.objects.state();
        objects.len() == self.n
            && objects.iter().all(|o| {
                let label = o.labels().get(WORKER_LABEL);
                let s = o.status.as_ref();
                label.is_some()
                    && label.map(String::as_str) != excluded
                    && s.and_then(|s| s.worker.as_ref()) == label
                    && s.and_then(|s| s.phase) == Some(Phase::Live)
            })
    }

    /// Of the objects not labelled `excluded`: how many, and how many of them are Live by
    /// their labelled worker.
    fn moved_and_live(&self, excluded: &str) -> (usize, usize) {
        let objects = self.objects.state();
        let moved: Vec<_> = objects
            .iter()
            .filter(|o| {
                o.labels()
                    .get(WORKER_LABEL)
                    .is_some_and(|l| l.as_str() != excluded)
            })
            .collect();
        let live = moved
            .iter()
            .filter(|o| {
                let s = o.status.as_ref();
                s.and_then(|s| s.worker.as_ref()) == o.labels().get(WORKER_LABEL)
                    && s.and_then(|s| s.phase) == Some(Phase::Live)
            })
            .count();
        (moved.len(), live)
    }

    /// While `excluded`'s `held` relays are handed over: when their labels had all moved
    /// and when half of them were Live again (from `start`), by the watch's view, sampled
    /// every 50 ms; returns once all are Live.
    async fn handover_timeline(&self, excluded: &str, held: usize, start: Instant) -> String {
        let (mut moved_all, mut live_half) = (None, None);
        let others = self.n.saturating_sub(held);
        while start.elapsed() < Duration::from_secs(300) {
            let (moved, live) = self.moved_and_live(excluded);
            if moved == self.n && moved_all.is_none() {
                moved_all = Some(start.elapsed());
            }
            if live >= others + held / 2 && live_half.is_none() {
                live_half = Some(start.elapsed());
            }
            if self.all_live(Some(excluded)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        format!(
            "labels all moved at {:.1?}, half Live again at {:.1?}",
            moved_all.unwrap_or_default(),
            live_half.unwrap_or_default()
        )
    }

    async fn wait_all_live(&self, excluded: Option<&str>, within: Duration) -> Duration {
        let start = Instant::now();
        while !self.all_live(excluded) {
            if start.elapsed() >= within {
                self.report_stall(excluded);
                panic!("relays not all Live within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        start.elapsed()
    }

    /// What a stalled wait was waiting for: the objects not yet Live by their labelled
    /// worker, with what the record says about each, so a kept log can be searched by name.
    fn report_stall(&self, excluded: Option<&str>) {
        let objects = self.objects.state();
        let stuck: Vec<_> = objects
            .iter()
            .filter(|o| {
                let label = o.labels().get(WORKER_LABEL);
                let s = o.status.as_ref();
                label.is_none()
                    || label.map(String::as_str) == excluded
                    || s.and_then(|s| s.worker.as_ref()) != label
                    || s.and_then(|s| s.phase) != Some(Phase::Live)
            })
            .collect();
        eprintln!(
            "stall: {} of {} objects seen ({} expected) not Live (excluded worker {excluded:?}); owners {:?}",
            stuck.len(),
            objects.len(),
            self.n,
            self.owners()
        );
        for o in stuck.iter().take(20) {
            let s = o.status.as_ref();
            eprintln!(
                "  {} url={} labels={:?} rv={:?} status.worker={:?} phase={:?} lastError={:?} conditions={:?}",
                o.name_any(),
                o.spec.url,
                o.labels(),
                o.resource_version(),
                s.and_then(|s| s.worker.as_deref()),
                s.and_then(|s| s.phase),
                s.and_then(|s| s.last_error.as_deref()),
                s.map(|s| s
                    .conditions
                    .iter()
                    .map(|c| format!("{}={:?}/{}", c.type_, c.status, c.reason))
                    .collect::<Vec<_>>()),
            );
        }
    }

    fn owners(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for w in self.labels().into_values().flatten() {
            *m.entry(w).or_default() += 1;
        }
        m
    }

    /// After a worker rejoined: every relay labelled by the ring over `workers`, no drain
    /// left, every relay Live — so the next measurement starts from rest, not in the middle
    /// of a rebalance.
    async fn wait_balanced(&self, workers: usize) {
        let ring = Ring::new((0..workers).map(pod), DEFAULT_VNODES);
        let start = Instant::now();
        loop {
            let settled = self.objects.state().iter().all(|o| {
                o.labels().get(WORKER_LABEL).map(String::as_str) == ring.owner(&o.spec.url)
                    && !o.labels().contains_key(DRAIN_LABEL)
            });
            if settled && self.all_live(None) {
                return;
            }
            if start.elapsed() >= Duration::from_secs(600) {
                self.report_stall(None);
                panic!("the ring never settled");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The API server's request counters (`apiserver_request_total`) summed by verb, resource
    /// and subresource: what a phase of the benchmark cost the API server.
    async fn api_requests(&self) -> BTreeMap<String, f64> {
        let req = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("request");
        let text = self
            .cluster
            .admin
            .request_text(req)
            .await
            .unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
        {
            let label = |k: &str| {
                let key = format!("{k}=\"");
                let at = line.find(&key)? + key.len();
                Some(line[at..].split('"').next()?.to_string())
            };
            let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else {
                continue;
            };
            if verb == "WATCH" || verb == "GET" && resource.is_empty() {
                continue;
            }
            let sub = label("subresource").unwrap_or_default();
            let key = if sub.is_empty() {
                format!("{verb} {resource}")
            } else {
                format!("{verb} {resource}/{sub}")
            };
            let n: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *out.entry(key).or_insert(0.0) += n;
        }
        out
    }

    /// The API server's own floor for the writes a handover needs: one metadata write on
    /// every object (an annotation nobody acts on), `IN_FLIGHT` at a time as the assigner
    /// writes, each object as large as a held one (status, three field managers) and every
    /// watcher of the run still watching. Returns writes a second; prints them with the API
    /// server's and etcd's CPU per write.
    async fn write_floor(&self, api: &Api<RelaySync>) -> f64 {
        const IN_FLIGHT: usize = 32;
        let pids = self.cluster.env.pids();
        let cpu_before: u64 = pids.iter().map(|p| cpu::ticks(*p)).sum();
        let names: Vec<String> = self.objects.state().iter().map(|o| o.name_any()).collect();
        let round = rand::random::<u32>().to_string();
        let t = Instant::now();
        let failed = futures::stream::iter(names.iter())
            .map(|name| {
                let patch = serde_json::json!({
                    "metadata": {"annotations": {"bench.grasp-sync.dev/calibration": round}}
                });
                async move {
                    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .is_err()
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        let took = t.elapsed().as_secs_f64();
        let cpu = cpu::seconds(cpu_before, pids.iter().map(|p| cpu::ticks(*p)).sum());
        let writes = names.len() - failed;
        let rate = writes as f64 / took;
        println!(
            "API write floor: {writes} metadata writes ({failed} failed), {IN_FLIGHT} in flight, in {took:.2} s = {rate:.0} writes/s; API server + etcd CPU {:.1} ms per write",
            cpu * 1000.0 / writes.max(1) as f64
        );
        rate
    }

    async fn status_writes(&self) -> f64 {
        let mut sum = 0.0;
        for w in self.workers.values() {
            let url = format!("http://127.0.0.1:{}/metrics", w.metrics_port);
            let Ok(resp) = reqwest::get(url).await else {
                continue;
            };
            let text = resp.text().await.unwrap_or_default();
            sum += text
                .lines()
                .filter(|l| l.starts_with("grasp_sync_status_writes_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
        sum
    }

    fn print_rss(&self, when: &str, controller: &GraspSync, idle: &GraspSync) {
        let owners = self.owners();
        let idle_kib = idle.rss_kib().unwrap_or(0);
        let per_relay: Vec<f64> = self
            .workers
            .iter()
            .filter_map(|(k, w)| {
                let held = *owners.get(k)?;
                let rss = w.proc.rss_kib()?;
                (held > 0).then(|| rss.saturating_sub(idle_kib) as f64 / 1024.0 / held as f64)
            })
            .collect();
        println!(
            "{when}: controller {} MiB; idle worker {} MiB; workers {}; above idle {:.3}–{:.3} MiB per relay held",
            controller.rss_kib().unwrap_or(0) / 1024,
            idle_kib / 1024,
            self.workers
                .iter()
                .map(|(k, w)| format!(
                    "{k} {} MiB/{} relays",
                    w.proc.rss_kib().unwrap_or(0) / 1024,
                    owners.get(k).copied().unwrap_or(0)
                ))
                .collect::<Vec<_>>()
                .join(", "),
            per_relay.iter().copied().fold(f64::INFINITY, f64::min),
            per_relay.iter().copied().fold(0.0, f64::max),
        );
    }
}

/// Status writes per relay per minute over `steady` (after the writes that follow a cold
/// start have passed), and memory.
async fn steady_state(
    b: &Bench,
    steady: Duration,
    n: usize,
    w: usize,
    controller: &GraspSync,
    idle: &GraspSync,
) {
    tokio::time::sleep(Duration::from_secs(45)).await;
    let before = b.status_writes().await;
    tokio::time::sleep(steady).await;
    let after = b.status_writes().await;
    let per_min = steady.as_secs_f64() / 60.0;
    let renew = humantime::parse_duration(&b.lease.1).expect("renew");
    println!(
        "steady state ({} events/min flowing, 10 % new issues): {:.0} status writes in {steady:?} → {:.3} status writes/relay/min; Lease renewals add {:.3} writes/relay/min",
        20 * 60,
        after - before,
        (after - before) / n as f64 / per_min,
        w as f64 * (60.0 / renew.as_secs_f64()) / n as f64,
    );
    b.print_rss("RSS at steady state", controller, idle);
}

async fn scale(statefulsets: &Api<StatefulSet>, replicas: usize) {
    let sts = support::cluster::statefulset("gs", replicas);
    statefulsets
        .patch(
            "gs",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(sts),
        )
        .await
        .expect("StatefulSet");
}

fn main() {
    // Debug logs of thousands of sessions would cost the processes measured here.
    if std::env::var_os("GRASP_SYNC_PROC_LOG").is_none() {
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var("GRASP_SYNC_PROC_LOG", "info") };
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    grasp_sync::relay::tls::install_default_crypto();
    let n = env_usize("GRASP_SYNC_BENCH_RELAYS", 1000);
    let w = env_usize("GRASP_SYNC_BENCH_WORKERS", 3).clamp(2, MAX_WORKERS);
    let kills = env_usize("GRASP_SYNC_BENCH_KILLS", 10);
    let handovers = env_usize("GRASP_SYNC_BENCH_HANDOVERS", 5);
    let steady = env_duration("GRASP_SYNC_BENCH_STEADY", "7m");
    let lease_len = env_duration("GRASP_SYNC_BENCH_LEASE", CHART_LEASE);
    let lease = (
        humantime::format_duration(lease_len).to_string(),
        humantime::format_duration((lease_len / 3).max(Duration::from_secs(1))).to_string(),
    );
    println!(
        "kube_failover: {n} RelaySyncs, {w} workers, {kills} kills, {handovers} handovers, lease {} renewed every {}",
        lease.0, lease.1
    );
    let cluster = Cluster::start("bench").await;
    let relay = Arc::new(
        ScriptedRelay::start(Script::default())
            .await
            .expect("relay"),
    );

    // The objects as discovery would write them: one relay URL (a path of the one relay)
    // and one repo each.
    let api = Api::<RelaySync>::namespaced(cluster.admin.clone(), &cluster.ns);
    let t = Instant::now();
    let repos: Vec<String> = (0..n)
        .map(|i| format!("30617:{:064x}:repo-{i}", i + 1))
        .collect();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let repo = repos[i].clone();
            let url = RelayUrl::parse(&format!("{}/r{i}", relay.url())).expect("url");
            async move {
                let name = object_name(&url);
                let spec = RelaySyncSpec {
                    url: url.to_string(),
                    bootstrap: None,
                    repos: vec![repo],
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
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    println!("created {n} RelaySyncs in {:.1?}", t.elapsed());
    let (objects, writer) = reflector::store();
    let watch = reflector::reflector(writer, watcher(api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let watch_task = tokio::spawn(async move {
        let mut s = std::pin::pin!(watch);
        while s.next().await.is_some() {}
    });
    objects.wait_until_ready().await.expect("RelaySync watch");
    let statefulsets = Api::<StatefulSet>::namespaced(cluster.admin.clone(), &cluster.ns);
    scale(&statefulsets, w).await;

    let controller = cluster.controller(
        "c0",
        &[
            "--leader-lease-duration",
            "15s",
            "--leader-renew",
            "3s",
            "--worker-statefulset",
            "gs",
            "--max-workers",
            &MAX_WORKERS.to_string(),
            "--restart-grace",
            RESTART_GRACE,
        ],
    );
    // A worker the ring never counts (not one of the StatefulSet's pods): what a worker
    // costs holding nothing.
    let idle = cluster.worker("w4", &["--status-interval", CHART_STATUS_INTERVAL]);
    let mut b = Bench {
        cluster,
        objects,
        n,
        lease,
        workers: BTreeMap::new(),
        write_rate: 0.0,
    };
    let t = Instant::now();
    for i in 0..w {
        b.start_worker(&pod(i));
    }
    let first = b.wait_all_live(None, Duration::from_secs(900)).await;
    b.wait_balanced(w).await;
    println!(
        "cold start: all {n} Live in {:.1?} (workers started {:.1?} ago); spread {:?}",
        first,
        t.elapsed(),
        b.owners()
    );
    b.write_rate = b.write_floor(&api).await;

    // Steady state with events flowing: 20 events a second, each to a random repo's live
    // subscriptions.
    let flowing = {
        let relay = relay.clone();
        let repos = repos.clone();
        tokio::spawn(async move {
            let keys = Keys::generate();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let repo = &repos[rand::random_range(0..repos.len())];
                // Mostly comments; one in ten a new issue (a new root: its thread is
                // fetched, the live plan grows).
                let ev = if rand::random_range(0..10) == 0 {
                    EventBuilder::new(Kind::Custom(1621), "issue")
                        .tags([Tag::custom(TagKind::a(), [repo.clone()])])
                } else {
                    EventBuilder::new(Kind::Custom(1111), "comment")
                        .tags([Tag::custom(TagKind::custom("A"), [repo.clone()])])
                }
                .sign_with_keys(&keys)
                .expect("sign");
                relay.add([ev]);
            }
        })
    };
    if !steady.is_zero() {
        steady_state(&b, steady, n, w, &controller, &idle).await;
    }
    flowing.abort();

    // Crash failover: SIGKILL one worker, time until its relays are Live elsewhere; then
    // bring it back and let the ring settle before the next kill.
    let mut crash = Vec::new();
    for k in 0..kills {
        let victim = pod(k % w);
        let held = b.owners().get(&victim).copied().unwrap_or(0);
        b.workers.remove(&victim).expect("running").proc.kill();
        let took = b
            .wait_all_live(Some(&victim), Duration::from_secs(300))
            .await;
        println!("kill {k}: {victim} held {held} relays → all Live elsewhere in {took:.1?}");
        crash.push(took.as_secs_f64());
        b.start_worker(&victim);
        b.wait_balanced(w).await;
    }
    summary("crash failover", crash);

    // Graceful handover: the StatefulSet scaled down by one, its last pod stopped (sessions
    // closed, final status, Lease released); then scaled up again.
    let mut graceful = Vec::new();
    let last = pod(w - 1);
    for k in 0..handovers {
        scale(&statefulsets, w - 1).await;
        let held = b.owners().get(&last).copied().unwrap_or(0);
        let requests = b.api_requests().await;
        let t = Instant::now();
        let leaving = b.workers.remove(&last).expect("running");
        // The handover is timed on its own: the leaving pod may still be writing its last
        // Events while its relays are Live elsewhere.
        let ((status, stopped), took) = tokio::join!(
            async {
                let status = leaving.proc.terminate(Duration::from_secs(60)).await;
                (status, t.elapsed())
            },
            async {
                let timeline = b.handover_timeline(&last, held, t).await;
                b.wait_all_live(Some(&last), Duration::from_secs(300)).await;
                let took = t.elapsed();
                (took, timeline, b.api_requests().await)
            }
        );
        let (took, timeline, after) = took;
        // A label and a status write per relay moved, at the API server's measured pace.
        let floor = 2.0 * held as f64 / b.write_rate;
        println!(
            "handover {k}: {last} held {held} relays; exit {status} after {stopped:.1?}; all Live elsewhere {took:.1?} after SIGTERM (the API server's floor for {} writes: {floor:.1} s)",
            2 * held
        );
        graceful.push(took.as_secs_f64());
        let spent: Vec<String> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - requests.get(k).copied().unwrap_or(0.0);
                (d >= 1.0).then(|| format!("{k} {d:.0}"))
            })
            .collect();
        println!(
            "  {timeline}; API requests until then: {}",
            spent.join(", ")
        );
        scale(&statefulsets, w).await;
        b.start_worker(&last);
        b.wait_balanced(w).await;
    }
    summary("graceful handover", graceful);

    if std::env::var("GRASP_SYNC_BENCH_ROLLING").is_ok_and(|v| v == "0") {
        b.print_rss("RSS at the end", &controller, &idle);
        watch_task.abort();
        return;
    }
    // A rolling restart, as the StatefulSet controller does it: last pod first, each
    // stopped, started again under its name once it exited, and Ready (here: its relays
    // Live by it again) before the next. Every look compares the labels with the start.
    let labels = b.labels();
    relay.counters().reset_max();
    let mut moved = std::collections::BTreeSet::new();
    let mut back = Vec::new();
    let t = Instant::now();
    for i in (0..w).rev() {
        let name = pod(i);
        let stop = Instant::now();
        let status = b
            .workers
            .remove(&name)
            .expect("running")
            .proc
            .terminate(Duration::from_secs(60))
            .await;
        assert!(status.success(), "{name} exited with {status}");
        b.start_worker(&name);
        loop {
            for (k, v) in b.labels() {
                if labels.get(&k) != Some(&v) {
                    moved.insert(k);
                }
            }
            if b.all_live(None) {
                break;
            }
            assert!(
                stop.elapsed() < Duration::from_secs(600),
                "{name}'s relays not Live again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        back.push(stop.elapsed().as_secs_f64());
    }
    // A relay whose label never moved had one holder at a time (a pod's successor starts
    // only after it exited, having closed every session); the relay's own count of open
    // connections says the same from the other side: one per relay URL at most.
    println!(
        "rolling restart of {w} workers in {:.1?}: {} relays moved; at most {} connections open at once to the {n} relay URLs",
        t.elapsed(),
        moved.len(),
        relay
            .counters()
            .max_live_connections
            .load(std::sync::atomic::Ordering::SeqCst),
    );
    summary(
        "rolling restart, each pod's relays Live again after SIGTERM",
        back,
    );
    b.print_rss("RSS at the end", &controller, &idle);
    watch_task.abort();
}
