//! The RelaySync CRD against a real kube-apiserver: installation, server-side apply by the
//! two field managers, schema validation, printer columns through real kubectl, and the
//! worker's RBAC.

mod support;

use std::time::Duration;

use grasp_sync::coordination::membership;
use grasp_sync::crd::{
    CONTROLLER_MANAGER, ConditionStatus, Phase, RelayCapabilities, RelaySync, RelaySyncSpec,
    RelaySyncStatus, WORKER_MANAGER, conditions,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::{KubeEnv, eventually};

const PK1: &str = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";
const PK2: &str = "b0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b2";
const WORKER_USER: &str = "grasp-sync-test-worker";
const CONTROLLER_USER: &str = "grasp-sync-test-controller";

async fn setup(prefix: &str) -> (KubeEnv, Client, String) {
    let env = KubeEnv::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = env.client().await.unwrap();
    support::kube_env::install_crd(&client).await;
    let ns = env.namespace(prefix).await.unwrap();
    (env, client, ns)
}

fn coord(pk: &str, id: &str) -> String {
    format!("30617:{pk}:{id}")
}

fn spec(url: &str, repos: Vec<String>) -> RelaySyncSpec {
    RelaySyncSpec {
        url: url.to_string(),
        repos,
        ..Default::default()
    }
}

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

fn live_status(generation: i64, repos: u32) -> RelaySyncStatus {
    let now = Time(Timestamp::now());
    let mut status = RelaySyncStatus {
        worker: Some("worker-0".into()),
        observed_generation: Some(generation),
        phase: Some(Phase::Live),
        last_connected: Some(now.clone()),
        repos: Some(repos),
        confirmed_generation: Some(generation),
        confirmed_repos: Some(repos),
        cursor: Some(1_764_000_000),
        capabilities: Some(RelayCapabilities {
            negentropy: true,
            supported_nips: vec![1, 11, 77],
            max_limit: Some(500),
            ..Default::default()
        }),
        subscriptions: Some(2),
        ..Default::default()
    };
    conditions::set_condition(
        &mut status.conditions,
        conditions::condition(
            conditions::READY,
            ConditionStatus::True,
            "Live",
            "",
            now,
            Some(generation),
        ),
    );
    status
}

/// Server-side apply the controller's view of spec.
async fn apply_spec(api: &Api<RelaySync>, name: &str, spec: RelaySyncSpec) -> RelaySync {
    api.patch(
        name,
        &PatchParams::apply(CONTROLLER_MANAGER),
        &Patch::Apply(&RelaySync::new(name, spec)),
    )
    .await
    .expect("controller applies spec")
}

/// Server-side apply a worker's status.
async fn apply_status(
    api: &Api<RelaySync>,
    name: &str,
    status: &RelaySyncStatus,
) -> kube::Result<RelaySync> {
    let patch = json!({
        "apiVersion": "grasp-sync.dev/v1alpha1",
        "kind": "RelaySync",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(WORKER_MANAGER),
        &Patch::Apply(&patch),
    )
    .await
}

/// The top-level fields (`f:spec`, `f:status`, …) a manager owns.
fn owned_by(obj: &RelaySync, manager: &str) -> Vec<String> {
    let mut out = Vec::new();
    for mf in obj.managed_fields() {
        if mf.manager.as_deref() != Some(manager) {
            continue;
        }
        if let Some(map) = mf.fields_v1.as_ref().and_then(|f| f.0.as_object()) {
            out.extend(map.keys().cloned());
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_spec_and_worker_status_do_not_clobber_each_other() {
    let (_env, client, ns) = setup("ssa").await;
    let api = Api::<RelaySync>::namespaced(client, &ns);
    let name = "relay-relay-example-0123456789ab";

    let created = apply_spec(
        &api,
        name,
        spec(
            "wss://relay.example",
            vec![coord(PK1, "alpha"), coord(PK2, "beta")],
        ),
    )
    .await;
    let generation = created.metadata.generation.unwrap();
    assert!(created.status.is_none());

    // The worker reports status; spec is untouched.
    let status = live_status(generation, 2);
    let after_status = apply_status(&api, name, &status)
        .await
        .expect("worker applies status");
    assert_eq!(after_status.spec, created.spec);
    assert_eq!(
        after_status.status.as_ref().unwrap().phase,
        Some(Phase::Live)
    );
    assert_eq!(
        after_status.metadata.generation,
        Some(generation),
        "status must not bump generation"
    );

    // An operator pauses the relay with their own field manager.
    api.patch(
        name,
        &PatchParams::apply("operator"),
        &Patch::Apply(json!({
            "apiVersion": "grasp-sync.dev/v1alpha1", "kind": "RelaySync",
            "spec": {"url": "wss://relay.example", "paused": true}
        })),
    )
    .await
    .expect("operator applies paused");

    // The controller re-applies spec with a repo fewer: status survives, and so does the
    // operator's `paused`, because the controller never sets it.
    let after_spec = apply_spec(
        &api,
        name,
        spec("wss://relay.example", vec![coord(PK1, "alpha")]),
    )
    .await;
    assert_eq!(after_spec.spec.repos, vec![coord(PK1, "alpha")]);
    assert_eq!(after_spec.spec.paused, Some(true));
    assert!(after_spec.metadata.generation.unwrap() > generation);
    let kept = after_spec
        .status
        .as_ref()
        .expect("status survives a spec apply");
    assert_eq!(kept.phase, Some(Phase::Live));
    assert_eq!(kept.cursor, status.cursor);
    assert_eq!(kept.conditions.len(), 1);
    assert_eq!(kept.capabilities, status.capabilities);

    // A later status apply changes only what it sets.
    let mut next = status.clone();
    next.phase = Some(Phase::Backoff);
    next.consecutive_failures = Some(1);
    next.next_retry_at = Some(at(1_764_000_100));
    let after_next = apply_status(&api, name, &next).await.unwrap();
    assert_eq!(after_next.spec, after_spec.spec);
    assert_eq!(
        after_next.status.as_ref().unwrap().phase,
        Some(Phase::Backoff)
    );

    // Each manager owns exactly its half.
    let fetched = api.get(name).await.unwrap();
    let controller_fields = owned_by(&fetched, CONTROLLER_MANAGER);
    let worker_fields = owned_by(&fetched, WORKER_MANAGER);
    assert!(
        controller_fields.contains(&"f:spec".to_string()),
        "{controller_fields:?}"
    );
    assert!(
        !controller_fields.contains(&"f:status".to_string()),
        "{controller_fields:?}"
    );
    assert_eq!(worker_fields, vec!["f:status".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_rejects_invalid_objects_with_clear_messages() {
    let (_env, client, ns) = setup("invalid").await;
    let api = Api::<RelaySync>::namespaced(client, &ns);

    let long_id = "x".repeat(300);
    let cases: Vec<(&str, RelaySyncSpec, &str)> = vec![
        (
            "https-url",
            spec("https://relay.example", vec![]),
            "spec.url",
        ),
        ("http-url", spec("http://relay.example", vec![]), "spec.url"),
        (
            "userinfo-url",
            spec("wss://user:pw@relay.example", vec![]),
            "spec.url",
        ),
        (
            "query-url",
            spec("wss://relay.example/?t=1", vec![]),
            "spec.url",
        ),
        ("space-url", spec("wss://relay example", vec![]), "spec.url"),
        (
            "upper-pubkey",
            spec("wss://r.example", vec![coord(&PK1.to_uppercase(), "a")]),
            "spec.repos",
        ),
        (
            "short-pubkey",
            spec("wss://r.example", vec![coord(&PK1[2..], "a")]),
            "spec.repos",
        ),
        (
            "wrong-kind",
            spec("wss://r.example", vec![format!("30618:{PK1}:a")]),
            "spec.repos",
        ),
        (
            "empty-id",
            spec("wss://r.example", vec![coord(PK1, "")]),
            "spec.repos",
        ),
        (
            "newline-id",
            spec("wss://r.example", vec![coord(PK1, "a\nb")]),
            "spec.repos",
        ),
        (
            "long-id",
            spec("wss://r.example", vec![coord(PK1, &long_id)]),
            "spec.repos",
        ),
    ];
    for (name, bad, field) in cases {
        let err = api
            .create(&PostParams::default(), &RelaySync::new(name, bad.clone()))
            .await
            .expect_err(&format!("{name}: {bad:?} was accepted"));
        let kube::Error::Api(status) = err else {
            panic!("{name}: not an API error: {err:?}")
        };
        assert_eq!(status.code, 422, "{name}: {status:?}");
        assert!(
            status.message.contains(field)
                && (status.message.contains("should match")
                    || status.message.contains("should be at most")
                    || status.message.contains("should be at least")),
            "{name}: message does not name {field} and the rule: {}",
            status.message
        );
    }

    // A valid object is accepted, and an invalid status value is refused.
    let ok = "relay-r-example-0123456789ab";
    api.create(
        &PostParams::default(),
        &RelaySync::new(ok, spec("wss://r.example", vec![coord(PK1, "a")])),
    )
    .await
    .expect("valid object accepted");
    let err = api
        .patch_status(
            ok,
            &PatchParams::apply(WORKER_MANAGER),
            &Patch::Apply(json!({
                "apiVersion": "grasp-sync.dev/v1alpha1", "kind": "RelaySync",
                "status": {"phase": "Exploded"}
            })),
        )
        .await
        .expect_err("unknown phase accepted");
    let kube::Error::Api(status) = err else {
        panic!("{err:?}")
    };
    assert!(
        status.message.contains("status.phase"),
        "{}",
        status.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_shows_the_printer_columns() {
    let (env, client, ns) = setup("kubectl").await;
    let api = Api::<RelaySync>::namespaced(client, &ns);
    let name = "relay-nos-lol-0123456789ab";
    let created = apply_spec(
        &api,
        name,
        spec(
            "wss://nos.lol",
            vec![coord(PK1, "a"), coord(PK1, "b"), coord(PK2, "c")],
        ),
    )
    .await;
    let mut status = live_status(created.metadata.generation.unwrap(), 3);
    status.confirmed_repos = Some(2);
    status.phase = Some(Phase::Syncing);
    apply_status(&api, name, &status).await.unwrap();

    for resource in ["relaysyncs", "rsync", "grasp-sync"] {
        let out = env
            .kubectl()
            .args(["get", resource, "-n", &ns])
            .output()
            .expect("run kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "kubectl get {resource}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = stdout.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
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
            "kubectl get {resource}:\n{stdout}"
        );
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            row[..6],
            [name, "wss://nos.lol", "worker-0", "Syncing", "3", "2"],
            "kubectl get {resource}:\n{stdout}"
        );
        // LAST-CONNECTED and AGE are rendered as ages such as "3s".
        for age in &row[6..8] {
            assert!(
                age.ends_with(['s', 'm', 'h', 'd'])
                    && age.starts_with(|c: char| c.is_ascii_digit()),
                "not an age: {age:?} in\n{stdout}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_role_may_write_status_but_not_spec_or_delete() {
    let (env, client, ns) = setup("rbac").await;
    let admin_api = Api::<RelaySync>::namespaced(client.clone(), &ns);
    let name = "relay-relay-example-0123456789ab";
    let created = apply_spec(
        &admin_api,
        name,
        spec("wss://relay.example", vec![coord(PK1, "a")]),
    )
    .await;

    let role: Role = serde_yaml::from_str(include_str!("../deploy/rbac/worker-role.yaml")).unwrap();
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "grasp-sync-worker"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.name_any()},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": WORKER_USER}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let worker = Api::<RelaySync>::namespaced(env.client_as(WORKER_USER).await.unwrap(), &ns);
    let nobody =
        Api::<RelaySync>::namespaced(env.client_as("grasp-sync-test-nobody").await.unwrap(), &ns);

    // RBAC is really enforced: an unbound user cannot even read.
    assert_forbidden(nobody.get(name).await, "unbound user reads");

    // The binding reaches the authorizer's cache shortly after it is created.
    eventually(
        "the worker binding to take effect",
        Duration::from_secs(20),
        || async { worker.get(name).await.ok() },
    )
    .await;
    worker
        .list(&Default::default())
        .await
        .expect("worker lists");

    let status = live_status(created.metadata.generation.unwrap(), 1);
    let updated = apply_status(&worker, name, &status)
        .await
        .expect("worker writes status");
    assert_eq!(updated.status.unwrap().phase, Some(Phase::Live));

    // Spec, labels and deletion are the controller's.
    let spec_change = worker
        .patch(
            name,
            &PatchParams::apply(WORKER_MANAGER),
            &Patch::Apply(RelaySync::new(
                name,
                spec("wss://relay.example", vec![coord(PK2, "x")]),
            )),
        )
        .await;
    assert_forbidden(spec_change, "worker changes spec");
    let label_change = worker
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"grasp-sync.dev/worker": "worker-0"}}})),
        )
        .await;
    assert_forbidden(label_change, "worker labels the object");
    assert_forbidden(
        worker
            .delete(name, &DeleteParams::default())
            .await
            .map(|_| ()),
        "worker deletes",
    );

    let unchanged = admin_api.get(name).await.unwrap();
    assert_eq!(unchanged.spec.repos, vec![coord(PK1, "a")]);
    assert!(unchanged.labels().is_empty());

    // Leases: the worker holds its own (create, renew, release) and cannot touch another's.
    let lease_role: Role = serde_yaml::from_str(
        &include_str!("../deploy/rbac/worker-lease-role.yaml").replace("WORKER", "w0"),
    )
    .unwrap();
    bind(&client, &ns, &lease_role, WORKER_USER).await;
    let other: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": membership::lease_name("w1")},
        "spec": {"holderIdentity": "w1", "leaseDurationSeconds": 15}
    }))
    .unwrap();
    Api::<Lease>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &other)
        .await
        .unwrap();
    let worker_client = env.client_as(WORKER_USER).await.unwrap();
    let config = membership::LeaseConfig {
        duration: Duration::from_secs(10),
        renew_every: Duration::from_millis(500),
        owner: None,
    };
    let held = eventually(
        "the worker's own Lease to be taken",
        Duration::from_secs(20),
        || async {
            membership::hold(worker_client.clone(), &ns, "w0", config.clone())
                .await
                .ok()
        },
    )
    .await;
    assert!(*held.held().borrow());
    let worker_leases = Api::<Lease>::namespaced(worker_client.clone(), &ns);
    let takeover = worker_leases
        .patch(
            &membership::lease_name("w1"),
            &PatchParams::apply(WORKER_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "spec": {"holderIdentity": "w0"}
            })),
        )
        .await;
    assert_forbidden(takeover, "worker takes over another worker's Lease");
    assert_forbidden(
        worker_leases
            .delete(&membership::lease_name("w1"), &DeleteParams::default())
            .await
            .map(|_| ()),
        "worker deletes another worker's Lease",
    );
    // Its Role lets the worker mark its own Lease released on a graceful stop.
    held.release().await;
    let released = Api::<Lease>::namespaced(client.clone(), &ns)
        .get(&membership::lease_name("w0"))
        .await
        .unwrap();
    assert!(
        membership::is_released(&released),
        "the released Lease is marked"
    );

    // The controller manages objects and labels but never writes status.
    let controller_role: Role =
        serde_yaml::from_str(include_str!("../deploy/rbac/controller-role.yaml")).unwrap();
    bind(&client, &ns, &controller_role, CONTROLLER_USER).await;
    let controller =
        Api::<RelaySync>::namespaced(env.client_as(CONTROLLER_USER).await.unwrap(), &ns);
    eventually(
        "the controller binding to take effect",
        Duration::from_secs(20),
        || async { controller.get(name).await.ok() },
    )
    .await;
    controller
        .patch(
            name,
            &PatchParams::apply("grasp-sync-assigner").force(),
            &Patch::Apply(json!({
                "apiVersion": "grasp-sync.dev/v1alpha1", "kind": "RelaySync",
                "metadata": {"name": name, "labels": {"grasp-sync.dev/worker": "w0"}}
            })),
        )
        .await
        .expect("controller labels the object");
    assert_forbidden(
        apply_status(&controller, name, &live_status(1, 1))
            .await
            .map(|_| ()),
        "controller writes status",
    );
}

async fn bind(client: &kube::Client, ns: &str, role: &Role, user: &str) {
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": role.name_any()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role.name_any()},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

fn assert_forbidden<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}
