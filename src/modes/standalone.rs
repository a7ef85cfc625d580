//! Standalone mode: discovery and one worker in a single process, with the in-memory store
//! persisted to a state file instead of the Kubernetes API. The same code paths as the
//! Kubernetes deployment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nostr::Keys;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::controller::discovery::metrics::DiscoveryMetrics;
use crate::controller::discovery::{self, DiscoveryConfig, DiscoveryLimits};
use crate::nostr::RelayUrl;
use crate::observability::ProcessMetrics;
use crate::relay::address_policy::AddressPolicy;
use crate::store::StoreError;
use crate::store::memory::MemoryStore;
use crate::worker::WorkerMetrics;
use crate::worker::publisher::{Publisher, PublisherConfig, RefusalMemory};
use crate::worker::session::SessionConfig;
use crate::worker::supervisor::{self, SupervisorConfig};

#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    pub local_relay: RelayUrl,
    pub service_domain: String,
    pub bootstrap: Vec<RelayUrl>,
    /// Where the store is saved; `None` keeps it in memory only.
    pub state_file: Option<PathBuf>,
    pub http_addr: SocketAddr,
    pub addresses: AddressPolicy,
    pub worker_name: String,
    pub status_interval: Duration,
    pub grace: Duration,
    /// Bounds on what announcements make us sync.
    pub limits: DiscoveryLimits,
    pub publisher_connections: usize,
    pub publisher_max_connections: usize,
    /// Policy refusals of the local relay remembered (copies answered without a send).
    pub refusals: RefusalMemory,
    /// How long an event the local relay holds in purgatory is not sent again.
    pub purgatory_ttl: std::time::Duration,
    /// NIP-42 key for the local relay (the publisher).
    pub auth_keys: Option<Keys>,
    /// NIP-42 key for remote relays (the sessions); never the local relay's.
    pub remote_auth_keys: Option<Keys>,
    pub session: SessionConfig,
    /// How often the local relay's stored announcements and root events are read again
    /// (`None`: never): what its live stream dropped is found within this.
    pub local_reread_every: Option<Duration>,
}

impl StandaloneOptions {
    pub fn new(local_relay: RelayUrl, service_domain: impl Into<String>) -> Self {
        StandaloneOptions {
            local_relay,
            service_domain: service_domain.into(),
            bootstrap: Vec::new(),
            state_file: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
            addresses: AddressPolicy::default(),
            worker_name: "standalone".into(),
            status_interval: Duration::from_secs(30),
            grace: Duration::from_secs(15 * 60),
            limits: DiscoveryLimits::default(),
            publisher_connections: 1,
            publisher_max_connections: crate::worker::publisher::DEFAULT_MAX_CONNECTIONS,
            refusals: RefusalMemory::default(),
            purgatory_ttl: crate::worker::publisher::settled::PURGATORY_TTL,
            auth_keys: None,
            remote_auth_keys: None,
            session: SessionConfig::default(),
            local_reread_every: Some(crate::relay::feed::DEFAULT_REREAD_EVERY),
        }
    }
}

#[derive(Debug, Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot register the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running standalone syncer.
pub struct Standalone {
    pub http_addr: SocketAddr,
    pub store: Arc<MemoryStore>,
    pub metrics: ProcessMetrics,
    pub publisher: Publisher,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

pub async fn start(opts: StandaloneOptions) -> Result<Standalone, StandaloneError> {
    let store = Arc::new(match &opts.state_file {
        Some(path) => MemoryStore::open(path)?,
        None => MemoryStore::new(),
    });
    let metrics = ProcessMetrics::new()?;
    metrics.set_role("standalone");
    let worker_metrics = WorkerMetrics::register(&metrics.registry)?;
    let discovery_metrics = DiscoveryMetrics::register(&metrics.registry)?;
    let (shutdown, rx) = watch::channel(false);
    let (http_addr, http_task) = super::serve_http(opts.http_addr, &metrics, &store, &rx)
        .await
        .map_err(|source| StandaloneError::Http {
            addr: opts.http_addr,
            source,
        })?;

    let mut pc = PublisherConfig::with(
        opts.local_relay.clone(),
        opts.publisher_connections,
        opts.publisher_max_connections,
        opts.auth_keys.clone(),
    );
    pc.refusals = opts.refusals;
    pc.purgatory_ttl = opts.purgatory_ttl;
    pc.connect.ping_every = opts.session.connect.ping_every;
    pc.connect.pong_timeout = opts.session.connect.pong_timeout;
    let (publisher, publisher_task) = Publisher::spawn(pc, worker_metrics.publisher.clone());

    let dc = DiscoveryConfig::for_service(
        opts.local_relay.clone(),
        &opts.service_domain,
        opts.addresses.clone(),
        &opts.bootstrap,
        opts.grace,
        opts.limits,
    );
    let mut dc = dc;
    dc.connect = opts.session.connect.clone();
    dc.reread_every = opts.local_reread_every;
    let discovery_task = tokio::spawn(discovery::run(
        dc,
        store.clone(),
        discovery_metrics,
        rx.clone(),
    ));

    let mut rc = SupervisorConfig::new(
        opts.worker_name.clone(),
        opts.local_relay.clone(),
        opts.session.clone(),
        opts.status_interval,
        opts.addresses.clone(),
        opts.remote_auth_keys.clone(),
    );
    rc.feed_reread_every = opts.local_reread_every;
    let supervisor_task = tokio::spawn(supervisor::run(
        rc,
        store.clone(),
        publisher.clone(),
        worker_metrics,
        rx,
        None,
    ));
    let liveness = &metrics.liveness;
    liveness.task("publisher", publisher_task.abort_handle());
    liveness.task("discovery", discovery_task.abort_handle());
    liveness.task("supervisor", supervisor_task.abort_handle());
    drop(publisher_task);
    Ok(Standalone {
        http_addr,
        store,
        metrics,
        publisher,
        shutdown,
        tasks: vec![supervisor_task, discovery_task, http_task],
    })
}

impl Standalone {
    /// Stop: sessions close and write their final status (cursors), then everything else.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}
