//! `grasp-sync demo`: the whole job on loopback with no network. An embedded local relay
//! with a GRASP-01-like acceptance policy, embedded source relays (one with NIP-77, one
//! without, and nostr-rs-relay when installed), a synthetic corpus with noise, standalone
//! mode syncing it — then a check that our relay holds exactly the expected events.

pub mod corpus;
pub mod policy;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nostr::{EventId, Filter};
use nostr_relay_builder::prelude::{
    LocalRelay, MemoryDatabase, MemoryDatabaseOptions, RateLimit, RelayBuilder,
};
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
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.extra == 0
    }
}

async fn embedded_relay(builder: RelayBuilder) -> Result<(LocalRelay, RelayUrl), DemoError> {
    let relay = LocalRelay::new(builder);
    relay
        .run()
        .await
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    let url = RelayUrl::parse(&relay.url().await.to_string())
        .map_err(|e| DemoError::Relay(e.to_string()))?;
    Ok((relay, url))
}

fn builder() -> RelayBuilder {
    RelayBuilder::default()
        .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .database(MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: true,
            max_events: Some(5_000_000),
        }))
        .rate_limit(RateLimit {
            max_reqs: 100_000,
            notes_per_minute: u32::MAX,
        })
        .max_filter_limit(5_000)
        .default_filter_limit(5_000)
}

/// Every event id the relay holds (paged, like the negentropy item read).
async fn local_ids(url: &RelayUrl) -> Result<BTreeSet<EventId>, DemoError> {
    let items = local_index::local_items(
        url,
        Filter::new(),
        5_000,
        &ConnectOptions::default(),
        Duration::from_secs(300),
    )
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
    let corpus = corpus::generate(&cfg);
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
    let start = Instant::now();
    let running = standalone::start(sopts).await?;
    let mut synced;
    loop {
        let have = local_ids(&local).await?;
        synced = have.intersection(&corpus.expected).count();
        say(format!(
            "[{:>5.1}s] synced {synced}/{} ({:.0}%)",
            start.elapsed().as_secs_f64(),
            corpus.expected.len(),
            100.0 * synced as f64 / corpus.expected.len().max(1) as f64
        ));
        if synced == corpus.expected.len() || start.elapsed() > opts.timeout {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let elapsed = start.elapsed();
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
    })
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
        let unsent = ["already-held", "refused-before", "gave_up", "quarantined"];
        let (sent, from_memory): (Vec<_>, Vec<_>) = self
            .outcomes
            .iter()
            .partition(|(k, _)| !unsent.contains(&k.as_str()));
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
