//! The RelaySync store: where discovery writes what to sync and workers write how it goes.
//! Two implementations pass the same [`conformance`] suite: the Kubernetes API (Kubernetes
//! mode) and [`memory::MemoryStore`] (standalone, persisted to a state file).

pub mod conformance;
pub mod kube;
pub mod memory;

use std::future::Future;

use thiserror::Error;
use tokio::sync::watch;

use crate::crd::{Phase, RelaySyncSpec, RelaySyncStatus};

/// One stored RelaySync.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRelaySync {
    pub name: String,
    /// Bumped whenever the spec changes, as `metadata.generation` is.
    pub generation: i64,
    pub spec: RelaySyncSpec,
    pub status: Option<RelaySyncStatus>,
    /// The controller asked the holding worker to let go (the drain label); always false
    /// outside Kubernetes.
    pub draining: bool,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("RelaySync {0} not found")]
    NotFound(String),
    #[error("invalid RelaySync {name}: {reason}")]
    Invalid { name: String, reason: String },
    /// The Kubernetes API failed (other than not found / invalid).
    #[error("store backend: {0}")]
    Kube(#[source] Box<::kube::Error>),
    /// The state file of the in-memory store could not be read or written.
    #[error("store backend: {message}")]
    StateFile {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("store backend: store lock poisoned")]
    Poisoned,
    /// A status write refused because the object is no longer assigned to this worker (its
    /// label moved on): the new holder's status, cursor included, must not be overwritten.
    #[error("RelaySync {0} is no longer assigned to this worker")]
    NotHeld(String),
}

/// Operations discovery and workers need. Writers own disjoint parts: `apply_spec` (the
/// controller) never touches status or the operator's `paused`; `apply_status` (a worker)
/// never touches spec.
pub trait RelaySyncStore: Send + Sync {
    fn list(&self) -> impl Future<Output = Result<Vec<StoredRelaySync>, StoreError>> + Send;

    /// The objects as last observed by this store's watch, when it keeps one (cheap: no
    /// request); otherwise the same as [`RelaySyncStore::list`]. May lag behind writes a
    /// moment; [`RelaySyncStore::changes`] moves again once it caught up.
    fn snapshot(&self) -> impl Future<Output = Result<Vec<StoredRelaySync>, StoreError>> + Send {
        self.list()
    }

    /// True once this worker's store has seen the object leave it (relabelled for another
    /// worker, or deleted): a cheap look at the watch, no request. A status write would be
    /// refused anyway; a worker handing its relays over skips those writes. Stores without
    /// a watch, or not a worker's, never say so.
    fn seen_leaving(&self, _name: &str) -> bool {
        false
    }

    /// Whether this store's objects can be handed to another holder while it runs (a
    /// worker's store in Kubernetes mode, whose labels the controller moves).
    fn hands_over(&self) -> bool {
        false
    }

    /// When this store last saw an object leave it (see [`RelaySyncStore::seen_leaving`]);
    /// `None`: never, or a store that does not watch.
    fn last_departure(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Every object's name and spec, as [`RelaySyncStore::snapshot`] sees them, without
    /// copying statuses (discovery compares specs only, every pass).
    fn specs(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, RelaySyncSpec)>, StoreError>> + Send {
        async {
            Ok(self
                .snapshot()
                .await?
                .into_iter()
                .map(|o| (o.name, o.spec))
                .collect())
        }
    }

    fn get(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<StoredRelaySync>, StoreError>> + Send;

    /// Create the object, or update its controller-owned spec fields (`url`, `bootstrap`,
    /// `repos`). The generation moves only when one of them changes.
    fn apply_spec(
        &self,
        name: &str,
        spec: &RelaySyncSpec,
    ) -> impl Future<Output = Result<StoredRelaySync, StoreError>> + Send;

    /// Replace the status of an existing object — in a worker's store, only while the object
    /// is still assigned to that worker (`StoreError::NotHeld` otherwise).
    fn apply_status(
        &self,
        name: &str,
        status: &RelaySyncStatus,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Delete the object; deleting a missing object is not an error.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A counter that moves on every change: level-triggered, so a slow reader never misses
    /// that something changed (it re-lists).
    fn changes(&self) -> watch::Receiver<u64>;

    /// Tell operators that an object's phase changed (Kubernetes Events). `Ok(false)`: this
    /// store has no event sink.
    fn record_phase(
        &self,
        name: &str,
        from: Option<Phase>,
        to: Phase,
        note: Option<&str>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (name, from, to, note);
        async { Ok(false) }
    }
}
