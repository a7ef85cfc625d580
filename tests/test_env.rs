//! The test environment itself: it starts, and when it cannot, it says which piece failed
//! and how to fix it instead of hanging.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::KubeEnv;
use support::kube_env::{Binaries, EnvError};

#[tokio::test]
async fn missing_binary_is_named_with_the_fix() {
    let binaries = Binaries {
        kube_apiserver: PathBuf::from("/nonexistent/kube-apiserver"),
        ..Binaries::from_env()
    };
    let err = match KubeEnv::builder().binaries(binaries).start().await {
        Ok(_) => panic!("started without a kube-apiserver binary"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            EnvError::BinaryMissing {
                component: "kube-apiserver",
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    for needle in [
        "/nonexistent/kube-apiserver",
        "GRASP_SYNC_KUBE_APISERVER",
        "scripts/test-env.sh",
    ] {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }
}

#[tokio::test]
async fn taken_port_fails_fast_naming_component_and_port() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let start = Instant::now();
    let err = match KubeEnv::builder().etcd_port(port).start().await {
        Ok(_) => panic!("etcd started on a port that is in use"),
        Err(e) => e,
    };
    assert!(
        matches!(err, EnvError::PortTaken { component: "etcd", port: p, .. } if p == port),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("in use"),
        "{msg}"
    );
    // Reported when etcd exits, not after the readiness deadline.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn environment_starts_and_stops_cleanly() {
    let env = KubeEnv::builder().start().await.expect("test environment");
    let dir = env.kubeconfig().parent().unwrap().to_path_buf();
    let pids = env.pids();
    assert_eq!(pids.len(), 2);
    let version = env
        .client()
        .await
        .unwrap()
        .apiserver_version()
        .await
        .unwrap();
    assert_eq!(version.major, "1");
    drop(env);
    assert!(!dir.exists(), "{dir:?} left behind");
    for pid in pids {
        // Killed and reaped: not even a zombie remains.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left behind"
        );
    }
}
