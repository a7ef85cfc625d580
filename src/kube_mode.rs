//! Kubernetes mode: the `controller` process (leader-elected discovery and assignment) and
//! the `worker` process (Lease-held membership, the sessions of the relays labelled with its
//! name, status reports). Both run until `shutdown` turns true.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::config::{Config, KubeConfigOptions};
use nostr::Keys;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::controller::assigner::{self, AssignerConfig};
use crate::controller::discovery::{self, DiscoveryConfig};
use crate::controller::leader::{self, LeaderConfig};
use crate::controller::ssrf::AddressPolicy;
use crate::crd::WORKER_LABEL;
use crate::crd::naming::is_dns1123_label;
use crate::nostr::RelayUrl;
use crate::store::RelaySyncStore;
use crate::store::kube::KubeStore;
use crate::worker::lease::{self, LeaseConfig};
use crate::worker::metrics::Metrics;
use crate::worker::publisher::{Publisher, PublisherConfig};
use crate::worker::runtime::{self, RuntimeConfig};
use crate::worker::session::SessionConfig;

#[derive(Debug, Error)]
pub enum KubeModeError {
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
    #[error(
        "worker name {0:?} must be a DNS-1123 label (lower-case alphanumerics and '-', at most 63 characters): it is used as a label value and in the Lease name"
    )]
    BadWorkerName(String),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A worker name becomes a label value and part of a Lease name.
pub fn check_worker_name(name: &str) -> Result<(), KubeModeError> {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(KubeModeError::BadWorkerName(name.to_string()))
    }
}

/// Where to find the API server and which namespace to work in.
#[derive(Debug, Clone, Default)]
pub struct KubeTarget {
    /// A kubeconfig context; `None` infers (in-cluster, or the current context).
    pub context: Option<String>,
    /// `None`: the kubeconfig's or the pod's namespace.
    pub namespace: Option<String>,
}

/// A client and the namespace to use.
pub async fn connect(target: &KubeTarget) -> Result<(Client, String), KubeModeError> {
    let config = match &target.context {
        Some(ctx) => Config::from_kubeconfig(&KubeConfigOptions {
            context: Some(ctx.clone()),
            ..KubeConfigOptions::default()
        })
        .await
        .map_err(|e| KubeModeError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| KubeModeError::Config(e.to_string()))?,
    };
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| KubeModeError::Config(e.to_string()))?;
    Ok((client, namespace))
}

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub identity: String,
    pub local_relay: RelayUrl,
    pub service_domain: String,
    pub bootstrap: Vec<RelayUrl>,
    pub addresses: AddressPolicy,
    pub grace: Duration,
    pub http_addr: SocketAddr,
    pub leader: LeaderConfig,
    pub assigner: AssignerConfig,
}

async fn serve_http(
    addr: SocketAddr,
    metrics: &Metrics,
    store: &Arc<KubeStore>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), KubeModeError> {
    crate::http::serve(addr, metrics.clone(), store.clone(), shutdown.clone())
        .await
        .map_err(|source| KubeModeError::Http { addr, source })
}

async fn join_all(tasks: Vec<JoinHandle<()>>, within: Duration) {
    for t in tasks {
        let _ = tokio::time::timeout(within, t).await;
    }
}

/// Run a controller replica: campaign for the lead; while leading, run discovery and
/// assignment; on losing the lead stop both and campaign again.
pub async fn run_controller(
    opts: ControllerOptions,
    client: Client,
    namespace: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KubeModeError> {
    let metrics = Metrics::new();
    metrics.set_role("controller");
    let store = Arc::new(KubeStore::new(client.clone(), &namespace));
    let (http_addr, http_task) = serve_http(opts.http_addr, &metrics, &store, &shutdown).await?;
    tracing::info!(identity = %opts.identity, %namespace, http = %http_addr, "controller started; campaigning for the lead");
    let dc = DiscoveryConfig::for_service(
        opts.local_relay.clone(),
        &opts.service_domain,
        opts.addresses.clone(),
        &opts.bootstrap,
        opts.grace,
    );
    let election = leader::campaign(client.clone(), &namespace, opts.leader.clone());
    let mut leading = election.leading();
    'outer: loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
            _ = shutdown.wait_for(|s| *s) => break,
        }
        metrics.leader.set(1);
        let (stop, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(discovery::run(
                dc.clone(),
                store.clone(),
                metrics.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(assigner::run(
                client.clone(),
                namespace.clone(),
                store.cache(),
                store.changes(),
                opts.assigner.clone(),
                metrics.clone(),
                stop_rx,
            )),
        ];
        let quit = tokio::select! {
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!(identity = %opts.identity, "lost the lead; stopping discovery and assignment");
                false
            }
            _ = shutdown.wait_for(|s| *s) => true,
        };
        let _ = stop.send(true);
        join_all(tasks, Duration::from_secs(10)).await;
        metrics.leader.set(0);
        if quit {
            break 'outer;
        }
    }
    election.resign().await;
    join_all(vec![http_task], Duration::from_secs(5)).await;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub name: String,
    pub local_relay: RelayUrl,
    pub addresses: AddressPolicy,
    pub status_interval: Duration,
    pub publisher_connections: usize,
    pub auth_keys: Option<Keys>,
    pub http_addr: SocketAddr,
    pub lease: LeaseConfig,
    pub session: SessionConfig,
}

/// Run a worker: hold its Lease, and while it is held run the sessions of the relays
/// labelled with its name. A Lease that cannot be renewed stops every session before it
/// could expire; the worker then tries to get it back.
pub async fn run_worker(
    opts: WorkerOptions,
    client: Client,
    namespace: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KubeModeError> {
    check_worker_name(&opts.name)?;
    let metrics = Metrics::new();
    metrics.set_role("worker");
    let selector = format!("{WORKER_LABEL}={}", opts.name);
    let store = Arc::new(
        KubeStore::with_selector(client.clone(), &namespace, Some(selector))
            .with_events(client.clone(), &opts.name),
    );
    let (http_addr, http_task) = serve_http(opts.http_addr, &metrics, &store, &shutdown).await?;
    let pc = PublisherConfig::with(
        opts.local_relay.clone(),
        opts.publisher_connections,
        opts.auth_keys.clone(),
    );
    let (publisher, _publisher_task) = Publisher::spawn(pc, metrics.clone());
    let rc = RuntimeConfig::new(
        opts.name.clone(),
        opts.local_relay.clone(),
        opts.session.clone(),
        opts.status_interval,
        opts.addresses.clone(),
        opts.auth_keys.clone(),
    );
    tracing::info!(worker = %opts.name, %namespace, http = %http_addr, "worker started");
    loop {
        let held = match acquire(&client, &namespace, &opts, &mut shutdown).await {
            Some(h) => h,
            None => break,
        };
        metrics.lease_held.set(1);
        tracing::info!(worker = %opts.name, "holding the worker Lease; starting sessions");
        let (stop, stop_rx) = watch::channel(false);
        let rt = tokio::spawn(runtime::run(
            rc.clone(),
            store.clone(),
            publisher.clone(),
            metrics.clone(),
            stop_rx,
        ));
        let mut held_rx = held.held();
        let quit = tokio::select! {
            _ = held_rx.wait_for(|h| !*h) => {
                tracing::error!(worker = %opts.name, "cannot renew the worker Lease; closing every session before it expires");
                false
            }
            _ = shutdown.wait_for(|s| *s) => true,
        };
        let _ = stop.send(true);
        // Sessions close first (final status written), then the Lease goes, so the
        // controller reassigns only relays nobody holds any more.
        join_all(vec![rt], Duration::from_secs(30)).await;
        held.release().await;
        metrics.lease_held.set(0);
        if quit {
            break;
        }
    }
    // Events already handed over get a moment to be accepted; anything left is fetched
    // again after a restart (the cursor only covers what the local relay confirmed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while publisher.stats().outstanding() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    join_all(vec![http_task], Duration::from_secs(5)).await;
    Ok(())
}

async fn acquire(
    client: &Client,
    namespace: &str,
    opts: &WorkerOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<lease::LeaseHandle> {
    loop {
        match lease::hold(client.clone(), namespace, &opts.name, opts.lease.clone()).await {
            Ok(h) => return Some(h),
            Err(e) => {
                tracing::warn!(worker = %opts.name, error = %e, "cannot take the worker Lease; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.lease.renew_every) => {}
            _ = shutdown.wait_for(|s| *s) => return None,
        }
    }
}
