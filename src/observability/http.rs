//! The small HTTP endpoint every grasp-sync process serves: `/metrics` (Prometheus text),
//! `/status` (JSON: the RelaySync objects this process knows, with their status) and
//! `/healthz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

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

/// Bind `addr` (fails at once if it cannot) and serve until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    metrics: Registry,
    store: Arc<dyn StatusSource>,
    liveness: Liveness,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
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
            let (metrics, store, liveness) = (metrics.clone(), store.clone(), liveness.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (metrics, store, liveness) =
                        (metrics.clone(), store.clone(), liveness.clone());
                    async move {
                        Ok::<_, Infallible>(handle(req, &metrics, store.as_ref(), &liveness).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
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
