//! The binary's surface: `crd` output equals the committed file, help, and startup errors
//! that say what is wrong.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

fn grasp_sync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grasp-sync"))
}

/// The child's exit status once it has exited; fails with `what` after 30 s.
fn exit_within(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn crd_output_matches_the_committed_file() {
    let out = grasp_sync().arg("crd").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = include_str!("../deploy/crds/relaysync.yaml");
    assert!(
        generated == committed,
        "deploy/crds/relaysync.yaml is stale: run `cargo run -- crd > deploy/crds/relaysync.yaml`"
    );
}

#[test]
fn kubernetes_mode_startup_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-kubeconfig");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "worker",
                "--name",
                "Not_A_Label",
                "--local-relay",
                "ws://127.0.0.1:1",
            ],
            "DNS-1123",
        ),
        (
            &[
                "worker",
                "--name",
                "w0",
                "--local-relay",
                "ws://127.0.0.1:1",
                "--lease-duration",
                "5s",
                "--lease-renew",
                "2s",
            ],
            "--lease-renew must be at most a third",
        ),
        (
            &[
                "controller",
                "--identity",
                "c0",
                "--local-relay",
                "ws://127.0.0.1:1",
                "--service-domain",
                "git.example",
                "--kube-context",
                "nope",
            ],
            "cannot load the Kubernetes client configuration",
        ),
    ];
    for (args, expected) in cases {
        let out = grasp_sync()
            .args(*args)
            .env("KUBECONFIG", &missing)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn help_lists_every_subcommand_and_env_vars() {
    let out = grasp_sync().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["crd", "controller", "worker", "standalone", "demo"] {
        assert!(help.contains(sub), "--help lacks {sub}:\n{help}");
    }
    let out = grasp_sync().args(["worker", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "POD_NAME",
        "GRASP_SYNC_LOCAL_RELAY",
        "GRASP_SYNC_STATUS_INTERVAL",
    ] {
        assert!(help.contains(var), "worker --help lacks {var}:\n{help}");
    }
}

#[test]
fn invalid_relay_url_flag_names_the_problem() {
    let out = grasp_sync()
        .args([
            "worker",
            "--name",
            "w0",
            "--local-relay",
            "wss://user:pw@relay.example",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--local-relay") && stderr.contains("credentials"),
        "{stderr}"
    );
}

/// A re-read of the local relay every few milliseconds would read its history nonstop.
#[test]
fn a_local_reread_period_under_ten_seconds_is_refused() {
    let out = grasp_sync()
        .args([
            "standalone",
            "--local-relay",
            "ws://127.0.0.1:9",
            "--service-domain",
            "git.example",
            "--local-reread-every",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--local-reread-every must be 0s (never) or at least 10s"),
        "{stderr}"
    );
}

/// The real binary in standalone mode: it starts against a local relay, `grasp-sync status`
/// shows its relays, and SIGTERM stops it cleanly with its state saved.
#[test]
fn standalone_binary_runs_reports_status_and_stops_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt.block_on(support::nostr_rs_relay::NostrRsRelay::start());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = grasp_sync()
        .args(["standalone", "--local-relay", relay.url().as_str()])
        .args(["--service-domain", "git.example"])
        // Loopback bootstrap relays: refused by the default address policy, so this test
        // makes no connection (and no DNS query) beyond the machine.
        .args(["--bootstrap", "ws://127.0.0.1:1,ws://127.0.0.1:2/x"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .arg("--state-file")
        .arg(&state)
        .env("GRASP_SYNC_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let table = loop {
        let out = grasp_sync()
            .args(["status", "--url", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // Both bootstrap relays listed, and their sessions have reported the refusal.
        if out.status.success()
            && text.lines().count() == 3
            && text.matches("loopback").count() == 2
        {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no status: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("ws://127.0.0.1:1") && table.contains("ws://127.0.0.1:2/x"),
        "{table}"
    );

    // SIGTERM: a clean exit, with the objects saved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = exit_within(&mut child, "standalone did not stop on SIGTERM");
    assert!(status.success(), "exit status {status}");
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains("ws://127.0.0.1:1"), "{saved}");
    // The refusal is visible, not silent.
    assert!(saved.contains("loopback"), "{saved}");

    // Without a running standalone, `status` fails with a hint.
    let out = grasp_sync()
        .args(["status", "--url", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is grasp-sync standalone running"));
}

#[test]
fn an_interrupted_demo_removes_its_relays_stores() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here: the demo keeps its stores in the temp directory");
        return;
    }
    let mut child = grasp_sync()
        .args(["demo", "--repos", "300"])
        .env("GRASP_SYNC_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = grasp_sync::modes::demo::store_prefix(child.id());
    let stores = || {
        std::fs::read_dir(shm)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    };
    // Interrupted mid-run: once both embedded relays have their stores.
    let start = Instant::now();
    while stores() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the demo made no stores under {prefix}"
        );
        assert!(child.try_wait().unwrap().is_none(), "the demo ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = exit_within(&mut child, "the demo did not stop on SIGINT");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !status.success(),
        "an interrupted demo does not pass: {err}"
    );
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(stores(), 0, "stores left in /dev/shm under {prefix}");
}
