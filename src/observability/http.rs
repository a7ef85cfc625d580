//! The small HTTP endpoint every grasp-sync process serves: `/metrics` (Prometheus text),
//! `/status` (JSON: the RelaySync objects this process knows, with their status) and
//! `/healthz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use futures::future::BoxFuture;
use prometheus::Registry;

use super::liveness::Liveness;
use crate::crd::{RelaySyncSpec, RelaySyncStatus};

/// One object as `/status` reports it (and `grasp-sync status` reads it).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StatusEntry {
    pub name: String,
    pub generation: i64,
    pub spec: RelaySyncSpec,
    #[serde(default)]
    pub status: Option<RelaySyncStatus>,
}

/// Where `/status` reads its entries: the process's RelaySync store, wired by the mode.
pub trait StatusSource: Send + Sync + 'static {
    fn entries(&self) -> BoxFuture<'_, Result<Vec<StatusEntry>, String>>;
}

/// Bounds on what HTTP clients can hold: the endpoint may be reachable by anything in the
/// pod network, and it must never cost the process more than a few sockets.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// A request's headers must arrive within this (slow-loris).
    pub header_timeout: Duration,
    /// A connection is closed this long after it was accepted, keep-alive or not.
    pub connection_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(60),
        }
    }
}

/// Bind `addr` (fails at once if it cannot) and serve until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    metrics: Registry,
    store: Arc<dyn StatusSource>,
    liveness: Liveness,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(
        addr,
        metrics,
        store,
        liveness,
        shutdown,
        HttpLimits::default(),
    )
    .await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    addr: SocketAddr,
    metrics: Registry,
    store: Arc<dyn StatusSource>,
    liveness: Liveness,
    mut shutdown: watch::Receiver<bool>,
    limits: HttpLimits,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        continue;
                    }
                },
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, max = limits.max_connections, "too many HTTP connections; closing a new one");
                drop(stream);
                continue;
            };
            let (metrics, store, liveness) = (metrics.clone(), store.clone(), liveness.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req| {
                    let (metrics, store, liveness) =
                        (metrics.clone(), store.clone(), liveness.clone());
                    async move {
                        Ok::<_, Infallible>(handle(req, &metrics, store.as_ref(), &liveness).await)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(limits.connection_timeout, conn).await;
            });
        }
    });
    Ok((local, task))
}

fn response(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    metrics: &Registry,
    store: &dyn StatusSource,
    liveness: &Liveness,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            super::metrics::render(metrics),
        ),
        "/healthz" => match liveness.check() {
            Ok(body) => response(StatusCode::OK, "text/plain", body),
            Err(body) => response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body),
        },
        "/status" => match store.entries().await {
            Ok(entries) => match serde_json::to_vec_pretty(&entries) {
                Ok(body) => response(StatusCode::OK, "application/json", body),
                Err(e) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            },
            Err(e) => response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", e),
        },
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// A `kubectl get relaysyncs`-style table of `entries`.
pub fn render_table(entries: &[StatusEntry], now: std::time::SystemTime) -> String {
    let age = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| -> String {
        let Some(t) = t else {
            return "<none>".into();
        };
        let then = std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(t.0.as_second().max(0) as u64);
        let secs = now.duration_since(then).map(|d| d.as_secs()).unwrap_or(0);
        match secs {
            s if s < 120 => format!("{s}s"),
            s if s < 7200 => format!("{}m", s / 60),
            s if s < 172_800 => format!("{}h", s / 3600),
            s => format!("{}d", s / 86_400),
        }
    };
    let mut rows = vec![[
        "NAME".to_string(),
        "URL".into(),
        "PHASE".into(),
        "REPOS".into(),
        "CONFIRMED".into(),
        "LAST-CONNECTED".into(),
        "LAST-ERROR".into(),
    ]];
    for e in entries {
        let s = e.status.clone().unwrap_or_default();
        rows.push([
            e.name.clone(),
            e.spec.url.clone(),
            s.phase
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "Pending".into()),
            e.spec.repos.len().to_string(),
            s.confirmed_repos
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            age(&s.last_connected),
            s.last_error.unwrap_or_default().chars().take(60).collect(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    struct NoObjects;

    impl StatusSource for NoObjects {
        fn entries(&self) -> BoxFuture<'_, Result<Vec<StatusEntry>, String>> {
            async { Ok(Vec::new()) }.boxed()
        }
    }

    async fn start(limits: HttpLimits) -> (SocketAddr, watch::Sender<bool>) {
        let (stop, shutdown) = watch::channel(false);
        let (addr, _task) = serve_with(
            "127.0.0.1:0".parse().unwrap(),
            Registry::new(),
            Arc::new(NoObjects),
            Liveness::default(),
            shutdown,
            limits,
        )
        .await
        .unwrap();
        (addr, stop)
    }

    /// Whether the server ends the connection within `within` (EOF or reset).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let read = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read).await.is_ok()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let (addr, _stop) = start(HttpLimits {
            header_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        })
        .await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(
            closed_within(&mut slow, Duration::from_secs(5)).await,
            "a slow-loris client kept its connection"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_served_again_once_one_ends() {
        let (addr, _stop) = start(HttpLimits {
            max_connections: 2,
            ..HttpLimits::default()
        })
        .await;
        let idle1 = TcpStream::connect(addr).await.unwrap();
        let _idle2 = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut third, Duration::from_secs(5)).await,
            "a connection over the cap was kept"
        );
        drop(idle1);
        // The server learns of the close when it reads; poll with a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let body = get(addr, "/healthz").await;
            if body.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_has_a_lifetime() {
        let (addr, _stop) = start(HttpLimits {
            connection_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Keep-alive requests, one after the other, cannot hold it open for ever.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    }
}
