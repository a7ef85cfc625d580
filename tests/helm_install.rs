//! The chart installed into a real API server; a controller and a worker run as host
//! processes authenticated as the chart's ServiceAccounts (tokens from the TokenRequest API)
//! and sync a relay, which shows the chart's RBAC suffices; forbidden actions are refused.
//! A real Prometheus scrapes both processes and evaluates every dashboard query and alert.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
use support::{KubeEnv, eventually, free_port, nip34, relays};

const RELEASE: &str = "gs";
const CONTROLLER_SA: &str = "gs-grasp-sync-controller";
const WORKER_SA: &str = "gs-grasp-sync-worker";
const WORKER_POD: &str = "gs-grasp-sync-worker-0";
const DEADLINE: Duration = Duration::from_secs(90);

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, targets: &[u16], rules: &Path) -> Prometheus {
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: grasp-sync\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).expect("prometheus config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(locate(
            "GRASP_SYNC_PROMETHEUS",
            "prometheus",
            Some("/usr/bin/prometheus"),
        ))
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start prometheus (scripts/test-env.sh provides it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query).ok()?;
        let resp = reqwest::get(url).await.ok()?;
        serde_json::from_str(&resp.text().await.ok()?).ok()
    }

    /// Instant query → `Ok(series)`, or Prometheus's error.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = self
            .get("/api/v1/query", &[("query", expr)])
            .await
            .ok_or("no answer")?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// Every `ngit_sync_*` / `grasp_sync_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("_sync_") {
        let start = text[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|p| p + 1)
            .unwrap_or(0);
        let end = text[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|p| i + p)
            .unwrap_or(text.len());
        let name = &text[start..end];
        if name.starts_with("ngit_sync_") || name.starts_with("grasp_sync_") {
            out.insert(name.to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_its_service_accounts_suffice_and_prometheus_evaluates_every_query() {
    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let admin = env.client().await.expect("admin");
    let ns = env.namespace("chart").await.expect("namespace");
    let dir = tempfile::tempdir().expect("temp dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (_local_relay, local) = relays::local_relay(1_000_000).await;

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

    // The processes, as the chart's ServiceAccounts.
    let kubeconfig = sa_kubeconfig(&env, &ns, dir.path());
    let envs = [
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("GRASP_SYNC_NAMESPACE", ns.clone()),
        ("GRASP_SYNC_ALLOW", "127.0.0.1".to_string()),
        ("GRASP_SYNC_MAX_RELAYS_PER_HOST", "100000".to_string()),
    ];
    let (cport, wport) = (free_port(), free_port());
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let controller = GraspSync::spawn(
        "controller",
        dir.path(),
        &s(&[
            "controller",
            "--identity",
            "gs-controller-a",
            "--kube-context",
            CONTROLLER_SA,
            "--local-relay",
            local.as_str(),
            "--service-domain",
            "git.ours.example",
            "--metrics-addr",
            &format!("127.0.0.1:{cport}"),
            "--leader-lease-duration",
            "4s",
            "--leader-renew",
            "1s",
            // As the chart sets them: only the StatefulSet's pods join the ring.
            "--worker-statefulset",
            "gs-grasp-sync-worker",
            "--max-workers",
            "3",
        ]),
        &envs,
    );
    let worker = GraspSync::spawn(
        "worker",
        dir.path(),
        &s(&[
            "worker",
            "--name",
            WORKER_POD,
            "--kube-context",
            WORKER_SA,
            "--local-relay",
            local.as_str(),
            "--metrics-addr",
            &format!("127.0.0.1:{wport}"),
            "--status-interval",
            "1s",
            "--lease-duration",
            "4s",
            "--lease-renew",
            "1s",
        ]),
        &envs,
    );
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
        let text = reqwest::get(format!("http://127.0.0.1:{cport}/metrics"))
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
        &[cport, wport],
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

    // Every metric the dashboard and the alerts use exists in the processes' /metrics.
    let mut exposed = String::new();
    for port in [cport, wport] {
        exposed.push_str(
            &reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics"),
        );
    }
    let exposed_names = metric_names(&exposed);
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/grasp-sync.json")).unwrap();
    let rules_text = include_str!("../deploy/prometheus/grasp-sync-rules.yaml");
    let mut used = metric_names(rules_text);
    let mut queries = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            used.extend(metric_names(expr));
            queries.push((
                p["title"].as_str().unwrap().to_string(),
                expr.replace("$__rate_interval", "1m"),
            ));
        }
    }
    let dead: Vec<&String> = used.difference(&exposed_names).collect();
    assert!(
        dead.is_empty(),
        "dashboard/alerts use metrics nobody exports: {dead:?}"
    );

    // Every panel query evaluates and returns a series (no dead panels). Series of the
    // second target may need one more scrape: poll each query with a deadline.
    for (title, expr) in &queries {
        let start = std::time::Instant::now();
        loop {
            let series = prom
                .query(expr)
                .await
                .unwrap_or_else(|e| panic!("panel {title:?}: {expr} fails: {e}"));
            if !series.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "panel {title:?}: {expr} returns nothing"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

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
