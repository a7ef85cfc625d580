//! nostr-rs-relay — a widely deployed third-party relay without NIP-77 — as a child process on
//! a free loopback port, for tests and the demo. The process is killed when the handle is
//! dropped, and also dies with the thread that started it (`PR_SET_PDEATHSIG`), so a killed
//! test leaves nothing running.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::nostr::RelayUrl;

/// The binary to use: `explicit`, else `GRASP_SYNC_NOSTR_RS_RELAY`, else the cache
/// `scripts/test-env.sh` fills, else `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    if let Some(p) = std::env::var_os("GRASP_SYNC_NOSTR_RS_RELAY") {
        candidates.push(p.into());
    }
    if let Some(c) = std::env::var_os("GRASP_SYNC_CACHE") {
        candidates.push(PathBuf::from(c).join("bin/nostr-rs-relay"));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(c) = cache {
        candidates.push(c.join("grasp-sync/bin/nostr-rs-relay"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nostr-rs-relay")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

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
    /// Start `bin` and wait until it listens (at most 30 s).
    pub async fn start(bin: &Path) -> std::io::Result<NostrRsRelay> {
        let dir = tempfile::Builder::new()
            .prefix("grasp-sync-nrr-")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            "[info]\nrelay_url = \"ws://127.0.0.1:{port}/\"\nname = \"grasp-sync\"\n\n\
             [network]\naddress = \"127.0.0.1\"\nport = {port}\n\n\
             [limits]\nmessages_per_sec = 100000\nmax_event_bytes = 1048576\nmax_ws_message_bytes = 4194304\n"
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("relay.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--db")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl only; the relay dies with the thread that started it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut relay = NostrRsRelay {
            child: cmd.spawn()?,
            port,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = relay.child.try_wait()? {
                let log = std::fs::read_to_string(relay._dir.path().join("relay.log"))
                    .unwrap_or_default();
                return Err(std::io::Error::other(format!(
                    "nostr-rs-relay exited ({status}):\n{log}"
                )));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(relay);
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(std::io::Error::other(
                    "nostr-rs-relay did not listen within 30 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> RelayUrl {
        // A loopback socket address always forms a valid ws:// URL.
        RelayUrl::parse(&format!("ws://127.0.0.1:{}", self.port)).unwrap_or_else(|_| unreachable!())
    }
}
