//! A Kubernetes-mode deployment on loopback: a real API server with the CRD and the RBAC
//! from `deploy/rbac`, a local relay, and `grasp-sync controller` / `worker` processes each
//! authenticated as its own user (per-worker Lease rights, as in production).

use std::collections::BTreeMap;
use std::time::Duration;

use grasp_sync::controller::assignment::ring::{DEFAULT_VNODES, Ring};
use grasp_sync::coordination::leader::LEADER_LEASE;
use grasp_sync::crd::{DRAIN_LABEL, Phase, RelaySync, WORKER_LABEL};
use grasp_sync::nostr::RelayUrl;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use nostr_relay_builder::LocalRelay;
use serde_json::json;
use tempfile::TempDir;

use super::kube_env::install_crd;
use super::procs::GraspSync;
use super::{KubeEnv, relays};

pub const SERVICE_DOMAIN: &str = "git.ours.example";
pub const WORKERS: &[&str] = &[
    "w0", "w1", "w2", "w3", "w4", "gs-0", "gs-1", "gs-2", "gs-3", "gs-4", "gs-5", "gs-6", "gs-7",
];
const CONTROLLER_USER: &str = "grasp-sync-test-controller";

pub struct Cluster {
    pub env: KubeEnv,
    pub admin: Client,
    pub ns: String,
    pub dir: TempDir,
    pub local: RelayUrl,
    _local_relay: LocalRelay,
}

async fn create_role(admin: &Client, ns: &str, role: &Role, users: &[String]) {
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), role)
        .await
        .expect("role");
    let subjects: Vec<_> = users
        .iter()
        .map(|u| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u}))
        .collect();
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": role.name_any()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.name_any()},
        "subjects": subjects,
    }))
    .expect("binding");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
}

impl Cluster {
    pub async fn start(prefix: &str) -> Cluster {
        let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !env.is_external(),
            "the multi-process tests need the local API server (per-process users)"
        );
        let admin = env.client().await.expect("admin client");
        install_crd(&admin).await;
        let ns = env.namespace(prefix).await.expect("namespace");
        let controller_role: Role =
            serde_yaml::from_str(include_str!("../../deploy/rbac/controller-role.yaml"))
                .expect("controller role");
        create_role(&admin, &ns, &controller_role, &[CONTROLLER_USER.into()]).await;
        let worker_role: Role =
            serde_yaml::from_str(include_str!("../../deploy/rbac/worker-role.yaml"))
                .expect("worker role");
        let users: Vec<String> = WORKERS.iter().map(|w| user(w)).collect();
        create_role(&admin, &ns, &worker_role, &users).await;
        for w in WORKERS {
            let lease_role: Role = serde_yaml::from_str(
                &include_str!("../../deploy/rbac/worker-lease-role.yaml").replace("WORKER", w),
            )
            .expect("lease role");
            create_role(&admin, &ns, &lease_role, &[user(w)]).await;
        }
        let (local_relay, local) = relays::local_relay(1_000_000).await;
        Cluster {
            env,
            admin,
            ns,
            // GRASP_SYNC_KEEP_LOGS=1 keeps the processes' logs for a post-mortem.
            dir: tempfile::Builder::new()
                .prefix("grasp-sync-procs-")
                .disable_cleanup(std::env::var_os("GRASP_SYNC_KEEP_LOGS").is_some())
                .tempdir()
                .expect("temp dir"),
            local,
            _local_relay: local_relay,
        }
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KUBECONFIG", self.env.kubeconfig().display().to_string()),
            ("GRASP_SYNC_NAMESPACE", self.ns.clone()),
            ("GRASP_SYNC_METRICS_ADDR", "127.0.0.1:0".into()),
            ("GRASP_SYNC_ALLOW", "127.0.0.1".into()),
            // Every test relay shares the loopback host.
            ("GRASP_SYNC_MAX_RELAYS_PER_HOST", "100000".into()),
        ]
    }

    /// A controller replica with fast leader election; `extra` flags are appended.
    pub fn controller(&self, id: &str, extra: &[&str]) -> GraspSync {
        self.controller_logging_to(self.dir.path(), id, extra)
    }

    /// [`Cluster::controller`], its log in `dir`.
    pub fn controller_logging_to(
        &self,
        dir: &std::path::Path,
        id: &str,
        extra: &[&str],
    ) -> GraspSync {
        GraspSync::spawn(id, dir, &self.controller_args(id, extra), &self.envs())
    }

    /// [`Cluster::controller`] reaching the API server through `kubeconfig` instead (e.g. one
    /// pointing at a proxy).
    pub fn controller_via(
        &self,
        id: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> GraspSync {
        let envs = self.envs_via(kubeconfig);
        GraspSync::spawn(id, self.dir.path(), &self.controller_args(id, extra), &envs)
    }

    fn envs_via(&self, kubeconfig: &std::path::Path) -> Vec<(&'static str, String)> {
        let mut envs = self.envs();
        for (var, value) in &mut envs {
            if *var == "KUBECONFIG" {
                *value = kubeconfig.display().to_string();
            }
        }
        envs
    }

    fn controller_args(&self, id: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "controller",
            "--identity",
            id,
            "--kube-context",
            CONTROLLER_USER,
            "--local-relay",
            self.local.as_str(),
            "--service-domain",
            SERVICE_DOMAIN,
            "--grace",
            "1h",
            "--leader-lease-duration",
            "4s",
            "--leader-renew",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        override_flags(&mut args, extra);
        args
    }

    /// A worker authenticated as its own user; `extra` flag/value pairs replace the
    /// defaults or are appended.
    pub fn worker(&self, name: &str, extra: &[&str]) -> GraspSync {
        self.worker_logging_to(self.dir.path(), name, extra)
    }

    /// [`Cluster::worker`], its log in `dir`.
    pub fn worker_logging_to(
        &self,
        dir: &std::path::Path,
        name: &str,
        extra: &[&str],
    ) -> GraspSync {
        GraspSync::spawn(name, dir, &self.worker_args(name, extra), &self.envs())
    }

    /// [`Cluster::worker`] reaching the API server through `kubeconfig` instead (e.g. one
    /// pointing at a proxy).
    pub fn worker_via(&self, name: &str, kubeconfig: &std::path::Path) -> GraspSync {
        let envs = self.envs_via(kubeconfig);
        GraspSync::spawn(name, self.dir.path(), &self.worker_args(name, &[]), &envs)
    }

    /// A TCP proxy in front of the API server, and a kubeconfig `<name>-kubeconfig` that
    /// reaches the API server through it (TLS passes through untouched).
    pub async fn proxied_kubeconfig(
        &self,
        name: &str,
    ) -> (super::fault_proxy::FaultProxy, std::path::PathBuf) {
        let kubeconfig = std::fs::read_to_string(self.env.kubeconfig()).expect("kubeconfig");
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&kubeconfig).expect("yaml");
        let server = doc["clusters"][0]["cluster"]["server"]
            .as_str()
            .expect("server")
            .to_string();
        let upstream = server.trim_start_matches("https://").trim_end_matches('/');
        let proxy = super::fault_proxy::FaultProxy::start(
            &grasp_sync::nostr::RelayUrl::parse(&format!("ws://{upstream}")).expect("url"),
        )
        .await;
        for c in doc["clusters"].as_sequence_mut().expect("clusters") {
            c["cluster"]["server"] = format!("https://{}", proxy.host_port()).into();
        }
        let path = self.dir.path().join(format!("{name}-kubeconfig"));
        std::fs::write(&path, serde_yaml::to_string(&doc).expect("yaml")).expect("write");
        (proxy, path)
    }

    fn worker_args(&self, name: &str, extra: &[&str]) -> Vec<String> {
        let ctx = user(name);
        let mut args: Vec<String> = [
            "worker",
            "--name",
            name,
            "--kube-context",
            &ctx,
            "--local-relay",
            self.local.as_str(),
            "--status-interval",
            "1s",
            "--lease-duration",
            "4s",
            "--lease-renew",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        override_flags(&mut args, extra);
        args
    }

    pub async fn objects(&self) -> Vec<RelaySync> {
        Api::<RelaySync>::namespaced(self.admin.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// The controller replica holding the leader Lease.
    pub async fn leader(&self) -> Option<String> {
        let lease = Api::<Lease>::namespaced(self.admin.clone(), &self.ns)
            .get_opt(LEADER_LEASE)
            .await
            .ok()??;
        lease.spec?.holder_identity
    }

    /// `Ok(owners)` once every one of `expected` objects is labelled with its ring owner
    /// among `workers`, not draining, and Live with a full status written by that owner;
    /// otherwise the first thing still missing.
    pub async fn settled(
        &self,
        expected: usize,
        workers: &[&str],
    ) -> Result<BTreeMap<String, String>, String> {
        let ring = Ring::new(workers.iter().copied(), DEFAULT_VNODES);
        let objects = self.objects().await;
        if objects.len() != expected {
            return Err(format!("{} objects, want {expected}", objects.len()));
        }
        let mut owners = BTreeMap::new();
        for o in &objects {
            let name = o.name_any();
            let want = ring.owner(&o.spec.url).ok_or("empty ring")?;
            let label = o.labels().get(WORKER_LABEL).map(String::as_str);
            if label != Some(want) {
                return Err(format!("{name}: labelled {label:?}, ring says {want}"));
            }
            if o.labels().contains_key(DRAIN_LABEL) {
                return Err(format!("{name}: still draining"));
            }
            let s = o.status.as_ref().ok_or(format!("{name}: no status"))?;
            if s.worker.as_deref() != Some(want) || s.phase != Some(Phase::Live) {
                return Err(format!("{name}: status {:?} by {:?}", s.phase, s.worker));
            }
            if s.last_connected.is_none()
                || s.cursor.is_none()
                || s.confirmed_generation != o.metadata.generation
            {
                return Err(format!("{name}: status incomplete: {s:?}"));
            }
            owners.insert(name, want.to_string());
        }
        Ok(owners)
    }

    pub async fn wait_settled(
        &self,
        expected: usize,
        workers: &[&str],
        within: Duration,
    ) -> BTreeMap<String, String> {
        let start = std::time::Instant::now();
        loop {
            match self.settled(expected, workers).await {
                Ok(owners) => return owners,
                Err(why) if start.elapsed() > within => {
                    panic!("not settled on {workers:?} after {within:?}: {why}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Apply `--flag value` pairs: replace a default's value, or append the pair.
fn override_flags(args: &mut Vec<String>, extra: &[&str]) {
    for pair in extra.chunks(2) {
        match args.iter().position(|a| a == pair[0]) {
            Some(i) if pair.len() == 2 => args[i + 1] = pair[1].to_string(),
            _ => args.extend(pair.iter().map(|s| s.to_string())),
        }
    }
}

pub fn user(worker: &str) -> String {
    format!("grasp-sync-test-{worker}")
}

/// The workers' StatefulSet `name` with `replicas`, as the chart makes it, for server-side
/// apply (no kubelet runs its pods here: the workers are processes named as its pods).
pub fn statefulset(name: &str, replicas: usize) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "worker", "image": "example.invalid/grasp-sync:0"}]}
            }
        }
    })
}
