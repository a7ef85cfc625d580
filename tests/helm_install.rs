//! The chart installed into a real API server; its controller and worker containers run as
//! host processes exactly as rendered (args, environment, the Secret's mounted files, probe
//! paths and ports; only KUBECONFIG added, authenticating as the chart's ServiceAccounts with
//! tokens from the TokenRequest API) and sync a relay, which shows the chart's pod specs and
//! RBAC suffice; forbidden actions are refused.
//! A real Prometheus scrapes both processes and evaluates every dashboard query and alert.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use grasp_sync::crd::{DRAIN_LABEL, Phase, RelaySync, WORKER_LABEL};
use grasp_sync::testing::scripted_relay::{Script, ScriptedRelay};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions::is_crd_established};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use support::kube_env::locate;
use support::procs::GraspSync;
use support::prometheus::{self, Prometheus};
use support::{KubeEnv, eventually, free_port, nip34, relays, run};

const RELEASE: &str = "gs";
const CONTROLLER_SA: &str = "gs-grasp-sync-controller";
const WORKER_SA: &str = "gs-grasp-sync-worker";
const WORKER_POD: &str = "gs-grasp-sync-worker-0";
/// A pod name as a Deployment's ReplicaSet makes them.
const CONTROLLER_POD: &str = "gs-grasp-sync-controller-7d9f8b6c4-x2k9q";
/// Pod IPs: loopback addresses of their own, so both bind the chart's metrics port.
const CONTROLLER_IP: &str = "127.0.0.2";
const WORKER_IP: &str = "127.0.0.3";
const AUTH_SECRET: &str = "gs-auth";
const DEADLINE: Duration = Duration::from_secs(90);

/// The pod template of the `kind`/`name` workload in a rendered manifest.
fn rendered_pod(manifest: &str, kind: &str, name: &str) -> serde_yaml::Value {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(manifest)
        .map(|d| serde_yaml::Value::deserialize(d).expect("manifest YAML"))
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the release"))["spec"]["template"]["spec"]
        .clone()
}

/// One pod's container as the kubelet would start it on a host.
struct PodProcess {
    pod: String,
    ip: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// (kind, URL) of each HTTP probe.
    probes: Vec<(String, String)>,
    ports: Vec<(String, u16)>,
}

impl PodProcess {
    async fn resolve(
        admin: &Client,
        spec: &serde_yaml::Value,
        pod: &str,
        ip: &str,
        ns: &str,
        dir: &Path,
    ) -> PodProcess {
        use std::os::unix::fs::PermissionsExt;
        let containers = spec["containers"].as_sequence().expect("containers");
        assert_eq!(containers.len(), 1, "{pod}: one container");
        let c = &containers[0];
        assert!(
            c["command"].is_null(),
            "{pod}: the test runs the image's entrypoint (the binary), not a command"
        );
        let args: Vec<String> = c["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().expect("string arg").to_string())
            .collect();
        let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), ns);
        let secret_value = |secret: k8s_openapi::api::core::v1::Secret, key: &str| {
            let data = secret.data.unwrap_or_default();
            let bytes = data
                .get(key)
                .unwrap_or_else(|| panic!("{pod}: Secret has no {key}"));
            bytes.0.clone()
        };
        // Secret volumes: their files where the pod would see them, under `dir`.
        let mut remaps: Vec<(String, PathBuf)> = Vec::new();
        for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
            let name = m["name"].as_str().expect("mount name");
            let volume = spec["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{pod}: no volume {name}"));
            let secret_name = volume["secret"]["secretName"]
                .as_str()
                .unwrap_or_else(|| panic!("{pod}: volume {name} is not a Secret"));
            let secret = secrets.get(secret_name).await.expect("mounted Secret");
            let mount = m["mountPath"].as_str().expect("mountPath").to_string();
            let local = dir.join(pod).join(mount.trim_start_matches('/'));
            std::fs::create_dir_all(&local).expect("mount dir");
            for (key, value) in secret.data.unwrap_or_default() {
                let file = local.join(&key);
                std::fs::write(&file, &value.0).expect("secret file");
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400))
                    .expect("mode");
            }
            remaps.push((mount, local));
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                // `$(VAR)`: a variable defined earlier in the list, as the kubelet expands it.
                let mut v = v.to_string();
                for (k, val) in &env {
                    v = v.replace(&format!("$({k})"), val);
                }
                for (mount, local) in &remaps {
                    if let Some(rest) = v.strip_prefix(mount.as_str()) {
                        v = format!("{}{rest}", local.display());
                    }
                }
                v
            } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => pod.to_string(),
                    "metadata.namespace" => ns.to_string(),
                    "status.podIP" => ip.to_string(),
                    other => panic!("{pod}: env {name} from an unexpected field {other}"),
                }
            } else if !e["valueFrom"]["secretKeyRef"].is_null() {
                let r = &e["valueFrom"]["secretKeyRef"];
                let secret = secrets
                    .get(r["name"].as_str().expect("secret name"))
                    .await
                    .expect("Secret");
                String::from_utf8(secret_value(secret, r["key"].as_str().expect("key")))
                    .expect("utf-8 secret")
            } else {
                panic!("{pod}: env {name} has a source this test cannot resolve: {e:?}");
            };
            env.push((name, value));
        }
        let ports: Vec<(String, u16)> = c["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_string(),
                    p["containerPort"].as_u64().expect("containerPort") as u16,
                )
            })
            .collect();
        let mut probes = Vec::new();
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let get = &c[kind]["httpGet"];
            if get.is_null() {
                assert!(c[kind].is_null(), "{pod}: {kind} is not an HTTP GET");
                continue;
            }
            let port = match &get["port"] {
                serde_yaml::Value::Number(n) => n.as_u64().expect("port") as u16,
                serde_yaml::Value::String(name) => {
                    ports
                        .iter()
                        .find(|(n, _)| n == name)
                        .unwrap_or_else(|| panic!("{pod}: {kind} names no port {name}"))
                        .1
                }
                other => panic!("{pod}: {kind} port {other:?}"),
            };
            let path = get["path"].as_str().unwrap_or("/");
            probes.push((kind.to_string(), format!("http://{ip}:{port}{path}")));
        }
        assert!(!probes.is_empty(), "{pod}: no probes");
        PodProcess {
            pod: pod.to_string(),
            ip: ip.to_string(),
            args,
            env,
            probes,
            ports,
        }
    }

    /// The metrics port's address (what Prometheus scrapes by pod IP).
    fn metrics_addr(&self) -> String {
        let port = self
            .ports
            .iter()
            .find(|(n, _)| n == "metrics")
            .expect("a metrics port")
            .1;
        format!("{}:{port}", self.ip)
    }
}

/// `kubeconfig` with `context` as its current context.
fn single_context(kubeconfig: &Path, context: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    doc["current-context"] = context.into();
    let path = dir.join(format!("kubeconfig-{context}"));
    std::fs::write(&path, serde_yaml::to_string(&doc).expect("YAML")).expect("write");
    path
}

/// A kubeconfig whose contexts authenticate as the chart's ServiceAccounts.
fn sa_kubeconfig(env: &KubeEnv, ns: &str, dir: &Path) -> PathBuf {
    let admin = Kubeconfig::read_from(env.kubeconfig()).expect("kubeconfig");
    let server = admin.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .expect("server");
    let mut text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: {CONTROLLER_SA}\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\ncontexts:\n"
    );
    let mut users = String::from("users:\n");
    for sa in [CONTROLLER_SA, WORKER_SA] {
        let token = run(env
            .kubectl()
            .args(["create", "token", sa, "-n", ns, "--duration", "1h"]));
        text.push_str(&format!(
            "- name: {sa}\n  context:\n    cluster: test\n    user: {sa}\n    namespace: {ns}\n"
        ));
        users.push_str(&format!(
            "- name: {sa}\n  user:\n    token: {}\n",
            token.trim()
        ));
    }
    text.push_str(&users);
    let path = dir.join("sa-kubeconfig");
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

async fn client_for(kubeconfig: &Path, context: &str) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(
        kc,
        &KubeConfigOptions {
            context: Some(context.into()),
            ..KubeConfigOptions::default()
        },
    )
    .await
    .expect("config");
    Client::try_from(config).expect("client")
}

fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_its_service_accounts_suffice_and_prometheus_evaluates_every_query() {
    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let admin = env.client().await.expect("admin");
    let ns = env.namespace("chart").await.expect("namespace");
    let dir = tempfile::tempdir().expect("temp dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (_local_relay, local) = relays::local_relay(1_000_000).await;

    // The Secret the chart mounts (created beforehand, as an operator would).
    let key = nostr::Keys::generate();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": AUTH_SECRET},
        "stringData": {"nsec": key.secret_key().to_secret_hex()}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("auth Secret");
    let metrics_port = free_port();

    // helm install: CRD from the chart, then every object of the defaults.
    run(
        Command::new(locate("GRASP_SYNC_HELM", "helm", Some("/usr/bin/helm")))
            .args(["install", RELEASE])
            .arg(root.join("deploy/helm/grasp-sync"))
            .args(["--namespace", &ns, "--kubeconfig"])
            .arg(env.kubeconfig())
            .args(["--set", &format!("localRelay={local}")])
            .args([
                "--set",
                "serviceDomain=git.ours.example",
                "--set",
                "worker.replicas=1",
                // The test's relays listen on loopback, which the address policy refuses
                // unless allowed.
                "--set",
                "allow={127.0.0.1}",
                // The publisher's key, from a Secret mounted into the pods.
                "--set",
                &format!("auth.existingSecret={AUTH_SECRET}"),
                "--set",
                &format!("metrics.port={metrics_port}"),
            ]),
    );
    let crds = Api::<CustomResourceDefinition>::all(admin.clone());
    crds.get("relaysyncs.grasp-sync.dev")
        .await
        .expect("helm installed the CRD from the chart's crds/");
    tokio::time::timeout(
        DEADLINE,
        await_condition(crds, "relaysyncs.grasp-sync.dev", is_crd_established()),
    )
    .await
    .expect("CRD established")
    .expect("watching the CRD");
    let listed = run(env.kubectl().args([
        "get",
        "-n",
        &ns,
        "serviceaccounts,roles,rolebindings,deployments,statefulsets,services,poddisruptionbudgets,configmaps",
        "-o",
        "name",
    ]));
    for want in [
        "serviceaccount/gs-grasp-sync-controller",
        "serviceaccount/gs-grasp-sync-worker",
        "role.rbac.authorization.k8s.io/gs-grasp-sync-controller",
        "role.rbac.authorization.k8s.io/gs-grasp-sync-worker",
        "role.rbac.authorization.k8s.io/gs-grasp-sync-worker-lease",
        "rolebinding.rbac.authorization.k8s.io/gs-grasp-sync-worker-lease",
        "deployment.apps/gs-grasp-sync-controller",
        "statefulset.apps/gs-grasp-sync-worker",
        "service/gs-grasp-sync-worker",
        "poddisruptionbudget.policy/gs-grasp-sync-worker",
        "configmap/gs-grasp-sync-dashboard",
    ] {
        assert!(
            listed.lines().any(|l| l == want),
            "{want} missing:\n{listed}"
        );
    }

    // A repo whose remote holds its events.
    let remote = ScriptedRelay::start(Script::default())
        .await
        .expect("relay");
    let f = nip34::fixture("charted");
    let ann = nip34::announcement(&f, &[remote.url().to_string()]);
    relays::publish(&local, std::slice::from_ref(&ann)).await;
    remote.add(f.expected.iter().cloned());

    // The chart's containers as rendered, run as host processes: each container's args and
    // environment exactly (downward-API fields and `$(VAR)` references resolved as the
    // kubelet does, the Secret's files where the pod would mount them), only KUBECONFIG
    // added — in place of the in-cluster configuration, a token of the pod's
    // ServiceAccount. A variable the binary does not take, or a flag it refuses, fails here.
    let manifest = run(
        Command::new(locate("GRASP_SYNC_HELM", "helm", Some("/usr/bin/helm")))
            .args([
                "get",
                "manifest",
                RELEASE,
                "--namespace",
                &ns,
                "--kubeconfig",
            ])
            .arg(env.kubeconfig()),
    );
    let kubeconfig = sa_kubeconfig(&env, &ns, dir.path());
    let pods = [
        ("Deployment", CONTROLLER_SA, CONTROLLER_POD, CONTROLLER_IP),
        ("StatefulSet", WORKER_SA, WORKER_POD, WORKER_IP),
    ];
    let mut running = Vec::new();
    for (kind, workload, pod, ip) in pods {
        let spec = rendered_pod(&manifest, kind, workload);
        let p = PodProcess::resolve(&admin, &spec, pod, ip, &ns, dir.path()).await;
        let config = single_context(&kubeconfig, workload, dir.path());
        let mut envs: Vec<(&str, String)> =
            p.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        envs.push(("KUBECONFIG", config.display().to_string()));
        let proc = GraspSync::spawn_exact(pod, dir.path(), &p.args, &envs);
        running.push((proc, p));
    }
    let [(controller, cpod), (worker, wpod)]: [(GraspSync, PodProcess); 2] =
        running.try_into().ok().expect("two processes");
    let (caddr, waddr) = (cpod.metrics_addr(), wpod.metrics_addr());
    // The probes the kubelet would run, at the rendered paths and ports.
    for p in [&cpod, &wpod] {
        for (what, url) in &p.probes {
            eventually(
                &format!("{} {what} probe {url}", p.pod),
                DEADLINE,
                || async {
                    let r = reqwest::get(url).await.ok()?;
                    r.status().is_success().then_some(())
                },
            )
            .await;
        }
    }
    // Every variable the chart sets is one its command reads (the binary names the others).
    for (proc, p) in [(&controller, &cpod), (&worker, &wpod)] {
        let log = proc.log_tail(400);
        assert!(
            !log.contains("environment variable not read"),
            "{}: the chart sets a variable the binary ignores:\n{log}",
            p.pod
        );
    }
    let api = Api::<RelaySync>::namespaced(admin.clone(), &ns);
    let name = eventually(
        "the relay Live, held by the chart's worker",
        DEADLINE,
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let o = list.items.into_iter().next()?;
            let s = o.status.as_ref()?;
            (o.labels().get(WORKER_LABEL).map(String::as_str) == Some(WORKER_POD)
                && s.phase == Some(Phase::Live)
                && s.worker.as_deref() == Some(WORKER_POD))
            .then(|| o.name_any())
        },
    )
    .await;
    let mut want = nip34::ids(&f.expected);
    want.insert(ann.id);
    eventually("the events synced", DEADLINE, || async {
        let got = relays::fetch_ids(&local, nostr::Filter::new()).await;
        (got == want).then_some(())
    })
    .await;

    // What the chart's identities may not do.
    let as_worker = client_for(&kubeconfig, WORKER_SA).await;
    let as_controller = client_for(&kubeconfig, CONTROLLER_SA).await;
    let worker_api = Api::<RelaySync>::namespaced(as_worker.clone(), &ns);
    forbidden(
        worker_api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"repos": []}})),
            )
            .await,
        "worker changes spec",
    );
    forbidden(
        worker_api
            .delete(&name, &DeleteParams::default())
            .await
            .map(|_| ()),
        "worker deletes",
    );
    let intruder: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "grasp-sync-worker-someone-else"},
        "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    Api::<Lease>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &intruder)
        .await
        .expect("admin creates a Lease");
    forbidden(
        Api::<Lease>::namespaced(as_worker.clone(), &ns)
            .patch(
                "grasp-sync-worker-someone-else",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"holderIdentity": WORKER_POD}})),
            )
            .await,
        "worker takes a Lease outside its StatefulSet",
    );
    forbidden(
        Api::<RelaySync>::namespaced(as_controller.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Dead"}})),
            )
            .await,
        "controller writes status",
    );
    forbidden(
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(as_worker.clone(), &ns)
            .list(&Default::default())
            .await,
        "worker reads Secrets",
    );
    // The controller watches the workers' pods, their metadata (a stopped worker whose pod
    // is still terminating keeps its relays); a worker may not list pods.
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(as_controller.clone(), &ns)
        .list_metadata(
            &kube::api::ListParams::default().labels("statefulset.kubernetes.io/pod-name"),
        )
        .await
        .expect("the controller lists the workers' pods");
    forbidden(
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(as_worker.clone(), &ns)
            .list_metadata(&Default::default())
            .await,
        "worker lists pods",
    );

    // RBAC cannot stop the worker identity from creating Leases of other names: a ghost
    // member, renewed "forever", named so that the ring would give it our relay. The
    // controller ignores it (not one of the StatefulSet's pods) and counts it.
    let url = api.get(&name).await.expect("object").spec.url;
    let ghost = (3..200)
        .map(|i| format!("gs-grasp-sync-worker-{i}"))
        .find(|g| {
            grasp_sync::controller::assignment::ring::Ring::new(
                [WORKER_POD.to_string(), g.clone()],
                grasp_sync::controller::assignment::ring::DEFAULT_VNODES,
            )
            .owner(&url)
                == Some(g.as_str())
        })
        .expect("a ghost name the ring would prefer");
    let forged: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("grasp-sync-worker-{ghost}")},
        "spec": {"holderIdentity": ghost, "leaseDurationSeconds": 3600,
                 "renewTime": "2099-01-01T00:00:00.000000Z"}
    }))
    .unwrap();
    Api::<Lease>::namespaced(as_worker, &ns)
        .create(&PostParams::default(), &forged)
        .await
        .expect("the worker identity creates a Lease of another name");
    // Decided either way: the ghost counted as foreign, or the relay moving to it.
    let o = eventually("the controller to judge the ghost", DEADLINE, || async {
        let o = api.get(&name).await.ok()?;
        let text = reqwest::get(format!("http://{caddr}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let counted = text
            .lines()
            .any(|l| l.starts_with("grasp_sync_foreign_leases ") && !l.ends_with(" 0"));
        let moving = o.labels().get(WORKER_LABEL).map(String::as_str) != Some(WORKER_POD)
            || o.labels().contains_key(DRAIN_LABEL);
        (counted || moving).then_some(o)
    })
    .await;
    assert_eq!(
        o.labels().get(WORKER_LABEL).map(String::as_str),
        Some(WORKER_POD),
        "the ghost took the relay"
    );
    assert!(
        !o.labels().contains_key(DRAIN_LABEL),
        "the ghost started a drain"
    );

    // Prometheus scrapes both and loads the alert rules.
    let prom = Prometheus::start(
        dir.path(),
        &[caddr.clone(), waddr.clone()],
        &root.join("deploy/prometheus/grasp-sync-rules.yaml"),
    );
    eventually("Prometheus to scrape both processes", DEADLINE, || async {
        let up = prom.query("sum(up)").await.ok()?;
        (up.first()?["value"][1] == "2").then_some(())
    })
    .await;
    // Two scrapes at least, so that rate() has samples.
    eventually("rate() to have samples", DEADLINE, || async {
        let r = prom.query("rate(ngit_sync_events_total[1m])").await.ok()?;
        (!r.is_empty()).then_some(())
    })
    .await;

    // Every metric the dashboard and the alerts use exists in the processes' /metrics, and
    // every panel's query returns data.
    prometheus::dashboard_and_rules_use_exported_metrics(&[&caddr, &waddr]).await;
    prometheus::every_panel_returns_data(&prom).await;
    let rules_text = include_str!("../deploy/prometheus/grasp-sync-rules.yaml");

    // The rules load and evaluate without error; in this healthy deployment none fires.
    let rules: serde_yaml::Value = serde_yaml::from_str(rules_text).unwrap();
    let alerts: Vec<(String, String)> = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    eventually("the rule group to be evaluated", DEADLINE, || async {
        let body = prom.get("/api/v1/rules", &[]).await?;
        let rules = body["data"]["groups"][0]["rules"].as_array()?.clone();
        (rules.len() == alerts.len()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z"))
        .then_some(())
    })
    .await;
    for (alert, expr) in &alerts {
        let series = prom
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("{alert}: {e}"));
        assert!(
            series.is_empty(),
            "{alert} fires on a healthy deployment: {series:?}"
        );
    }

    // An alert fires when intended: the worker crashes, its relay has no live worker.
    worker.kill();
    let unassigned = alerts
        .iter()
        .find(|(a, _)| a == "GraspSyncRelaysUnassigned")
        .map(|(_, e)| e.clone())
        .expect("rule");
    eventually(
        "GraspSyncRelaysUnassigned's expression to hold",
        DEADLINE,
        || async {
            let series = prom.query(&unassigned).await.ok()?;
            (!series.is_empty()).then_some(())
        },
    )
    .await;
    drop(controller);
}
