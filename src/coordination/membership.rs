//! Worker membership: every worker holds its own Lease (`grasp-sync-worker-<name>`) and
//! renews it every few seconds; the controller counts a worker live while its Lease is fresh.
//! A worker that cannot renew must consider itself gone before the Lease could expire, so
//! two workers never hold one relay.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
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
    /// The workers' StatefulSet: the Lease is deleted with it.
    pub owner: Option<OwnerReference>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            owner: None,
        }
    }
}

pub fn lease_name(worker: &str) -> String {
    format!("{LEASE_PREFIX}{worker}")
}

/// Annotation a worker sets on its Lease when it stops gracefully (every session closed,
/// final status written). The next renewal, by the same field manager, removes it.
pub const RELEASED_ANNOTATION: &str = "grasp-sync.dev/released";

/// Whether the Lease carries a graceful stop's mark.
pub fn is_released(l: &Lease) -> bool {
    l.annotations()
        .get(RELEASED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

async fn renew(api: &Api<Lease>, worker: &str, config: &LeaseConfig) -> kube::Result<()> {
    write(api, worker, config, false).await
}

/// Apply this worker's Lease, renewed now; `released` marks a graceful stop. Server-side
/// apply removes the fields this manager no longer sets, so a renewal clears the mark.
async fn write(
    api: &Api<Lease>,
    worker: &str,
    config: &LeaseConfig,
    released: bool,
) -> kube::Result<()> {
    let now = MicroTime(Timestamp::now());
    let mut metadata = json!({
        "name": lease_name(worker),
        "labels": {"app.kubernetes.io/name": "grasp-sync", "app.kubernetes.io/component": "worker"}
    });
    if released {
        metadata["annotations"] = json!({ RELEASED_ANNOTATION: "true" });
    }
    if let Some(owner) = &config.owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
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

    /// Stop renewing and mark the Lease released: the controller reassigns at once — unless
    /// this worker is a StatefulSet pod that will come back under the same name (a rolling
    /// restart), whose relays wait for it for the restart grace.
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
                    let within =
                        super::renewal_within(*held_tx.borrow(), deadline, last_ok + margin, started);
                    match tokio::time::timeout(within, renew(&api, &worker, &config)).await {
                        Ok(Ok(())) => {
                            last_ok = started;
                            held_tx.send_if_modified(|h| !std::mem::replace(h, true));
                        }
                        Ok(Err(e)) => tracing::warn!(%worker, error = %e, "lease renewal failed"),
                        Err(_) => tracing::warn!(%worker, deadline = ?within, "lease renewal timed out"),
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
                    // Every session is closed by now: the mark is not a renewal racing the
                    // Lease's expiry, and it decides whether a returning pod keeps its relays,
                    // so a loaded API server gets the Lease's whole duration to take it.
                    let mark = deadline.max(config.duration);
                    match tokio::time::timeout(mark, write(&api, &worker, &config, true)).await {
                        Ok(Ok(())) => {}
                        // Not marked: the controller sees the Lease expire instead.
                        Ok(Err(e)) => tracing::warn!(%worker, error = %e, "could not mark the worker Lease released"),
                        Err(_) => tracing::warn!(%worker, deadline = ?mark, "marking the worker Lease released timed out"),
                    }
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
    /// Leases named like a worker's but held by an identity the controller does not expect
    /// (a forged member): ignored.
    pub foreign: usize,
    /// Workers that stopped gracefully and are expected back under the same name (a rolling
    /// restart): still in `live`, so their relays stay, unserved, until they return or the
    /// restart grace ends.
    pub resting: BTreeSet<String>,
    /// Workers whose Lease is marked released and who are not waited for: not in `live`.
    pub released: BTreeSet<String>,
}

/// Why a worker left the ring between two observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Its Lease was not renewed in time, or is gone: a crash, a stall, a lost network.
    LeaseExpired,
    /// It stopped gracefully and is not expected back (scaled away, or no restart grace).
    Released,
    /// It stopped gracefully and was waited for, but did not come back within the grace.
    GraceEnded,
}

impl Departure {
    pub fn label(self) -> &'static str {
        match self {
            Departure::LeaseExpired => "lease_expired",
            Departure::Released => "released",
            Departure::GraceEnded => "grace_ended",
        }
    }
}

impl Membership {
    /// The workers live in `before` and not now, with why they left.
    pub fn departures(&self, before: &Membership) -> Vec<(String, Departure)> {
        before
            .live
            .difference(&self.live)
            .map(|w| {
                let why = if !self.released.contains(w) {
                    Departure::LeaseExpired
                } else if before.resting.contains(w) {
                    Departure::GraceEnded
                } else {
                    Departure::Released
                };
                (w.clone(), why)
            })
            .collect()
    }
}

/// Who is expected back after a graceful stop: the StatefulSet's pods below its current
/// replica count, for `grace` after the stop was seen — or after its pod was last seen
/// terminating, when the kubelet takes longer to finish the pod than the process took to
/// stop (a kubelet deletes the pod object only once its sandbox is gone: measured from 5 to
/// over 30 s on one node), up to [`MAX_GRACES`] graces. A pod at or above the replica count
/// was scaled away and hands over at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Returning {
    pub replicas: u32,
    pub grace: Duration,
}

/// However long a stopped pod stays terminating, its relays wait at most this many restart
/// graces after its stop: a pod stuck terminating (a node lost after the process stopped)
/// must not keep them unserved.
pub const MAX_GRACES: u32 = 10;

/// Which worker identities may be ring members: the StatefulSet's pods `<name>-0` …
/// `<name>-<max-1>`. RBAC cannot restrict which Lease a worker creates, so without this any
/// worker identity could add a ghost member whose relays nobody syncs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRule {
    pub statefulset: String,
    pub max: u32,
    /// The StatefulSet's replica count as last seen: a worker joins the ring only below it
    /// (a Lease of any other ordinal, a ghost's, is ignored), and once a member stays one
    /// while its Lease is live, so that a pod being scaled away keeps its relays until it
    /// has closed its sessions. `None`: unknown, `max` alone decides.
    pub scale: Option<u32>,
}

impl MemberRule {
    pub fn allows(&self, worker: &str) -> bool {
        self.ordinal(worker).is_some()
    }

    /// The pod ordinal of `worker`, if it is one of the StatefulSet's allowed pods.
    pub fn ordinal(&self, worker: &str) -> Option<u32> {
        worker
            .strip_prefix(self.statefulset.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .filter(|n| !n.is_empty() && (n.len() == 1 || !n.starts_with('0')))
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|i| *i < self.max)
    }
}

/// Judges worker Leases by when *this* controller saw each one change, not by the
/// `renewTime` a worker wrote: a worker whose clock runs behind would otherwise be declared
/// dead while renewing, and one whose clock runs ahead (or a forged far-future Lease) kept
/// alive long after it stopped. This is how client-go's leader election observes a record.
/// A Lease seen for the first time counts as just renewed — a new leader waits one Lease
/// duration before declaring anyone dead — unless its `renewTime` is older than any
/// plausible skew ([`FIRST_SIGHT_TOLERANCE`]); one that was never renewed never counts.
#[derive(Debug, Default, Clone)]
pub struct LeaseObserver {
    /// Lease name → (its renewal as last seen, when we saw that change; `None`: stale when
    /// first seen and unchanged since).
    seen: HashMap<String, (String, Option<std::time::Instant>)>,
    /// The members of the last observation: they stay members whatever the scale.
    members: BTreeSet<String>,
    /// Worker → when its pod was last seen terminating ([`LeaseObserver::pods_terminating`]).
    terminating: HashMap<String, std::time::Instant>,
    /// Released Leases whose rest is over: a later sight of the pod terminating (a new
    /// incarnation stuck, deleted again) does not make them rest again until the Lease
    /// changes.
    rested: HashSet<String>,
}

/// How far a first-seen Lease's `renewTime` may lag the controller's clock and still count
/// as possibly alive.
pub const FIRST_SIGHT_TOLERANCE: Duration = Duration::from_secs(300);

impl LeaseObserver {
    /// The workers whose pod is terminating (being deleted) as seen at `now`: a gracefully
    /// stopped worker is waited for while its pod is, and for the restart grace after.
    pub fn pods_terminating<'a>(
        &mut self,
        workers: impl IntoIterator<Item = &'a str>,
        now: std::time::Instant,
    ) {
        for w in workers {
            self.terminating.insert(w.to_string(), now);
        }
    }

    /// Classify `leases` as of `now` (a monotonic instant of this process) and `wall` (this
    /// controller's clock, used only for Leases seen for the first time). A Lease marked
    /// released is not live, unless `rule` and `returning` say its pod comes back.
    pub fn observe(
        &mut self,
        leases: &[Lease],
        now: std::time::Instant,
        wall: Timestamp,
        orphan_after: Duration,
        rule: Option<&MemberRule>,
        returning: Option<Returning>,
    ) -> Membership {
        let mut out = Membership::default();
        let mut present = HashSet::new();
        for l in leases {
            let name = l.name_any();
            let Some(worker) = name.strip_prefix(LEASE_PREFIX) else {
                continue;
            };
            let spec = l.spec.as_ref();
            let holder_ok = spec.and_then(|s| s.holder_identity.as_deref()) == Some(worker);
            if !holder_ok || rule.is_some_and(|r| !r.allows(worker)) {
                out.foreign += 1;
                continue;
            }
            let Some(renewed) = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0) else {
                continue; // never renewed: nobody holds it
            };
            present.insert(name.clone());
            let duration = Duration::from_secs(
                spec.and_then(|s| s.lease_duration_seconds)
                    .unwrap_or(0)
                    .max(0) as u64,
            );
            // Seconds by which the writer's stamp lags our clock (negative: ahead).
            let lag = wall.as_second().saturating_sub(renewed.as_second());
            let lags_beyond = |d: Duration| lag > i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            // What a renewal changes: the renew time as written (whatever the writer's clock
            // says), and the object's version.
            let print = format!("{renewed}/{}", l.resource_version().unwrap_or_default());
            let changed_at = match self.seen.get(&name) {
                Some((p, at)) if *p == print => *at,
                Some(_) => {
                    self.rested.remove(&name);
                    Some(now)
                }
                None if lags_beyond(duration + FIRST_SIGHT_TOLERANCE) => None,
                None => Some(now),
            };
            self.seen.insert(name.clone(), (print, changed_at));
            if is_released(l) {
                let released_worker = worker.to_string();
                let back = rule
                    .and_then(|r| r.ordinal(worker))
                    .zip(returning)
                    .filter(|(i, r)| *i < r.replicas)
                    .map(|(_, r)| r.grace);
                let since = changed_at.map(|at| now.saturating_duration_since(at));
                // The grace runs from the stop, or from when its pod was last seen still
                // terminating, whichever is later; never beyond MAX_GRACES graces.
                let waited = changed_at.map(|at| {
                    let from = self.terminating.get(worker).map_or(at, |t| (*t).max(at));
                    now.saturating_duration_since(from)
                });
                let rests = match (since, waited, back) {
                    (Some(s), Some(w), Some(grace)) => {
                        w < grace
                            && s < grace.saturating_mul(MAX_GRACES)
                            && !self.rested.contains(&name)
                    }
                    _ => false,
                };
                if rests {
                    out.live.insert(worker.to_string());
                    out.resting.insert(worker.to_string());
                    continue;
                }
                if back.is_some() {
                    self.rested.insert(name.clone());
                }
                match (since, back) {
                    (Some(s), back)
                        if s >= back.unwrap_or_default().max(duration) + orphan_after =>
                    {
                        out.orphans.push(name);
                    }
                    (None, _) if lags_beyond(duration + FIRST_SIGHT_TOLERANCE + orphan_after) => {
                        out.orphans.push(name);
                    }
                    _ => {}
                }
                out.released.insert(released_worker);
                continue;
            }
            match changed_at {
                Some(at) if now.saturating_duration_since(at) < duration => {
                    out.live.insert(worker.to_string());
                }
                Some(at) if now.saturating_duration_since(at) >= duration + orphan_after => {
                    out.orphans.push(name);
                }
                None if lags_beyond(duration + FIRST_SIGHT_TOLERANCE + orphan_after) => {
                    out.orphans.push(name);
                }
                _ => {}
            }
        }
        self.seen.retain(|name, _| present.contains(name));
        self.terminating
            .retain(|w, _| present.contains(&lease_name(w)));
        self.rested.retain(|name| present.contains(name));
        // Joining needs an ordinal below the StatefulSet's scale; staying does not.
        if let Some((r, scale)) = rule.and_then(|r| Some((r, r.scale?))) {
            let joining: Vec<String> = out
                .live
                .iter()
                .filter(|w| !self.members.contains(*w))
                .filter(|w| r.ordinal(w).is_none_or(|i| i >= scale))
                .cloned()
                .collect();
            for w in joining {
                out.live.remove(&w);
                out.resting.remove(&w);
                out.foreign += 1;
            }
        }
        // Only an observation that knew the scale decides who is a member: one made without
        // it (the StatefulSet unreadable) must not let a ghost stay in once it is known.
        if rule.is_none_or(|r| r.scale.is_some()) {
            self.members = out.live.clone();
        }
        out
    }

    /// Workers that hold relays now (named by assignment labels) count as members already:
    /// after a leader change, a pod being scaled away keeps its relays until it has stopped,
    /// instead of losing them while its sessions still run.
    pub fn keep_members<'a>(&mut self, holders: impl IntoIterator<Item = &'a str>) {
        self.members.extend(holders.into_iter().map(str::to_string));
    }
}

/// Classify worker Leases by comparing each `renewTime` with `now` (pure). For a one-off
/// look (tools, tests); the controller judges by observed change ([`LeaseObserver`]), which
/// no clock skew can fool. A Lease counts only if its holder is the worker it is named after.
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
            Some(e) if holder_ok && !is_released(l) && e > now.as_second() => {
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

    #[test]
    fn a_renewal_never_waits_past_the_margin_while_the_lease_counts_as_held() {
        // The chart's Lease: 6 s, renewed every 2 s; each request may take 1.6 s.
        let config = LeaseConfig {
            duration: Duration::from_secs(6),
            renew_every: Duration::from_secs(2),
            ..LeaseConfig::default()
        };
        let deadline = crate::coordination::request_deadline(config.renew_every);
        let margin = hold_margin(&config);
        let t0 = tokio::time::Instant::now();
        let held_until = t0 + margin;
        // The next renewal after a good one: the whole deadline.
        let next = t0 + config.renew_every;
        assert_eq!(
            crate::coordination::renewal_within(true, deadline, held_until, next),
            deadline
        );
        // The one after a stalled renewal starts on the margin's end: it may not wait at all,
        // so the Lease is given up then, a whole interval before it could expire.
        let on_the_edge = t0 + 2 * config.renew_every;
        assert_eq!(on_the_edge, held_until);
        assert_eq!(
            crate::coordination::renewal_within(true, deadline, held_until, on_the_edge),
            Duration::ZERO
        );
        // Half a second before it: half a second.
        assert_eq!(
            crate::coordination::renewal_within(
                true,
                deadline,
                held_until,
                held_until - Duration::from_millis(500)
            ),
            Duration::from_millis(500)
        );
        // Given up already (trying to take it back): the whole deadline.
        assert_eq!(
            crate::coordination::renewal_within(false, deadline, held_until, on_the_edge),
            deadline
        );
    }
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
                owner: None,
            };
            let (margin, deadline) = (
                hold_margin(&config),
                crate::coordination::request_deadline(config.renew_every),
            );
            // The next renewal starts within an interval and ends within its deadline.
            assert!(config.renew_every + deadline < margin, "{duration}/{renew}");
            // Given up (at worst a request's deadline late) before the Lease can expire.
            assert!(margin + deadline < config.duration, "{duration}/{renew}");
        }
    }

    fn renewed(name: &str, holder: &str, at: i64, version: u32) -> Lease {
        let mut l = lease(name, holder, at, 15);
        l.metadata.resource_version = Some(version.to_string());
        l
    }

    #[test]
    fn liveness_is_judged_by_observed_change_whatever_the_writer_s_clock() {
        let secs = Duration::from_secs;
        let t0 = std::time::Instant::now();
        let wall = 10_000; // the controller's clock, in seconds
        // Every 5 s each worker renews, stamping its own clock: a's runs 60 s behind, b's
        // 60 s ahead, c's is right. b dies after the fourth renewal.
        let at = |k: i64| -> Vec<Lease> {
            let b = k.min(3);
            vec![
                renewed("grasp-sync-worker-a", "a", wall - 60 + 5 * k, k as u32),
                renewed("grasp-sync-worker-b", "b", wall + 60 + 5 * b, b as u32),
                renewed("grasp-sync-worker-c", "c", wall + 5 * k, k as u32),
            ]
        };
        let mut obs = LeaseObserver::default();
        let mut live_at = Vec::new();
        for k in 0..8 {
            let now = t0 + secs(5 * k as u64);
            let m = obs.observe(
                &at(k),
                now,
                Timestamp::from_second(wall + 5 * k).unwrap(),
                secs(600),
                None,
                None,
            );
            live_at.push(m.live.into_iter().collect::<Vec<_>>().join(","));
        }
        // b's last renewal was seen at 15 s: live until 30 s, whatever its stamp says; a is
        // live throughout though its stamps are a minute old.
        assert_eq!(
            live_at,
            [
                "a,b,c", "a,b,c", "a,b,c", "a,b,c", "a,b,c", "a,b,c", "a,c", "a,c"
            ]
        );
        // Judged by clocks instead, a is dead while renewing and b alive after its death.
        let by_clock = membership(
            &at(7),
            Timestamp::from_second(wall + 35).unwrap(),
            secs(600),
        );
        assert_eq!(
            by_clock.live.into_iter().collect::<Vec<_>>(),
            ["b", "c"],
            "the clock comparison this replaces"
        );
    }

    #[test]
    fn first_sight_stale_never_renewed_and_forged_leases() {
        let secs = Duration::from_secs;
        let t0 = std::time::Instant::now();
        let wall = Timestamp::from_second(100_000).unwrap();
        let never: Lease = {
            let mut l = lease("grasp-sync-worker-n", "n", 0, 15);
            l.spec.as_mut().unwrap().renew_time = None;
            l
        };
        let leases = [
            // Died an hour ago: dead at once, and an orphan.
            renewed("grasp-sync-worker-old", "old", 100_000 - 3_600, 1),
            // A minute behind (skew, or died a minute ago): live for one duration.
            renewed("grasp-sync-worker-skew", "skew", 100_000 - 60, 1),
            // Forged a day ahead, never renewed again.
            renewed("grasp-sync-worker-ghost", "ghost", 100_000 + 86_400, 1),
            never,
        ];
        let mut obs = LeaseObserver::default();
        let m = obs.observe(&leases, t0, wall, secs(600), None, None);
        assert_eq!(
            m.live.iter().map(String::as_str).collect::<Vec<_>>(),
            ["ghost", "skew"]
        );
        assert_eq!(m.orphans, ["grasp-sync-worker-old"]);
        // Nothing changes for a Lease duration: the forged and the skewed one are dead.
        let m = obs.observe(&leases, t0 + secs(15), wall, secs(600), None, None);
        assert!(m.live.is_empty(), "{:?}", m.live);
    }

    fn released(name: &str, holder: &str, at: i64, version: u32) -> Lease {
        let mut l = renewed(name, holder, at, version);
        l.metadata.annotations =
            Some([(RELEASED_ANNOTATION.to_string(), "true".to_string())].into());
        l
    }

    /// The StatefulSet `gs` (up to 8 pods, scale unknown) at two replicas, a 30 s grace.
    fn gs_of_two() -> (MemberRule, Returning) {
        let rule = MemberRule {
            statefulset: "gs".into(),
            max: 8,
            scale: None,
        };
        let back = Returning {
            replicas: 2,
            grace: Duration::from_secs(30),
        };
        (rule, back)
    }

    #[test]
    fn a_pod_that_stopped_gracefully_keeps_its_place_while_it_is_expected_back() {
        let secs = Duration::from_secs;
        let t0 = std::time::Instant::now();
        let wall = Timestamp::from_second(50_000).unwrap();
        let (rule, back) = gs_of_two();
        let leases = |v: u32| {
            vec![
                renewed("grasp-sync-worker-gs-0", "gs-0", 50_000, v),
                // Released by a graceful stop: gs-1 is below the replica count (a rolling
                // restart), gs-2 above it (scaled away).
                released("grasp-sync-worker-gs-1", "gs-1", 50_000, 1),
                released("grasp-sync-worker-gs-2", "gs-2", 50_000, 1),
            ]
        };
        let names = |m: &Membership| m.live.iter().cloned().collect::<Vec<_>>().join(",");
        let mut obs = LeaseObserver::default();
        let m = obs.observe(&leases(1), t0, wall, secs(60), Some(&rule), Some(back));
        assert_eq!(names(&m), "gs-0,gs-1");
        assert_eq!(m.resting, BTreeSet::from(["gs-1".to_string()]));
        // Still waited for just before the grace ends; not after it.
        let m = obs.observe(
            &leases(2),
            t0 + secs(29),
            wall,
            secs(60),
            Some(&rule),
            Some(back),
        );
        assert_eq!(names(&m), "gs-0,gs-1");
        let m = obs.observe(
            &leases(3),
            t0 + secs(30),
            wall,
            secs(60),
            Some(&rule),
            Some(back),
        );
        assert_eq!(names(&m), "gs-0");
        assert!(m.orphans.is_empty());
        // Long gone: both released Leases are orphans.
        let m = obs.observe(
            &leases(4),
            t0 + secs(90),
            wall,
            secs(60),
            Some(&rule),
            Some(back),
        );
        assert_eq!(m.orphans.len(), 2, "{:?}", m.orphans);
        // Without a StatefulSet to say who comes back, a released worker is gone at once.
        let m = LeaseObserver::default().observe(&leases(1), t0, wall, secs(60), Some(&rule), None);
        assert_eq!(names(&m), "gs-0");
        let m = LeaseObserver::default().observe(&leases(1), t0, wall, secs(60), None, Some(back));
        assert_eq!(names(&m), "gs-0");
        // The clock-comparing look never counts a released Lease.
        assert_eq!(
            membership(&leases(1), wall, secs(60)).live,
            BTreeSet::from(["gs-0".to_string()])
        );
    }

    #[test]
    fn a_pod_the_kubelet_is_still_terminating_is_waited_for_beyond_the_grace() {
        // Seen on a real node: the process stopped in 0.4 s, the kubelet deleted its pod
        // 31 s later, and a grace counted from the stop moved every relay just before the
        // pod came back.
        let secs = Duration::from_secs;
        let t0 = std::time::Instant::now();
        let wall = Timestamp::from_second(50_000).unwrap();
        let (rule, back) = gs_of_two();
        let leases = vec![
            renewed("grasp-sync-worker-gs-0", "gs-0", 50_000, 1),
            released("grasp-sync-worker-gs-1", "gs-1", 50_000, 1),
        ];
        let mut obs = LeaseObserver::default();
        let at = |obs: &mut LeaseObserver, t: u64| {
            obs.observe(
                &leases,
                t0 + secs(t),
                wall,
                secs(60),
                Some(&rule),
                Some(back),
            )
        };
        assert!(at(&mut obs, 0).resting.contains("gs-1"));
        // Its pod still terminating at 35 s: still waited for, and for a grace after that.
        obs.pods_terminating(["gs-1"], t0 + secs(35));
        assert!(at(&mut obs, 40).resting.contains("gs-1"));
        assert!(at(&mut obs, 64).live.contains("gs-1"));
        let m = at(&mut obs, 65);
        assert!(!m.live.contains("gs-1") && m.released.contains("gs-1"));
        // Once its rest is over, a later sight of a pod terminating (a new one deleted
        // again) does not bring it back: its relays moved on.
        obs.pods_terminating(["gs-1"], t0 + secs(70));
        assert!(!at(&mut obs, 70).live.contains("gs-1"));
        // A pod terminating however long: at most MAX_GRACES graces after the stop, and the
        // Lease is never judged an orphan meanwhile.
        let limit = 30 * u64::from(MAX_GRACES);
        let mut obs = LeaseObserver::default();
        for t in (0..limit).step_by(10) {
            obs.pods_terminating(["gs-1"], t0 + secs(t));
            let m = at(&mut obs, t);
            assert!(m.resting.contains("gs-1"), "at {t} s");
            assert!(
                !m.orphans.iter().any(|o| o == "grasp-sync-worker-gs-1"),
                "at {t} s"
            );
        }
        obs.pods_terminating(["gs-1"], t0 + secs(limit));
        assert!(!at(&mut obs, limit).live.contains("gs-1"));
        // A stop written again (a new incarnation stopped too): a new rest.
        let restopped = vec![
            renewed("grasp-sync-worker-gs-0", "gs-0", 50_000, 1),
            released("grasp-sync-worker-gs-1", "gs-1", 50_000, 2),
        ];
        let m = obs.observe(
            &restopped,
            t0 + secs(limit + 1),
            wall,
            secs(60),
            Some(&rule),
            Some(back),
        );
        assert!(m.resting.contains("gs-1"));
        // A pod seen terminating before a later stop does not lengthen that stop's grace.
        let mut obs = LeaseObserver::default();
        obs.pods_terminating(["gs-1"], t0);
        assert!(at(&mut obs, 10).resting.contains("gs-1"));
        assert!(at(&mut obs, 39).resting.contains("gs-1"));
        assert!(!at(&mut obs, 40).live.contains("gs-1"));
    }

    #[test]
    fn departures_say_why_a_worker_left() {
        let secs = Duration::from_secs;
        let t0 = std::time::Instant::now();
        let wall = Timestamp::from_second(50_000).unwrap();
        let (rule, back) = gs_of_two();
        let back = Some(back);
        let mut obs = LeaseObserver::default();
        let look = |obs: &mut LeaseObserver, leases: &[Lease], at: u64| {
            obs.observe(leases, t0 + secs(at), wall, secs(600), Some(&rule), back)
        };
        let all = [
            renewed("grasp-sync-worker-gs-0", "gs-0", 50_000, 1),
            renewed("grasp-sync-worker-gs-1", "gs-1", 50_000, 1),
            renewed("grasp-sync-worker-gs-2", "gs-2", 50_000, 1),
            renewed("grasp-sync-worker-gs-3", "gs-3", 50_000, 1),
        ];
        let first = look(&mut obs, &all, 0);
        assert!(first.departures(&Membership::default()).is_empty());
        assert_eq!(first.live.len(), 4);
        // gs-0 stops renewing; gs-1 stops gracefully and is expected back (below the
        // replica count); gs-2 stops gracefully and is not (scaled away); gs-3 renews.
        let then = |v: u32| {
            [
                renewed("grasp-sync-worker-gs-0", "gs-0", 50_000, 1),
                released("grasp-sync-worker-gs-1", "gs-1", 50_000, 2),
                released("grasp-sync-worker-gs-2", "gs-2", 50_000, 2),
                renewed("grasp-sync-worker-gs-3", "gs-3", 50_000, v),
            ]
        };
        let second = look(&mut obs, &then(2), 1);
        assert_eq!(
            second.departures(&first),
            [("gs-2".to_string(), Departure::Released)]
        );
        let third = look(&mut obs, &then(3), 16);
        assert_eq!(
            third.departures(&second),
            [("gs-0".to_string(), Departure::LeaseExpired)]
        );
        let fourth = look(&mut obs, &then(4), 32);
        assert_eq!(
            fourth.departures(&third),
            [("gs-1".to_string(), Departure::GraceEnded)]
        );
        assert_eq!(fourth.live, BTreeSet::from(["gs-3".to_string()]));
    }

    #[test]
    fn only_the_statefulset_s_pods_join_the_ring() {
        let rule = MemberRule {
            statefulset: "gs-worker".into(),
            max: 3,
            scale: None,
        };
        for ok in ["gs-worker-0", "gs-worker-2"] {
            assert!(rule.allows(ok), "{ok}");
        }
        for ghost in [
            "gs-worker-3",
            "gs-worker-03",
            "gs-worker-",
            "gs-worker",
            "gs-worker-1x",
            "gs-worker--1",
            "other-0",
            "ghost",
        ] {
            assert!(!rule.allows(ghost), "{ghost}");
        }
        let t0 = std::time::Instant::now();
        let leases = [
            renewed("grasp-sync-worker-gs-worker-0", "gs-worker-0", 10_000, 1),
            renewed("grasp-sync-worker-ghost", "ghost", 99_999_999, 1),
        ];
        let m = LeaseObserver::default().observe(
            &leases,
            t0,
            Timestamp::from_second(10_000).unwrap(),
            Duration::from_secs(60),
            Some(&rule),
            None,
        );
        assert_eq!(m.live, BTreeSet::from(["gs-worker-0".to_string()]));
        assert_eq!(m.foreign, 1);
    }

    /// `kubectl scale` up to `max` works; a ghost Lease of an ordinal not running now (below
    /// `max`, so RBAC lets a worker identity write it) never joins; a pod being scaled away
    /// stays a member while its Lease is live.
    #[test]
    fn joining_needs_an_ordinal_below_the_statefulset_s_scale() {
        let secs = Duration::from_secs;
        let lease = |i: u32, renewed_at: i64| {
            renewed(
                &format!("grasp-sync-worker-gs-w-{i}"),
                &format!("gs-w-{i}"),
                renewed_at,
                1,
            )
        };
        let rule = |scale| MemberRule {
            statefulset: "gs-w".into(),
            max: 10,
            scale,
        };
        let names = |m: &Membership| m.live.iter().cloned().collect::<Vec<_>>();
        // `leases` with pod 3's Lease renewed at `at`.
        let renew_3 = |leases: &[Lease], at: i64| -> Vec<Lease> {
            leases
                .iter()
                .map(|l| {
                    if l.name_any().ends_with("-3") {
                        lease(3, at)
                    } else {
                        l.clone()
                    }
                })
                .collect()
        };
        let t0 = std::time::Instant::now();
        let wall = Timestamp::from_second(10_000).unwrap();
        let mut obs = LeaseObserver::default();
        let observe = |obs: &mut LeaseObserver, leases: &[Lease], at, scale| {
            obs.observe(leases, at, wall, secs(600), Some(&rule(scale)), None)
        };
        // Three pods; a ghost at ordinal 7.
        let three = [lease(0, 10_000), lease(1, 10_000), lease(2, 10_000)];
        let with_ghost: Vec<Lease> = three.iter().cloned().chain([lease(7, 10_000)]).collect();
        let m = observe(&mut obs, &with_ghost, t0, Some(3));
        assert_eq!(names(&m), ["gs-w-0", "gs-w-1", "gs-w-2"]);
        assert_eq!(m.foreign, 1, "the ghost is counted");
        // Scaled to 4: the new pod joins; the ghost still does not.
        let four: Vec<Lease> = with_ghost
            .iter()
            .cloned()
            .chain([lease(3, 10_000)])
            .collect();
        let m = observe(&mut obs, &four, t0 + secs(1), Some(4));
        assert_eq!(names(&m), ["gs-w-0", "gs-w-1", "gs-w-2", "gs-w-3"]);
        assert_eq!(m.foreign, 1);
        // Scaled back to 3: pod 3 renews until it has stopped, and stays a member meanwhile.
        let renewing = renew_3(&four, 10_002);
        let m = observe(&mut obs, &renewing, t0 + secs(2), Some(3));
        assert!(m.live.contains("gs-w-3"), "{:?}", m.live);
        // Unknown scale: the static bound alone (the ghost, below max, joins).
        let m = LeaseObserver::default().observe(
            &with_ghost,
            t0,
            wall,
            secs(600),
            Some(&rule(None)),
            None,
        );
        assert!(m.live.contains("gs-w-7"));
        // A member that stopped being live must join again: below the scale only.
        let mut obs = LeaseObserver::default();
        let m = observe(&mut obs, &four, t0, Some(4));
        assert!(m.live.contains("gs-w-3"));
        let m = observe(&mut obs, &four, t0 + secs(20), Some(3));
        assert!(!m.live.contains("gs-w-3"), "expired");
        let back = renew_3(&four, 10_030);
        let m = observe(&mut obs, &back, t0 + secs(21), Some(3));
        assert!(
            !m.live.contains("gs-w-3"),
            "a Lease above the scale that stopped being live does not join again"
        );
        // Observations without the scale (the StatefulSet not read yet) admit by `max`, but
        // make nobody a member: once the scale is known, the ghost is out.
        let mut obs = LeaseObserver::default();
        let m = observe(&mut obs, &with_ghost, t0, None);
        assert!(m.live.contains("gs-w-7"));
        let m = observe(&mut obs, &with_ghost, t0 + secs(1), Some(3));
        assert_eq!(names(&m), ["gs-w-0", "gs-w-1", "gs-w-2"]);
        // A new leader during a scale-down: the pod being scaled away still holds relays,
        // and keeps them until it stops.
        let mut obs = LeaseObserver::default();
        obs.keep_members(["gs-w-3"]);
        let m = observe(&mut obs, &four, t0, Some(3));
        assert!(m.live.contains("gs-w-3"), "{:?}", m.live);
        assert!(!m.live.contains("gs-w-7"));
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
