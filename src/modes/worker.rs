//! The `worker` process: hold this worker's Lease and, while it is held, run the sessions of
//! the relays labelled with its name and report their status. Runs until `shutdown` turns
//! true.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use nostr::Keys;
use tokio::sync::{oneshot, watch};

use super::kube::{KubeModeError, check_worker_name, join_all, resolve_owner, serve_http};
use crate::coordination::membership::{self, LeaseConfig};
use crate::crd::owner::OwnerTarget;
use crate::nostr::RelayUrl;
use crate::observability::ProcessMetrics;
use crate::relay::address_policy::AddressPolicy;
use crate::store::kube::KubeStore;
use crate::worker::WorkerMetrics;
use crate::worker::publisher::{Publisher, PublisherConfig, RefusalMemory};
use crate::worker::session::SessionConfig;
use crate::worker::supervisor::{self, SupervisorConfig};

/// How long a stopping worker waits for its sessions to close (and then for its final
/// statuses) before it goes on regardless.
const SESSIONS_CLOSE_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub name: String,
    pub local_relay: RelayUrl,
    pub addresses: AddressPolicy,
    pub status_interval: Duration,
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
    pub http_addr: SocketAddr,
    pub lease: LeaseConfig,
    pub session: SessionConfig,
    /// The StatefulSet owning the worker's Lease (deleted with it).
    pub owner: Option<OwnerTarget>,
    /// How often the local relay's stored root events and announcements of the worker's repos are read again
    /// (`None`: never): what its live stream dropped is found within this.
    pub local_reread_every: Option<Duration>,
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
    let mut opts = opts;
    if let Some(t) = &opts.owner {
        opts.lease.owner = Some(resolve_owner(&client, &namespace, t).await?);
    }
    let metrics = ProcessMetrics::new()?;
    metrics.set_role("worker");
    let worker_metrics = WorkerMetrics::register(&metrics.registry)?;
    let store = Arc::new(
        KubeStore::for_worker(client.clone(), &namespace, &opts.name)
            .with_events(client.clone(), &opts.name),
    );
    let (http_addr, http_task) = serve_http(opts.http_addr, &metrics, &store, &shutdown).await?;
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
    // A publisher task that ended (a panic) loses every event handed to it: restart the pod.
    metrics
        .liveness
        .task("publisher", publisher_task.abort_handle());
    let mut rc = SupervisorConfig::new(
        opts.name.clone(),
        opts.local_relay.clone(),
        opts.session.clone(),
        opts.status_interval,
        opts.addresses.clone(),
        opts.remote_auth_keys.clone(),
    );
    rc.feed_reread_every = opts.local_reread_every;
    tracing::info!(worker = %opts.name, %namespace, http = %http_addr, "worker started");
    loop {
        let held = match acquire(&client, &namespace, &opts, &mut shutdown).await {
            Some(h) => h,
            None => break,
        };
        metrics.lease_held.set(1);
        tracing::info!(worker = %opts.name, "holding the worker Lease; starting sessions");
        let (stop, stop_rx) = watch::channel(false);
        let (closed, sessions_closed) = oneshot::channel();
        let rt = tokio::spawn(supervisor::run(
            rc.clone(),
            store.clone(),
            publisher.clone(),
            worker_metrics.clone(),
            stop_rx,
            Some(closed),
        ));
        let mut held_rx = held.held();
        let quit = tokio::select! {
            _ = held_rx.wait_for(|h| !*h) => {
                tracing::error!(worker = %opts.name, "cannot renew the worker Lease; closing every session before it expires");
                false
            }
            _ = shutdown.wait_for(|s| *s) => true,
        };
        // Each step of a stop is logged with its time: a pod's stop delays its return under
        // the same name (a rolling restart, `kubectl delete pod`).
        let stopping = tokio::time::Instant::now();
        let _ = stop.send(true);
        // Sessions close first, then the Lease goes, so the controller reassigns only relays
        // nobody holds any more. The final statuses are written after the release, beside
        // the controller's handover (each is conditional on the relay's label): written
        // before it, a few hundred of them held every relay back by a second.
        let closed = tokio::time::timeout(SESSIONS_CLOSE_WITHIN, sessions_closed)
            .await
            .is_ok();
        tracing::info!(worker = %opts.name, closed, took = ?stopping.elapsed(), "sessions closed; releasing the worker Lease");
        held.release().await;
        tracing::info!(worker = %opts.name, took = ?stopping.elapsed(), "worker Lease released");
        let abort = rt.abort_handle();
        join_all(vec![rt], SESSIONS_CLOSE_WITHIN).await;
        // Its final statuses must not land after the next supervisor's (same worker name:
        // the label test would let them through).
        abort.abort();
        metrics.lease_held.set(0);
        if quit {
            break;
        }
    }
    // Events already handed over get a moment to be accepted; anything left is fetched
    // again after a restart (the cursor only covers what the local relay confirmed).
    let waiting = tokio::time::Instant::now();
    let deadline = waiting + Duration::from_secs(10);
    while publisher.stats().outstanding() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outstanding = publisher.stats().outstanding();
    tracing::info!(worker = %opts.name, outstanding, took = ?waiting.elapsed(), "publisher settled (events still unanswered are fetched again after a restart)");
    join_all(vec![http_task], Duration::from_secs(5)).await;
    tracing::info!(worker = %opts.name, "worker stopped");
    Ok(())
}

async fn acquire(
    client: &Client,
    namespace: &str,
    opts: &WorkerOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<membership::LeaseHandle> {
    loop {
        match membership::hold(client.clone(), namespace, &opts.name, opts.lease.clone()).await {
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
