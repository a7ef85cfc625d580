//! The Helm chart, rendered by the real `helm`: lint, the objects the defaults and a matrix of
//! values produce, the schema refusing bad values, and the chart's copies of the CRD, rules
//! and dashboard staying identical to `deploy/`.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;
use support::kube_env::locate;

const REQUIRED: &[&str] = &[
    "--set",
    "localRelay=ws://ngit-relay.grasp.svc:7777",
    "--set",
    "serviceDomain=git.example.com",
];

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/grasp-sync")
}

fn helm() -> Command {
    Command::new(locate("GRASP_SYNC_HELM", "helm", Some("/usr/bin/helm")))
}

/// `helm template` → the rendered objects, or helm's error text.
fn render(args: &[&str]) -> Result<Vec<Value>, String> {
    let out = helm()
        .args(["template", "gs", "--namespace", "grasp"])
        .arg(chart())
        .args(args)
        .output()
        .expect("run helm (scripts/test-env.sh installs it)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).expect("utf-8");
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect())
}

use serde::Deserialize;

fn with_required(extra: &[&str]) -> Vec<Value> {
    let mut args: Vec<&str> = REQUIRED.to_vec();
    args.extend_from_slice(extra);
    render(&args).unwrap_or_else(|e| panic!("helm template {extra:?} failed: {e}"))
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {:?}", kinds(objects)))
}

fn env_of(workload: &Value) -> Vec<(String, String)> {
    workload["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("<from field>").to_string(),
            )
        })
        .collect()
}

fn env_value(workload: &Value, name: &str) -> Option<String> {
    env_of(workload)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

fn rules_of(path: &str) -> Value {
    let role: Value = serde_yaml::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap(),
    )
    .unwrap();
    role["rules"].clone()
}

#[test]
fn chart_lints() {
    let out = helm()
        .args(["lint", "--strict"])
        .arg(chart())
        .args(REQUIRED)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn defaults_render_a_hardened_least_privilege_deployment() {
    let objects = with_required(&[]);
    let want: BTreeSet<String> = [
        "ServiceAccount/gs-grasp-sync-controller",
        "ServiceAccount/gs-grasp-sync-worker",
        "Role/gs-grasp-sync-controller",
        "Role/gs-grasp-sync-worker",
        "Role/gs-grasp-sync-worker-lease",
        "RoleBinding/gs-grasp-sync-controller",
        "RoleBinding/gs-grasp-sync-worker",
        "RoleBinding/gs-grasp-sync-worker-lease",
        "Deployment/gs-grasp-sync-controller",
        "StatefulSet/gs-grasp-sync-worker",
        "Service/gs-grasp-sync-controller",
        "Service/gs-grasp-sync-worker",
        "PodDisruptionBudget/gs-grasp-sync-controller",
        "PodDisruptionBudget/gs-grasp-sync-worker",
        "ConfigMap/gs-grasp-sync-dashboard",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds(&objects), want);

    let controller = find(&objects, "Deployment", "gs-grasp-sync-controller");
    let worker = find(&objects, "StatefulSet", "gs-grasp-sync-worker");
    assert_eq!(controller["spec"]["replicas"], 2);
    assert_eq!(worker["spec"]["replicas"], 3);
    for w in [controller, worker] {
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(
            env_value(w, "GRASP_SYNC_LOCAL_RELAY").as_deref(),
            Some("ws://ngit-relay.grasp.svc:7777")
        );
        assert_eq!(env_value(w, "POD_NAME").as_deref(), Some("<from field>"));
        // Empty lists are left out rather than passed as an empty (invalid) value.
        assert_eq!(env_value(w, "GRASP_SYNC_ALLOW"), None);
        assert_eq!(env_value(w, "GRASP_SYNC_DENY_NETS"), None);
    }
    assert_eq!(
        controller["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "controller"
    );
    assert_eq!(
        worker["spec"]["template"]["spec"]["containers"][0]["args"][0],
        "worker"
    );
    assert_eq!(
        env_value(controller, "GRASP_SYNC_SERVICE_DOMAIN").as_deref(),
        Some("git.example.com")
    );
    assert_eq!(env_value(controller, "GRASP_SYNC_BOOTSTRAP"), None);
    assert_eq!(env_value(worker, "GRASP_SYNC_AUTH_KEY_FILE"), None);

    // RBAC: exactly the rules of deploy/rbac; the worker renews only its pods' Lease names.
    assert_eq!(
        find(&objects, "Role", "gs-grasp-sync-controller")["rules"],
        rules_of("deploy/rbac/controller-role.yaml")
    );
    assert_eq!(
        find(&objects, "Role", "gs-grasp-sync-worker")["rules"],
        rules_of("deploy/rbac/worker-role.yaml")
    );
    let lease = &find(&objects, "Role", "gs-grasp-sync-worker-lease")["rules"][0];
    let per_identity = &rules_of("deploy/rbac/worker-lease-role.yaml")[0];
    assert_eq!(lease["verbs"], per_identity["verbs"]);
    assert_eq!(lease["resources"], per_identity["resources"]);
    let names: Vec<&str> = lease["resourceNames"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Every pod `kubectl scale` may run (worker.maxReplicas), not only the replicas.
    let want: Vec<String> = (0..10)
        .map(|i| format!("grasp-sync-worker-gs-grasp-sync-worker-{i}"))
        .collect();
    assert_eq!(names, want);
    for binding in ["gs-grasp-sync-worker", "gs-grasp-sync-worker-lease"] {
        let b = find(&objects, "RoleBinding", binding);
        assert_eq!(b["subjects"][0]["name"], "gs-grasp-sync-worker");
        assert_eq!(b["subjects"][0]["namespace"], "grasp");
    }

    // The dashboard ConfigMap carries the sidecar label and exactly deploy/grafana's JSON.
    let cm = find(&objects, "ConfigMap", "gs-grasp-sync-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: serde_json::Value =
        serde_json::from_str(cm["data"]["grasp-sync.json"].as_str().unwrap()).unwrap();
    let source: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/grasp-sync.json")).unwrap();
    assert_eq!(shipped, source);
}

#[test]
fn optional_parts_follow_the_values() {
    let objects = with_required(&[
        "--set",
        "worker.autoscaling.enabled=true",
        "--set",
        "worker.autoscaling.maxReplicas=5",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=kps",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.apiServerCIDRs={10.0.0.1/32}",
        "--set",
        "auth.existingSecret=relay-key",
        "--set",
        "bootstrapRelays={wss://relay.example,wss://other.example}",
        "--set",
        "allow={10.1.0.0/16,relay.internal}",
        "--set",
        "denyNets={10.96.0.0/12}",
        "--set",
        "grafana.dashboard.enabled=false",
        "--set",
        "controller.podDisruptionBudget.enabled=false",
        "--set",
        "log.format=text",
    ]);
    let k = kinds(&objects);
    for present in [
        "HorizontalPodAutoscaler/gs-grasp-sync-worker",
        "ServiceMonitor/gs-grasp-sync",
        "PodMonitor/gs-grasp-sync",
        "PrometheusRule/gs-grasp-sync",
        "NetworkPolicy/gs-grasp-sync",
    ] {
        assert!(k.contains(present), "{present} missing: {k:?}");
    }
    for absent in [
        "ConfigMap/gs-grasp-sync-dashboard",
        "PodDisruptionBudget/gs-grasp-sync-controller",
    ] {
        assert!(!k.contains(absent), "{absent} rendered");
    }
    let worker = find(&objects, "StatefulSet", "gs-grasp-sync-worker");
    assert!(
        worker["spec"]["replicas"].is_null(),
        "the HPA owns replicas"
    );
    let hpa = find(&objects, "HorizontalPodAutoscaler", "gs-grasp-sync-worker");
    assert_eq!(hpa["spec"]["maxReplicas"], 5);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
    let lease = &find(&objects, "Role", "gs-grasp-sync-worker-lease")["rules"][0];
    assert_eq!(
        lease["resourceNames"].as_sequence().unwrap().len(),
        5,
        "every pod the HPA may create"
    );
    assert_eq!(
        env_value(worker, "GRASP_SYNC_AUTH_KEY_FILE").as_deref(),
        Some("/etc/grasp-sync/auth/nsec")
    );
    assert_eq!(
        worker["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "relay-key"
    );
    let controller = find(&objects, "Deployment", "gs-grasp-sync-controller");
    assert_eq!(
        env_value(controller, "GRASP_SYNC_BOOTSTRAP").as_deref(),
        Some("wss://relay.example,wss://other.example")
    );
    assert_eq!(
        env_value(worker, "GRASP_SYNC_ALLOW").as_deref(),
        Some("10.1.0.0/16,relay.internal")
    );
    assert_eq!(
        env_value(worker, "GRASP_SYNC_DENY_NETS").as_deref(),
        Some("10.96.0.0/12")
    );
    assert_eq!(
        env_value(worker, "GRASP_SYNC_LOG_FORMAT").as_deref(),
        Some("text")
    );

    // The PrometheusRule carries exactly the rule file's groups.
    let rule = find(&objects, "PrometheusRule", "gs-grasp-sync");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let file: Value =
        serde_yaml::from_str(include_str!("../deploy/prometheus/grasp-sync-rules.yaml")).unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let np = find(&objects, "NetworkPolicy", "gs-grasp-sync");
    assert_eq!(
        np["spec"]["egress"][1]["to"][0]["ipBlock"]["cidr"],
        "10.0.0.1/32"
    );
}

#[test]
fn the_schema_and_required_values_refuse_bad_input() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "serviceDomain=git.example.com"],
            "localRelay is required",
        ),
        (
            &["--set", "localRelay=ws://r:1"],
            "serviceDomain is required",
        ),
        (
            &[
                "--set",
                "localRelay=https://relay.example",
                "--set",
                "serviceDomain=x.example",
            ],
            "localRelay",
        ),
        (
            &[
                REQUIRED[0],
                REQUIRED[1],
                REQUIRED[2],
                REQUIRED[3],
                "--set",
                "worker.replicas=0",
            ],
            "replicas",
        ),
        (
            &[
                REQUIRED[0],
                REQUIRED[1],
                REQUIRED[2],
                REQUIRED[3],
                "--set",
                "log.format=xml",
            ],
            "format",
        ),
        (
            &[
                REQUIRED[0],
                REQUIRED[1],
                REQUIRED[2],
                REQUIRED[3],
                "--set",
                "metrics.port=70000",
            ],
            "port",
        ),
        (
            &[
                REQUIRED[0],
                REQUIRED[1],
                REQUIRED[2],
                REQUIRED[3],
                "--set",
                "grace=soon",
            ],
            "grace",
        ),
        (
            &[
                REQUIRED[0],
                REQUIRED[1],
                REQUIRED[2],
                REQUIRED[3],
                "--set",
                "bootstrapRelays={http://relay.example}",
            ],
            "bootstrapRelays",
        ),
        (
            &[
                REQUIRED[0],
                REQUIRED[1],
                REQUIRED[2],
                REQUIRED[3],
                "--set",
                "replicas=3",
            ],
            "replicas",
        ),
    ];
    for (args, mention) in cases {
        match render(args) {
            Ok(_) => panic!("{args:?} rendered"),
            Err(e) => assert!(
                e.contains(mention),
                "{args:?}: error does not mention {mention}: {e}"
            ),
        }
    }
}

#[test]
fn chart_copies_equal_their_sources() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (copy, source) in [
        (
            "deploy/helm/grasp-sync/crds/relaysync.yaml",
            "deploy/crds/relaysync.yaml",
        ),
        (
            "deploy/helm/grasp-sync/files/grasp-sync-rules.yaml",
            "deploy/prometheus/grasp-sync-rules.yaml",
        ),
        (
            "deploy/helm/grasp-sync/dashboards/grasp-sync.json",
            "deploy/grafana/grasp-sync.json",
        ),
    ] {
        let a = std::fs::read(root.join(copy)).unwrap();
        let b = std::fs::read(root.join(source)).unwrap();
        assert!(a == b, "{copy} differs from {source}: copy it again");
    }
}

#[test]
fn dashboard_uses_a_templated_datasource_and_no_fixed_uids() {
    let d: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/grafana/grasp-sync.json")).unwrap();
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "datasource")
    );
    let mut panels = 0;
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    assert!(panels >= 15, "{panels} panels");
    assert!(d.get("uid").is_none(), "no fixed dashboard uid");
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let rules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/grasp-sync-rules.yaml");
    let out = Command::new(locate(
        "GRASP_SYNC_PROMTOOL",
        "promtool",
        Some("/usr/bin/promtool"),
    ))
    .args(["check", "rules"])
    .arg(&rules)
    .output()
    .expect("run promtool (scripts/test-env.sh provides it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&rules).expect("rules")).expect("YAML");
    let alerts = file["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .map(|g| g["rules"].as_sequence().map_or(0, |r| r.len()))
        .sum::<usize>();
    assert!(alerts >= 7, "{alerts} rules");
    assert!(
        text.contains(&format!("SUCCESS: {alerts} rules found")),
        "every rule checked: {text}"
    );
}

/// clap ignores environment variables it does not know, so a chart that sets a misspelt or
/// removed one would deploy silently with the default. Every variable the chart gives a
/// container must be one its subcommand reads (`--help` lists them as `[env: NAME=`).
#[test]
fn every_variable_the_chart_sets_is_one_the_binary_reads() {
    let objects = with_required(&[
        "--set",
        "auth.existingSecret=relay-key",
        "--set",
        "auth.remoteSecretKey=remote",
        "--set",
        "bootstrapRelays={wss://relay.example}",
        "--set",
        "allow={10.1.0.0/16}",
        "--set",
        "denyNets={10.96.0.0/12}",
    ]);
    for (kind, name) in [
        ("Deployment", "gs-grasp-sync-controller"),
        ("StatefulSet", "gs-grasp-sync-worker"),
    ] {
        let workload = find(&objects, kind, name);
        let container = &workload["spec"]["template"]["spec"]["containers"][0];
        let subcommand = container["args"][0].as_str().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_grasp-sync"))
            .args([subcommand, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        let env = env_of(workload);
        // The endpoint listens on the pod's IP; Kubernetes expands only variables defined
        // earlier in the list.
        let at = |name: &str| env.iter().position(|(n, _)| n == name);
        assert_eq!(
            env_value(workload, "GRASP_SYNC_METRICS_ADDR").as_deref(),
            Some("$(POD_IP):9090")
        );
        assert!(at("POD_IP") < at("GRASP_SYNC_METRICS_ADDR") && at("POD_IP").is_some());
        for (var, _) in &env {
            // Set only for Kubernetes to expand in another variable, e.g. `$(POD_IP):9090`.
            let reference = format!("$({var})");
            if env.iter().any(|(_, value)| value.contains(&reference)) {
                continue;
            }
            assert!(
                help.contains(&format!("[env: {var}=")),
                "{name} sets {var}, which `grasp-sync {subcommand}` does not read"
            );
        }
    }
}
