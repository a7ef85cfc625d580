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
use crate::crd::WORKER_MANAGER as MANAGER;

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

/// How long after the start of the last successful renewal the Lease still counts as held:
/// its `renewTime` was stamped after that start, so it expires no earlier than start +
/// `duration`; giving it up one renew interval before that, with every request bounded by
/// [`super::request_deadline`], leaves the worker time to stop its sessions first.
pub fn hold_margin(config: &LeaseConfig) -> Duration {
    config
        .duration
        .saturating_sub(config.renew_every)
        .max(config.renew_every)
}

/// Acquire (create or take over) and keep renewing the Lease of `worker`.
pub async fn hold(
    client: Client,
    namespace: &str,
    worker: &str,
    config: LeaseConfig,
) -> kube::Result<LeaseHandle> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let deadline = super::request_deadline(config.renew_every);
    let first = tokio::time::Instant::now();
    match tokio::time::timeout(deadline, renew(&api, worker, &config)).await {
        Ok(r) => r?,
        Err(_) => return Err(super::timed_out(deadline)),
    }
    let (held_tx, held) = watch::channel(true);
    let (stop, mut stop_rx) = watch::channel(false);
    let worker = worker.to_string();
    let task = tokio::spawn(async move {
        // Measured from the request's start, not its end: a slow answer does not extend it.
        let mut last_ok = first;
        let margin = hold_margin(&config);
        let mut tick = tokio::time::interval(config.renew_every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let started = tokio::time::Instant::now();
                    match tokio::time::timeout(deadline, renew(&api, &worker, &config)).await {
                        Ok(Ok(())) => {
                            last_ok = started;
                            held_tx.send_if_modified(|h| !std::mem::replace(h, true));
                        }
                        Ok(Err(e)) => tracing::warn!(%worker, error = %e, "lease renewal failed"),
                        Err(_) => tracing::warn!(%worker, ?deadline, "lease renewal timed out"),
                    }
                    if last_ok.elapsed() >= margin
                        && held_tx.send_if_modified(|h| std::mem::replace(h, false))
                    {
                        tracing::warn!(%worker, "could not renew the worker Lease in time; stopping every session");
                    }
                }
                // Not only after a failed request: the margin runs out on its own.
                _ = tokio::time::sleep_until(last_ok + margin), if *held_tx.borrow() => {
                    held_tx.send_replace(false);
                    tracing::warn!(%worker, "could not renew the worker Lease in time; stopping every session");
                }
                _ = stop_rx.changed() => {
                    let _ = tokio::time::timeout(
                        deadline,
                        api.delete(&lease_name(&worker), &DeleteParams::default()),
                    )
                    .await;
                    held_tx.send_replace(false);
                    return;
                }
            }
        }
    });
    Ok(LeaseHandle { held, stop, task })
}

/// What the worker Leases say at `now`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Workers whose Lease is fresh.
    pub live: BTreeSet<String>,
    /// Lease names expired for longer than the orphan age: safe to delete.
    pub orphans: Vec<String>,
}

/// Classify worker Leases (pure). A Lease counts only if its holder is the worker it is
/// named after.
pub fn membership(leases: &[Lease], now: Timestamp, orphan_after: Duration) -> Membership {
    let mut out = Membership::default();
    for l in leases {
        let name = l.name_any();
        let Some(worker) = name.strip_prefix(LEASE_PREFIX) else {
            continue;
        };
        let spec = l.spec.as_ref();
        let expires = spec.and_then(|s| {
            let renewed = s.renew_time.as_ref()?.0.as_second();
            renewed.checked_add(i64::from(s.lease_duration_seconds?))
        });
        let holder_ok = spec.and_then(|s| s.holder_identity.as_deref()) == Some(worker);
        match expires {
            Some(e) if holder_ok && e > now.as_second() => {
                out.live.insert(worker.to_string());
            }
            Some(e) if e.saturating_add(orphan_after.as_secs() as i64) < now.as_second() => {
                out.orphans.push(name.clone());
            }
            _ => {}
        }
    }
    out
}

/// Workers whose Lease is fresh at `now`.
pub async fn live_workers(
    client: Client,
    namespace: &str,
    now: Timestamp,
) -> kube::Result<BTreeSet<String>> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let leases = api.list(&ListParams::default()).await?;
    Ok(membership(&leases.items, now, Duration::from_secs(3600)).live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn lease(name: &str, holder: &str, renewed: i64, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_duration_seconds: Some(secs),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn the_margin_keeps_a_live_worker_and_drops_a_stalled_one_before_expiry() {
        // Every setting the command line accepts (renew at most a third of the duration).
        for (duration, renew) in [(15, 5), (4, 1), (30, 10), (9, 3), (60, 1)] {
            let config = LeaseConfig {
                duration: Duration::from_secs(duration),
                renew_every: Duration::from_secs(renew),
            };
            let (margin, deadline) = (
                hold_margin(&config),
                super::super::request_deadline(config.renew_every),
            );
            // The next renewal starts within an interval and ends within its deadline.
            assert!(config.renew_every + deadline < margin, "{duration}/{renew}");
            // Given up (at worst a request's deadline late) before the Lease can expire.
            assert!(margin + deadline < config.duration, "{duration}/{renew}");
        }
    }

    #[test]
    fn fresh_expired_foreign_and_orphaned_leases() {
        let now = Timestamp::from_second(10_000).unwrap();
        let leases = [
            lease("grasp-sync-worker-a", "a", 9_995, 15),
            lease("grasp-sync-worker-b", "b", 9_900, 15),
            lease("grasp-sync-worker-c", "someone-else", 9_995, 15),
            lease("grasp-sync-worker-d", "d", 1_000, 15),
            lease("grasp-sync-controller", "x", 9_995, 15),
        ];
        let m = membership(&leases, now, Duration::from_secs(600));
        assert_eq!(m.live, BTreeSet::from(["a".to_string()]));
        assert_eq!(m.orphans, vec!["grasp-sync-worker-d".to_string()]);
    }
}
