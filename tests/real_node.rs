//! The operator's journey on a real single-node Kubernetes (kubelet, containerd, runc, CNI
//! bridge, kube-proxy, DNS for Service names; `support::node`), with the runtime image built
//! here (`scripts/build-image.sh`) and the chart installed by `helm install`: pods Running and
//! Ready by their probes, relays Live, the local relay holding exactly what the remote relays
//! hold for its repos; then `kubectl scale`, `kubectl delete pod`, a rolling restart, `helm
//! upgrade`, Prometheus scraping the pods, and `helm uninstall`.
//!
//! The relays are this test's own, listening on the node's address; the pods reach them by
//! Service names (`*.relays.svc.cluster.local`: dnsmasq → ClusterIP → kube-proxy → the node).
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use grasp_sync::controller::assignment::ring::{DEFAULT_VNODES, Ring};
use grasp_sync::crd::{Phase, RelaySync, WORKER_LABEL};
use grasp_sync::nostr::RelayUrl;
use grasp_sync::testing::scripted_relay::{Script, ScriptedRelay};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::kube_env::locate;
use support::node::{NODE_IP, Node, isolate};
use support::prometheus::{self, Prometheus};
use support::{eventually, nip34, relays, run};

const NS: &str = "grasp-sync";
const RELAYS_NS: &str = "relays";
const RELEASE: &str = "gs";
const WORKERS: &str = "gs-grasp-sync-worker";
const CONTROLLER: &str = "gs-grasp-sync-controller";
const AUTH_SECRET: &str = "gs-auth";
const REMOTES: usize = 12;
const DEADLINE: Duration = Duration::from_secs(180);
/// The failover target (README): a worker's relays Live again within 10 s.
const FAILOVER: Duration = Duration::from_secs(10);
/// The chart's `worker.restartGrace`.
const GRACE: Duration = Duration::from_secs(30);

fn helm(node: &Node) -> Command {
    let mut c = Command::new(locate("GRASP_SYNC_HELM", "helm", Some("/usr/bin/helm")));
    c.arg("--kubeconfig").arg(node.kubeconfig());
    c
}

/// A Service without selector and its Endpoints: `<name>.relays.svc.cluster.local:port`
/// reaches `port` on the node's address (where the test's relay listens).
fn relay_service(node: &Node, name: &str, port: u16, target: u16) {
    let objects = json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": name, "namespace": RELAYS_NS},
             "spec": {"ports": [{"name": "ws", "port": port, "targetPort": target, "protocol": "TCP"}]}},
            {"apiVersion": "v1", "kind": "Endpoints",
             "metadata": {"name": name, "namespace": RELAYS_NS},
             "subsets": [{"addresses": [{"ip": NODE_IP}],
                          "ports": [{"name": "ws", "port": target, "protocol": "TCP"}]}]}
        ]
    });
    let file = node.work.join(format!("svc-{name}.json"));
    std::fs::write(&file, objects.to_string()).expect("service file");
    run(node.kubectl().args(["apply", "-f"]).arg(&file));
}

/// Where every RelaySync stands: (url, label, status worker, phase).
type Holding = BTreeMap<String, (Option<String>, Option<String>, Option<Phase>)>;

async fn holding(api: &Api<RelaySync>) -> Option<Holding> {
    let list = api.list(&ListParams::default()).await.ok()?;
    Some(
        list.items
            .into_iter()
            .map(|o| {
                let s = o.status.clone().unwrap_or_default();
                (
                    o.spec.url.clone(),
                    (o.labels().get(WORKER_LABEL).cloned(), s.worker, s.phase),
                )
            })
            .collect(),
    )
}

/// Every relay Live, its status written by the worker its label names, that worker one of
/// `workers`, and `relays` of them.
fn all_live(h: &Holding, relays: usize, workers: &[String]) -> bool {
    h.len() == relays
        && h.values().all(|(label, worker, phase)| {
            label.is_some()
                && label == worker
                && *phase == Some(Phase::Live)
                && workers.contains(label.as_ref().unwrap_or(&String::new()))
        })
}

/// Every relay Live on one of `workers` (with `by_ring`, on its ring owner among them);
/// where they stand then.
async fn wait_all_live(
    api: &Api<RelaySync>,
    workers: &[String],
    by_ring: bool,
    what: &str,
) -> Holding {
    let ring = Ring::new(workers.iter().cloned(), DEFAULT_VNODES);
    eventually(what, DEADLINE, || async {
        let h = holding(api).await?;
        (all_live(&h, REMOTES, workers)
            && (!by_ring
                || h.iter()
                    .all(|(url, (label, _, _))| label.as_deref() == ring.owner(url))))
        .then_some(h)
    })
    .await
}

/// The local relay holds exactly `want`.
async fn wait_exact_set(local: &RelayUrl, want: &BTreeSet<nostr::EventId>, what: &str) {
    eventually(what, DEADLINE, || async {
        let got = relays::fetch_ids(local, nostr::Filter::new()).await;
        (&got == want).then_some(())
    })
    .await;
}

/// Wait for both workloads' rollouts, after restarting them when `restart`.
fn rollout(node: &Node, restart: bool) {
    for what in [
        format!("statefulset/{WORKERS}"),
        format!("deployment/{CONTROLLER}"),
    ] {
        if restart {
            run(node.kubectl().args(["rollout", "restart", &what, "-n", NS]));
        }
        run(node
            .kubectl()
            .args(["rollout", "status", &what, "-n", NS, "--timeout=180s"]));
    }
}

fn pod_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{WORKERS}-{i}")).collect()
}

/// The StatefulSet's and the Deployment's pods all Ready (by their probes), with these counts.
async fn wait_ready(client: &Client, workers: i32, controllers: i32) {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    let sts = Api::<StatefulSet>::namespaced(client.clone(), NS);
    let dep = Api::<Deployment>::namespaced(client.clone(), NS);
    eventually(
        &format!("{workers} workers and {controllers} controllers Ready"),
        DEADLINE,
        || async {
            let s = sts.get(WORKERS).await.ok()?.status?;
            let d = dep.get(CONTROLLER).await.ok()?.status?;
            (s.ready_replicas == Some(workers)
                && s.replicas == workers
                && s.updated_replicas == Some(workers)
                && d.ready_replicas == Some(controllers)
                && d.updated_replicas == Some(controllers)
                && d.replicas == Some(controllers))
            .then_some(())
        },
    )
    .await;
}

#[test]
fn operator_journey_on_a_real_node() {
    let Some(inside) = isolate("operator_journey_on_a_real_node") else {
        return;
    };
    let mut node = Node::start(&inside);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(journey(&mut node));
}

async fn journey(node: &mut Node) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let client = node.client().await;
    let ip: IpAddr = NODE_IP.parse().expect("node IP");

    // The image, built and loaded as the README says.
    let tag = env!("CARGO_PKG_VERSION");
    let archive = node.work.join("img/grasp-sync.oci.tar");
    run(Command::new(root.join("scripts/build-image.sh"))
        .args([
            "--binary",
            env!("CARGO_BIN_EXE_grasp-sync"),
            "--tag",
            tag,
            "--out",
        ])
        .arg(&archive));
    node.import_image(&archive, "localhost/grasp-sync");

    // The local relay and the remote relays, reachable from the pods by Service names.
    run(node.kubectl().args(["create", "namespace", RELAYS_NS]));
    let (_local_relay, local) = relays::local_relay_at(ip, 1_000_000).await;
    relay_service(node, "local-relay", 80, local.port());
    let mut remotes = Vec::new();
    for i in 0..REMOTES {
        let r = ScriptedRelay::start_on(SocketAddr::new(ip, 0), Script::default())
            .await
            .expect("remote relay");
        let port = r.url().port();
        relay_service(node, &format!("remote-{i}"), 80, port);
        remotes.push(r);
    }
    node.refresh_dns();
    let remote_url = |i: usize| format!("ws://remote-{i}.{RELAYS_NS}.svc.cluster.local");

    // Repos: each announced with two of the remotes, its events on both.
    let mut want = BTreeSet::new();
    for i in 0..REMOTES {
        let f = nip34::fixture(&format!("node-{i}"));
        let on = [i, (i + 1) % REMOTES];
        let ann = nip34::announcement(&f, &on.map(remote_url));
        relays::publish(&local, std::slice::from_ref(&ann)).await;
        for r in on {
            remotes[r].add(f.expected.iter().cloned());
        }
        want.extend(nip34::ids(&f.expected));
        want.insert(ann.id);
    }

    // helm install, as an operator would: the key Secret first.
    run(node.kubectl().args(["create", "namespace", NS]));
    let key = nostr::Keys::generate();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": AUTH_SECRET},
        "stringData": {"nsec": key.secret_key().to_secret_hex()}
    }))
    .expect("secret");
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .expect("auth Secret");
    let allow = (0..REMOTES)
        .map(|i| format!("remote-{i}.{RELAYS_NS}.svc.cluster.local"))
        .chain([support::node::SERVICE_CIDR.to_string()])
        .collect::<Vec<_>>()
        .join(",");
    let started = Instant::now();
    run(helm(node)
        .args(["install", RELEASE])
        .arg(root.join("deploy/helm/grasp-sync"))
        .args(["--namespace", NS])
        .args(["--set", "image.repository=localhost/grasp-sync"])
        .args(["--set", &format!("image.tag={tag}")])
        .args([
            "--set",
            &format!("localRelay=ws://local-relay.{RELAYS_NS}.svc.cluster.local"),
        ])
        .args(["--set", "serviceDomain=git.ours.example"])
        // The remote relays are Services of this cluster: their names and addresses are
        // refused unless allowed.
        .args(["--set", &format!("allow={{{allow}}}")])
        .args(["--set", &format!("auth.existingSecret={AUTH_SECRET}")]));
    wait_ready(&client, 3, 2).await;
    println!(
        "installed: pods Ready {:.1?} after helm install",
        started.elapsed()
    );
    node.check_running();

    let api = Api::<RelaySync>::namespaced(client.clone(), NS);
    let three = pod_names(3);
    wait_all_live(
        &api,
        &three,
        false,
        "every relay Live on the chart's workers",
    )
    .await;
    println!("Live: {:.1?} after helm install", started.elapsed());
    wait_exact_set(
        &local,
        &want,
        "the local relay to hold exactly the expected set",
    )
    .await;

    // What `kubectl get relaysyncs` shows an operator.
    let table = run(node.kubectl().args(["get", "relaysyncs", "-n", NS]));
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "URL",
            "WORKER",
            "PHASE",
            "REPOS",
            "CONFIRMED",
            "LAST-CONNECTED",
            "AGE"
        ],
        "{table}"
    );
    for line in lines {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.len(), header.len(), "every column has a value: {line}");
        assert!(cols[1].starts_with("ws://remote-"), "{line}");
        assert!(three.iter().any(|w| w == cols[2]), "{line}");
        assert_eq!(cols[3], "Live", "{line}");
        assert_eq!(cols[4], "2", "two repos per relay: {line}");
        assert_eq!(cols[5], "2", "both confirmed: {line}");
    }
    println!("{table}");

    at_most_one_connection_each(&remotes);

    // kubectl scale 3 → 4: relays move by the ring.
    let four = pod_names(4);
    run(node
        .kubectl()
        .args(["scale", "statefulset", WORKERS, "-n", NS, "--replicas=4"]));
    wait_ready(&client, 4, 2).await;
    let moved = wait_all_live(
        &api,
        &four,
        true,
        "every relay Live on its ring owner among 4",
    )
    .await;
    let onto_new = moved
        .values()
        .filter(|(l, _, _)| l.as_deref() == Some(four[3].as_str()))
        .count();
    assert!(onto_new > 0, "the ring gives the new worker some relays");
    println!("scaled to 4: {onto_new} relays moved to the new worker");
    at_most_one_connection_each(&remotes);

    // A forged Lease of a pod not running (an ordinal below worker.maxReplicas, so the
    // workers' RBAC lets their identity write it), renewed as a live worker would: it does
    // not join the ring, so none of its relays go unsynced.
    let ghost = (4..10)
        .map(|i| format!("{WORKERS}-{i}"))
        .find(|g| {
            let r = Ring::new(four.iter().cloned().chain([g.clone()]), DEFAULT_VNODES);
            moved.keys().any(|url| r.owner(url) == Some(g.as_str()))
        })
        .expect("a ghost ordinal the ring would give relays");
    let leases = Api::<Lease>::namespaced(client.clone(), NS);
    let ghost_lease = format!("grasp-sync-worker-{ghost}");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": ghost_lease},
            "spec": {"holderIdentity": ghost, "leaseDurationSeconds": 6,
                     "renewTime": MicroTime(Timestamp::now())}
        });
        leases
            .patch(
                &ghost_lease,
                &PatchParams::apply("ghost").force(),
                &Patch::Apply(&lease),
            )
            .await
            .expect("ghost Lease");
        let h = holding(&api).await.expect("holding");
        assert!(
            h.values()
                .all(|(l, _, _)| l.as_deref() != Some(ghost.as_str())),
            "the ghost {ghost} was given relays"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    leases
        .delete(&ghost_lease, &Default::default())
        .await
        .expect("ghost Lease deleted");
    println!("a forged Lease for {ghost} renewed for 10 s: no relay given to it");

    // kubectl delete pod: the StatefulSet makes it again under its name. With the chart's
    // restart grace its relays wait for it (no move, no second connection) and are Live
    // again once it is back. The grace runs from the later of the stop and the last sight of
    // the old pod terminating: this kubelet deletes a pod object 5 to over 30 s after its
    // process stopped, and a grace counted from the stop alone moved every relay in about
    // one run in eight.
    let victim = four
        .iter()
        .max_by_key(|w| {
            moved
                .values()
                .filter(|(l, _, _)| l.as_ref() == Some(*w))
                .count()
        })
        .expect("a worker")
        .clone();
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let old_uid = pods.get(&victim).await.expect("pod").metadata.uid;
    let theirs: Vec<String> = moved
        .iter()
        .filter(|(_, (l, _, _))| l.as_ref() == Some(&victim))
        .map(|(url, _)| url.clone())
        .collect();
    let moved_in_grace = std::sync::atomic::AtomicBool::new(false);
    // The deleted pod's log goes with it: follow it into the work directory, so that a move
    // during the grace can be explained.
    let old_log = node.work.join(format!("{victim}-deleted.log"));
    let mut follow = node
        .kubectl()
        .args(["logs", "-f", "--timestamps", &victim, "-n", NS])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&old_log).expect("log file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kubectl logs -f");
    // Statuses store whole seconds: a connection after the delete is one after this.
    let deleted_at = Timestamp::from_second(Timestamp::now().as_second()).expect("now");
    let t = Instant::now();
    run(node
        .kubectl()
        .args(["delete", "pod", &victim, "-n", NS, "--wait=false"]));
    let took = eventually(
        "the deleted pod's relays Live again",
        2 * GRACE + FAILOVER,
        || async {
            let h = holding(&api).await?;
            if !theirs
                .iter()
                .all(|u| h.get(u).and_then(|(l, _, _)| l.as_deref()) == Some(victim.as_str()))
                && !moved_in_grace.swap(true, Ordering::SeqCst)
            {
                println!("NOTE: a relay of the deleted pod moved during the restart grace: {h:?}");
                explain_move(node, &victim, &old_log);
            }
            let connected = last_connected(&api).await?;
            (all_live(&h, REMOTES, &four)
                && theirs
                    .iter()
                    .all(|url| connected.get(url).is_some_and(|c| *c > deleted_at)))
            .then(|| t.elapsed())
        },
    )
    .await;
    eventually("the deleted pod replaced and Ready", DEADLINE, || async {
        let p = pods.get(&victim).await.ok()?;
        let ready = p
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (p.metadata.uid != old_uid && ready).then_some(())
    })
    .await;
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        !moved_in_grace.load(Ordering::SeqCst),
        "a relay of the deleted pod moved during the restart grace (explained above)"
    );
    wait_ready(&client, 4, 2).await;
    println!(
        "{victim} deleted: its {} relays Live again after {took:.1?}",
        theirs.len()
    );
    // Usually 5 to 15 s (the pod's stop, its re-creation, a connection), over 30 s when the
    // kubelet is slow to delete the old pod: say where the time went.
    if took > FAILOVER + Duration::from_secs(5) {
        println!("NOTE: a slow return after the delete at {deleted_at}");
        explain_move(node, &victim, &old_log);
    }
    at_most_one_connection_each(&remotes);

    // kubectl rollout restart of both workloads.
    rollout(node, true);
    wait_ready(&client, 4, 2).await;
    wait_all_live(
        &api,
        &four,
        false,
        "every relay Live after the rolling restarts",
    )
    .await;
    at_most_one_connection_each(&remotes);

    // helm upgrade with changed values: the pods roll to the new settings. Without a restart
    // grace, a deleted pod's relays move to the other workers at once.
    run(helm(node)
        .args(["upgrade", RELEASE])
        .arg(root.join("deploy/helm/grasp-sync"))
        .args(["--namespace", NS, "--reuse-values"])
        .args([
            "--set",
            "statusInterval=20s",
            "--set",
            "worker.restartGrace=0s",
        ])
        .args(["--set", "worker.replicas=4"]));
    rollout(node, false);
    wait_ready(&client, 4, 2).await;
    for w in &four {
        let p = pods.get(w).await.expect("worker pod");
        let env = p.spec.expect("spec").containers[0]
            .env
            .clone()
            .unwrap_or_default();
        assert!(
            env.iter().any(
                |e| e.name == "GRASP_SYNC_STATUS_INTERVAL" && e.value.as_deref() == Some("20s")
            ),
            "{w} runs the upgraded value"
        );
    }
    let controller_env = |p: &Pod| {
        p.spec.as_ref().expect("spec").containers[0]
            .env
            .clone()
            .unwrap_or_default()
    };
    let controllers = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await
        .expect("controller pods");
    for p in controllers
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        assert!(
            controller_env(p)
                .iter()
                .any(|e| e.name == "GRASP_SYNC_RESTART_GRACE" && e.value.as_deref() == Some("0s")),
            "{} runs the upgraded restart grace",
            p.name_any()
        );
    }
    let settled = wait_all_live(&api, &four, false, "every relay Live after the upgrade").await;
    at_most_one_connection_each(&remotes);
    let victim = four
        .iter()
        .max_by_key(|w| {
            settled
                .values()
                .filter(|(l, _, _)| l.as_ref() == Some(*w))
                .count()
        })
        .expect("a worker")
        .clone();
    let theirs = settled
        .values()
        .filter(|(l, _, _)| l.as_ref() == Some(&victim))
        .count();
    let t = Instant::now();
    run(node
        .kubectl()
        .args(["delete", "pod", &victim, "-n", NS, "--wait=false"]));
    let others: Vec<String> = four.iter().filter(|w| **w != victim).cloned().collect();
    let took = eventually(
        "the deleted pod's relays Live on the others",
        FAILOVER,
        || async { all_live(&holding(&api).await?, REMOTES, &others).then(|| t.elapsed()) },
    )
    .await;
    println!(
        "{victim} deleted without a restart grace: its {theirs} relays Live elsewhere after {took:.1?}"
    );
    at_most_one_connection_each(&remotes);
    wait_ready(&client, 4, 2).await;
    wait_all_live(&api, &four, false, "every relay Live once the pod is back").await;
    at_most_one_connection_each(&remotes);
    wait_exact_set(
        &local,
        &want,
        "the local relay still to hold exactly the expected set",
    )
    .await;

    // A real Prometheus scrapes the pods by their IPs; every dashboard query returns data.
    let list = pods.list(&ListParams::default()).await.expect("pods");
    let targets: Vec<String> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .map(|ip| format!("{ip}:9090"))
        .collect();
    assert_eq!(targets.len(), 6, "2 controllers and 4 workers: {targets:?}");
    let prom = Prometheus::start(
        &node.work,
        &targets,
        &root.join("deploy/prometheus/grasp-sync-rules.yaml"),
    );
    eventually("Prometheus to scrape every pod", DEADLINE, || async {
        let up = prom.query("sum(up)").await.ok()?;
        (up.first()?["value"][1] == "6").then_some(())
    })
    .await;
    let refs: Vec<&String> = targets.iter().collect();
    prometheus::dashboard_and_rules_use_exported_metrics(&refs).await;
    prometheus::every_panel_returns_data(&prom).await;
    drop(prom);

    // kubectl scale 4 → 3: the last pod's relays go to their ring owners among the three.
    run(node
        .kubectl()
        .args(["scale", "statefulset", WORKERS, "-n", NS, "--replicas=3"]));
    wait_ready(&client, 3, 2).await;
    wait_all_live(
        &api,
        &three,
        true,
        "every relay Live on its ring owner among 3",
    )
    .await;
    at_most_one_connection_each(&remotes);

    // helm uninstall leaves nothing of grasp-sync but the CRD: what the chart made, and what
    // the controller and the workers made (RelaySyncs, Leases) goes with it.
    run(helm(node).args(["uninstall", RELEASE, "--namespace", NS, "--wait"]));
    let last_left = std::sync::Mutex::new(String::new());
    eventually("nothing of grasp-sync left but the CRD", DEADLINE, || async {
        let left = run(node.kubectl().args([
            "get",
            "all,configmaps,serviceaccounts,roles,rolebindings,poddisruptionbudgets,leases,relaysyncs",
            "-n",
            NS,
            "-o",
            "name",
        ]));
        let left: Vec<&str> = left
            .lines()
            .filter(|l| {
                // What Kubernetes makes in every namespace.
                !matches!(*l, "configmap/kube-root-ca.crt" | "serviceaccount/default")
            })
            .collect();
        if left.is_empty() {
            return Some(());
        }
        let now = format!("{left:?}");
        if *last_left.lock().unwrap() != now {
            eprintln!("left after helm uninstall: {now}");
            *last_left.lock().unwrap() = now;
        }
        None
    })
    .await;
    run(node
        .kubectl()
        .args(["get", "crd", "relaysyncs.grasp-sync.dev"]));
}

/// What the deleted pod, its successor, its Lease, the pod's events and the controllers said
/// about a relay that moved during the restart grace, or a slow return (printed, for the note
/// that reports it).
fn explain_move(node: &Node, victim: &str, old_log: &Path) {
    let tail = |text: &str, n: usize| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    let lease = grasp_sync::coordination::membership::lease_name(victim);
    let show = |args: &[&str]| {
        node.kubectl()
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| e.to_string())
    };
    let old = std::fs::read_to_string(old_log).unwrap_or_default();
    println!(
        "--- the deleted pod's log (last 40 lines):\n{}",
        tail(&old, 40)
    );
    let successor = show(&["logs", "--timestamps", victim, "-n", NS]);
    println!(
        "--- its successor's log (first 40 lines):\n{}",
        successor.lines().take(40).collect::<Vec<_>>().join("\n")
    );
    println!(
        "--- its Lease:\n{}",
        show(&["get", "lease", &lease, "-n", NS, "-o", "yaml"])
    );
    println!(
        "--- the pod's events:\n{}",
        show(&[
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            &format!("involvedObject.name={victim}"),
            "--sort-by=.lastTimestamp",
        ])
    );
    let controllers = show(&[
        "logs",
        "--timestamps",
        "--prefix",
        "--tail=400",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=controller",
    ]);
    let said: Vec<&str> = controllers
        .lines()
        .filter(|l| l.contains("left the ring") || l.contains(victim) || l.contains("leader"))
        .collect();
    println!("--- the controllers on it:\n{}", tail(&said.join("\n"), 40));
}

fn at_most_one_connection_each(remotes: &[ScriptedRelay]) {
    for (i, r) in remotes.iter().enumerate() {
        let max = r.counters().max_live_connections.load(Ordering::SeqCst);
        assert!(max <= 1, "remote-{i}: {max} connections at once");
    }
}

/// When each relay's holder last connected (whole seconds, as the API server stores them).
async fn last_connected(api: &Api<RelaySync>) -> Option<BTreeMap<String, Timestamp>> {
    let list = api.list(&ListParams::default()).await.ok()?;
    list.items
        .into_iter()
        .map(|o| Some((o.spec.url.clone(), o.status?.last_connected?.0)))
        .collect()
}
