//! The assignment loop of the leading controller: watch RelaySyncs (a reflector) and worker
//! Leases, plan with [`super::plan::plan`] over the hash ring of live workers, and apply
//! the steps as label changes (field manager `grasp-sync-assigner`, apart from discovery's
//! spec writes so neither removes the other's fields): by server-side apply at the
//! resourceVersion planned from, except a reassignment, which is a JSON patch that tests the
//! labels it moves from.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::metrics::AssignmentMetrics;
use super::plan::{self, Assigned, Step};
use super::ring::{DEFAULT_VNODES, Ring};
use crate::coordination::membership;
use crate::crd::{
    ASSIGNER_MANAGER, DRAIN_LABEL, RelaySync, WORKER_LABEL, is_released_by, label_test_failed,
};

static PARAMS: std::sync::LazyLock<PatchParams> =
    std::sync::LazyLock::new(|| PatchParams::apply(ASSIGNER_MANAGER).force());

static JSON_PARAMS: std::sync::LazyLock<PatchParams> = std::sync::LazyLock::new(|| PatchParams {
    field_manager: Some(ASSIGNER_MANAGER.to_string()),
    ..PatchParams::default()
});

/// How a step's labels are written.
enum LabelWrite {
    /// Server-side apply of the labels, at the resourceVersion planned from.
    Apply(serde_json::Value),
    /// A JSON patch whose tests pin the labels the step moves from.
    Json(json_patch::Patch),
}

/// A reassignment away from a dead (or released) worker moves the relay only if it is still
/// labelled for `from` (and still draining, if it was): the one thing that decision rests
/// on. Not the whole object's resourceVersion — the old holder's last status writes land
/// beside the handover, and each would otherwise refuse the move and cost the relay a pass.
fn reassign_ops(from: &str, to: &str, draining: bool) -> json_patch::Patch {
    use json_patch::jsonptr::PointerBuf;
    use json_patch::{PatchOperation, RemoveOperation, ReplaceOperation, TestOperation};
    let label = |key: &str| PointerBuf::from_tokens(["metadata", "labels", key]);
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: label(WORKER_LABEL),
        value: json!(from),
    })];
    if draining {
        ops.push(PatchOperation::Test(TestOperation {
            path: label(DRAIN_LABEL),
            value: json!("true"),
        }));
        ops.push(PatchOperation::Remove(RemoveOperation {
            path: label(DRAIN_LABEL),
        }));
    }
    ops.push(PatchOperation::Replace(ReplaceOperation {
        path: label(WORKER_LABEL),
        value: json!(to),
    }));
    json_patch::Patch(ops)
}

/// Label writes in flight at once.
const LABEL_WRITES_IN_FLIGHT: usize = 32;

/// A label write or Lease deletion abandoned after this long (decided again next pass).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new leader waits for the workers' StatefulSet before its first pass.
const STATEFULSET_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct AssignerConfig {
    /// Most moves between live workers in flight at once.
    pub max_moves: usize,
    pub vnodes: usize,
    /// A pass runs at least this often (Lease expiry needs no event to be noticed).
    pub resync: Duration,
    /// Worker Leases expired this long are deleted.
    pub orphan_lease_after: Duration,
    /// Which worker identities may join the ring (`None`: any Lease named like a worker's).
    pub members: Option<membership::MemberRule>,
    /// How long the relays of a StatefulSet pod that stopped gracefully wait for it to come
    /// back under the same name (a rolling restart) before moving; zero: they move at once.
    /// Needs `members` (the StatefulSet whose replica count says who comes back).
    pub restart_grace: Duration,
}

impl Default for AssignerConfig {
    fn default() -> Self {
        AssignerConfig {
            max_moves: 100,
            vnodes: DEFAULT_VNODES,
            resync: Duration::from_secs(1),
            orphan_lease_after: Duration::from_secs(60),
            members: None,
            restart_grace: Duration::ZERO,
        }
    }
}

fn assigned(o: &RelaySync) -> Assigned {
    let labels = o.labels();
    let worker = labels.get(WORKER_LABEL).cloned();
    Assigned {
        name: o.name_any(),
        url: o.spec.url.clone(),
        draining: labels.get(DRAIN_LABEL).is_some_and(|v| v == "true"),
        released: worker
            .as_deref()
            .is_some_and(|w| is_released_by(o.status.as_ref(), w)),
        worker,
    }
}

fn holder(objects: &[Assigned], name: &str) -> Option<String> {
    objects
        .iter()
        .find(|o| o.name == name)
        .and_then(|o| o.worker.clone())
}

/// Run until `shutdown` turns true. `objects` is the RelaySync cache the controller's store
/// already keeps (no second watch of the same objects); `changes` moves whenever it does.
pub async fn run(
    client: Client,
    namespace: String,
    objects: Store<RelaySync>,
    mut changes: watch::Receiver<u64>,
    config: AssignerConfig,
    metrics: AssignmentMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<RelaySync> = Api::namespaced(client.clone(), &namespace);
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    // Worker Leases, watched too: a released (deleted) Lease reassigns at once.
    let (lease_reader, lease_writer) = reflector::store();
    let lease_stream = reflector::reflector(
        lease_writer,
        watcher(leases.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let lease_changed = Arc::new(Notify::new());
    let notify = lease_changed.clone();
    let lease_task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(lease_stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::debug!(error = %e, "Lease watch interrupted; it resumes");
            }
            notify.notify_one();
        }
    });
    // The workers' StatefulSet, when there is one: its replica count says which pods may
    // join the ring, and which gracefully stopped pods come back. Unreadable: the member
    // rule's bound alone decides, and nobody is waited for.
    let statefulset = config.members.as_ref().map(|rule| {
        let api: Api<StatefulSet> = Api::namespaced(api.clone().into_client(), &namespace);
        let (reader, writer) = reflector::store();
        let wc = watcher::Config::default().fields(&format!("metadata.name={}", rule.statefulset));
        let stream = reflector::reflector(writer, watcher(api, wc))
            .default_backoff()
            .touched_objects();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::debug!(error = %e, "StatefulSet watch interrupted; it resumes");
                }
            }
        });
        (reader, task)
    });
    // The workers' pods, their metadata only: a gracefully stopped worker is waited for while
    // the kubelet is still terminating its pod, and for the restart grace after. Unreadable,
    // the grace counts from the stop alone.
    let pods = (config.members.is_some() && !config.restart_grace.is_zero()).then(|| {
        // Metadata-only requests: the pods' specs and statuses are never read.
        let api: Api<PartialObjectMeta<Pod>> =
            Api::namespaced(api.clone().into_client(), &namespace);
        let (reader, writer) = reflector::store();
        // Every StatefulSet pod carries this label (its value is the pod's name).
        let wc = watcher::Config::default().labels("statefulset.kubernetes.io/pod-name");
        let stream = reflector::reflector(writer, watcher(api, wc))
            .default_backoff()
            .touched_objects();
        // While the watch fails, what the cache last said about a pod may be stale: it is
        // not used, and the grace counts from the stop alone.
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let ok = healthy.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut warned = false;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => ok.store(true, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => {
                        ok.store(false, std::sync::atomic::Ordering::Relaxed);
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(error = %e, "cannot watch the workers' pods (the controller's Role needs list and watch on pods): the restart grace counts from a worker's stop alone until it can");
                        } else {
                            tracing::debug!(error = %e, "worker pod watch interrupted; it resumes");
                        }
                    }
                }
            }
        });
        (reader, healthy, task)
    });
    let ready = async {
        let ok = objects.wait_until_ready().await.is_ok()
            && lease_reader.wait_until_ready().await.is_ok();
        // Who may join the ring depends on the StatefulSet's scale: wait for it a while.
        // Unreadable, the member rule's bound alone decides (warned about below).
        if let Some((reader, _)) = &statefulset {
            let _ = tokio::time::timeout(STATEFULSET_WAIT, reader.wait_until_ready()).await;
        }
        ok
    };
    let ok = tokio::select! {
        ok = ready => ok,
        _ = shutdown.changed() => false,
    };
    let stop_watches = |lease_task: tokio::task::JoinHandle<()>| {
        lease_task.abort();
        if let Some((_, task)) = &statefulset {
            task.abort();
        }
        if let Some((_, _, task)) = &pods {
            task.abort();
        }
    };
    if !ok {
        tracing::warn!("assignment stopped before its caches loaded");
        stop_watches(lease_task);
        return;
    }
    tracing::info!(
        relaysyncs = objects.state().len(),
        leases = lease_reader.state().len(),
        "assignment started"
    );
    let mut tick = tokio::time::interval(config.resync);
    // After a slow pass (a write timing out), one pass, not one for every tick missed: a
    // burst of passes on a stale cache is a burst of writes bound to be refused.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Kept across passes: liveness is judged by when this controller saw each Lease change.
    let mut observer = membership::LeaseObserver::default();
    let mut warned_scale = false;
    let mut before = membership::Membership::default();
    // The newest version of each worker Lease seen, from the watch or a list.
    let mut view = LeaseView::default();
    // Resting workers whose pod was seen terminating: said once per stop.
    let mut waited_for: std::collections::BTreeSet<String> = Default::default();
    loop {
        let scale = statefulset.as_ref().and_then(|(reader, _)| {
            let sts = reader.state().into_iter().next()?;
            Some(
                sts.spec
                    .as_ref()
                    .and_then(|s| s.replicas)
                    .unwrap_or(1)
                    .max(0) as u32,
            )
        });
        let returning = scale
            .filter(|_| !config.restart_grace.is_zero())
            .map(|replicas| membership::Returning {
                replicas,
                grace: config.restart_grace,
            });
        let rule = config
            .members
            .clone()
            .map(|r| membership::MemberRule { scale, ..r });
        if let Some(r) = rule.as_ref().filter(|r| r.scale.is_none())
            && !warned_scale
        {
            tracing::warn!(statefulset = %r.statefulset, max = r.max, "cannot read the workers' StatefulSet: any of its first `max` pods may join the ring");
            warned_scale = true;
        }
        let terminating: Vec<String> = pods
            .as_ref()
            .filter(|(_, healthy, _)| healthy.load(std::sync::atomic::Ordering::Relaxed))
            .map_or_else(Vec::new, |(reader, _, _)| {
                reader
                    .state()
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_some())
                    .map(|p| p.name_any())
                    .collect()
            });
        observer.pods_terminating(
            terminating.iter().map(String::as_str),
            std::time::Instant::now(),
        );
        observer.keep_members(
            objects
                .state()
                .iter()
                .filter_map(|o| o.labels().get(WORKER_LABEL).map(String::as_str)),
        );
        let members = observe_members(
            &leases,
            &lease_reader,
            &mut observer,
            &mut view,
            &before,
            returning,
            rule.as_ref(),
            &config,
            &metrics,
        )
        .await;
        report_departures(&members, &before, &objects, &metrics);
        for w in members.resting.iter().filter(|w| terminating.contains(w)) {
            if waited_for.insert(w.clone()) {
                tracing::info!(worker = %w, grace = ?config.restart_grace, "a stopped worker's pod is still terminating; its relays wait for it (the restart grace counts from when it is gone)");
            }
        }
        waited_for.retain(|w| members.resting.contains(w));
        let r = pass(&api, &objects, &config, &metrics, &members).await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "assignment pass failed; retrying");
        }
        before = members;
        let settle = tokio::select! {
            r = changes.changed() => r.is_ok(),
            _ = lease_changed.notified() => true,
            _ = tick.tick() => false,
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
                false
            }
        };
        if settle {
            // Let a burst of changes (a discovery pass) settle into one pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop_watches(lease_task);
}

/// Say which workers left the ring and why: their relays move next, and an operator
/// reading why relays moved needs to tell a crash or a stall (the Lease expired) from a
/// graceful stop.
fn report_departures(
    now: &membership::Membership,
    before: &membership::Membership,
    objects: &Store<RelaySync>,
    metrics: &AssignmentMetrics,
) {
    for (worker, why) in now.departures(before) {
        let relays = objects
            .state()
            .iter()
            .filter(|o| o.labels().get(WORKER_LABEL) == Some(&worker))
            .count();
        metrics
            .workers_departed
            .with_label_values(&[why.label()])
            .inc();
        tracing::info!(%worker, reason = why.label(), relays, "worker left the ring; its relays move");
    }
}

/// The newest version of each worker Lease seen, from the watch's cache or a list: a stale
/// cache read after a fresh list must not look like a change — to the observer, any change
/// is a renewal — nor bring back a Lease the list showed gone (judged anew, a deleted
/// Lease renewed a few minutes ago would rejoin the ring). Versions are etcd revisions,
/// compared only when both read as numbers; a recreated Lease has a larger one.
#[derive(Debug, Default)]
struct LeaseView {
    newest: HashMap<String, Lease>,
    /// Leases a list showed gone, with the last version seen: the cache may still hold it.
    gone: HashMap<String, u64>,
}

fn revision(l: &Lease) -> Option<u64> {
    l.resource_version().and_then(|v| v.parse::<u64>().ok())
}

impl LeaseView {
    /// What the watch's cache shows, less what a list showed gone, each at its newest.
    fn seen_in_cache(&mut self, cached: Vec<Lease>) -> Vec<Lease> {
        // The watch has caught up with a deletion once the name is gone from it.
        self.gone
            .retain(|name, _| cached.iter().any(|l| l.name_any() == *name));
        let gone = &self.gone;
        let kept = cached
            .into_iter()
            .filter(|l| {
                let deleted = gone.get(&l.name_any());
                deleted.is_none_or(|g| revision(l).is_none_or(|r| r > *g))
            })
            .collect();
        self.merge(kept)
    }

    /// What a fresh list shows: a Lease seen before and missing now is gone.
    fn seen_in_list(&mut self, listed: Vec<Lease>) -> Vec<Lease> {
        for (name, l) in &self.newest {
            if !listed.iter().any(|x| x.name_any() == *name)
                && let Some(r) = revision(l)
            {
                self.gone.insert(name.clone(), r);
            }
        }
        for l in &listed {
            self.gone.remove(&l.name_any());
        }
        self.merge(listed)
    }

    fn merge(&mut self, list: Vec<Lease>) -> Vec<Lease> {
        let out: Vec<Lease> = list
            .into_iter()
            .map(|l| match self.newest.get(&l.name_any()) {
                Some(prev) if revision(prev).zip(revision(&l)).is_some_and(|(p, c)| p > c) => {
                    prev.clone()
                }
                _ => l,
            })
            .collect();
        self.newest = out.iter().map(|l| (l.name_any(), l.clone())).collect();
        out
    }
}

/// Judge the worker Leases (liveness by observed change), count what is ignored, and delete
/// the Leases of long-dead workers.
///
/// The watch's cache is judged first; a judgement that would take a worker out of the ring
/// or delete a Lease is made again from a fresh list. A watch whose connection died without
/// a word (half-open TCP: the watcher notices after minutes) shows no renewals, and judged
/// from it every live worker would expire in turn, its relays moved away without a drain
/// while it still runs them. If the list cannot be had, the last membership stands.
#[allow(clippy::too_many_arguments)]
async fn observe_members(
    leases: &Api<Lease>,
    lease_reader: &Store<Lease>,
    observer: &mut membership::LeaseObserver,
    view: &mut LeaseView,
    before: &membership::Membership,
    returning: Option<membership::Returning>,
    rule: Option<&membership::MemberRule>,
    config: &AssignerConfig,
    metrics: &AssignmentMetrics,
) -> membership::Membership {
    let cached: Vec<Lease> = view.seen_in_cache(
        lease_reader
            .state()
            .iter()
            .map(|l| l.as_ref().clone())
            .collect(),
    );
    let judge = |observer: &mut membership::LeaseObserver, list: &[Lease]| {
        observer.observe(
            list,
            std::time::Instant::now(),
            k8s_openapi::jiff::Timestamp::now(),
            config.orphan_lease_after,
            rule,
            returning,
        )
    };
    let leaving = |m: &membership::Membership| before.live.iter().any(|w| !m.live.contains(w));
    let mut trial = observer.clone();
    let mut members = judge(&mut trial, &cached);
    let mut judged = cached;
    // (A Lease judged long dead needs no list: its deletion is conditional on the version
    // judged, so a renewal the cache missed keeps it.)
    if leaving(&members) {
        match tokio::time::timeout(WRITE_TIMEOUT, leases.list(&ListParams::default())).await {
            Ok(Ok(fresh)) => {
                judged = view.seen_in_list(fresh.items);
                members = judge(observer, &judged);
                let left = leaving(&members);
                let result = if left { "left" } else { "stayed" };
                metrics
                    .departures_checked
                    .with_label_values(&[result])
                    .inc();
                if !left {
                    tracing::warn!(
                        "the Lease watch is behind: a departure it showed is refuted by a fresh list; nothing moves"
                    );
                }
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {WRITE_TIMEOUT:?}"),
                };
                tracing::warn!(%error, "cannot list the worker Leases to confirm a departure; the ring stays as it was");
                metrics
                    .departures_checked
                    .with_label_values(&["failed"])
                    .inc();
                metrics.foreign_leases.set(before.foreign as i64);
                metrics.workers_resting.set(before.resting.len() as i64);
                return before.clone();
            }
        }
    } else {
        *observer = trial;
    }
    metrics.foreign_leases.set(members.foreign as i64);
    metrics.workers_resting.set(members.resting.len() as i64);
    for name in &members.orphans {
        tracing::info!(lease = %name, "deleting the Lease of a long-dead worker");
        // Only the version judged dead: a worker renewing meanwhile keeps its Lease.
        let rv = judged
            .iter()
            .find(|l| &l.name_any() == name)
            .and_then(|l| l.resource_version());
        let params = DeleteParams {
            preconditions: rv.map(|rv| kube::api::Preconditions {
                resource_version: Some(rv),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, leases.delete(name, &params)).await;
    }
    members
}

async fn pass(
    api: &Api<RelaySync>,
    reader: &Store<RelaySync>,
    config: &AssignerConfig,
    metrics: &AssignmentMetrics,
    members: &membership::Membership,
) -> kube::Result<()> {
    let ring = Ring::new(members.live.iter().cloned(), config.vnodes);
    let mut objects: Vec<Assigned> = reader.state().iter().map(|o| assigned(o)).collect();
    objects.sort_by(|a, b| a.name.cmp(&b.name));
    let plan = plan::plan(&objects, &members.live, &ring, config.max_moves);
    metrics.workers_live.set(members.live.len() as i64);
    metrics.relays_unassigned.set(plan.unassigned as i64);
    metrics.relays_draining.set(plan.draining as i64);
    let by_name: std::collections::HashMap<&str, &Assigned> =
        objects.iter().map(|o| (o.name.as_str(), o)).collect();
    let mut patches = Vec::new();
    for step in plan.steps {
        if let Step::Reassign { name, from, to } = &step
            && !members.live.contains(from)
        {
            let draining = by_name.get(name.as_str()).is_some_and(|o| o.draining);
            let ops = reassign_ops(from, to, draining);
            patches.push((name.clone(), LabelWrite::Json(ops), "reassign_dead", step));
            continue;
        }
        let (name, labels, kind) = match &step {
            Step::Assign { name, worker } => (name, json!({ WORKER_LABEL: worker }), "assign"),
            Step::StartDrain { name } => {
                let Some(current) = holder(&objects, name) else {
                    continue;
                };
                (
                    name,
                    json!({ WORKER_LABEL: current, DRAIN_LABEL: "true" }),
                    "drain",
                )
            }
            Step::CancelDrain { name } => {
                let Some(current) = holder(&objects, name) else {
                    continue;
                };
                (name, json!({ WORKER_LABEL: current }), "cancel")
            }
            // From a live worker, after its drain acknowledgement: at the resourceVersion
            // planned from, so an acknowledgement overtaken by a new status (a cancelled
            // drain whose session started again) refuses the move.
            Step::Reassign { name, to, .. } => {
                (name, json!({ WORKER_LABEL: to }), "reassign_drained")
            }
        };
        // The resourceVersion we planned from: if the object changed since (the worker's
        // ack, a new spec), the write is refused and the next pass decides again.
        let rv = reader
            .find(|o| &o.name_any() == name)
            .and_then(|o| o.resource_version());
        let patch = json!({
            "apiVersion": "grasp-sync.dev/v1alpha1",
            "kind": "RelaySync",
            "metadata": { "name": name, "labels": labels, "resourceVersion": rv },
        });
        patches.push((name.clone(), LabelWrite::Apply(patch), kind, step));
    }
    // Label writes go out concurrently, a fixed number in flight (not in lock-step batches,
    // where each batch waits for its slowest write): a dead worker's relays all move in one
    // pass.
    let mut writes = Vec::with_capacity(patches.len());
    for (name, patch, kind, step) in patches {
        let api = api.clone();
        writes.push(async move {
            // One hung request must not stop every later pass.
            let tested = matches!(patch, LabelWrite::Json(_));
            let write = async {
                match patch {
                    LabelWrite::Apply(patch) => {
                        api.patch(&name, &PARAMS, &Patch::Apply(&patch)).await
                    }
                    LabelWrite::Json(ops) => {
                        api.patch(&name, &JSON_PARAMS, &Patch::<()>::Json(ops))
                            .await
                    }
                }
            };
            // The object the API server returns is dropped at once: after a failover this
            // pass writes thousands, and holding every answer until the last write lands
            // set the controller's peak memory (kept by the allocator after).
            let result = tokio::time::timeout(WRITE_TIMEOUT, write)
                .await
                .map(|r| r.map(drop));
            (name, kind, step, tested, result)
        });
    }
    let results: Vec<_> = futures::stream::iter(writes)
        .buffer_unordered(LABEL_WRITES_IN_FLIGHT)
        .collect()
        .await;
    for (name, kind, step, tested, result) in results {
        let Ok(result) = result else {
            tracing::warn!(object = %name, timeout = ?WRITE_TIMEOUT, "label write timed out; re-planning");
            continue;
        };
        match result {
            Ok(_) => {
                tracing::info!(object = %name, ?step, "assignment");
                metrics.assignment_moves.with_label_values(&[kind]).inc();
            }
            // 409: the resourceVersion moved; a 422 without details: a reassignment's
            // label test failed (a 422 naming causes is a real rejection).
            Err(kube::Error::Api(s))
                if s.code == 409 || s.code == 404 || (tested && label_test_failed(&s)) =>
            {
                tracing::debug!(object = %name, code = s.code, "object changed meanwhile; re-planning");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_at(name: &str, rv: &str) -> Lease {
        let mut l = Lease::default();
        l.metadata.name = Some(name.into());
        l.metadata.resource_version = Some(rv.into());
        l
    }

    fn versions(list: &[Lease]) -> Vec<(String, String)> {
        list.iter()
            .map(|l| (l.name_any(), l.resource_version().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn a_stale_cache_read_after_a_fresh_list_is_not_a_change() {
        let mut view = LeaseView::default();
        // The watch's cache, then a fresh list with a renewal the watch never delivered.
        view.seen_in_cache(vec![lease_at("a", "100"), lease_at("b", "101")]);
        let fresh = view.seen_in_list(vec![lease_at("a", "150"), lease_at("b", "101")]);
        assert_eq!(
            versions(&fresh),
            [("a".into(), "150".into()), ("b".into(), "101".into())]
        );
        // The stale cache again: what is judged is still the newest seen.
        let again = view.seen_in_cache(vec![lease_at("a", "100"), lease_at("b", "101")]);
        assert_eq!(versions(&again), versions(&fresh));
        // Versions that do not read as numbers are taken as they come.
        let odd = view.seen_in_cache(vec![lease_at("a", "x"), lease_at("b", "101")]);
        assert_eq!(
            versions(&odd),
            [("a".into(), "x".into()), ("b".into(), "101".into())]
        );
    }

    #[test]
    fn a_lease_a_list_showed_gone_does_not_come_back_from_a_stale_cache() {
        let mut view = LeaseView::default();
        view.seen_in_cache(vec![lease_at("a", "100"), lease_at("b", "101")]);
        // Deleted (an orphan the controller removed, say): the list no longer has it.
        let listed = view.seen_in_list(vec![lease_at("a", "150")]);
        assert_eq!(versions(&listed), [("a".into(), "150".into())]);
        // The silent watch still holds b: it stays gone.
        let stale = view.seen_in_cache(vec![lease_at("a", "100"), lease_at("b", "101")]);
        assert_eq!(versions(&stale), [("a".into(), "150".into())]);
        // Created again (a new incarnation): a larger version, and it is back.
        let back = view.seen_in_cache(vec![lease_at("a", "160"), lease_at("b", "170")]);
        assert_eq!(
            versions(&back),
            [("a".into(), "160".into()), ("b".into(), "170".into())]
        );
        // Once the watch has seen a deletion, nothing is remembered of it.
        view.seen_in_list(vec![lease_at("a", "160")]);
        view.seen_in_cache(vec![lease_at("a", "160")]);
        assert!(view.gone.is_empty());
    }

    fn labelled(labels: serde_json::Value) -> serde_json::Value {
        json!({ "metadata": { "name": "r", "labels": labels } })
    }

    fn apply(doc: &serde_json::Value, ops: &json_patch::Patch) -> Option<serde_json::Value> {
        let mut doc = doc.clone();
        json_patch::patch(&mut doc, ops).ok().map(|()| doc)
    }

    #[test]
    fn a_reassignment_moves_only_a_relay_still_labelled_for_its_old_holder() {
        let ops = reassign_ops("gs-2", "gs-0", false);
        let moved = apply(&labelled(json!({ WORKER_LABEL: "gs-2" })), &ops).expect("moved");
        assert_eq!(moved["metadata"]["labels"], json!({ WORKER_LABEL: "gs-0" }));
        // Moved meanwhile (by an earlier pass, another leader): refused, not moved again.
        assert!(apply(&labelled(json!({ WORKER_LABEL: "gs-1" })), &ops).is_none());
        assert!(apply(&labelled(json!({})), &ops).is_none());
    }

    #[test]
    fn a_drained_reassignment_needs_the_drain_still_set_and_clears_it() {
        let ops = reassign_ops("gs-2", "gs-0", true);
        let draining = labelled(json!({ WORKER_LABEL: "gs-2", DRAIN_LABEL: "true" }));
        let moved = apply(&draining, &ops).expect("moved");
        assert_eq!(moved["metadata"]["labels"], json!({ WORKER_LABEL: "gs-0" }));
        // The drain was cancelled meanwhile: the worker may have started its session again.
        assert!(apply(&labelled(json!({ WORKER_LABEL: "gs-2" })), &ops).is_none());
    }

    #[test]
    fn label_keys_are_escaped_in_the_patch_paths() {
        let text = serde_json::to_string(&reassign_ops("a", "b", true)).unwrap();
        assert!(text.contains(&WORKER_LABEL.replace('/', "~1")), "{text}");
        assert!(!text.contains(WORKER_LABEL), "{text}");
    }
}
