//! Historic sync of a large set from one remote relay into the local relay, by NIP-77
//! negentropy and by REQ/EOSE pagination: events/s, bytes received from the remote, peak RSS.
//!
//!     cargo bench --bench historic_sync            # 50,000 events
//!     GRASP_SYNC_BENCH_EVENTS=5000 cargo bench --bench historic_sync
//!
//! Both relays run in this process (nostr-relay-builder, in-memory), so the RSS figures
//! include them; the delta over the seeded baseline is what the sync itself added.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grasp_sync::nostr::filters::RepoScope;
use grasp_sync::nostr::{RelayUrl, RepoCoordinate};
use grasp_sync::worker::WorkerMetrics;
use grasp_sync::worker::publisher::{Publisher, PublisherConfig};
use grasp_sync::worker::session::{self, Resume, SessionConfig, SyncSet};
use nostr_relay_builder::prelude::*;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn relay(db: Arc<MemoryDatabase>) -> (LocalRelay, RelayUrl) {
    let builder = RelayBuilder::default()
        .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .database(db)
        .rate_limit(RateLimit {
            max_reqs: 100_000,
            notes_per_minute: u32::MAX,
        })
        .default_filter_limit(500)
        .max_filter_limit(5_000);
    let relay = LocalRelay::new(builder);
    relay.run().await.expect("relay");
    let url = RelayUrl::parse(&relay.url().await.to_string()).expect("url");
    (relay, url)
}

fn memory_db() -> Arc<MemoryDatabase> {
    Arc::new(MemoryDatabase::with_opts(MemoryDatabaseOptions {
        events: true,
        max_events: Some(2_000_000),
    }))
}

struct Corpus {
    scope: RepoScope,
    root: Event,
    events: Vec<Event>,
}

fn corpus(n: usize) -> Corpus {
    let owner = Keys::generate();
    let coord = RepoCoordinate::new(&owner.public_key().to_hex(), "bench").expect("coordinate");
    let scope = RepoScope::owned(coord.clone()).expect("scope");
    let root = EventBuilder::new(Kind::from(1621), "issue")
        .tag(Tag::custom(TagKind::custom("a"), [coord.to_string()]))
        .sign_with_keys(&owner)
        .expect("sign");
    let authors: Vec<Keys> = (0..50).map(|_| Keys::generate()).collect();
    let mut events = vec![root.clone()];
    for i in 0..n.saturating_sub(1) {
        let ev = EventBuilder::new(Kind::from(1111), format!("comment {i}"))
            .tag(Tag::custom(TagKind::custom("E"), [root.id.to_hex()]))
            .custom_created_at(Timestamp::from(1_700_000_000 + (i as u64 / 3)))
            .sign_with_keys(&authors[i % authors.len()])
            .expect("sign");
        events.push(ev);
    }
    Corpus {
        scope,
        root,
        events,
    }
}

async fn run(label: &str, corpus: &Corpus, negentropy: bool, local_share: f64) {
    let remote_db = memory_db();
    for e in &corpus.events {
        remote_db.save_event(e).await.expect("seed remote");
    }
    let local_db = memory_db();
    let present = (corpus.events.len() as f64 * local_share) as usize;
    for e in corpus.events.iter().skip(corpus.events.len() - present) {
        local_db.save_event(e).await.expect("seed local");
    }
    let (_remote, remote_url) = relay(remote_db).await;
    let (_local, local_url) = relay(local_db.clone()).await;
    let baseline = rss_kib("VmRSS:");

    let metrics = WorkerMetrics::default();
    let mut pc = PublisherConfig::new(local_url.clone());
    pc.max_in_flight = 512;
    pc.queue_capacity = 4096;
    let (publisher, _task) = Publisher::spawn(pc, metrics.publisher.clone());
    let config = SessionConfig {
        local_relay: Some(local_url.clone()),
        negentropy,
        page_limit: 5_000,
        ..SessionConfig::default()
    };
    let set = SyncSet {
        repos: [corpus.scope.clone()].into_iter().collect(),
        roots: [corpus.root.id].into_iter().collect(),
    };
    let start = Instant::now();
    let h = session::spawn(
        remote_url,
        set,
        Resume::fresh(),
        config,
        publisher.clone(),
        metrics.session.clone(),
    );
    let want = corpus.events.len();
    let mut rx = h.state();
    loop {
        let count = local_db.count(Filter::new()).await.expect("count");
        let s = rx.borrow_and_update().clone();
        if count >= want && s.phase == grasp_sync::crd::Phase::Live && s.events_pending == 0 {
            let secs = start.elapsed().as_secs_f64();
            let fetched = (want - present) as f64;
            println!(
                "{label:<28} events={want:>6} missing={:>6} time={secs:>6.2}s  {:>8.0} ev/s  remote_bytes={:>11}  ids_requested={:>6}  rss_delta={:>6} MiB  peak_rss={:>6} MiB",
                want - present,
                fetched / secs,
                s.bytes_received,
                s.negentropy_ids_requested,
                rss_kib("VmRSS:").saturating_sub(baseline) / 1024,
                rss_kib("VmHWM:") / 1024,
            );
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            println!("{label}: did not finish in 900 s (local has {count} of {want}; state {s:?})");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

fn main() {
    let n: usize = std::env::var("GRASP_SYNC_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let t = Instant::now();
        let corpus = corpus(n);
        println!(
            "corpus: {n} events signed in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        run("negentropy, local empty", &corpus, true, 0.0).await;
        run("REQ pagination, local empty", &corpus, false, 0.0).await;
        run("negentropy, local has 90%", &corpus, true, 0.9).await;
        run("REQ pagination, local 90%", &corpus, false, 0.9).await;
    });
}
