//! In-memory RelaySync store for standalone mode, saved to a JSON state file (atomically:
//! write a temporary file, fsync, rename) on every change, so cursors survive a restart.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{RelaySyncStore, StoreError, StoredRelaySync};
use crate::crd::{RelaySyncSpec, RelaySyncStatus};

const STATE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    objects: BTreeMap<String, StoredObject>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredObject {
    generation: i64,
    spec: RelaySyncSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<RelaySyncStatus>,
}

pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, StoredObject>>,
    revision: watch::Sender<u64>,
    path: Option<PathBuf>,
}

impl MemoryStore {
    /// A store that lives only in memory.
    pub fn new() -> Self {
        MemoryStore {
            objects: Mutex::new(BTreeMap::new()),
            revision: watch::channel(0).0,
            path: None,
        }
    }

    /// A store persisted at `path`, loading what is there. A missing file is an empty store;
    /// an unreadable one is an error (never silently discarded: it holds the cursors).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let objects = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
                    state_file_error(
                        format!(
                            "state file {} is not valid ({e}); move it away to start fresh",
                            path.display()
                        ),
                        Some(Box::new(e)),
                    )
                })?;
                if state.version != STATE_VERSION {
                    return Err(state_file_error(
                        format!(
                            "state file {} has version {}, this grasp-sync reads {STATE_VERSION}",
                            path.display(),
                            state.version
                        ),
                        None,
                    ));
                }
                state.objects
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(state_file_error(
                    format!("reading state file {}: {e}", path.display()),
                    Some(Box::new(e)),
                ));
            }
        };
        Ok(MemoryStore {
            objects: Mutex::new(objects),
            revision: watch::channel(0).0,
            path: Some(path),
        })
    }

    fn lock(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, StoredObject>>, StoreError> {
        self.objects.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Persist (when file-backed) and tell watchers. Called with the lock held so the file
    /// always reflects one consistent state; the write is small and local.
    fn changed(&self, objects: &BTreeMap<String, StoredObject>) -> Result<(), StoreError> {
        if let Some(path) = &self.path {
            save_atomically(
                path,
                &StateFile {
                    version: STATE_VERSION,
                    objects: objects.clone(),
                },
            )?;
        }
        self.revision.send_modify(|r| *r += 1);
        Ok(())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn state_file_error(
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::StateFile { message, source }
}

fn save_atomically(path: &Path, state: &StateFile) -> Result<(), StoreError> {
    let err = |what: &str, e: std::io::Error| {
        state_file_error(format!("{what} {}: {e}", path.display()), Some(Box::new(e)))
    };
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| state_file_error(format!("encoding state: {e}"), Some(Box::new(e))))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| err("creating", e))?;
    f.write_all(&bytes).map_err(|e| err("writing", e))?;
    f.sync_all().map_err(|e| err("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("replacing", e))
}

fn stored(name: &str, o: &StoredObject) -> StoredRelaySync {
    StoredRelaySync {
        name: name.to_string(),
        generation: o.generation,
        spec: o.spec.clone(),
        status: o.status.clone(),
        draining: false,
    }
}

impl RelaySyncStore for MemoryStore {
    async fn list(&self) -> Result<Vec<StoredRelaySync>, StoreError> {
        Ok(self.lock()?.iter().map(|(n, o)| stored(n, o)).collect())
    }

    async fn get(&self, name: &str) -> Result<Option<StoredRelaySync>, StoreError> {
        Ok(self.lock()?.get(name).map(|o| stored(name, o)))
    }

    async fn apply_spec(
        &self,
        name: &str,
        spec: &RelaySyncSpec,
    ) -> Result<StoredRelaySync, StoreError> {
        if crate::nostr::RelayUrl::parse(&spec.url).map(|u| u.as_str() == spec.url) != Ok(true) {
            return Err(StoreError::Invalid {
                name: name.to_string(),
                reason: format!("spec.url {:?} is not a normalised relay URL", spec.url),
            });
        }
        if let Some(bad) = spec
            .repos
            .iter()
            .find(|r| crate::nostr::RepoCoordinate::parse(r).is_err())
        {
            return Err(StoreError::Invalid {
                name: name.to_string(),
                reason: format!("spec.repos entry {bad:?} is not a repo coordinate"),
            });
        }
        let mut objects = self.lock()?;
        let entry = objects
            .entry(name.to_string())
            .or_insert_with(|| StoredObject {
                generation: 0,
                spec: RelaySyncSpec {
                    paused: None,
                    ..spec.clone()
                },
                status: None,
            });
        let same = entry.generation > 0
            && entry.spec.url == spec.url
            && entry.spec.bootstrap == spec.bootstrap
            && entry.spec.repos == spec.repos;
        if !same {
            entry.generation += 1;
            entry.spec.url = spec.url.clone();
            entry.spec.bootstrap = spec.bootstrap;
            entry.spec.repos = spec.repos.clone();
            let out = stored(name, entry);
            self.changed(&objects)?;
            return Ok(out);
        }
        Ok(stored(name, entry))
    }

    async fn apply_status(&self, name: &str, status: &RelaySyncStatus) -> Result<(), StoreError> {
        let mut objects = self.lock()?;
        let entry = objects
            .get_mut(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        if entry.status.as_ref() == Some(status) {
            return Ok(());
        }
        entry.status = Some(status.clone());
        self.changed(&objects)
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let mut objects = self.lock()?;
        if objects.remove(name).is_some() {
            self.changed(&objects)?;
        }
        Ok(())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn memory_store_passes_the_conformance_suite() {
        conformance::run(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn file_backed_store_passes_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = MemoryStore::open(&path).unwrap();
        conformance::run(&store).await;
        let before = store.list().await.unwrap();
        assert!(
            !before.is_empty(),
            "the suite leaves objects behind to compare"
        );
        drop(store);
        let reopened = MemoryStore::open(&path).unwrap();
        assert_eq!(reopened.list().await.unwrap(), before);
        assert!(!path.with_extension("tmp").exists());
    }

    #[tokio::test]
    async fn a_damaged_state_file_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{ not json").unwrap();
        let err = MemoryStore::open(&path)
            .err()
            .expect("damaged file refused");
        assert!(err.to_string().contains("move it away"), "{err}");
        std::fs::write(&path, br#"{"version": 99, "objects": {}}"#).unwrap();
        assert!(MemoryStore::open(&path).is_err());
    }
}
