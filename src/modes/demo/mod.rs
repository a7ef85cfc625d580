//! `grasp-sync demo`: the whole job on loopback with no network. An embedded local relay
//! with a GRASP-01-like acceptance policy, embedded source relays (one with NIP-77, one
//! without, and nostr-rs-relay when installed), a synthetic corpus with noise, standalone
//! mode syncing it — then a check that our relay holds exactly the expected events.

pub mod corpus;
pub mod policy;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nostr::{EventId, Filter};
use nostr_lmdb::NostrLMDB;
use nostr_relay_builder::prelude::{LocalRelay, RateLimit, RelayBuilder};
use thiserror::Error;

use crate::modes::standalone::{self, StandaloneOptions};
use crate::nostr::RelayUrl;
use crate::relay::address_policy::AddressPolicy;
use crate::relay::connection::ConnectOptions;
use crate::relay::local_index;
use crate::store::RelaySyncStore;
use crate::testing::nostr_rs_relay;
use crate::testing::scripted_relay::{Script, ScriptedRelay};
use crate::worker::publisher;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub repos: usize,
    pub timeout: Duration,
    /// nostr-rs-relay binary to use as a third source; `None` = look for one.
    pub nostr_rs_relay: Option<PathBuf>,
    /// The local relay at nostr-relay-builder's stock ingress limits (60 events a minute and
    /// 500 REQs per connection) instead of limits raised out of the way.
    pub stock_limits: bool,
    /// Print progress to stderr.
    pub progress: bool,
    pub seed: u64,
    /// Sessions' full reconciliation period (`--reconcile-every`); `None`: the product's.
    pub reconcile_every: Option<Duration>,
    /// Once the sync is complete, keep running this long and count what is sent to the
    /// local relay meanwhile (an idle reconciliation's cost, with `reconcile_every` shorter).
    pub idle_window: Option<Duration>,
}

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("starting an embedded relay: {0}")]
    Relay(String),
    #[error("starting standalone mode: {0}")]
    Standalone(#[from] standalone::StandaloneError),
    #[error("reading the local relay: {0}")]
    Read(String),
}

/// Sets its flag when dropped.
struct StopWhenDropped(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopWhenDropped {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct RelayLine {
    pub url: String,
    pub kind: &'static str,
    pub phase: String,
    pub published: u64,
}

#[derive(Debug, Clone)]
pub struct DemoReport {
    pub repos: usize,
    pub expected: usize,
    pub synced: usize,
    pub missing: usize,
    pub extra: usize,
    pub noise_events: usize,
    pub forged_events: usize,
    pub elapsed: Duration,
    pub relays: Vec<RelayLine>,
    /// What the publisher's answers were, by outcome (`grasp_sync_publish_outcomes_total`):
    /// sends the local relay answered, and copies answered without a send.
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// Most publisher connections to the local relay open at once (sampled every 100 ms).
    pub peak_connections: i64,
    /// Copies from remotes that skipped the signature check: an identical copy passed it
    /// (`grasp_sync_signature_checks_skipped_total`).
    pub signatures_skipped: u64,
    /// What the publisher's answers were during the idle window, by outcome, and the window.
    pub idle: Option<(std::collections::BTreeMap<String, u64>, Duration)>,
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.extra == 0
    }

    /// Sends the local relay answered.
    pub fn sends(&self) -> u64 {
        sends(&self.outcomes)
    }

    /// Sends the local relay answered during the idle window.
    pub fn idle_sends(&self) -> Option<u64> {
        self.idle.as_ref().map(|(o, _)| sends(o))
    }

    /// Copies answered without a send (from what the relay said before), or given up.
    pub fn unsent(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| UNSENT.contains(&k.as_str()))
            .map(|(_, n)| *n)
            .sum()
    }
}

/// An embedded relay, and the directory of its store (removed when this is dropped).
struct Embedded {
    _relay: LocalRelay,
    _store: tempfile::TempDir,
}

async fn embedded_relay(builder: RelayBuilder) -> Result<(Embedded, RelayUrl), DemoError> {
    // Stored as a real GRASP relay stores them (ngit-grasp: nostr-relay-builder on LMDB,
    // indexed by tag). The in-memory store scans every event for each tag filter, so at
    // 5,000 repos the test bed's own queries were most of the demo's CPU and the numbers
    // measured the store, not the sync.
    let store = store_dir()?;
    let db = NostrLMDB::open(store.path()).map_err(|e| DemoError::Relay(format!("store: {e}")))?;
    let relay = LocalRelay::new(builder.database(db));
    relay
        .run()
        .await
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let url = RelayUrl::parse(&relay.url().await.to_string())
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    Ok((
        Embedded {
            _relay: relay,
            _store: store,
        },
        url,
    ))
}

/// How the demo's relay stores are named: after the process, so what a killed demo left
/// behind can be told apart.
pub fn store_prefix(pid: u32) -> String {
    format!("grasp-sync-demo-relay-{pid}-")
}

/// A directory for one relay's store: memory-backed `/dev/shm` where there is one, else the
/// system's temp directory. LMDB syncs each write to disk, and on a disk whose sync costs
/// half a millisecond a 1,000-repo demo took 90 s instead of 15 s: the demo measures the
/// sync, not the disk.
fn store_dir() -> Result<tempfile::TempDir, DemoError> {
    let prefix = store_prefix(std::process::id());
    let mut named = tempfile::Builder::new();
    named.prefix(&prefix);
    named
        .tempdir_in("/dev/shm")
        .or_else(|_| named.tempdir())
        .map_err(|e| DemoError::Relay(format!("store directory: {e}")))
}

fn builder() -> RelayBuilder {
    RelayBuilder::default()
        .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .rate_limit(RateLimit {
            max_reqs: 100_000,
            notes_per_minute: u32::MAX,
        })
        .max_filter_limit(5_000)
        .default_filter_limit(5_000)
}

/// Which of `ids` the relay holds: one query by id, for the few a whole read found missing.
async fn held_among(
    url: &RelayUrl,
    ids: &BTreeSet<EventId>,
) -> Result<BTreeSet<EventId>, DemoError> {
    ids_for(
        url,
        Filter::new().ids(ids.iter().copied()),
        Duration::from_secs(60),
    )
    .await
}

/// Every event id the relay holds (paged, like the negentropy item read).
async fn local_ids(url: &RelayUrl) -> Result<BTreeSet<EventId>, DemoError> {
    ids_for(url, Filter::new(), Duration::from_secs(300)).await
}

async fn ids_for(
    url: &RelayUrl,
    filter: Filter,
    timeout: Duration,
) -> Result<BTreeSet<EventId>, DemoError> {
    let items = local_index::local_items(url, filter, 5_000, &ConnectOptions::default(), timeout)
        .await
        .map_err(DemoError::Read)?;
    Ok(items.into_iter().map(|(id, _)| id).collect())
}

pub async fn run(opts: DemoOptions) -> Result<DemoReport, DemoError> {
    crate::relay::tls::install_default_crypto();
    let say = |msg: String| {
        if opts.progress {
            eprintln!("{msg}");
        }
    };
    // Our relay, with the acceptance policy of a GRASP relay.
    let local_probe = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let service = format!("127.0.0.1:{}", local_probe.port());
    let mut local_builder = builder()
        .port(local_probe.port())
        .write_policy(policy::GraspPolicy::new(service.clone()));
    if opts.stock_limits {
        local_builder = local_builder.rate_limit(RateLimit::default());
    }
    let (_local, local) = embedded_relay(local_builder).await?;

    // Sources.
    let (_s1, s1) = embedded_relay(builder()).await?;
    let mut sources = vec![(s1.clone(), "nostr-relay-builder (NIP-77)")];
    let mut _nrr = None;
    if let Some(bin) = nostr_rs_relay::find_binary(opts.nostr_rs_relay.as_deref()) {
        let relay = nostr_rs_relay::NostrRsRelay::start(&bin)
            .await
            .map_err(|e| DemoError::Relay(format!("nostr-rs-relay: {e}")))?;
        sources.push((relay.url(), "nostr-rs-relay (no NIP-77)"));
        _nrr = Some(relay);
    }
    let scripted = ScriptedRelay::start(Script::default())
        .await
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    sources.push((scripted.url(), "grasp-sync scripted (no NIP-77, forgeries)"));

    let cfg = corpus::CorpusConfig {
        repos: opts.repos,
        service: service.clone(),
        local_relay: local.clone(),
        sources: sources.iter().map(|(u, _)| u.clone()).collect(),
        seed: opts.seed,
    };
    let t = Instant::now();
    // Off the runtime, so an interrupt is heard while it signs; stopped when this run is
    // dropped (interrupted), so the process need not wait for it either.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _stop_when_dropped = StopWhenDropped(stop.clone());
    let corpus = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::task::spawn_blocking(move || corpus::generate_until(&cfg, &stop))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| DemoError::Relay("generating the corpus was cut short".into()))?
    };
    say(format!(
        "corpus: {} repos, {} expected events, {} noise, {} forged ({:.1}s)",
        opts.repos,
        corpus.expected.len(),
        corpus.noise.len(),
        corpus.forged.len(),
        t.elapsed().as_secs_f64()
    ));

    // Users announce their repositories to our relay; everything else sits on the sources.
    publisher::publish_all(&local, corpus.announcements.iter().cloned()).await;
    for (i, (url, _)) in sources.iter().enumerate() {
        let on_i = corpus
            .events
            .iter()
            .chain(corpus.noise.iter())
            .filter(|p| p.on.contains(&i))
            .map(|p| p.event.clone());
        if *url == scripted.url() {
            scripted.add(on_i);
        } else {
            publisher::publish_all(url, on_i).await;
        }
    }
    scripted.set_script(Script {
        raw_events: corpus.forged.clone(),
        ..Script::default()
    });
    say(format!(
        "sources seeded: {}",
        sources
            .iter()
            .map(|(u, k)| format!("{u} [{k}]"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // Sync.
    let mut sopts = StandaloneOptions::new(local.clone(), service.clone());
    sopts.addresses = AddressPolicy::allow_all();
    // Every source shares the loopback host.
    sopts.limits.caps.per_host = usize::MAX;
    sopts.http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    sopts.status_interval = Duration::from_millis(500);
    sopts.session.nip11_timeout = Duration::from_secs(1);
    if let Some(p) = opts.reconcile_every {
        sopts.session.reconcile_every = (p / 24 * 23, p / 24 * 25);
    }
    // What users announced straight to our relay is there before the sync starts.
    let before = local_ids(&local)
        .await?
        .intersection(&corpus.expected)
        .count();
    let start = Instant::now();
    let running = standalone::start(sopts).await?;
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampler = {
        let registry = running.metrics.registry.clone();
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                let now = gauge(&registry, "grasp_sync_publisher_connections");
                peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (synced, elapsed) = wait_complete(
        &local,
        &corpus.expected,
        before,
        &running.metrics.registry,
        start,
        opts.timeout,
        &say,
    )
    .await?;
    let idle = match opts.idle_window {
        Some(window) if synced == corpus.expected.len() => {
            let before = publish_outcomes(&running.metrics.registry);
            say(format!("complete; watching sends for {window:?}"));
            tokio::time::sleep(window).await;
            let mut during = publish_outcomes(&running.metrics.registry);
            for (k, n) in during.iter_mut() {
                *n -= before.get(k).copied().unwrap_or(0);
            }
            during.retain(|_, n| *n > 0);
            Some((during, window))
        }
        _ => None,
    };
    sampler.abort();
    // Let anything that should not arrive have its chance to, then compare exactly.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let have = local_ids(&local).await?;
    let missing = corpus.expected.difference(&have).count();
    let extra = have.difference(&corpus.expected).count();

    let objects = running.store.list().await.unwrap_or_default();
    let relays = sources
        .iter()
        .map(|(url, kind)| {
            let mine: Vec<_> = objects
                .iter()
                .filter(|o| o.spec.url == url.as_str())
                .collect();
            RelayLine {
                url: url.to_string(),
                kind,
                phase: mine
                    .first()
                    .and_then(|o| o.status.as_ref().and_then(|s| s.phase))
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "-".into()),
                // Split objects of one relay share its session and report the same count.
                published: mine
                    .iter()
                    .filter_map(|o| o.status.as_ref().and_then(|s| s.events_published))
                    .max()
                    .unwrap_or(0),
            }
        })
        .collect();
    let outcomes = publish_outcomes(&running.metrics.registry);
    let signatures_skipped = counter(
        &running.metrics.registry,
        "grasp_sync_signature_checks_skipped_total",
    );
    running.stop().await;
    Ok(DemoReport {
        repos: opts.repos,
        expected: corpus.expected.len(),
        synced: have.intersection(&corpus.expected).count(),
        missing,
        extra,
        noise_events: corpus.noise.len(),
        forged_events: corpus.forged.len(),
        elapsed,
        relays,
        outcomes,
        peak_connections: peak.load(std::sync::atomic::Ordering::Relaxed),
        signatures_skipped,
        idle,
    })
}

/// Waits until our relay holds every expected event or `timeout` passes; returns how many it
/// holds and when it first held them all (else the time waited). Progress is estimated
/// from the publisher's `accepted` answers on top of the `before` already held, sampled
/// every 100 ms; only an estimate of completion is checked by reading the whole relay,
/// whose cost at 100,000 events (seconds of both cores) would otherwise swamp what it
/// measures. In case the estimate undercounts, the relay is also read once answers have
/// stopped coming for a while (and ten times the last read's cost has passed). A read that
/// finds only a few missing hands over to asking for those by id until they are all there.
async fn wait_complete(
    local: &RelayUrl,
    expected: &BTreeSet<EventId>,
    before: usize,
    registry: &prometheus::Registry,
    start: Instant,
    timeout: Duration,
    say: &impl Fn(String),
) -> Result<(usize, Duration), DemoError> {
    const SAMPLE: Duration = Duration::from_millis(100);
    const PROGRESS: Duration = Duration::from_secs(2);
    // With no answer for this long the estimate may never get there (an event that reached
    // the relay by another path is answered `duplicate`): read the relay to know.
    const STALLED: Duration = Duration::from_secs(5);
    // A whole read that finds at most this many missing hands over to asking for them by id.
    const FEW: usize = 1_000;
    const BY_ID_EVERY: Duration = Duration::from_millis(500);
    let want = expected.len();
    let percent = |n: usize| 100.0 * n as f64 / want.max(1) as f64;
    let mut said = Instant::now();
    let mut read = Instant::now();
    let mut read_cost = Duration::ZERO;
    // The estimate a read last found short: read again only once it has grown.
    let mut short_at = None;
    // What the last whole read found missing, when few (answers still due): asked for by id
    // instead of waiting ten reads' cost for the next whole read.
    let mut missing: Option<BTreeSet<EventId>> = None;
    let mut asked = Instant::now();
    let (mut last_estimate, mut grew) = (0, Instant::now());
    loop {
        let accepted = publish_outcomes(registry)
            .get("accepted")
            .copied()
            .unwrap_or(0);
        let estimate = before.saturating_add(usize::try_from(accepted).unwrap_or(usize::MAX));
        if estimate != last_estimate {
            (last_estimate, grew) = (estimate, Instant::now());
        }
        // The moment the answers said complete, not when a read confirmed it.
        let at = start.elapsed();
        let timed_out = at > timeout;
        if let Some(m) = missing.as_mut()
            && !timed_out
            && asked.elapsed() >= BY_ID_EVERY
        {
            asked = Instant::now();
            let held = held_among(local, m).await?;
            m.retain(|id| !held.contains(id));
            if m.is_empty() {
                say(format!(
                    "[{:>5.1}s] synced {want}/{want} (100%)",
                    at.as_secs_f64()
                ));
                return Ok((want, at));
            }
        }
        // After a read found the estimate short (it counts what it should not, or more
        // answers are due), another waits for it to grow and for ten times that read's cost.
        let says_complete = missing.is_none()
            && estimate >= want
            && short_at.is_none_or(|s| estimate > s && read.elapsed() >= read_cost * 10);
        // Not while answers come in: a whole read costs the relay and both cores seconds at
        // 5,000 repos, and read every 30 s they slowed the very sync they timed.
        let fallback = missing.is_none()
            && grew.elapsed() >= STALLED
            && read.elapsed() >= STALLED.max(read_cost * 10);
        if says_complete || fallback || timed_out {
            let began = Instant::now();
            let have = local_ids(local).await?;
            let synced = have.intersection(expected).count();
            read_cost = began.elapsed();
            read = Instant::now();
            if synced == want || timed_out {
                say(format!(
                    "[{:>5.1}s] synced {synced}/{want} ({:.0}%)",
                    at.as_secs_f64(),
                    percent(synced)
                ));
                return Ok((synced, at));
            }
            short_at = Some(estimate);
            if want - synced <= FEW {
                missing = Some(expected.difference(&have).copied().collect());
            }
        }
        if said.elapsed() >= PROGRESS {
            said = Instant::now();
            let shown = estimate.min(want);
            say(format!(
                "[{:>5.1}s] synced ~{shown}/{want} ({:.0}%)",
                at.as_secs_f64(),
                percent(shown)
            ));
        }
        tokio::time::sleep(SAMPLE).await;
    }
}

/// Copies answered without a send: from what the relay said before, or given up.
const UNSENT: [&str; 5] = [
    "already-held",
    "in-purgatory",
    "refused-before",
    "gave_up",
    "quarantined",
];

/// Sends the local relay answered, from publisher outcomes.
fn sends(outcomes: &std::collections::BTreeMap<String, u64>) -> u64 {
    outcomes
        .iter()
        .filter(|(k, _)| !UNSENT.contains(&k.as_str()))
        .map(|(_, n)| *n)
        .sum()
}

/// How deep each event sits below what the demo's GRASP-like policy takes on its own:
/// announcements and state 0, an event tagging a repository 1, an event that refers only to
/// other events one more than the shallowest of them. Events referring to nothing here are
/// left out.
fn reference_depths(events: &[nostr::Event]) -> std::collections::HashMap<EventId, usize> {
    use nostr::TagKind;
    let mut depth = std::collections::HashMap::new();
    for e in events {
        let k = e.kind.as_u16();
        let tags_repo = e.tags.iter().any(|t| {
            t.content().is_some() && (t.kind() == TagKind::a() || t.kind() == TagKind::custom("A"))
        });
        if k == 30617 || k == 30618 {
            depth.insert(e.id, 0);
        } else if tags_repo {
            depth.insert(e.id, 1);
        }
    }
    loop {
        let mut changed = false;
        for e in events {
            if depth.contains_key(&e.id) {
                continue;
            }
            let parent = e
                .tags
                .iter()
                .filter(|t| [TagKind::e(), TagKind::custom("E"), TagKind::q()].contains(&t.kind()))
                .filter_map(|t| EventId::from_hex(t.content()?).ok())
                .filter_map(|id| depth.get(&id).copied())
                .min();
            if let Some(d) = parent {
                depth.insert(e.id, d + 1);
                changed = true;
            }
        }
        if !changed {
            return depth;
        }
    }
}

/// The value of an unlabelled metric in `registry`, read by `value` (0 if absent).
fn metric(
    registry: &prometheus::Registry,
    name: &str,
    value: fn(&prometheus::proto::Metric) -> f64,
) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(value)
        .next()
        .unwrap_or(0.0)
}

fn gauge(registry: &prometheus::Registry, name: &str) -> i64 {
    metric(registry, name, |m| m.get_gauge().value()) as i64
}

fn counter(registry: &prometheus::Registry, name: &str) -> u64 {
    metric(registry, name, |m| m.get_counter().value()) as u64
}

/// The ceiling an over-the-wire syncer can approach: the expected set of the same corpus
/// (`opts.repos`, `opts.seed`) published straight into an identical local relay by a plain
/// publisher over `connections` connections — the repositories announced first, as users do
/// in the demo, then roots before what refers to them. Returns the events published and the
/// time from the first send until the relay answered the last; an error if the relay did not
/// take them all.
pub async fn direct_publish(
    opts: &DemoOptions,
    connections: usize,
) -> Result<(usize, Duration), DemoError> {
    crate::relay::tls::install_default_crypto();
    let probe = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let service = format!("127.0.0.1:{}", probe.port());
    let mut local_builder = builder()
        .port(probe.port())
        .write_policy(policy::GraspPolicy::new(service.clone()));
    if opts.stock_limits {
        local_builder = local_builder.rate_limit(RateLimit::default());
    }
    let (_local, local) = embedded_relay(local_builder).await?;
    // The sources are only named by the announcements here.
    let sources = (0..3)
        .map(|i| RelayUrl::parse(&format!("ws://127.0.0.{}:7777", i + 2)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let corpus = corpus::generate(&corpus::CorpusConfig {
        repos: opts.repos,
        service,
        local_relay: local.clone(),
        sources,
        seed: opts.seed,
    });
    publisher::publish_all(&local, corpus.announcements.iter().cloned()).await;
    let announced: BTreeSet<EventId> = corpus.announcements.iter().map(|e| e.id).collect();
    let events: Vec<nostr::Event> = corpus
        .events
        .iter()
        .filter(|p| corpus.expected.contains(&p.event.id) && !announced.contains(&p.event.id))
        .map(|p| p.event.clone())
        .collect();
    // The relay takes only events that refer to what it took: announcements and state first,
    // then each level after the one it refers to, once the relay has answered for all of that
    // one (the connections do not keep order between them).
    let depth = reference_depths(&events);
    let mut levels: std::collections::BTreeMap<usize, Vec<nostr::Event>> = Default::default();
    for e in events {
        let d = depth.get(&e.id).copied().unwrap_or(usize::MAX);
        levels.entry(d).or_default().push(e);
    }
    let mut config = publisher::PublisherConfig::new(local.clone());
    config.connections = connections.max(1);
    config.max_connections = connections.max(1);
    let (p, _task) =
        publisher::Publisher::spawn(config, publisher::metrics::PublisherMetrics::default());
    let n = levels.values().map(Vec::len).sum();
    let t = Instant::now();
    for level in levels.into_values() {
        for e in level {
            if p.publish(e, None).await.is_err() {
                break;
            }
        }
        while p.stats().outstanding() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let elapsed = t.elapsed();
    let stats = p.stats();
    let took = stats.accepted.load(std::sync::atomic::Ordering::Relaxed)
        + stats.duplicate.load(std::sync::atomic::Ordering::Relaxed);
    if took < n as u64 {
        return Err(DemoError::Relay(format!(
            "the local relay took {took} of the {n} expected events published directly"
        )));
    }
    Ok((n, elapsed))
}

/// `grasp_sync_publish_outcomes_total` by outcome, the zeros left out.
fn publish_outcomes(registry: &prometheus::Registry) -> std::collections::BTreeMap<String, u64> {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "grasp_sync_publish_outcomes_total")
        .flat_map(|f| f.get_metric())
        .filter_map(|m| {
            let label = m.get_label().iter().find(|l| l.name() == "outcome")?;
            let n = m.get_counter().value() as u64;
            (n > 0).then(|| (label.value().to_string(), n))
        })
        .collect()
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "repos      {}", self.repos)?;
        writeln!(f, "expected   {}", self.expected)?;
        writeln!(f, "synced     {}", self.synced)?;
        writeln!(f, "missing    {}", self.missing)?;
        writeln!(
            f,
            "extra      {}  (noise offered: {}, forged: {})",
            self.extra, self.noise_events, self.forged_events
        )?;
        writeln!(
            f,
            "time       {:.2}s ({:.0} events/s)",
            self.elapsed.as_secs_f64(),
            self.synced as f64 / self.elapsed.as_secs_f64().max(0.001)
        )?;
        // Copies answered from what the relay said before, and what gave up, took no send.
        let (sent, from_memory): (Vec<_>, Vec<_>) = self
            .outcomes
            .iter()
            .partition(|(k, _)| !UNSENT.contains(&k.as_str()));
        let list = |v: &[(&String, &u64)]| {
            v.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "pushed     {} sends answered by our relay ({}); without a send: {}",
            sent.iter().map(|(_, n)| **n).sum::<u64>(),
            list(&sent),
            list(&from_memory)
        )?;
        writeln!(
            f,
            "connections {} at most, to the local relay",
            self.peak_connections
        )?;
        writeln!(
            f,
            "signatures {} copies skipped the check (an identical copy passed it)",
            self.signatures_skipped
        )?;
        if let Some((outcomes, window)) = &self.idle {
            writeln!(
                f,
                "idle       {} sends in the {window:?} after completion ({})",
                sends(outcomes),
                outcomes
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        writeln!(f, "relays:")?;
        for r in &self.relays {
            writeln!(
                f,
                "  {:<28} {:<44} phase {:<12} published {}",
                r.url, r.kind, r.phase, r.published
            )?;
        }
        write!(
            f,
            "result     {}",
            if self.ok() {
                "OK: exactly the expected set"
            } else {
                "MISMATCH"
            }
        )
    }
}
