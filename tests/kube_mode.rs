//! Kubernetes mode end to end: real `grasp-sync controller` and `worker` processes against a
//! real kube-apiserver, remote relays on loopback that count their connections.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use grasp_sync::controller::assignment::ring::{DEFAULT_VNODES, Ring};
use grasp_sync::coordination::membership::{is_released, lease_name};
use grasp_sync::crd::is_released_by;
use grasp_sync::crd::{DRAIN_LABEL, Phase, RelaySync, WORKER_LABEL};
use grasp_sync::testing::scripted_relay::{Script, ScriptedRelay};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use nostr::{Event, EventBuilder, EventId, Keys, Kind, Tag, TagKind, Timestamp};
use serde_json::json;
use support::cluster::{Cluster, SERVICE_DOMAIN};
use support::{eventually, nip34, relays};

const SETTLE: Duration = Duration::from_secs(90);

/// One repo per remote: its announcement (published to our relay) lists the remote; the
/// remote holds the repo's events. Returns every event the local relay must end up with.
async fn repos_on(cluster: &Cluster, remotes: &[ScriptedRelay]) -> BTreeSet<EventId> {
    let mut want = BTreeSet::new();
    for (i, r) in remotes.iter().enumerate() {
        let f = nip34::fixture(&format!("repo-{i}"));
        let ann = nip34::announcement(
            &f,
            &[r.url().to_string(), format!("wss://{SERVICE_DOMAIN}")],
        );
        relays::publish(&cluster.local, std::slice::from_ref(&ann)).await;
        r.add(f.expected.iter().cloned().chain(f.noise.iter().cloned()));
        want.insert(ann.id);
        want.extend(nip34::ids(&f.expected));
    }
    want
}

async fn remotes(n: usize) -> Vec<ScriptedRelay> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            ScriptedRelay::start(Script::default())
                .await
                .expect("relay"),
        );
    }
    out
}

/// `n` remotes of which at least one goes to `newcomer` once it joins `workers` on the
/// ring, so a scale-out to it must move relays. Remote ports are random: left to chance, the
/// newcomer gets none of twelve relays in about 3% of runs.
async fn remotes_with_one_for(n: usize, workers: &[&str], newcomer: &str) -> Vec<ScriptedRelay> {
    let ring = Ring::new(workers.iter().copied().chain([newcomer]), DEFAULT_VNODES);
    let owner = |r: &ScriptedRelay| ring.owner(r.url().as_str()) == Some(newcomer);
    let mut out = remotes(n - 1).await;
    if out.iter().any(owner) {
        out.extend(remotes(1).await);
        return out;
    }
    for _ in 0..200 {
        let r = remotes(1).await.pop().expect("one remote");
        if owner(&r) {
            out.push(r);
            return out;
        }
    }
    panic!("no loopback port in 200 maps to {newcomer}");
}

fn by_url(objects: &[RelaySync]) -> BTreeMap<String, String> {
    objects
        .iter()
        .map(|o| (o.spec.url.clone(), o.name_any()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_relays_fail_over_scale_out_through_drains_and_survive_a_leader_loss() {
    let cluster = Cluster::start("shard").await;
    let remotes = remotes_with_one_for(12, &["w0", "w1", "w2"], "w3").await;
    let want = repos_on(&cluster, &remotes).await;

    let mut controllers = BTreeMap::new();
    for id in ["c0", "c1"] {
        controllers.insert(id.to_string(), cluster.controller(id, &[]));
    }
    let mut workers = BTreeMap::new();
    for w in ["w0", "w1", "w2"] {
        workers.insert(w, cluster.worker(w, &[]));
    }

    // Every relay is held by its ring owner among three workers, Live, status complete.
    let owners = cluster.wait_settled(12, &["w0", "w1", "w2"], SETTLE).await;
    let distinct: BTreeSet<&String> = owners.values().collect();
    assert!(
        distinct.len() >= 2,
        "relays spread over workers: {owners:?}"
    );
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    for r in &remotes {
        assert_eq!(r.counters().live_connections.load(Ordering::SeqCst), 1);
    }

    // Scale 3 → 4: the ring gives the fourth worker some relays (see remotes_with_one_for),
    // so moves happen.
    let objects = cluster.objects().await;
    let urls = by_url(&objects);
    let fourth = "w3";
    let ring = Ring::new(["w0", "w1", "w2", fourth], DEFAULT_VNODES);
    let moved: BTreeSet<String> = urls
        .iter()
        .filter(|(u, _)| ring.owner(u) == Some(fourth))
        .map(|(_, n)| n.clone())
        .collect();
    assert!(
        !moved.is_empty(),
        "the ring gives {fourth} relays: {urls:?}"
    );
    for r in &remotes {
        r.counters().reset_max();
    }
    // Start-up itself may have moved relays (workers join one by one): only Released
    // events from now on belong to the scale-out.
    let events = Api::<K8sEvent>::namespaced(cluster.admin.clone(), &cluster.ns);
    let earlier: BTreeSet<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .iter()
        .filter_map(|e| e.metadata.uid.clone())
        .collect();
    workers.insert(fourth, cluster.worker(fourth, &[]));
    let four = ["w0", "w1", "w2", fourth];
    let after = cluster.wait_settled(12, &four, SETTLE).await;
    let changed: BTreeSet<String> = after
        .iter()
        .filter(|(n, w)| owners.get(*n) != Some(w))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        changed, moved,
        "exactly the relays the ring gives the new worker move"
    );
    for (i, r) in remotes.iter().enumerate() {
        let max = r.counters().max_live_connections.load(Ordering::SeqCst);
        assert!(
            max <= 1,
            "remote {i} had {max} connections at once during the drain"
        );
    }
    // The old holders acknowledged each move with a Released event; every relay got Live.
    let released = eventually("Released events for moved relays", SETTLE, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let released: BTreeSet<String> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("Released"))
            .filter(|e| {
                e.metadata
                    .uid
                    .as_ref()
                    .is_some_and(|u| !earlier.contains(u))
            })
            .filter_map(|e| e.regarding.as_ref()?.name.clone())
            .collect();
        let live: BTreeSet<String> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("Live"))
            .filter_map(|e| e.regarding.as_ref()?.name.clone())
            .collect();
        (moved.is_subset(&released) && live.len() == 12).then_some(released)
    })
    .await;
    assert!(
        released.is_subset(&moved),
        "only moved relays were released: {released:?}"
    );

    // SIGKILL a worker holding relays: they are reassigned and Live elsewhere.
    let victim = *four
        .iter()
        .find(|w| after.values().any(|o| o == *w) && **w != fourth)
        .expect("a worker with relays");
    workers.remove(victim).expect("running").kill();
    let survivors: Vec<&str> = four.iter().copied().filter(|w| *w != victim).collect();
    cluster.wait_settled(12, &survivors, SETTLE).await;

    // Kill the leading controller: the standby takes the lead and assignment goes on.
    let leader = eventually("a leader", SETTLE, || cluster.leader()).await;
    controllers.remove(&leader).expect("leader is ours").kill();
    let standby = controllers.keys().next().expect("standby").clone();
    eventually("the standby to lead", SETTLE, || async {
        (cluster.leader().await.as_deref() == Some(standby.as_str())).then_some(())
    })
    .await;
    let second = survivors[0];
    workers.remove(second).expect("running").kill();
    let rest: Vec<&str> = survivors.iter().copied().filter(|w| *w != second).collect();
    cluster.wait_settled(12, &rest, SETTLE).await;

    // A graceful stop releases the Lease at once: exit 0, Lease marked released, relays
    // moved on (no StatefulSet says this worker comes back).
    let leaving = rest[0];
    let status = workers
        .remove(leaving)
        .expect("running")
        .terminate(Duration::from_secs(40))
        .await;
    assert!(status.success(), "{leaving} exited with {status}");
    let leases = Api::<Lease>::namespaced(cluster.admin.clone(), &cluster.ns);
    let lease = leases.get(&lease_name(leaving)).await.unwrap();
    assert!(is_released(&lease), "a stopped worker's Lease is released");
    let last: Vec<&str> = rest.iter().copied().filter(|w| *w != leaving).collect();
    cluster.wait_settled(12, &last, SETTLE).await;
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    for mut p in controllers.into_values().chain(workers.into_values()) {
        assert!(p.running(), "{} crashed:\n{}", p.name, p.log_tail(30));
    }
}

/// Comments on `coord` (Layer 2 `#A`), created at `at`.
fn comments(coord: &str, n: usize, at: u64) -> Vec<Event> {
    let k = Keys::generate();
    (0..n)
        .map(|i| {
            EventBuilder::new(Kind::from(1111), format!("comment {i} at {at}"))
                .tag(Tag::custom(TagKind::custom("A"), [coord.to_string()]))
                .custom_created_at(Timestamp::from(at))
                .sign_with_keys(&k)
                .expect("sign")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_an_api_server_restart_resume_from_the_cursor_and_stop_on_unlabel() {
    let mut cluster = Cluster::start("resume").await;
    let remotes = remotes(2).await;
    let mut want = repos_on(&cluster, &remotes).await;
    // History two days old: outside the resume window, so never fetched twice.
    let f = nip34::fixture("history");
    let coord = f.scope.coordinate.to_string();
    let ann = nip34::announcement(&f, &[remotes[0].url().to_string()]);
    relays::publish(&cluster.local, std::slice::from_ref(&ann)).await;
    want.insert(ann.id);
    let old = comments(&coord, 60, Timestamp::now().as_secs() - 2 * 86_400);
    remotes[0].add(old.iter().cloned());
    want.extend(nip34::ids(&old));

    let mut controller = cluster.controller("c0", &[]);
    // Leases long enough to ride out an API server restart.
    let lease = ["--lease-duration", "40s", "--lease-renew", "2s"];
    let mut worker = cluster.worker("w0", &lease);
    cluster.wait_settled(2, &["w0"], SETTLE).await;
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    let objects_before = cluster.objects().await;

    // Restart the API server: sessions stay up (no reconnect), events keep flowing, status
    // catches up afterwards, nothing crashes.
    let connections = remotes[0].counters().connections.load(Ordering::SeqCst);
    cluster
        .env
        .restart_apiserver()
        .await
        .expect("API server restarts");
    let during = comments(&coord, 5, Timestamp::now().as_secs());
    remotes[0].add(during.iter().cloned());
    want.extend(nip34::ids(&during));
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    let name0 = by_url(&objects_before)[remotes[0].url().as_str()].clone();
    let published_before = objects_before
        .iter()
        .find(|o| o.name_any() == name0)
        .and_then(|o| o.status.as_ref()?.events_published)
        .unwrap_or(0);
    eventually("status to catch up after the restart", SETTLE, || async {
        let o = cluster
            .objects()
            .await
            .into_iter()
            .find(|o| o.name_any() == name0)?;
        let s = o.status?;
        (s.phase == Some(Phase::Live) && s.events_published? >= published_before + 5).then_some(())
    })
    .await;
    assert_eq!(
        remotes[0].counters().connections.load(Ordering::SeqCst),
        connections,
        "the session did not reconnect across the API server restart"
    );
    assert!(worker.running(), "worker crashed:\n{}", worker.log_tail(30));
    assert!(
        controller.running(),
        "controller crashed:\n{}",
        controller.log_tail(30)
    );

    // Kill the worker in the middle of a live stream and start it again: it resumes from the
    // stored cursor. Nothing is lost; the two-day-old history is not fetched again.
    let streaming = comments(&coord, 40, Timestamp::now().as_secs());
    let (first, second) = streaming.split_at(20);
    remotes[0].add(first.iter().cloned());
    want.extend(nip34::ids(first));
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    worker.kill();
    let served_before = remotes[0].counters().events_served.load(Ordering::SeqCst);
    remotes[0].add(second.iter().cloned());
    want.extend(nip34::ids(second));
    let mut worker = cluster.worker("w0", &lease);
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    cluster.wait_settled(2, &["w0"], SETTLE).await;
    let served_after = remotes[0].counters().events_served.load(Ordering::SeqCst) - served_before;
    let recent = during.len() + streaming.len() + 20; // + the fixture's own recent events
    assert!(
        served_after <= recent,
        "re-download bounded by the resume window: {served_after} events served after the restart, at most {recent} recent ones exist ({} old ones must not come back)",
        old.len()
    );

    // The drain protocol, with the controller stopped so nobody moves the label: the worker
    // closes the session *before* it acknowledges, and resumes when the drain is cancelled.
    controller.terminate(Duration::from_secs(30)).await;
    let api = Api::<RelaySync>::namespaced(cluster.admin.clone(), &cluster.ns);
    let names = by_url(&cluster.objects().await);
    let n0 = names[remotes[0].url().as_str()].clone();
    let n1 = names[remotes[1].url().as_str()].clone();
    let set_drain = |on: bool| {
        let api = api.clone();
        let n0 = n0.clone();
        async move {
            let value = if on { json!("true") } else { json!(null) };
            api.patch(
                &n0,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {DRAIN_LABEL: value}}})),
            )
            .await
            .expect("drain label");
        }
    };
    set_drain(true).await;
    eventually("the drain to be acknowledged", SETTLE, || async {
        let o = api.get(&n0).await.ok()?;
        is_released_by(o.status.as_ref(), "w0").then_some(())
    })
    .await;
    assert_eq!(
        remotes[0]
            .counters()
            .live_connections
            .load(Ordering::SeqCst),
        0,
        "acknowledged while still connected"
    );
    set_drain(false).await;
    eventually(
        "the session to resume after the drain is cancelled",
        SETTLE,
        || async {
            let o = api.get(&n0).await.ok()?;
            let live = o.status?.phase == Some(Phase::Live);
            (live
                && remotes[0]
                    .counters()
                    .live_connections
                    .load(Ordering::SeqCst)
                    == 1)
                .then_some(())
        },
    )
    .await;

    // Take the label off one relay and delete the other: the worker closes both sessions
    // (the raw watch reports both as deletions).
    api.patch(
        &n0,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {WORKER_LABEL: null}}})),
    )
    .await
    .expect("unlabel");
    api.delete(&n1, &DeleteParams::default())
        .await
        .expect("delete");
    for (i, r) in remotes.iter().enumerate() {
        eventually(&format!("remote {i} to be let go"), SETTLE, || async {
            (r.counters().live_connections.load(Ordering::SeqCst) == 0).then_some(())
        })
        .await;
    }
    assert!(worker.running(), "worker crashed:\n{}", worker.log_tail(30));
}

/// A worker whose API server stops answering (every response held back by a proxy) cannot
/// keep its relays past its Lease: every request has a deadline shorter than the renew
/// interval, so it stops its sessions before the Lease could expire, and the relays move to
/// another worker without ever having two connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_api_server_stops_before_its_lease_expires() {
    let cluster = Cluster::start("stall").await;
    // Relays on both workers, at least one on the one we stall.
    let remotes = remotes_with_one_for(6, &["w1"], "w0").await;
    repos_on(&cluster, &remotes).await;

    // w0 reaches the API server only through a proxy the test can stall.
    let (proxy, proxied) = cluster.proxied_kubeconfig("w0").await;

    let _c0 = cluster.controller("c0", &[]);
    let _w0 = cluster.worker_via("w0", &proxied);
    let _w1 = cluster.worker("w1", &[]);
    let owners = cluster.wait_settled(6, &["w0", "w1"], SETTLE).await;
    let objects = cluster.objects().await;
    let on_w0: Vec<&ScriptedRelay> = remotes
        .iter()
        .filter(|r| {
            objects.iter().any(|o| {
                o.spec.url == r.url().as_str()
                    && owners.get(&o.name_any()).map(String::as_str) == Some("w0")
            })
        })
        .collect();
    assert!(!on_w0.is_empty(), "the ring gave w0 nothing");
    for r in &remotes {
        r.counters().reset_max();
    }

    // Stall: nothing the API server sends reaches w0 any more.
    proxy.set_delay(Duration::from_secs(3600));
    // Its Lease (4 s, renewed every second) was last renewed before this moment: w0 must
    // have closed every session within that, plus a moment for the process to act.
    eventually("w0 closing its sessions", Duration::from_secs(5), || {
        let open: usize = on_w0
            .iter()
            .map(|r| r.counters().live_connections.load(Ordering::SeqCst))
            .sum();
        async move { (open == 0).then_some(()) }
    })
    .await;
    // The controller sees the Lease expire and w1 takes everything over.
    cluster.wait_settled(6, &["w1"], SETTLE).await;
    for r in &remotes {
        assert!(
            r.counters().max_live_connections.load(Ordering::SeqCst) <= 1,
            "{} was held by two workers at once",
            r.url()
        );
    }
}

/// The controller's watch of the worker Leases dies without a word (a half-open connection:
/// the watcher would notice after minutes) while the workers renew as ever. Judged from that
/// stale cache, the worker with the shorter Lease would expire and its relays move to the
/// other without a drain while it still runs them; a departure is confirmed from a fresh
/// list first, so nothing moves — and a worker that really dies still fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_lease_watch_moves_no_relay_of_a_live_worker() {
    let cluster = Cluster::start("silent-watch").await;
    let remotes = remotes_with_one_for(6, &["w1"], "w0").await;
    repos_on(&cluster, &remotes).await;
    // Only the controller goes through the proxy. Its leader Lease is long enough that the
    // renewals lost on silenced connections do not cost it the lead (a new leader would
    // start with fresh watches).
    let (proxy, proxied) = cluster.proxied_kubeconfig("c0").await;
    let c0 = cluster.controller_via(
        "c0",
        &proxied,
        &["--leader-lease-duration", "60s", "--leader-renew", "3s"],
    );
    let w0 = cluster.worker("w0", &[]);
    // A long Lease: still fresh in any stale view long after w0's (4 s) is not.
    let _w1 = cluster.worker("w1", &["--lease-duration", "60s", "--lease-renew", "3s"]);
    let owners = cluster.wait_settled(6, &["w0", "w1"], SETTLE).await;
    assert!(
        owners.values().any(|w| w == "w0"),
        "the ring gave w0 nothing: {owners:?}"
    );
    let before = labels_of(&cluster.objects().await);

    // Every connection the controller has now goes silent: its watches with them. New
    // requests open new connections and get through.
    proxy.silence_connections();
    // An absence over a window: w0's Lease, judged from the watch, expires after 4 s, and
    // a label write the controller sends over a silenced connection gives up after 10 s
    // before it is sent again over a new one.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        assert_eq!(
            labels_of(&cluster.objects().await),
            before,
            "a live worker's relays moved on a stale view of the Leases"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !c0.log_tail(400).contains("lost the lead"),
        "the controller lost the lead, so its watches started afresh:\n{}",
        c0.log_tail(40)
    );
    // A worker that really dies still fails over.
    w0.kill();
    cluster.wait_settled(6, &["w1"], SETTLE).await;
}

/// Labels of every object, by name.
fn labels_of(objects: &[RelaySync]) -> BTreeMap<String, Option<String>> {
    objects
        .iter()
        .map(|o| (o.name_any(), o.labels().get(WORKER_LABEL).cloned()))
        .collect()
}

/// A cluster with the workers' StatefulSet `gs` at two replicas, as the chart makes it (no
/// kubelet runs its pods here: the workers are processes named as its pods), and six
/// remotes, one of which the ring gives `gs-1`. Returns what the local relay must end up with.
async fn two_pods_of_gs(name: &str) -> (Cluster, Vec<ScriptedRelay>, BTreeSet<EventId>) {
    let cluster = Cluster::start(name).await;
    let remotes = remotes_with_one_for(6, &["gs-0"], "gs-1").await;
    let want = repos_on(&cluster, &remotes).await;
    Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(cluster.admin.clone(), &cluster.ns)
        .patch(
            "gs",
            &PatchParams::apply("test").force(),
            &Patch::Apply(support::cluster::statefulset("gs", 2)),
        )
        .await
        .expect("StatefulSet");
    (cluster, remotes, want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_moves_no_relay_while_a_crash_or_a_scale_down_hands_over_at_once() {
    let (cluster, remotes, want) = two_pods_of_gs("restart").await;
    let (a, b) = ("gs-0", "gs-1");
    let statefulsets = Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(
        cluster.admin.clone(),
        &cluster.ns,
    );
    let replicas = |n| support::cluster::statefulset("gs", n);
    let apply = PatchParams::apply("test").force();
    // The grace is far longer than a handover takes, so a move within it is the old rule.
    let _controller = cluster.controller(
        "c0",
        &[
            "--worker-statefulset",
            "gs",
            "--max-workers",
            "4",
            "--restart-grace",
            "60s",
        ],
    );
    let mut wa = cluster.worker(a, &[]);
    let mut wb = cluster.worker(b, &[]);
    let owners = cluster.wait_settled(6, &[a, b], SETTLE).await;
    let before = labels_of(&cluster.objects().await);
    assert!(owners.values().any(|w| w == b), "{owners:?}");
    for r in &remotes {
        r.counters().reset_max();
    }

    // A rolling restart: gs-1 stops gracefully and comes back under its name. Its relays
    // wait for it (every look sees the same labels) and are Live by it again.
    let status = wb.terminate(Duration::from_secs(40)).await;
    assert!(status.success(), "{b} exited with {status}");
    // Give the controller longer than the old rule needed to move them (it moved them on
    // its next pass, about a second), checking at every look that nothing moved.
    let stopped = std::time::Instant::now();
    while stopped.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            labels_of(&cluster.objects().await),
            before,
            "a relay moved while its worker restarted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wb = cluster.worker(b, &[]);
    let restarted = std::time::Instant::now();
    loop {
        let objects = cluster.objects().await;
        assert_eq!(
            labels_of(&objects),
            before,
            "a relay moved during the restart"
        );
        if cluster.settled(6, &[a, b]).await.is_ok() {
            break;
        }
        assert!(
            restarted.elapsed() < SETTLE,
            "not Live again after the restart: {:?}",
            cluster.settled(6, &[a, b]).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, r) in remotes.iter().enumerate() {
        let max = r.counters().max_live_connections.load(Ordering::SeqCst);
        assert!(max <= 1, "remote {i} had {max} connections at once");
    }

    // A crash is no graceful stop: the relays move on the Lease's expiry (4 s), not after
    // the 60 s grace.
    wb.kill();
    let crashed = std::time::Instant::now();
    cluster.wait_settled(6, &[a], Duration::from_secs(30)).await;
    println!("crash handed over in {:?}", crashed.elapsed());

    // A scale-down: the StatefulSet goes to one replica, so gs-1 is not coming back and
    // its relays move as soon as it stops.
    wb = cluster.worker(b, &[]);
    cluster.wait_settled(6, &[a, b], SETTLE).await;
    statefulsets
        .patch("gs", &apply, &Patch::Apply(replicas(1)))
        .await
        .expect("scale down");
    let status = wb.terminate(Duration::from_secs(40)).await;
    assert!(status.success(), "{b} exited with {status}");
    let scaled = std::time::Instant::now();
    cluster.wait_settled(6, &[a], Duration::from_secs(30)).await;
    println!("scale-down handed over in {:?}", scaled.elapsed());
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
    assert!(wa.running(), "{a} crashed:\n{}", wa.log_tail(30));
}

/// A kubelet may delete a stopped pod's object half a minute after its process exited (seen
/// on the real node: 5 to 32 s). The restart grace counts from when the old pod is gone, so
/// a slow kubelet moves no relay; once it is gone and the grace passes without the worker
/// coming back, they move. Seen failing with the grace counted from the stop alone: every
/// relay moved while the pod was still terminating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_whose_pod_is_still_terminating_keeps_its_relays() {
    let (cluster, _remotes, want) = two_pods_of_gs("terminating").await;
    let (a, b) = ("gs-0", "gs-1");
    let grace = Duration::from_secs(3);
    let _controller = cluster.controller(
        "c0",
        &[
            "--worker-statefulset",
            "gs",
            "--max-workers",
            "4",
            "--restart-grace",
            "3s",
        ],
    );
    let _wa = cluster.worker(a, &[]);
    let wb = cluster.worker(b, &[]);
    let owners = cluster.wait_settled(6, &[a, b], SETTLE).await;
    assert!(owners.values().any(|w| w == b), "{owners:?}");
    let before = labels_of(&cluster.objects().await);

    // gs-1's pod object, as the StatefulSet made it (no kubelet here), held terminating by a
    // finalizer as a slow kubelet holds it.
    let pods =
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(cluster.admin.clone(), &cluster.ns);
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": b,
            "labels": {"app": "gs", "statefulset.kubernetes.io/pod-name": b},
            "finalizers": ["grasp-sync.dev/test-slow-kubelet"],
        },
        "spec": {"containers": [{"name": "worker", "image": "example.invalid/grasp-sync:0"}]},
    }))
    .expect("pod");
    pods.create(&Default::default(), &pod)
        .await
        .expect("pod created");
    pods.delete(b, &DeleteParams::default())
        .await
        .expect("pod deleted");
    let status = wb.terminate(Duration::from_secs(40)).await;
    assert!(status.success(), "{b} exited with {status}");

    // Three graces while the pod is terminating: nothing moves.
    let stopped = std::time::Instant::now();
    while stopped.elapsed() < grace * 3 {
        assert_eq!(
            labels_of(&cluster.objects().await),
            before,
            "a relay moved while its worker's pod was still terminating"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The kubelet finishes the pod; the worker does not come back: after the grace, its
    // relays move.
    pods.patch(
        b,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("finalizer removed");
    let gone = std::time::Instant::now();
    cluster.wait_settled(6, &[a], SETTLE).await;
    let took = gone.elapsed();
    assert!(
        took >= grace / 2,
        "moved {took:?} after the pod was gone, before the grace"
    );
    println!("relays moved {took:?} after the pod was gone (grace {grace:?})");
    relays::holds_exactly(&cluster.local, &want, SETTLE).await;
}
