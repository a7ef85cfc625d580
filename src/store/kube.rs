//! RelaySync store on the Kubernetes API: the controller writes spec by server-side apply as
//! `grasp-sync-controller`; a worker writes status as `grasp-sync-worker` by a JSON patch
//! that first tests the object's worker label (so only the current holder's write lands); a
//! watch turns every change into a revision bump.
//!
//! A worker's store is narrowed by a label selector (its own name). The raw watch stream
//! reports an object leaving the selector (label moved) as a deletion, so the next list no
//! longer holds it and its session stops — the kube-runtime `Controller` would not
//! reconcile that case.

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{RelaySyncStore, StoreError, StoredRelaySync};
use crate::crd::{
    CONTROLLER_MANAGER, DRAIN_LABEL, Phase, RelaySync, RelaySyncSpec, RelaySyncStatus,
    WORKER_LABEL, WORKER_MANAGER, label_test_failed,
};

pub struct KubeStore {
    api: Api<RelaySync>,
    namespace: String,
    selector: Option<String>,
    /// The worker whose store this is: status is written only while the object's worker
    /// label still names it.
    holder: Option<String>,
    recorder: Option<Recorder>,
    /// Put on every object applied, so that deleting the owner deletes them.
    owner: Option<OwnerReference>,
    cache: Store<RelaySync>,
    /// The watch has listed once. Not `cache.wait_until_ready()` polled and dropped: its
    /// readiness future keeps a single waker, so a dropped poll would steal the wake-up of
    /// a task waiting on it (the assigner, which then never starts).
    listed: Arc<AtomicBool>,
    /// When the watch last saw an object leave this store (relabelled away, or deleted).
    departed: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    revision: watch::Sender<u64>,
    watch_task: JoinHandle<()>,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        self.watch_task.abort();
    }
}

impl KubeStore {
    /// A store over the RelaySyncs of `namespace`. Starts watching them at once.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self::with_selector(client, namespace, None)
    }

    /// A store over the RelaySyncs of `namespace` matching `selector` (a label selector such
    /// as `grasp-sync.dev/worker=w0`).
    pub fn with_selector(client: Client, namespace: &str, selector: Option<String>) -> Self {
        Self::watching(client, namespace, selector, Announce::Every)
    }

    /// The controller's store: every object, announced on every change (the assigner waits
    /// for drain acknowledgements in status), its cache without what no controller reads —
    /// the confirmed-roots digest, a worker's opaque resume key of about a kilobyte per
    /// object (thousands of objects are held here).
    pub fn for_controller(client: Client, namespace: &str) -> Self {
        Self::watching(client, namespace, None, Announce::EveryLean)
    }

    fn watching(
        client: Client,
        namespace: &str,
        selector: Option<String>,
        announce: Announce,
    ) -> Self {
        let api: Api<RelaySync> = Api::namespaced(client, namespace);
        let revision = watch::channel(0).0;
        let tx = revision.clone();
        let mut wc = watcher::Config::default();
        if let Some(sel) = &selector {
            wc = wc.labels(sel);
        }
        let (cache, writer) = reflector::store();
        // Nobody reads who wrote which field: the cache keeps objects without it.
        let lean = announce == Announce::EveryLean;
        let events = watcher(api.clone(), wc)
            .default_backoff()
            .modify(move |o: &mut RelaySync| {
                o.managed_fields_mut().clear();
                if lean && let Some(s) = o.status.as_mut() {
                    s.confirmed_roots_digest = None;
                }
            });
        // The cache is updated before the revision moves, so a reader woken by the bump
        // sees the change in `snapshot()`.
        let stream = reflector::reflector(writer, events);
        let listed = Arc::new(AtomicBool::new(false));
        let done = listed.clone();
        let departed = Arc::new(std::sync::Mutex::new(None));
        let departures = departed.clone();
        let watch_task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut seen = Seen::default();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(ev) => {
                        if matches!(ev, watcher::Event::InitDone) {
                            done.store(true, Ordering::Release);
                        }
                        let news = seen.news(&ev, announce);
                        if news.departed
                            && let Ok(mut at) = departures.lock()
                        {
                            *at = Some(tokio::time::Instant::now());
                        }
                        if news.look_again {
                            tx.send_modify(|r| *r += 1);
                        }
                    }
                    // The watcher re-lists and re-watches by itself; a change may have been
                    // missed meanwhile, so tell readers to look again.
                    Err(e) => {
                        tracing::debug!(error = %e, "RelaySync watch interrupted; it resumes");
                        tx.send_modify(|r| *r += 1);
                    }
                }
            }
        });
        KubeStore {
            api,
            namespace: namespace.to_string(),
            selector,
            holder: None,
            recorder: None,
            owner: None,
            cache,
            listed,
            departed,
            revision,
            watch_task,
        }
    }

    /// The objects as the watch last saw them (shared, not copied).
    pub fn cache(&self) -> Store<RelaySync> {
        self.cache.clone()
    }

    /// The store of worker `worker`: its watch sees only the objects labelled for it, and a
    /// status write succeeds only while the object is still labelled for it (checked by the
    /// API server in the same request), so a worker that lost an object — moved, or presumed
    /// dead during a stall — cannot overwrite the new holder's status.
    ///
    /// Its [`RelaySyncStore::changes`] moves only when something a holder acts on changed
    /// (an object came or went, its spec, labels or deletion): a change of status alone is
    /// its own write, and waking the supervisor for each would make every write cost a pass
    /// over everything it holds. The cache still holds the latest status.
    pub fn for_worker(client: Client, namespace: &str, worker: &str) -> Self {
        let mut store = Self::watching(
            client,
            namespace,
            Some(format!("{WORKER_LABEL}={worker}")),
            Announce::NotStatusAlone,
        );
        store.holder = Some(worker.to_string());
        store
    }

    /// Objects applied from now on name `owner` among their owners (the controller's
    /// Deployment): the garbage collector deletes them with it.
    pub fn with_owner(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    /// Publish Kubernetes Events on phase changes, reported as `instance` (the worker).
    pub fn with_events(mut self, client: Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: WORKER_MANAGER.to_string(),
            instance: Some(instance.to_string()),
        };
        self.recorder = Some(Recorder::new(client, reporter));
        self
    }
}

/// Which watch events move a store's revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announce {
    Every,
    /// Every change; the cache keeps no confirmed-roots digest.
    EveryLean,
    /// Not an object's change of status alone.
    NotStatusAlone,
}

/// What a holder acts on in an object: the generation (spec, `paused` included), labels
/// (the worker and drain labels) and deletion.
type Fingerprint = (Option<i64>, BTreeMap<String, String>, bool);

fn fingerprint(o: &RelaySync) -> Fingerprint {
    (
        o.metadata.generation,
        o.metadata.labels.clone().unwrap_or_default(),
        o.metadata.deletion_timestamp.is_some(),
    )
}

/// The fingerprints of the objects as last announced, to tell status-only changes apart.
#[derive(Default)]
struct Seen {
    current: HashMap<String, Fingerprint>,
    /// Being rebuilt by a re-list (`Init` … `InitDone`).
    relisting: Option<HashMap<String, Fingerprint>>,
}

/// What one watch event meant to the store's readers.
#[derive(Debug, Default, PartialEq)]
struct News {
    /// Readers should look again.
    look_again: bool,
    /// An object left the store.
    departed: bool,
}

impl Seen {
    /// Record `event`.
    fn news(&mut self, event: &watcher::Event<RelaySync>, announce: Announce) -> News {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(HashMap::new());
                News::default()
            }
            watcher::Event::InitApply(o) => {
                if let Some(m) = &mut self.relisting {
                    m.insert(o.name_any(), fingerprint(o));
                }
                News::default()
            }
            watcher::Event::InitDone => {
                let mut departed = false;
                if let Some(m) = self.relisting.take() {
                    departed = self.current.keys().any(|k| !m.contains_key(k));
                    self.current = m;
                }
                News {
                    look_again: true,
                    departed,
                }
            }
            watcher::Event::Apply(o) => {
                let new = fingerprint(o);
                let old = self.current.insert(o.name_any(), new.clone());
                News {
                    look_again: announce != Announce::NotStatusAlone || old.as_ref() != Some(&new),
                    departed: false,
                }
            }
            watcher::Event::Delete(o) => {
                self.current.remove(&o.name_any());
                News {
                    look_again: true,
                    departed: true,
                }
            }
        }
    }
}

/// Event reason for entering `phase` (CamelCase, as Kubernetes Events expect).
/// A worker only returns an object to `Pending` when it releases it for reassignment.
fn phase_reason(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => crate::crd::RELEASED,
        other => other.as_str(),
    }
}

/// An object as stored, copying only what a reader uses (not its metadata: a worker reads
/// its whole cache after each announced change, up to ten times a second while it takes
/// relays over).
fn to_stored(o: &RelaySync) -> StoredRelaySync {
    StoredRelaySync {
        name: o.name_any(),
        generation: o.metadata.generation.unwrap_or(0),
        draining: o.labels().get(DRAIN_LABEL).is_some_and(|v| v == "true"),
        spec: o.spec.clone(),
        status: o.status.clone(),
    }
}

fn map_err(name: &str, e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(s) if s.code == 404 => StoreError::NotFound(name.to_string()),
        kube::Error::Api(s) if s.code == 422 => StoreError::Invalid {
            name: name.to_string(),
            reason: s.message,
        },
        other => StoreError::Kube(Box::new(other)),
    }
}

impl RelaySyncStore for KubeStore {
    async fn list(&self) -> Result<Vec<StoredRelaySync>, StoreError> {
        let mut lp = ListParams::default();
        if let Some(sel) = &self.selector {
            lp = lp.labels(sel);
        }
        let list = self.api.list(&lp).await.map_err(|e| map_err("(list)", e))?;
        let mut out: Vec<StoredRelaySync> = list.items.iter().map(to_stored).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn hands_over(&self) -> bool {
        self.holder.is_some()
    }

    fn last_departure(&self) -> Option<tokio::time::Instant> {
        self.departed.lock().ok().and_then(|at| *at)
    }

    fn seen_leaving(&self, name: &str) -> bool {
        let Some(worker) = &self.holder else {
            return false;
        };
        self.listed.load(Ordering::Acquire)
            && self
                .cache
                .get(&ObjectRef::new(name).within(&self.namespace))
                .is_none_or(|o| o.labels().get(WORKER_LABEL) != Some(worker))
    }

    async fn snapshot(&self) -> Result<Vec<StoredRelaySync>, StoreError> {
        if !self.listed.load(Ordering::Acquire) {
            // The watch has not listed yet (or is gone): ask the API server.
            return self.list().await;
        }
        let mut out: Vec<StoredRelaySync> =
            self.cache.state().iter().map(|o| to_stored(o)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn specs(&self) -> Result<Vec<(String, RelaySyncSpec)>, StoreError> {
        if !self.listed.load(Ordering::Acquire) {
            return Ok(self
                .list()
                .await?
                .into_iter()
                .map(|o| (o.name, o.spec))
                .collect());
        }
        Ok(self
            .cache
            .state()
            .iter()
            .map(|o| (o.name_any(), o.spec.clone()))
            .collect())
    }

    async fn get(&self, name: &str) -> Result<Option<StoredRelaySync>, StoreError> {
        Ok(self
            .api
            .get_opt(name)
            .await
            .map_err(|e| map_err(name, e))?
            .as_ref()
            .map(to_stored))
    }

    async fn apply_spec(
        &self,
        name: &str,
        spec: &RelaySyncSpec,
    ) -> Result<StoredRelaySync, StoreError> {
        // `paused` belongs to the operator: never part of what the controller applies.
        let spec = RelaySyncSpec {
            paused: None,
            ..spec.clone()
        };
        let mut obj = RelaySync::new(name, spec);
        if let Some(owner) = &self.owner {
            obj.metadata.owner_references = Some(vec![owner.clone()]);
        }
        let applied = self
            .api
            .patch(
                name,
                &PatchParams::apply(CONTROLLER_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .map_err(|e| map_err(name, e))?;
        Ok(to_stored(&applied))
    }

    async fn apply_status(&self, name: &str, status: &RelaySyncStatus) -> Result<(), StoreError> {
        let Some(worker) = &self.holder else {
            let patch = json!({
                "apiVersion": "grasp-sync.dev/v1alpha1",
                "kind": "RelaySync",
                "status": status,
            });
            self.api
                .patch_status(
                    name,
                    &PatchParams::apply(WORKER_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .map_err(|e| map_err(name, e))?;
            return Ok(());
        };
        // A JSON patch is atomic: the label test and the status replacement succeed or fail
        // together, against the object as the API server holds it now.
        let label = WORKER_LABEL.replace('~', "~0").replace('/', "~1");
        let ops: json_patch::Patch = serde_json::from_value(json!([
            { "op": "test", "path": format!("/metadata/labels/{label}"), "value": worker },
            { "op": "add", "path": "/status", "value": status },
        ]))
        .map_err(|e| StoreError::Invalid {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        let params = PatchParams {
            field_manager: Some(WORKER_MANAGER.to_string()),
            ..PatchParams::default()
        };
        match self
            .api
            .patch_status(name, &params, &Patch::<()>::Json(ops))
            .await
        {
            Ok(_) => Ok(()),
            // The API server reports a patch it could not apply (our `test` failed, or the
            // label is gone) as 422 without details; a status failing the schema names the
            // object and its causes.
            Err(kube::Error::Api(s)) if label_test_failed(&s) => {
                Err(StoreError::NotHeld(name.to_string()))
            }
            Err(e) => Err(map_err(name, e)),
        }
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(map_err(name, e)),
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    async fn record_phase(
        &self,
        name: &str,
        from: Option<Phase>,
        to: Phase,
        note: Option<&str>,
    ) -> Result<bool, StoreError> {
        let Some(recorder) = &self.recorder else {
            return Ok(false);
        };
        let reference = ObjectReference {
            api_version: Some(RelaySync::api_version(&()).into_owned()),
            kind: Some(RelaySync::kind(&()).into_owned()),
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            ..ObjectReference::default()
        };
        let bad = matches!(to, Phase::Backoff | Phase::Dead | Phase::RateLimited);
        let mut text = match from {
            Some(f) => format!("{} → {}", f.as_str(), to.as_str()),
            None => to.as_str().to_string(),
        };
        if let Some(n) = note.filter(|n| !n.is_empty()) {
            text.push_str(": ");
            text.push_str(n);
        }
        // Event notes are limited to 1 KiB by the API server.
        if text.len() > 1000 {
            let mut cut = 1000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let event = Event {
            type_: if bad {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: phase_reason(to).to_string(),
            note: Some(text),
            action: "Sync".to_string(),
            secondary: None,
        };
        recorder
            .publish(&event, &reference)
            .await
            .map_err(|e| map_err(name, e))?;
        Ok(true)
    }
}
