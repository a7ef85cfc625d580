//! A session connects to exactly the address its policy checked (#12, DNS rebinding): the
//! relay's name is resolved once per attempt, and the NIP-11 request and the websocket go to
//! that answer, with the original host name for `Host` (and SNI), never through a proxy from
//! the environment. The resolver is injected so the name can be rebound between look-ups.

mod support;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use futures::future::BoxFuture;
use grasp_sync::nostr::RelayUrl;
use grasp_sync::relay::address_policy::AddressPolicy;
use grasp_sync::relay::resolve::{Resolve, Resolver};
use grasp_sync::worker::WorkerMetrics;
use grasp_sync::worker::publisher::{Publisher, PublisherConfig};
use grasp_sync::worker::session::{self, Resume, SessionConfig, SessionHandle, SyncSet};
use support::eventually;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

const DEADLINE: Duration = Duration::from_secs(30);

/// Every connection a listener accepted, with the request head it read (lower-cased).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn heads(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A loopback listener standing for what an attacker would aim at (a metadata service, a
/// cluster-internal relay, a proxy): it records what reaches it and answers nothing.
async fn listener() -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await;
                record
                    .0
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).to_ascii_lowercase());
            });
        }
    });
    (port, seen)
}

/// Point the process's proxy variables at a listener that must see nothing. Every test in
/// this binary calls this first, before it starts any task, so no thread reads the
/// environment while it is written.
fn proxy_in_the_environment() -> Seen {
    static SET: Once = Once::new();
    static SEEN: Mutex<Option<Seen>> = Mutex::new(None);
    SET.call_once(|| {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let seen = Seen::default();
        let record = seen.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = TcpListener::from_std(std_listener).unwrap();
                while let Ok((_s, _)) = l.accept().await {
                    record.0.lock().unwrap().push("proxy".into());
                }
            });
        });
        let proxy = format!("http://127.0.0.1:{port}");
        // SAFETY: see the function's comment: no other thread of this binary reads the
        // environment yet.
        unsafe {
            for var in [
                "HTTP_PROXY",
                "http_proxy",
                "HTTPS_PROXY",
                "https_proxy",
                "ALL_PROXY",
            ] {
                std::env::set_var(var, &proxy);
            }
            std::env::remove_var("NO_PROXY");
            std::env::remove_var("no_proxy");
        }
        *SEEN.lock().unwrap() = Some(seen);
    });
    SEEN.lock().unwrap().clone().unwrap()
}

/// Answers `first` to the first look-up and `then` to every later one, counting look-ups.
struct Rebinding {
    first: IpAddr,
    then: IpAddr,
    calls: Arc<AtomicUsize>,
}

impl Resolve for Rebinding {
    fn resolve(&self, _host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let ip = if n == 0 { self.first } else { self.then };
        Box::pin(async move { Ok(vec![SocketAddr::new(ip, port)]) })
    }
}

fn start(url: &str, policy: AddressPolicy, resolver: Resolver) -> SessionHandle {
    let WorkerMetrics {
        session: metrics,
        publisher: publisher_metrics,
        ..
    } = WorkerMetrics::default();
    // Nothing reaches the publisher in these tests; its relay is never connected to.
    let local = RelayUrl::parse("ws://127.0.0.1:9").unwrap();
    let (publisher, _task) = Publisher::spawn(PublisherConfig::new(local), publisher_metrics);
    let mut config = SessionConfig::default();
    config.health.base_backoff = Duration::from_millis(50);
    config.health.max_backoff = Duration::from_millis(200);
    config.connect.connect_timeout = Duration::from_millis(500);
    config.nip11_timeout = Duration::from_millis(500);
    config.negentropy = false;
    config.addresses = Some(policy);
    config.resolver = resolver;
    session::spawn(
        RelayUrl::parse(url).unwrap(),
        SyncSet::default(),
        Resume::default(),
        config,
        publisher,
        metrics,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_rebound_to_loopback_after_the_check_is_never_connected_to() {
    let proxy = proxy_in_the_environment();
    let (port, internal) = listener().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let resolver = Resolver::new(Rebinding {
        // Public: passes the check. With no route out of this machine the attempt fails.
        first: "93.184.216.34".parse().unwrap(),
        then: "127.0.0.1".parse().unwrap(),
        calls: calls.clone(),
    });
    let h = start(
        &format!("ws://rebind.example:{port}"),
        AddressPolicy::default(),
        resolver,
    );
    let mut state = h.state();
    // The first attempt used the public answer; later ones are refused at the check.
    eventually("two attempts after the rebind", DEADLINE, || {
        let s = state.borrow_and_update().clone();
        let n = calls.load(Ordering::SeqCst);
        async move {
            (n >= 3
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("127.0.0.1") && e.contains("loopback")))
            .then_some(())
        }
    })
    .await;
    assert!(
        internal.heads().is_empty(),
        "the loopback listener was reached: {:?}",
        internal.heads()
    );
    assert!(proxy.heads().is_empty(), "a request went through the proxy");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nip11_and_the_websocket_go_to_the_resolved_address_with_the_relay_s_name() {
    let proxy = proxy_in_the_environment();
    let (port, relay) = listener().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let resolver = Resolver::new(Rebinding {
        first: loopback,
        then: loopback,
        calls: calls.clone(),
    });
    // The operator allows this network, so the answer passes.
    let policy = AddressPolicy {
        allow_nets: vec!["127.0.0.0/8".parse().unwrap()],
        ..AddressPolicy::default()
    };
    let h = start(&format!("ws://relay.example:{port}"), policy, resolver);
    let host = format!("host: relay.example:{port}");
    let heads = eventually("a NIP-11 GET and a websocket upgrade", DEADLINE, || {
        let heads = relay.heads();
        async move {
            (heads.iter().any(|h| h.contains("upgrade: websocket"))
                && heads.iter().any(|h| h.contains("application/nostr+json")))
            .then_some(heads)
        }
    })
    .await;
    for head in &heads {
        assert!(head.contains(&host), "expected {host:?} in {head:?}");
    }
    assert!(
        proxy.heads().is_empty(),
        "the NIP-11 request went through the proxy from the environment"
    );
    h.stop().await;
}
