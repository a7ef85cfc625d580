//! Worker memory under hostile relays: `grasp-sync standalone` (the release binary, in a
//! process of its own) syncs a corpus from 50 source relays into a local relay, twice — once
//! with every source polite, once with one source flooding 100,000 extra related events and
//! one never sending EOSE. The peak RSS of the grasp-sync process is measured in each run; the
//! bound (#12) is that the hostile run stays within 64 MiB of the polite one.
//!
//!     cargo bench --bench memory_bounds
//!     GRASP_SYNC_BENCH_FLOOD=20000 cargo bench --bench memory_bounds
//!
//! The relays run in this bench's process, so their memory is not in the figures.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grasp_sync::modes::demo::corpus::{self, CorpusConfig};
use grasp_sync::nostr::RelayUrl;
use grasp_sync::testing::scripted_relay::{Script, ScriptedRelay};
use grasp_sync::worker::publisher::publish_all;
use nostr::{EventBuilder, Kind, Tag, TagKind, Timestamp};
use nostr_relay_builder::prelude::*;

const SOURCES: usize = 50;
const LIMIT_MIB: f64 = 64.0;

/// `VmHWM` (peak) and `VmRSS` of `pid`, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

async fn local_relay() -> (LocalRelay, RelayUrl) {
    let builder = RelayBuilder::default()
        .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .database(Arc::new(MemoryDatabase::with_opts(MemoryDatabaseOptions {
            events: true,
            max_events: Some(2_000_000),
        })))
        .rate_limit(RateLimit {
            max_reqs: 100_000,
            notes_per_minute: u32::MAX,
        })
        .default_filter_limit(500)
        .max_filter_limit(5_000);
    let relay = LocalRelay::new(builder);
    relay.run().await.expect("local relay");
    let url = RelayUrl::parse(&relay.url().await.to_string()).expect("url");
    (relay, url)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `grasp_sync_publish_outcomes_total{outcome="accepted"}` from the child's /metrics.
async fn accepted(metrics: &str) -> u64 {
    let Ok(resp) = reqwest::get(metrics).await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("grasp_sync_publish_outcomes_total{outcome=\"accepted\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// The child's log, kept for a look when a run does not finish.
fn log_file(hostile: bool) -> Stdio {
    let path = std::env::temp_dir().join(format!(
        "memory_bounds-{}.log",
        if hostile { "hostile" } else { "polite" }
    ));
    std::fs::File::create(&path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

struct Run {
    peak_kib: u64,
    settled_kib: u64,
    secs: f64,
    accepted: u64,
}

impl Run {
    fn print(&self, label: &str, note: &str) {
        println!(
            "  {label} peak RSS {:6.1} MiB, {:6.1} MiB at the end; {} events in {:.1}s{note}",
            self.peak_kib as f64 / 1024.0,
            self.settled_kib as f64 / 1024.0,
            self.accepted,
            self.secs
        );
    }
}

async fn run(hostile: bool, flood: usize) -> Run {
    let (_local, local) = local_relay().await;
    let mut sources = Vec::new();
    for i in 0..SOURCES {
        let script = Script {
            no_eose: hostile && i == 1,
            ..Script::default()
        };
        sources.push(ScriptedRelay::start(script).await.expect("source relay"));
    }
    let urls: Vec<RelayUrl> = sources.iter().map(|s| s.url()).collect();
    // Our relay's own address is the service: announcements list it, and it is never a source.
    let service = local.authority_and_path().to_string();
    let c = corpus::generate(&CorpusConfig {
        repos: 200,
        service: service.clone(),
        local_relay: local.clone(),
        sources: urls.clone(),
        seed: 7,
    });
    for placed in &c.events {
        for i in &placed.on {
            sources[*i].add_silently([placed.event.clone()]);
        }
    }
    // Announcements reach our relay from their authors here, so grasp-sync finds them there.
    let announced: std::collections::BTreeSet<_> = c.announcements.iter().map(|a| a.id).collect();
    let mut want = c.expected.difference(&announced).count() as u64;
    if hostile {
        // Related events for a repository the flooding source (0) serves: valid, matching,
        // and far more than a page, a queue or a status write.
        let on_0 = c
            .announcements
            .iter()
            .find(|a| {
                a.tags.iter().any(|t| {
                    t.kind() == TagKind::custom("relays")
                        && t.as_slice().iter().any(|v| v == urls[0].as_str())
                })
            })
            .expect("a repository listing source 0");
        let d = on_0.tags.identifier().unwrap_or_default().to_string();
        let coord = format!("30617:{}:{d}", on_0.pubkey.to_hex());
        let keys = nostr::Keys::generate();
        let now = Timestamp::now().as_secs();
        let t = Instant::now();
        let events: Vec<_> = (0..flood)
            .map(|i| {
                EventBuilder::new(Kind::from(1111u16), format!("flood {i}"))
                    .tag(Tag::custom(TagKind::custom("a"), [coord.clone()]))
                    .custom_created_at(Timestamp::from(now - 86_400 + (i as u64 % 80_000)))
                    .sign_with_keys(&keys)
                    .expect("sign")
            })
            .collect();
        eprintln!(
            "  signed {flood} flood events in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        sources[0].add_silently(events);
        want += flood as u64;
    }
    publish_all(&local, c.announcements.iter().cloned()).await;

    let state = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_grasp-sync"))
        .args([
            "standalone",
            "--local-relay",
            local.as_str(),
            "--service-domain",
            &service,
            "--allow",
            "127.0.0.0/8",
            // Every source shares the loopback host.
            "--max-relays-per-host",
            "1000",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--state-file",
        ])
        .arg(state.path().join("state.json"))
        .env("GRASP_SYNC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file(hostile))
        .spawn()
        .expect("start grasp-sync");
    let pid = child.id();
    let started = Instant::now();
    let deadline = Duration::from_secs(600);
    let mut peak = 0;
    let mut got = 0;
    let mut last_report = Instant::now();
    while started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some((hwm, _)) = memory_kib(pid) {
            peak = peak.max(hwm);
        }
        got = accepted(&metrics).await;
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  {got}/{want} accepted, peak {} MiB", peak / 1024);
            last_report = Instant::now();
        }
        if got >= want {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Keep running a little: the never-EOSE source keeps its pages open meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (hwm, rss) = memory_kib(pid).unwrap_or((peak, 0));
    let _ = child.kill();
    let _ = child.wait();
    Run {
        peak_kib: peak.max(hwm),
        settled_kib: rss,
        secs,
        accepted: got,
    }
}

fn main() {
    let flood: usize = std::env::var("GRASP_SYNC_BENCH_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        grasp_sync::relay::tls::install_default_crypto();
        println!("memory_bounds: {SOURCES} source relays, 200 repositories");
        let polite = run(false, 0).await;
        polite.print("polite: ", "");
        let hostile = run(true, flood).await;
        hostile.print(
            "hostile:",
            &format!(" (one source floods {flood}, one never sends EOSE)"),
        );
        let delta = (hostile.peak_kib as f64 - polite.peak_kib as f64) / 1024.0;
        println!("  peak difference: {delta:+.1} MiB (bound: {LIMIT_MIB} MiB)");
        if delta > LIMIT_MIB {
            eprintln!("memory_bounds: the hostile run used {delta:.1} MiB more than the bound");
            std::process::exit(1);
        }
    });
}
