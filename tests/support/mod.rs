//! Shared test support: a real Kubernetes API server and polling helpers.
#![allow(dead_code, unused_imports)] // each test binary uses a different part

pub mod cluster;
pub mod cpu;
pub mod fault_proxy;
pub mod hostile_relay;
pub mod kube_env;
pub mod nip34;
pub mod node;
pub mod nostr_rs_relay;
pub mod procs;
pub mod prometheus;
pub mod relays;

use std::future::Future;
use std::time::{Duration, Instant};

pub use kube_env::KubeEnv;

/// Run a command to its end (no stdin); its stdout, or fail the test with its output.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback port free right now (for a process started next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Poll `check` until it returns `Some`, or fail after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
