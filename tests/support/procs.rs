//! `grasp-sync` processes for the multi-process tests: real binaries, output in a log file,
//! killed on drop (and when the test process dies).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct GraspSync {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl GraspSync {
    /// Start `grasp-sync <args>` with `envs`, logging to `<dir>/<name>.log` (appended, so a
    /// restarted process keeps the earlier lines).
    pub fn spawn(name: &str, dir: &Path, args: &[String], envs: &[(&str, String)]) -> GraspSync {
        Self::start(name, dir, args, envs, false)
    }

    /// [`GraspSync::spawn`] with exactly `envs` as its environment (nothing inherited, no
    /// log level added): a container's process as its pod spec defines it.
    pub fn spawn_exact(
        name: &str,
        dir: &Path,
        args: &[String],
        envs: &[(&str, String)],
    ) -> GraspSync {
        Self::start(name, dir, args, envs, true)
    }

    fn start(
        name: &str,
        dir: &Path,
        args: &[String],
        envs: &[(&str, String)],
        exact: bool,
    ) -> GraspSync {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        // GRASP_SYNC_BIN runs another build (e.g. a copy kept stable during long runs).
        let bin = std::env::var_os("GRASP_SYNC_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_grasp-sync")));
        let mut cmd = Command::new(bin);
        cmd.args(args);
        if exact {
            cmd.env_clear();
        } else {
            // GRASP_SYNC_PROC_LOG: another level (benchmarks log less).
            cmd.env(
                "GRASP_SYNC_LOG",
                std::env::var("GRASP_SYNC_PROC_LOG")
                    .unwrap_or_else(|_| "info,grasp_sync=debug".to_string()),
            );
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start grasp-sync");
        GraspSync {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: a crash, nothing cleaned up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit; panics if it takes longer than `within`.
    pub async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "{} did not stop within {within:?} after SIGTERM:\n{}",
                self.name,
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory in KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for GraspSync {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
