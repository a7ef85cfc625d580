//! Worker membership: every worker holds its own Lease (`grasp-sync-worker-<name>`) and
//! renews it every few seconds; the controller counts a worker live while its Lease is fresh.
//! A worker that cannot renew must consider itself gone before the Lease could expire, so
//! two workers never hold one relay.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const LEASE_PREFIX: &str = "grasp-sync-worker-";
const MANAGER: &str = "grasp-sync-worker";

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub duration: Duration,
    pub renew_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

pub fn lease_name(worker: &str) -> String {
    format!("{LEASE_PREFIX}{worker}")
}

async fn renew(api: &Api<Lease>, worker: &str, config: &LeaseConfig) -> kube::Result<()> {
    let now = MicroTime(Timestamp::now());
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(worker),
            "labels": {"app.kubernetes.io/name": "grasp-sync", "app.kubernetes.io/component": "worker"}
        },
        "spec": {
            "holderIdentity": worker,
            "leaseDurationSeconds": config.duration.as_secs().max(1),
            "renewTime": now,
        }
    });
    api.patch(
        &lease_name(worker),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&lease),
    )
    .await?;
    Ok(())
}

/// Holds this worker's Lease until dropped via [`LeaseHandle::release`].
pub struct LeaseHandle {
    held: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LeaseHandle {
    /// True while the Lease is known to be ours and fresh.
    pub fn held(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }

    /// Stop renewing and delete the Lease, so the controller reassigns at once.
    pub async fn release(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Acquire (create or take over) and keep renewing the Lease of `worker`.
pub async fn hold(
    client: Client,
    namespace: &str,
    worker: &str,
    config: LeaseConfig,
) -> kube::Result<LeaseHandle> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    renew(&api, worker, &config).await?;
    let (held_tx, held) = watch::channel(true);
    let (stop, mut stop_rx) = watch::channel(false);
    let worker = worker.to_string();
    let task = tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        // Give up on the Lease well before it could expire elsewhere.
        let safe = config
            .duration
            .saturating_sub(config.renew_every)
            .max(config.renew_every);
        let mut tick = tokio::time::interval(config.renew_every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match renew(&api, &worker, &config).await {
                        Ok(()) => {
                            last_ok = tokio::time::Instant::now();
                            held_tx.send_if_modified(|h| !std::mem::replace(h, true));
                        }
                        Err(e) => {
                            tracing::warn!(%worker, error = %e, "lease renewal failed");
                            if last_ok.elapsed() >= safe {
                                held_tx.send_if_modified(|h| std::mem::replace(h, false));
                            }
                        }
                    }
                }
                _ = stop_rx.changed() => {
                    let _ = api.delete(&lease_name(&worker), &DeleteParams::default()).await;
                    held_tx.send_replace(false);
                    return;
                }
            }
        }
    });
    Ok(LeaseHandle { held, stop, task })
}

/// Workers whose Lease is fresh at `now`.
pub async fn live_workers(
    client: Client,
    namespace: &str,
    now: Timestamp,
) -> kube::Result<BTreeSet<String>> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let leases = api.list(&ListParams::default()).await?;
    Ok(leases
        .items
        .into_iter()
        .filter_map(|l| {
            let name = l.name_any();
            let worker = name.strip_prefix(LEASE_PREFIX)?.to_string();
            let spec = l.spec?;
            let renewed = spec.renew_time?.0;
            let duration = i64::from(spec.lease_duration_seconds?);
            let expires = renewed.as_second().checked_add(duration)?;
            (expires > now.as_second() && spec.holder_identity.as_deref() == Some(worker.as_str()))
                .then_some(worker)
        })
        .collect())
}
