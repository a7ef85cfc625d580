//! nostr-rs-relay, a third-party relay (no NIP-77), as a child process on a free loopback
//! port. Binary from `GRASP_SYNC_NOSTR_RS_RELAY` or the cache `scripts/test-env.sh` fills.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grasp_sync::nostr::RelayUrl;
use tempfile::TempDir;

use super::kube_env::locate;

pub struct NostrRsRelay {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for NostrRsRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NostrRsRelay {
    pub async fn start() -> NostrRsRelay {
        let bin = locate("GRASP_SYNC_NOSTR_RS_RELAY", "nostr-rs-relay", None);
        assert!(
            bin.is_file(),
            "nostr-rs-relay not found at {}: set GRASP_SYNC_NOSTR_RS_RELAY or run scripts/test-env.sh",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("grasp-sync-nrr-")
            .tempdir()
            .expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "[info]\nrelay_url = \"ws://127.0.0.1:{port}/\"\nname = \"test\"\n\n\
             [network]\naddress = \"127.0.0.1\"\nport = {port}\n\n\
             [limits]\nmessages_per_sec = 100000\nmax_event_bytes = 1048576\nmax_ws_message_bytes = 4194304\n"
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--db")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl only; the relay dies with the test's thread.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start nostr-rs-relay");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
                panic!("nostr-rs-relay exited ({status}):\n{log}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "nostr-rs-relay did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        NostrRsRelay {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> RelayUrl {
        RelayUrl::parse(&format!("ws://127.0.0.1:{}", self.port)).unwrap()
    }
}
