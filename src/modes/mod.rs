//! Process wiring: each `grasp-sync` command that runs something puts the rooms together
//! here. The only layer that may import both [`crate::controller`] and [`crate::worker`].

pub mod controller;
pub mod demo;
pub mod kube;
pub mod standalone;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::observability::ProcessMetrics;
use crate::observability::http::{self, StatusEntry, StatusSource};
use crate::store::RelaySyncStore;

/// `/status` reads the process's RelaySync store.
struct StoreStatus<S>(Arc<S>);

impl<S: RelaySyncStore + 'static> StatusSource for StoreStatus<S> {
    fn entries(&self) -> BoxFuture<'_, Result<Vec<StatusEntry>, String>> {
        async move {
            // From the store's watch cache: a request must not cost an API LIST.
            let list = self.0.snapshot().await.map_err(|e| e.to_string())?;
            Ok(list
                .into_iter()
                .map(|o| StatusEntry {
                    name: o.name,
                    generation: o.generation,
                    spec: o.spec,
                    status: o.status,
                })
                .collect())
        }
        .boxed()
    }
}

/// Serve `/metrics`, `/status` (from `store`) and `/healthz` on `addr`.
pub(crate) async fn serve_http<S: RelaySyncStore + 'static>(
    addr: SocketAddr,
    metrics: &ProcessMetrics,
    store: &Arc<S>,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    http::serve(
        addr,
        metrics.registry.clone(),
        Arc::new(StoreStatus(store.clone())),
        metrics.liveness.clone(),
        shutdown.clone(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::assignment::metrics::AssignmentMetrics;
    use crate::controller::discovery::metrics::DiscoveryMetrics;
    use crate::worker::WorkerMetrics;

    #[test]
    fn every_components_metrics_fit_in_one_registry() {
        // Standalone runs discovery and a worker in one process; no name may be taken twice.
        let process = ProcessMetrics::new().expect("process metrics");
        WorkerMetrics::register(&process.registry).expect("worker metrics");
        DiscoveryMetrics::register(&process.registry).expect("discovery metrics");
        AssignmentMetrics::register(&process.registry).expect("assignment metrics");
        assert!(
            WorkerMetrics::register(&process.registry).is_err(),
            "a second registration of the same names must fail"
        );
    }
}
