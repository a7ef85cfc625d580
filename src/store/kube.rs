//! RelaySync store on the Kubernetes API: the controller writes spec by server-side apply as
//! `grasp-sync-controller`, workers write status by server-side apply as
//! `grasp-sync-worker`; a watch turns every change into a revision bump.

use futures::StreamExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{RelaySyncStore, StoreError, StoredRelaySync};
use crate::crd::{CONTROLLER_MANAGER, RelaySync, RelaySyncSpec, RelaySyncStatus, WORKER_MANAGER};

pub struct KubeStore {
    api: Api<RelaySync>,
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
        let api: Api<RelaySync> = Api::namespaced(client, namespace);
        let revision = watch::channel(0).0;
        let tx = revision.clone();
        let stream = watcher(api.clone(), watcher::Config::default());
        let watch_task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => tx.send_modify(|r| *r += 1),
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
            revision,
            watch_task,
        }
    }
}

fn to_stored(o: RelaySync) -> StoredRelaySync {
    StoredRelaySync {
        name: o.name_any(),
        generation: o.metadata.generation.unwrap_or(0),
        spec: o.spec,
        status: o.status,
    }
}

fn map_err(name: &str, e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(s) if s.code == 404 => StoreError::NotFound(name.to_string()),
        kube::Error::Api(s) if s.code == 422 => StoreError::Invalid {
            name: name.to_string(),
            reason: s.message,
        },
        other => StoreError::Backend(other.to_string()),
    }
}

impl RelaySyncStore for KubeStore {
    async fn list(&self) -> Result<Vec<StoredRelaySync>, StoreError> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|e| map_err("(list)", e))?;
        let mut out: Vec<StoredRelaySync> = list.items.into_iter().map(to_stored).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn get(&self, name: &str) -> Result<Option<StoredRelaySync>, StoreError> {
        Ok(self
            .api
            .get_opt(name)
            .await
            .map_err(|e| map_err(name, e))?
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
        let obj = RelaySync::new(name, spec);
        let applied = self
            .api
            .patch(
                name,
                &PatchParams::apply(CONTROLLER_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .map_err(|e| map_err(name, e))?;
        Ok(to_stored(applied))
    }

    async fn apply_status(&self, name: &str, status: &RelaySyncStatus) -> Result<(), StoreError> {
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
        Ok(())
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
}
