//! The fault-schedule test: from a seed, a corpus and a schedule of faults, run against the
//! real `grasp-sync standalone` binary, judged by an oracle.
//!
//! Each seed builds a small NIP-34 corpus (repositories with history on two sources), then
//! for a few seconds: announces more repositories to our relay (and some again, dropping a
//! source: what only that source holds becomes optional, and so does what hangs off such a
//! root), publishes live events on the
//! sources (some back-dated, on the NIP-77 source: late rebroadcasts), and injects faults —
//! connections dropped or silenced without FIN (a proxy in front of every relay), sources
//! down for a while, subscriptions closed by the relay (rate-limited, `error:`, unprefixed),
//! delivery delayed by a latency, a source that sends no EOSE, drops every connection after
//! a moment or refuses every REQ on policy grounds (`blocked:`) for a while, a per-connection
//! subscription cap refused with `CLOSED` or with a NOTICE naming no REQ, the local relay failing
//! transiently (`error:`, unprefixed), rate-limiting or restarting, in half the seeds holding
//! state events and PRs in a GRASP purgatory (`OK true "purgatory: …"`, served only once
//! git data arrives a moment later), and SIGKILL of the syncer followed by a restart from
//! its state file.
//!
//! Two checks:
//! - **during** the schedule, every cursor the syncer reports (polled from `/status`) must be
//!   honest: every expected event of a confirmed repository that its relay served before
//!   `cursor - δ` and that is dated before `cursor - resume overlap` is already on our relay
//!   (served, or accepted into its purgatory);
//! - **after** the schedule and a quiet period — with the full reconciliation pushed out of
//!   reach, because it is a safety net, not the mechanism — our relay holds exactly the
//!   expected set: nothing missing, nothing extra (noise and forgeries never arrive).
//!
//! A second test runs a subset in Kubernetes mode: a controller and two workers against a real
//! API server, any of them SIGKILLed and restarted, cursors read from the RelaySyncs' status.
//!
//! `scripts/test.sh` runs a fixed set of seeds. More: `GRASP_SYNC_FAULT_SEEDS=1..=300` (a
//! range, one seed `17`, or a list `4,17`); `GRASP_SYNC_FAULT_KUBE_SEEDS` likewise for the
//! Kubernetes mode. A failing seed names itself; run it alone to
//! reproduce (the schedule is a function of the seed; timing on the machine is not).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grasp_sync::crd::RelaySync;
use grasp_sync::modes::demo::corpus::{self, Corpus, CorpusConfig};
use grasp_sync::modes::demo::policy::GraspPolicy;
use grasp_sync::nostr::RelayUrl;
use grasp_sync::nostr::root_digest::RootDigest;
use grasp_sync::observability::http::StatusEntry;
use grasp_sync::testing::scripted_relay::{CapRefusal, Purgatory, Script, ScriptedRelay};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use nostr::{Event, EventBuilder, EventId, Keys, Kind, Tag, TagKind};
use nostr_relay_builder::prelude::LocalRelay;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::cluster::Cluster;
use support::fault_proxy::FaultProxy;
use support::procs::GraspSync;
use support::relays;

/// Repositories per seed, and how many of them are announced during the schedule.
const REPOS: usize = 6;
const LATE_REPOS: usize = 2;
/// The syncer's time constants, scaled down so a seed runs in seconds.
const PING: &str = "1s";
const PONG: &str = "1s";
const RESUME_OVERLAP_S: u64 = 3;
/// A cursor is checked only against events served at least this long before it (delivery
/// from the relay's acceptance to our read).
const DELTA_S: f64 = 1.0;
/// A repository a re-announcement no longer lists on a source leaves that source's spec
/// after this.
const GRACE: &str = "2s";
/// After the schedule, the expected set must be complete within this. The longest wait the
/// product may rightly take: the local relay failing one event seven times in a row (the
/// largest burst below) pauses it 0.5 s doubling to 32 s, about 64 s from its first failure
/// (seen at 60 s, seed 1077: the event was due 4 s after the deadline).
const QUIET_DEADLINE: Duration = Duration::from_secs(90);

const SOURCE_NIP77: usize = 0;
const SOURCE_SCRIPTED: usize = 1;

fn now_f() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn seeds(var: &str, default: &str) -> Vec<u64> {
    let spec = std::env::var(var).unwrap_or_else(|_| default.into());
    let spec = spec.trim();
    if let Some((a, b)) = spec.split_once("..") {
        let inclusive = b.starts_with('=');
        let a: u64 = a.parse().expect("seed range start");
        let b: u64 = b.trim_start_matches('=').parse().expect("seed range end");
        if inclusive {
            (a..=b).collect()
        } else {
            (a..b).collect()
        }
    } else if spec.contains(',') {
        spec.split(',')
            .map(|s| s.trim().parse().expect("seed"))
            .collect()
    } else {
        vec![spec.parse().expect("a seed, a range a..=b or a list a,b")]
    }
}

/// The two tests share two cores: one runs at a time, so neither's timing starves the other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_schedule_keeps_every_promise() {
    let _one = ONE_AT_A_TIME.lock().await;
    run_seeds(Mode::Standalone, seeds("GRASP_SYNC_FAULT_SEEDS", "1..=12")).await;
}

/// The subset in Kubernetes mode: a controller and two workers against a real API server;
/// SIGKILL hits any of them; cursors are read from the RelaySync objects' status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_schedule_in_kubernetes_mode_keeps_every_promise() {
    let _one = ONE_AT_A_TIME.lock().await;
    run_seeds(Mode::Kube, seeds("GRASP_SYNC_FAULT_KUBE_SEEDS", "1..=3")).await;
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Standalone,
    Kube,
}

/// The Kubernetes-mode processes (killed and restarted under these names).
const CONTROLLER: &str = "c0";
const KUBE_WORKERS: [&str; 2] = ["w0", "w1"];

async fn run_seeds(mode: Mode, seeds: Vec<u64>) {
    let start = Instant::now();
    let mut passed = 0;
    let mut failed = Vec::new();
    let var = match mode {
        Mode::Standalone => "GRASP_SYNC_FAULT_SEEDS",
        Mode::Kube => "GRASP_SYNC_FAULT_KUBE_SEEDS",
    };
    for seed in &seeds {
        let t = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("grasp-sync-faults-")
            .tempdir()
            .expect("temp dir");
        let world = World::start(*seed, dir.path().to_path_buf(), mode).await;
        match world.run().await {
            Ok(stats) => {
                passed += 1;
                eprintln!(
                    "{mode:?} seed {seed}: ok in {:.1}s ({stats})",
                    t.elapsed().as_secs_f64()
                );
            }
            Err(failure) => {
                eprintln!(
                    "{mode:?} seed {seed}: FAILED: {failure}\n\
                     process logs and state kept in {}\n\
                     reproduce: {var}={seed} cargo test --test fault_schedule -- --nocapture",
                    dir.keep().display()
                );
                failed.push(*seed);
            }
        }
    }
    eprintln!(
        "{mode:?}: {passed}/{} seeds passed in {:.1}s",
        seeds.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "failing seeds ({mode:?}): {failed:?} (details above)"
    );
}

/// What the oracle knows about one expected event.
#[derive(Clone)]
struct Known {
    kind: u16,
    created_at: u64,
    /// Repository coordinate it belongs to.
    repo: String,
    /// Its root, when it reaches us through the root (Layer 3).
    root: Option<EventId>,
    /// Sources holding it, and since when (unix seconds).
    on: Vec<(usize, f64)>,
}

struct World {
    seed: u64,
    rng: StdRng,
    dir: std::path::PathBuf,
    local: ScriptedRelay,
    /// Our relay's script between faults (its purgatory, if any).
    local_base: Script,
    /// Our relay's acceptance policy (users' announcements go through it directly).
    policy: Arc<GraspPolicy>,
    local_proxy: FaultProxy,
    _nip77: LocalRelay,
    nip77_url: RelayUrl,
    scripted: ScriptedRelay,
    /// The scripted source's standing script (its cap, its forgeries); faults vary it.
    scripted_base: Script,
    proxies: Vec<FaultProxy>,
    corpus: Corpus,
    known: HashMap<EventId, Known>,
    expected: BTreeSet<EventId>,
    /// Related events that may arrive or not: those only on a source their repository no
    /// longer lists (a re-announcement dropped it), and what hangs off such a root.
    optional: BTreeSet<EventId>,
    /// Sources each repository (coordinate) no longer lists.
    removed: HashMap<String, BTreeSet<usize>>,
    /// Identifier → coordinate of every repository in the corpus.
    coords: HashMap<String, String>,
    /// Announced on our relay so far (coordinates), and the roots published live.
    announced: Vec<String>,
    live_roots: Vec<(EventId, String)>,
    mode: Mode,
    /// Standalone: the syncer. Kubernetes mode: the controller and the workers.
    procs: BTreeMap<&'static str, GraspSync>,
    /// Kubernetes mode: the API server holding the RelaySyncs.
    cluster: Option<Cluster>,
    metrics_port: u16,
    service: String,
    kills: usize,
    faults: Vec<String>,
    cursor_checks: usize,
    /// The first dishonest cursor seen (the run goes on, to tell whether the event was
    /// late or lost).
    violation: Option<(EventId, String)>,
}

impl World {
    async fn start(seed: u64, dir: std::path::PathBuf, mode: Mode) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let cluster = match mode {
            Mode::Standalone => None,
            Mode::Kube => Some(Cluster::start(&format!("faults-{seed}")).await),
        };
        // In half the seeds our relay holds new state events and PRs in a purgatory until
        // their git data arrives (by itself, a moment later), as GRASP relays do.
        // Drawn apart, so a seed's schedule is the one it was before the purgatory existed.
        let mut draws = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let local_base = Script {
            purgatory: draws.random_bool(0.5).then(|| Purgatory {
                git_data_after: Some(Duration::from_millis(draws.random_range(200..3_000))),
                expiry: Duration::from_secs(3600),
                ..Purgatory::default()
            }),
            ..Script::default()
        };
        // In half the seeds the scripted source takes up each REQ a moment after it arrives
        // while it applies a CLOSE at once, as relays that handle a connection's messages
        // concurrently do (khatru): replacing live REQs must not open a gap there.
        let req_delay = draws
            .random_bool(0.5)
            .then(|| Duration::from_millis(draws.random_range(50..500)));
        // In half the seeds (drawn apart again) it takes up each REQ after a delay of its
        // own, so a later REQ can overtake an earlier one (khatru runs each message in its
        // own goroutine): a read must not go out before the live REQ covering its items is
        // in place.
        let req_jitter = draws
            .random_bool(0.5)
            .then(|| Duration::from_millis(draws.random_range(50..500)));
        let local = ScriptedRelay::start(local_base.clone())
            .await
            .expect("local relay");
        let local_proxy = FaultProxy::start(&local.url()).await;
        let service = local_proxy.host_port();
        let policy = Arc::new(GraspPolicy::new(service.clone()));
        let p = policy.clone();
        local.set_policy(Arc::new(move |e: &Event| p.decide(e)));

        let (nip77, nip77_url) = relays::local_relay(1_000_000).await;
        // The scripted source refuses REQs over a small cap in half the seeds, by CLOSED
        // (nostr-relay-builder) or by a NOTICE naming no REQ (nostr-rs-relay).
        let cap = rng.random_bool(0.5).then(|| rng.random_range(3..=6usize));
        let cap_refusal = if rng.random_bool(0.5) {
            CapRefusal::Closed
        } else {
            CapRefusal::Notice
        };
        let scripted = ScriptedRelay::start(Script {
            max_subscriptions: cap,
            cap_refusal,
            req_delay,
            req_jitter,
            ..Script::default()
        })
        .await
        .expect("scripted source");
        let proxies = vec![
            FaultProxy::start(&nip77_url).await,
            FaultProxy::start(&scripted.url()).await,
        ];
        let corpus = corpus::generate(&CorpusConfig {
            repos: REPOS,
            service: service.clone(),
            local_relay: local_proxy.url(),
            sources: proxies.iter().map(|p| p.url()).collect(),
            seed,
        });
        let scripted_base = Script {
            max_subscriptions: cap,
            cap_refusal,
            req_delay,
            req_jitter,
            raw_events: corpus.forged.clone(),
            ..Script::default()
        };
        scripted.set_script(scripted_base.clone());
        let mut world = World {
            seed,
            rng,
            dir,
            local,
            local_base,
            policy,
            local_proxy,
            _nip77: nip77,
            nip77_url,
            scripted,
            scripted_base,
            proxies,
            known: HashMap::new(),
            expected: corpus.expected.clone(),
            optional: BTreeSet::new(),
            removed: HashMap::new(),
            coords: HashMap::new(),
            announced: Vec::new(),
            live_roots: Vec::new(),
            corpus,
            mode,
            procs: BTreeMap::new(),
            cluster,
            metrics_port: 0,
            service,
            kills: 0,
            faults: Vec::new(),
            cursor_checks: 0,
            violation: None,
        };
        if let Some(cap) = cap {
            world
                .faults
                .push(format!("subscription cap {cap} refused by {cap_refusal:?}"));
        }
        if let Some(d) = req_delay {
            world
                .faults
                .push(format!("scripted source takes up each REQ {d:?} late"));
        }
        if let Some(d) = req_jitter {
            world.faults.push(format!(
                "scripted source takes up each REQ up to {d:?} late, out of order"
            ));
        }
        if let Some(p) = &world.local_base.purgatory {
            let wait = p.git_data_after;
            world.faults.push(format!(
                "our relay holds state and PRs in purgatory, git data after {wait:?}"
            ));
        }
        world.seed_history().await;
        world
    }

    /// Put the corpus' history on the sources and learn what the oracle needs about it.
    async fn seed_history(&mut self) {
        for a in &self.corpus.announcements {
            let d = a.tags.identifier().unwrap_or_default().to_string();
            self.coords
                .insert(d.clone(), format!("30617:{}:{d}", a.pubkey.to_hex()));
        }
        let t = now_f();
        let mut on_nip77 = Vec::new();
        let mut on_scripted = Vec::new();
        let placed: Vec<(Event, Vec<usize>, bool)> = self
            .corpus
            .events
            .iter()
            .map(|p| (p.event.clone(), p.on.clone(), true))
            .chain(
                self.corpus
                    .noise
                    .iter()
                    .map(|p| (p.event.clone(), p.on.clone(), false)),
            )
            .collect();
        for (event, on, related) in placed {
            if related && self.expected.contains(&event.id) {
                self.learn(&event, on.iter().map(|i| (*i, t)).collect());
            }
            if on.contains(&SOURCE_NIP77) {
                on_nip77.push(event.clone());
            }
            if on.contains(&SOURCE_SCRIPTED) {
                on_scripted.push(event);
            }
        }
        relays::publish(&self.nip77_url, &on_nip77).await;
        self.scripted.add(on_scripted);
        // The announcements the users made before we started.
        let early: Vec<Event> = self.corpus.announcements[..REPOS - LATE_REPOS].to_vec();
        for a in &early {
            self.learn(a, Vec::new());
        }
        let late: Vec<Event> = self.corpus.announcements[REPOS - LATE_REPOS..].to_vec();
        for a in &late {
            self.learn(a, Vec::new());
        }
        self.announce(&early);
        self.announced = early
            .iter()
            .map(|a| self.coords[a.tags.identifier().unwrap_or_default()].clone())
            .collect();
    }

    /// Record what the oracle needs about an expected event.
    fn learn(&mut self, e: &Event, on: Vec<(usize, f64)>) {
        let tag_value = |names: &[&str]| {
            e.tags.iter().find_map(|t| {
                let kind = t.kind().to_string();
                names
                    .contains(&kind.as_str())
                    .then(|| t.content().map(str::to_string))
                    .flatten()
            })
        };
        let (repo, root) = if e.kind == Kind::from(30617u16) {
            let d = e.tags.identifier().unwrap_or_default();
            (format!("30617:{}:{d}", e.pubkey.to_hex()), None)
        } else if e.kind == Kind::from(30618u16) {
            let d = e.tags.identifier().unwrap_or_default();
            (self.coords.get(d).cloned().unwrap_or_default(), None)
        } else if let Some(coord) = tag_value(&["a", "A"]).filter(|c| c.starts_with("30617:")) {
            (coord, None)
        } else if let Some(root) = tag_value(&["E", "e"]).and_then(|h| EventId::from_hex(&h).ok()) {
            let repo = self
                .known
                .get(&root)
                .map(|k| k.repo.clone())
                .unwrap_or_default();
            (repo, Some(root))
        } else {
            (String::new(), None)
        };
        let entry = self.known.entry(e.id).or_insert(Known {
            kind: e.kind.as_u16(),
            created_at: e.created_at.as_secs(),
            repo,
            root,
            on: Vec::new(),
        });
        entry.on.extend(on);
    }

    /// The syncer's time constants, scaled down (shared by standalone and worker).
    fn sync_flags(&self) -> Vec<String> {
        [
            "--local-relay",
            self.local_proxy.url().as_str(),
            "--status-interval",
            "200ms",
            "--ping-interval",
            PING,
            "--pong-timeout",
            PONG,
            "--resume-overlap",
            &format!("{RESUME_OVERLAP_S}s"),
            "--batch-timeout",
            "3s",
            "--batch-retry",
            "500ms",
            "--reconnect-delay",
            "200ms",
            "--rate-limit-cooldown",
            "2s",
            "--overflow-poll",
            "1s",
            "--reconcile-every",
            "1000h",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Start whatever is not running: the standalone syncer, or the controller and workers.
    fn spawn_missing(&mut self) {
        match self.mode {
            Mode::Standalone => {
                if !self.procs.contains_key("standalone") {
                    self.spawn("standalone");
                }
            }
            Mode::Kube => {
                for name in std::iter::once(CONTROLLER).chain(KUBE_WORKERS) {
                    if !self.procs.contains_key(name) {
                        self.spawn(name);
                    }
                }
            }
        }
    }

    fn spawn(&mut self, name: &'static str) {
        let proc = match self.mode {
            Mode::Standalone => {
                self.metrics_port = support::free_port();
                let mut args: Vec<String> = [
                    "standalone",
                    "--service-domain",
                    &self.service,
                    "--state-file",
                    &self.dir.join("state.json").to_string_lossy(),
                    "--metrics-addr",
                    &format!("127.0.0.1:{}", self.metrics_port),
                    "--allow",
                    "127.0.0.1",
                    // Every test relay shares the loopback host.
                    "--max-relays-per-host",
                    "100000",
                    "--grace",
                    GRACE,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(self.sync_flags());
                GraspSync::spawn(name, &self.dir, &args, &[])
            }
            Mode::Kube => {
                let cluster = self.cluster.as_ref().expect("a cluster in Kubernetes mode");
                let local = self.local_proxy.url().to_string();
                if name == CONTROLLER {
                    cluster.controller_logging_to(
                        &self.dir,
                        name,
                        &[
                            "--local-relay",
                            &local,
                            "--service-domain",
                            &self.service,
                            "--grace",
                            GRACE,
                        ],
                    )
                } else {
                    let flags = self.sync_flags();
                    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                    cluster.worker_logging_to(&self.dir, name, &flags)
                }
            }
        };
        self.procs.insert(name, proc);
    }

    async fn run(mut self) -> Result<String, String> {
        self.spawn_missing();
        let steps = self.rng.random_range(10..=20);
        let mut restore: Vec<(Instant, Restore)> = Vec::new();
        for _ in 0..steps {
            let pause = Duration::from_millis(self.rng.random_range(100..600));
            let until = Instant::now() + pause;
            while Instant::now() < until {
                self.check_cursors().await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let now = Instant::now();
            restore.retain(|(at, r)| {
                if *at <= now {
                    r.apply(&self);
                    false
                } else {
                    true
                }
            });
            if let Some(r) = self.step().await {
                restore.push(r);
            }
        }
        for (_, r) in restore.drain(..) {
            r.apply(&self);
        }
        // Late announcements that the schedule did not reach are made now.
        while self.announced.len() < REPOS {
            self.announce_next().await;
        }
        self.procs.retain(|_, p| p.running());
        self.spawn_missing();
        self.quiet().await
    }

    /// One schedule step: a change of the world or a fault.
    async fn step(&mut self) -> Option<(Instant, Restore)> {
        let roll = self.rng.random_range(0..100);
        let source = self.rng.random_range(0..2usize);
        let hold = Duration::from_millis(self.rng.random_range(300..2500));
        let at = Instant::now() + hold;
        match roll {
            0..=25 => {
                self.publish_live().await;
                None
            }
            26..=27 => {
                self.drop_source_from_a_repo(source);
                None
            }
            28..=35 => {
                if self.announced.len() < REPOS {
                    self.announce_next().await;
                }
                None
            }
            36..=39 => {
                // Within the oracle's δ: latency beyond it is what the resume overlap
                // (15 min in production) absorbs.
                let delay = Duration::from_millis(self.rng.random_range(50..=600));
                self.fault(format!(
                    "source {source} delivers {delay:?} late for {hold:?}"
                ));
                self.proxies[source].set_delay(delay);
                Some((at, Restore::Delay(source)))
            }
            40..=44 => {
                self.fault(format!("silence source {source}"));
                self.proxies[source].silence_connections();
                None
            }
            45..=51 => {
                self.fault(format!("drop source {source}"));
                self.proxies[source].drop_connections();
                None
            }
            52..=57 => {
                self.fault(format!("source {source} down {hold:?}"));
                self.proxies[source].set_down(true);
                Some((at, Restore::Source(source)))
            }
            58..=59 => {
                self.fault(format!("scripted source sends no EOSE for {hold:?}"));
                self.scripted.set_script(Script {
                    no_eose: true,
                    ..self.scripted_base.clone()
                });
                Some((at, Restore::Scripted))
            }
            60..=61 => {
                let every = Duration::from_millis(self.rng.random_range(200..1000));
                self.fault(format!(
                    "scripted source drops every connection after {every:?}, for {hold:?}"
                ));
                self.scripted.set_script(Script {
                    close_after: Some(every),
                    ..self.scripted_base.clone()
                });
                Some((at, Restore::Scripted))
            }
            62..=63 => {
                self.fault(format!(
                    "scripted source refuses every REQ (blocked:) for {hold:?}"
                ));
                self.scripted.set_script(Script {
                    closed_with: Some("blocked: not on this relay today".into()),
                    ..self.scripted_base.clone()
                });
                Some((at, Restore::Scripted))
            }
            64..=65 => {
                let reason = [
                    "rate-limited: slow down",
                    "error: shutting down subscription backend",
                    "subscription restarted",
                ][self.rng.random_range(0..3)];
                self.fault(format!("scripted source closes subscriptions: {reason}"));
                self.scripted.close_subscriptions(reason);
                None
            }
            66..=73 => {
                let n = self.rng.random_range(1..8);
                let text = ["error: database busy", "Database query failed: timeout"]
                    [self.rng.random_range(0..2)];
                self.fault(format!("local relay fails the next {n} events: {text}"));
                self.local.set_script(Script {
                    ok_failed_first: Some((n, text.to_string())),
                    ok_rate_limited_first: self.rng.random_range(0..4),
                    ..self.local_base.clone()
                });
                None
            }
            74..=81 => {
                self.fault(format!("local relay restarts, down {hold:?}"));
                self.local_proxy.set_down(true);
                Some((at, Restore::Local))
            }
            82..=89 => {
                self.fault("local relay silenced".into());
                self.local_proxy.silence_connections();
                None
            }
            _ => {
                let names: Vec<&'static str> = self.procs.keys().copied().collect();
                let victim = names[self.rng.random_range(0..names.len())];
                if let Some(p) = self.procs.remove(victim) {
                    self.kills += 1;
                    self.fault(format!("SIGKILL {victim}"));
                    p.kill();
                    tokio::time::sleep(Duration::from_millis(self.rng.random_range(0..500))).await;
                    self.spawn(victim);
                }
                None
            }
        }
    }

    fn fault(&mut self, what: String) {
        self.faults.push(what);
    }

    async fn announce_next(&mut self) {
        let a = self.corpus.announcements[self.announced.len()].clone();
        self.announce(std::slice::from_ref(&a));
        let d = a.tags.identifier().unwrap_or_default().to_string();
        self.announced.push(self.coords[&d].clone());
    }

    /// A user announces an announced repository again, no longer listing `source` (its
    /// other source stays): that source's spec loses the repository once the grace passes,
    /// and what only that source holds need not arrive any more.
    fn drop_source_from_a_repo(&mut self, source: usize) {
        let candidates: Vec<String> = self
            .announced
            .iter()
            .filter(|c| !self.removed.contains_key(*c))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return;
        }
        let coord = candidates[self.rng.random_range(0..candidates.len())].clone();
        let Some(i) =
            self.corpus.announcements.iter().position(|a| {
                self.coords.get(a.tags.identifier().unwrap_or_default()) == Some(&coord)
            })
        else {
            return;
        };
        let old = &self.corpus.announcements[i];
        let dropped = self.proxies[source].url().to_string();
        let mut builder = EventBuilder::new(Kind::from(30617u16), "");
        for t in old.tags.iter() {
            if t.kind().to_string() == "relays" {
                let kept: Vec<String> = t
                    .as_slice()
                    .iter()
                    .skip(1)
                    .filter(|u| **u != dropped)
                    .cloned()
                    .collect();
                builder = builder.tag(Tag::custom(TagKind::custom("relays"), kept));
            } else {
                builder = builder.tag(t.clone());
            }
        }
        let at = nostr::Timestamp::now()
            .as_secs()
            .max(old.created_at.as_secs() + 1);
        let again = builder
            .custom_created_at(nostr::Timestamp::from(at))
            .sign_with_keys(&self.corpus.owners[i])
            .expect("sign");
        self.fault(format!("{coord} announced again without source {source}"));
        self.removed
            .entry(coord.clone())
            .or_default()
            .insert(source);
        self.learn(&again, Vec::new());
        self.expected.insert(again.id);
        self.announce(std::slice::from_ref(&again));
        // Roots first: what hangs off a root that need not arrive need not arrive either.
        for roots_pass in [true, false] {
            let now_optional: Vec<EventId> = self
                .expected
                .iter()
                .filter(|id| self.known.get(id).is_some_and(|k| k.root.is_none()) == roots_pass)
                .filter(|id| self.need_not_arrive(id))
                .copied()
                .collect();
            for id in now_optional {
                self.expected.remove(&id);
                self.optional.insert(id);
            }
        }
    }

    /// What must be on our relay given what is: the expected set, and the optional events
    /// of an optional root that did arrive which a source still listed holds (once the root
    /// is ours, the syncer asks the listed sources for what hangs off it).
    fn required(&self, have: &BTreeSet<EventId>) -> BTreeSet<EventId> {
        let mut required = self.expected.clone();
        for id in &self.optional {
            let Some(k) = self.known.get(id) else {
                continue;
            };
            if !k.root.is_some_and(|r| have.contains(&r)) {
                continue;
            }
            let dropped = self.removed.get(&k.repo);
            if k.on
                .iter()
                .any(|(i, _)| dropped.is_none_or(|d| !d.contains(i)))
            {
                required.insert(*id);
            }
        }
        required
    }

    /// Held only by sources its repository no longer lists, or hanging off a root that is:
    /// the syncer learns roots from our relay, so it asks no source for the comments of a
    /// root that never reached it.
    fn need_not_arrive(&self, id: &EventId) -> bool {
        let Some(k) = self.known.get(id) else {
            return false;
        };
        if k.root.is_some_and(|r| self.optional.contains(&r)) {
            return true;
        }
        let Some(dropped) = self.removed.get(&k.repo) else {
            return false;
        };
        !k.on.is_empty() && k.on.iter().all(|(i, _)| dropped.contains(i))
    }

    /// Users announce repositories to our relay: through its policy, but not through the
    /// faults scripted for the syncer's connections (a harness publish must not time out).
    fn announce(&self, announcements: &[Event]) {
        for a in announcements {
            self.policy
                .decide(a)
                .expect("our relay accepts the corpus' announcements");
        }
        self.local.add(announcements.iter().cloned());
    }

    /// Publish a few live events on the sources: new issues, comments on roots published
    /// live, repo comments, noise; some back-dated on the NIP-77 source.
    async fn publish_live(&mut self) {
        let n = self.rng.random_range(1..=4);
        for _ in 0..n {
            let repo = self.announced[self.rng.random_range(0..self.announced.len())].clone();
            let keys = Keys::generate();
            let kind = self.rng.random_range(0..10);
            let (builder, related, root) = match kind {
                0..=2 => (
                    EventBuilder::new(Kind::from(1621u16), "a live issue")
                        .tag(tag("a", &repo))
                        .tag(tag("subject", "live")),
                    true,
                    None,
                ),
                3..=6 if !self.live_roots.is_empty() => {
                    let (root, _) =
                        self.live_roots[self.rng.random_range(0..self.live_roots.len())];
                    (
                        EventBuilder::new(Kind::from(1111u16), "a live comment")
                            .tag(tag("E", &root.to_hex()))
                            .tag(tag("K", "1621"))
                            .tag(tag("e", &root.to_hex()))
                            .tag(tag("k", "1621")),
                        true,
                        Some(root),
                    )
                }
                7 => (
                    EventBuilder::new(Kind::from(1111u16), "about the repo")
                        .tag(tag("A", &repo))
                        .tag(tag("K", "30617"))
                        .tag(tag("a", &repo))
                        .tag(tag("k", "30617")),
                    true,
                    None,
                ),
                8 => (
                    EventBuilder::new(Kind::TextNote, "unrelated chatter"),
                    false,
                    None,
                ),
                _ => (
                    EventBuilder::new(Kind::from(1111u16), "orphan")
                        .tag(tag("E", &EventId::all_zeros().to_hex())),
                    false,
                    None,
                ),
            };
            // Where: one or both sources; a late rebroadcast (dated well before now) only
            // on the NIP-77 source, where a reconciliation over the whole range finds it.
            let on: Vec<usize> = match self.rng.random_range(0..3) {
                0 => vec![SOURCE_NIP77],
                1 => vec![SOURCE_SCRIPTED],
                _ => vec![SOURCE_NIP77, SOURCE_SCRIPTED],
            };
            let backdate = on == [SOURCE_NIP77] && self.rng.random_bool(0.4);
            let created = if backdate {
                nostr::Timestamp::now().as_secs() - self.rng.random_range(3600..30 * 86_400)
            } else {
                nostr::Timestamp::now().as_secs()
            };
            let event = builder
                .custom_created_at(nostr::Timestamp::from(created))
                .sign_with_keys(&keys)
                .expect("sign");
            if on.contains(&SOURCE_NIP77) {
                relays::publish(&self.nip77_url, std::slice::from_ref(&event)).await;
            }
            if on.contains(&SOURCE_SCRIPTED) {
                self.scripted.add([event.clone()]);
            }
            let t = now_f();
            if related {
                self.learn(&event, on.iter().map(|i| (*i, t)).collect());
                if self.need_not_arrive(&event.id) {
                    self.optional.insert(event.id);
                } else {
                    self.expected.insert(event.id);
                }
                if event.kind == Kind::from(1621u16) {
                    self.live_roots.push((event.id, repo));
                }
            }
            let _ = root;
        }
    }

    /// Poll `/status` and check every confirmed cursor against what our relay holds.
    async fn check_cursors(&mut self) -> Result<(), String> {
        let Some(entries) = self.status().await else {
            return Ok(());
        };
        // Held in purgatory counts: our relay accepted it, and serves it once git data
        // arrives; the cursor is about what grasp-sync handed over.
        let have: BTreeSet<EventId> = self.local.accepted_ids().into_iter().collect();
        let sources: Vec<String> = self.proxies.iter().map(|p| p.url().to_string()).collect();
        for entry in entries {
            let Some(status) = entry.status else { continue };
            let (Some(cursor), Some(confirmed)) = (status.cursor, status.confirmed_generation)
            else {
                continue;
            };
            if confirmed != entry.generation {
                continue;
            }
            let Some(source) = sources.iter().position(|u| *u == entry.spec.url) else {
                continue;
            };
            self.cursor_checks += 1;
            let cursor = cursor as f64;
            let repos: BTreeSet<&String> = entry.spec.repos.iter().collect();
            // The roots the status vouches for: our candidates (root events of these repos
            // on our relay) in the buckets whose digest matches. A bucket where the worker's
            // set differs from ours vouches for nothing here, so this never over-claims.
            let candidates: BTreeSet<EventId> = self
                .known
                .iter()
                .filter(|(id, k)| {
                    [1617, 1618, 1621].contains(&k.kind)
                        && repos.contains(&k.repo)
                        && have.contains(id)
                })
                .map(|(id, _)| *id)
                .collect();
            let vouched = status
                .confirmed_roots_digest
                .as_deref()
                .and_then(RootDigest::from_hex)
                .map(|d| RootDigest::confirmed_among(&candidates, &[d]))
                .unwrap_or_default();
            for (id, k) in &self.known {
                if !repos.contains(&k.repo) || have.contains(id) || self.optional.contains(id) {
                    continue;
                }
                let Some((_, served)) = k.on.iter().find(|(i, _)| *i == source) else {
                    continue;
                };
                if served + DELTA_S > cursor || (k.created_at + RESUME_OVERLAP_S) as f64 >= cursor {
                    continue;
                }
                if let Some(root) = k.root
                    && !vouched.contains(&root)
                {
                    continue;
                }
                if self.violation.is_some() {
                    continue;
                }
                self.violation = Some((
                    *id,
                    format!(
                        "cursor of {} is ahead of the truth: cursor {cursor} (phase {:?}) but event {id} \
                     (kind {}, created {}, served there since {served:.1}, repo {}, root {:?}) is not on our \
                     relay; faults so far: {:?}\n{}",
                        entry.spec.url,
                        status.phase,
                        k.kind,
                        k.created_at,
                        k.repo,
                        k.root,
                        self.faults,
                        self.log_tail()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn status(&mut self) -> Option<Vec<StatusEntry>> {
        if let Some(cluster) = &self.cluster {
            let api = Api::<RelaySync>::namespaced(cluster.admin.clone(), &cluster.ns);
            let params = ListParams::default();
            let objects = tokio::time::timeout(Duration::from_secs(2), api.list(&params))
                .await
                .ok()?
                .ok()?;
            return Some(
                objects
                    .items
                    .into_iter()
                    .map(|o| StatusEntry {
                        name: o.name_any(),
                        generation: o.metadata.generation.unwrap_or(0),
                        spec: o.spec,
                        status: o.status,
                    })
                    .collect(),
            );
        }
        let url = format!("http://127.0.0.1:{}/status", self.metrics_port);
        let resp = tokio::time::timeout(Duration::from_secs(2), reqwest::get(&url))
            .await
            .ok()?
            .ok()?;
        let body = resp.bytes().await.ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// After the schedule: every expected event arrives, then nothing else does.
    async fn quiet(mut self) -> Result<String, String> {
        let start = Instant::now();
        loop {
            self.check_cursors().await?;
            let have: BTreeSet<EventId> = self.local.ids().into_iter().collect();
            let required = self.required(&have);
            if have.is_superset(&required) {
                break;
            }
            if start.elapsed() > QUIET_DEADLINE {
                let missing: Vec<_> = required.difference(&have).collect();
                let detail: Vec<String> = missing
                    .iter()
                    .take(10)
                    .map(|id| match self.known.get(id) {
                        Some(k) => format!(
                            "{id} (kind {}, created {}, on {:?}, repo {}, root {:?})",
                            k.kind, k.created_at, k.on, k.repo, k.root
                        ),
                        None => id.to_string(),
                    })
                    .collect();
                return Err(format!(
                    "{} of {} expected events missing {QUIET_DEADLINE:?} after the schedule: {detail:?}\n\
                     faults: {:?}\n{}",
                    missing.len(),
                    self.expected.len(),
                    self.faults,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Some((id, v)) = self.violation.take() {
            let have: BTreeSet<EventId> = self.local.ids().into_iter().collect();
            let fate = if have.contains(&id) {
                "arrived later"
            } else {
                "never arrived"
            };
            return Err(format!("{v}\n(that event {fate})"));
        }
        // Give anything that must not arrive its chance to.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.check_cursors().await?;
        let have: BTreeSet<EventId> = self.local.ids().into_iter().collect();
        let extra: Vec<_> = have
            .iter()
            .filter(|id| !self.expected.contains(id) && !self.optional.contains(id))
            .collect();
        if !extra.is_empty() {
            return Err(format!(
                "{} unexpected events on our relay: {:?}\nfaults: {:?}",
                extra.len(),
                extra.iter().take(10).collect::<Vec<_>>(),
                self.faults
            ));
        }
        Ok(format!(
            "{} events (+{} optional), {} faults, {} kills, {} cursor checks, {} purgatory answers ({:?})",
            self.expected.len(),
            self.optional.len(),
            self.faults.len(),
            self.kills,
            self.cursor_checks,
            self.local
                .counters()
                .purgatory_answers
                .load(std::sync::atomic::Ordering::SeqCst),
            self.local_base.purgatory.as_ref().map(|p| p.git_data_after)
        ))
    }

    fn log_tail(&self) -> String {
        let _ = self.seed;
        self.procs
            .values()
            .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A fault that ends after a while.
enum Restore {
    Source(usize),
    Local,
    Scripted,
    Delay(usize),
}

impl Restore {
    fn apply(&self, w: &World) {
        match self {
            Restore::Source(i) => w.proxies[*i].set_down(false),
            Restore::Local => w.local_proxy.set_down(false),
            Restore::Scripted => w.scripted.set_script(w.scripted_base.clone()),
            Restore::Delay(i) => w.proxies[*i].set_delay(Duration::ZERO),
        }
    }
}

fn tag(name: &str, value: &str) -> Tag {
    Tag::custom(TagKind::custom(name), [value.to_string()])
}
