//! Controller leader election through one Lease (`grasp-sync-controller`). Every write carries
//! the Lease's `resourceVersion`, so two replicas racing for it cannot both win (the loser
//! gets a 409). A leader that cannot renew steps down before the Lease could expire, so two
//! replicas never assign at once; on a graceful stop it hands the Lease over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::crd::owner::with_owner;

pub const LEADER_LEASE: &str = "grasp-sync-controller";

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub identity: String,
    pub lease_name: String,
    pub duration: Duration,
    /// How often the leader renews and a standby retries.
    pub renew_every: Duration,
    /// The controller's Deployment: the Lease is deleted with it.
    pub owner: Option<OwnerReference>,
}

impl LeaderConfig {
    pub fn new(identity: impl Into<String>) -> Self {
        LeaderConfig {
            identity: identity.into(),
            lease_name: LEADER_LEASE.to_string(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(3),
            owner: None,
        }
    }
}

/// Who may take the Lease at `now`, from its spec alone (pure).
pub fn may_take(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => {
            let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds)
            else {
                return true;
            };
            renewed.0.as_second().saturating_add(i64::from(secs)) < now.as_second()
        }
    }
}

fn spec_for(config: &LeaderConfig, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let same_holder =
        previous.and_then(|p| p.holder_identity.as_deref()) == Some(config.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs().max(1) as i32),
        acquire_time: if same_holder {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// One attempt to acquire or renew; `Ok(true)` when this replica holds the Lease now.
pub async fn try_lead(api: &Api<Lease>, config: &LeaderConfig) -> kube::Result<bool> {
    let now = Timestamp::now();
    match api.get_opt(&config.lease_name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.lease_name.clone()),
                    owner_references: config.owner.as_ref().map(|o| vec![o.clone()]),
                    ..ObjectMeta::default()
                },
                spec: Some(spec_for(config, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !may_take(lease.spec.as_ref(), &config.identity, now) {
                return Ok(false);
            }
            // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
            lease.spec = Some(spec_for(config, lease.spec.as_ref(), now));
            if let Some(owner) = &config.owner {
                let refs = lease.metadata.owner_references.take();
                lease.metadata.owner_references = Some(with_owner(refs, owner));
            }
            match api
                .replace(&config.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Give the Lease up so a standby takes over without waiting for expiry.
pub async fn step_down(api: &Api<Lease>, config: &LeaderConfig) -> kube::Result<()> {
    if let Some(mut lease) = api.get_opt(&config.lease_name).await? {
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(config.identity.as_str());
        if ours {
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
            }
            api.replace(&config.lease_name, &PostParams::default(), &lease)
                .await?;
        }
    }
    Ok(())
}

/// A running election: `leading()` turns true while this replica leads.
pub struct Election {
    leading: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Election {
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stop campaigning; a leader hands the Lease over.
    pub async fn resign(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub fn campaign(client: Client, namespace: &str, config: LeaderConfig) -> Election {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let (tx, leading) = watch::channel(false);
    let (stop, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        // Step down before the Lease could expire at the others' end.
        let safe = config
            .duration
            .saturating_sub(config.renew_every)
            .max(config.renew_every);
        let mut last_ok: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(config.renew_every);
        // Every attempt is bounded below the renew interval, so a stalled API server cannot
        // keep a leader leading past the margin; the margin counts from an attempt's start.
        let deadline = super::request_deadline(config.renew_every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => break,
                _ = tokio::time::sleep_until(last_ok.map_or_else(tokio::time::Instant::now, |t| t + safe)), if *tx.borrow() => {
                    if tx.send_if_modified(|l| std::mem::replace(l, false)) {
                        tracing::warn!(identity = %config.identity, "could not renew the leader Lease in time; stepping down");
                    }
                    continue;
                }
            }
            let started = tokio::time::Instant::now();
            let within = match last_ok {
                Some(t) => super::renewal_within(*tx.borrow(), deadline, t + safe, started),
                None => deadline,
            };
            let attempt = match tokio::time::timeout(within, try_lead(&api, &config)).await {
                Ok(r) => r,
                Err(_) => Err(super::timed_out(within)),
            };
            match attempt {
                Ok(true) => {
                    last_ok = Some(started);
                    if tx.send_if_modified(|l| !std::mem::replace(l, true)) {
                        tracing::info!(identity = %config.identity, "became the leader");
                    }
                }
                Ok(false) => {
                    last_ok = None;
                    if tx.send_if_modified(|l| std::mem::replace(l, false)) {
                        tracing::warn!(identity = %config.identity, "another replica took the lead");
                    }
                }
                Err(e) => {
                    tracing::warn!(identity = %config.identity, error = %e, "leader election request failed");
                    if last_ok.is_none_or(|t| t.elapsed() >= safe)
                        && tx.send_if_modified(|l| std::mem::replace(l, false))
                    {
                        tracing::warn!(identity = %config.identity, "could not renew the leader Lease; stepping down");
                    }
                }
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            let handed = tokio::time::timeout(deadline, step_down(&api, &config)).await;
            if let Ok(Err(e)) | Err(e) = handed.map_err(|_| super::timed_out(deadline)) {
                tracing::warn!(error = %e, "could not hand the leader Lease over; it expires by itself");
            }
        }
    });
    Election {
        leading,
        stop,
        task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_fresh_lease_of_another_holder_is_not_taken() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(!may_take(Some(&spec(Some("b"), 995, 15)), "a", now));
        assert!(may_take(Some(&spec(Some("a"), 995, 15)), "a", now), "own");
        assert!(
            may_take(Some(&spec(Some("b"), 900, 15)), "a", now),
            "expired"
        );
        assert!(
            may_take(Some(&spec(None, 995, 15)), "a", now),
            "handed over"
        );
        assert!(may_take(None, "a", now));
    }

    #[test]
    fn transitions_count_holder_changes_only() {
        let now = Timestamp::from_second(1_000).unwrap();
        let c = LeaderConfig::new("a");
        let first = spec_for(&c, None, now);
        assert_eq!(first.lease_transitions, Some(1));
        let renewed = spec_for(&c, Some(&first), now);
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, first.acquire_time);
        let taken = spec_for(&LeaderConfig::new("b"), Some(&renewed), now);
        assert_eq!(taken.lease_transitions, Some(2));
    }
}
