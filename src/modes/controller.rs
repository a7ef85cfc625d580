//! The `controller` process: campaign for the lead; while leading, run discovery and
//! assignment. Runs until `shutdown` turns true.

use std::net::SocketAddr;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use super::kube::{KubeModeError, join_all, resolve_owner, serve_http};
use crate::controller::assignment::metrics::AssignmentMetrics;
use crate::controller::assignment::reconciler::{self, AssignerConfig};
use crate::controller::discovery::metrics::DiscoveryMetrics;
use crate::controller::discovery::{self, DiscoveryConfig, DiscoveryLimits};
use crate::coordination::leader::{self, LeaderConfig};
use crate::crd::owner::OwnerTarget;
use crate::nostr::RelayUrl;
use crate::observability::ProcessMetrics;
use crate::relay::address_policy::AddressPolicy;
use crate::store::RelaySyncStore;
use crate::store::kube::KubeStore;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub identity: String,
    pub local_relay: RelayUrl,
    pub service_domain: String,
    pub bootstrap: Vec<RelayUrl>,
    pub addresses: AddressPolicy,
    pub grace: Duration,
    /// Bounds on what announcements make us sync.
    pub limits: DiscoveryLimits,
    pub http_addr: SocketAddr,
    pub leader: LeaderConfig,
    pub assigner: AssignerConfig,
    /// The Deployment owning the RelaySyncs and the leader Lease (deleted with it).
    pub owner: Option<OwnerTarget>,
    /// How often the local relay's stored announcements and deletions are read again
    /// (`None`: never): what its live stream dropped is found within this.
    pub local_reread_every: Option<Duration>,
}

/// Run a controller replica: campaign for the lead; while leading, run discovery and
/// assignment; on losing the lead stop both and campaign again.
pub async fn run_controller(
    opts: ControllerOptions,
    client: Client,
    namespace: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KubeModeError> {
    let metrics = ProcessMetrics::new()?;
    metrics.set_role("controller");
    let discovery_metrics = DiscoveryMetrics::register(&metrics.registry)?;
    let assignment_metrics = AssignmentMetrics::register(&metrics.registry)?;
    let owner = match &opts.owner {
        Some(t) => Some(resolve_owner(&client, &namespace, t).await?),
        None => None,
    };
    let store =
        Arc::new(KubeStore::for_controller(client.clone(), &namespace).with_owner(owner.clone()));
    let (http_addr, http_task) = serve_http(opts.http_addr, &metrics, &store, &shutdown).await?;
    tracing::info!(identity = %opts.identity, %namespace, http = %http_addr, "controller started; campaigning for the lead");
    let mut dc = DiscoveryConfig::for_service(
        opts.local_relay.clone(),
        &opts.service_domain,
        opts.addresses.clone(),
        &opts.bootstrap,
        opts.grace,
        opts.limits,
    );
    dc.reread_every = opts.local_reread_every;
    let election = leader::campaign(
        client.clone(),
        &namespace,
        LeaderConfig {
            owner,
            ..opts.leader.clone()
        },
    );
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
                discovery_metrics.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(reconciler::run(
                client.clone(),
                namespace.clone(),
                store.cache(),
                store.changes(),
                opts.assigner.clone(),
                assignment_metrics.clone(),
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
