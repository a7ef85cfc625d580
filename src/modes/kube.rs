//! What the Kubernetes-mode processes share: the client, the namespace, the errors, the
//! worker-name rule and the HTTP endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::Client;
use kube::config::{Config, KubeConfigOptions};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::crd::naming::is_dns1123_label;
use crate::crd::owner::{OwnerKind, OwnerTarget};
use crate::observability::ProcessMetrics;
use crate::store::kube::KubeStore;

#[derive(Debug, Error)]
pub enum KubeModeError {
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
    #[error(
        "worker name {0:?} must be a DNS-1123 label (lower-case alphanumerics and '-', at most 63 characters): it is used as a label value and in the Lease name"
    )]
    BadWorkerName(String),
    #[error("cannot register the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(
        "cannot read the owner {target} (the workload whose deletion deletes what this process creates): {source}"
    )]
    Owner {
        target: OwnerTarget,
        #[source]
        source: kube::Error,
    },
    #[error("the owner {0} has no uid")]
    OwnerWithoutUid(OwnerTarget),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A worker name becomes a label value and part of a Lease name.
pub fn check_worker_name(name: &str) -> Result<(), KubeModeError> {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(KubeModeError::BadWorkerName(name.to_string()))
    }
}

/// Where to find the API server and which namespace to work in.
#[derive(Debug, Clone, Default)]
pub struct KubeTarget {
    /// A kubeconfig context; `None` infers (in-cluster, or the current context).
    pub context: Option<String>,
    /// `None`: the kubeconfig's or the pod's namespace.
    pub namespace: Option<String>,
}

/// The owner reference for `target`, a workload in `namespace`, read from the API server.
pub async fn resolve_owner(
    client: &Client,
    namespace: &str,
    target: &OwnerTarget,
) -> Result<OwnerReference, KubeModeError> {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    async fn uid<K>(client: &Client, namespace: &str, name: &str) -> kube::Result<Option<String>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let o = Api::<K>::namespaced(client.clone(), namespace)
            .get(name)
            .await?;
        Ok(o.meta().uid.clone())
    }
    let uid = match target.kind {
        OwnerKind::Deployment => uid::<Deployment>(client, namespace, &target.name).await,
        OwnerKind::StatefulSet => uid::<StatefulSet>(client, namespace, &target.name).await,
    }
    .map_err(|source| KubeModeError::Owner {
        target: target.clone(),
        source,
    })?
    .ok_or_else(|| KubeModeError::OwnerWithoutUid(target.clone()))?;
    Ok(target.reference(&uid))
}

/// A client and the namespace to use.
pub async fn connect(target: &KubeTarget) -> Result<(Client, String), KubeModeError> {
    let config = match &target.context {
        Some(ctx) => Config::from_kubeconfig(&KubeConfigOptions {
            context: Some(ctx.clone()),
            ..KubeConfigOptions::default()
        })
        .await
        .map_err(|e| KubeModeError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| KubeModeError::Config(e.to_string()))?,
    };
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| KubeModeError::Config(e.to_string()))?;
    Ok((client, namespace))
}

pub(crate) async fn serve_http(
    addr: SocketAddr,
    metrics: &ProcessMetrics,
    store: &Arc<KubeStore>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), KubeModeError> {
    super::serve_http(addr, metrics, store, shutdown)
        .await
        .map_err(|source| KubeModeError::Http { addr, source })
}

pub(crate) async fn join_all(tasks: Vec<JoinHandle<()>>, within: Duration) {
    for t in tasks {
        let _ = tokio::time::timeout(within, t).await;
    }
}
