//! What `/healthz` answers: whether the loops this process depends on are still running —
//! a task that ended (a panic, an early return) or a loop that stopped beating means the
//! process should be restarted. Remote relays being down is not a reason: that is reported
//! in status and metrics, and a restart would not help.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

enum Check {
    /// Alive while the task has not finished.
    Task(AbortHandle),
    /// Alive while it has beaten within `max_age`.
    Beat { last: Instant, max_age: Duration },
}

#[derive(Clone, Default)]
pub struct Liveness {
    checks: Arc<Mutex<BTreeMap<String, Check>>>,
}

/// The handle a loop beats with.
#[derive(Clone)]
pub struct Heartbeat {
    name: String,
    checks: Arc<Mutex<BTreeMap<String, Check>>>,
}

impl Heartbeat {
    pub fn beat(&self) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Check::Beat { last, .. }) = checks.get_mut(&self.name) {
            *last = Instant::now();
        }
    }
}

impl Liveness {
    /// Watch `task`: the process is unhealthy once it has finished.
    pub fn task(&self, name: impl Into<String>, task: AbortHandle) {
        self.lock().insert(name.into(), Check::Task(task));
    }

    /// A loop that must beat at least every `max_age`.
    pub fn heartbeat(&self, name: impl Into<String>, max_age: Duration) -> Heartbeat {
        let name = name.into();
        self.lock().insert(
            name.clone(),
            Check::Beat {
                last: Instant::now(),
                max_age,
            },
        );
        Heartbeat {
            name,
            checks: self.checks.clone(),
        }
    }

    /// `Ok` with one line per check, or `Err` with the failing ones.
    pub fn check(&self) -> Result<String, String> {
        let now = Instant::now();
        let checks = self.lock();
        let mut ok = String::new();
        let mut bad = String::new();
        for (name, c) in checks.iter() {
            let (fine, line) = match c {
                Check::Task(t) if t.is_finished() => (false, format!("{name}: ended\n")),
                Check::Task(_) => (true, format!("{name}: running\n")),
                Check::Beat { last, max_age } => {
                    let age = now.saturating_duration_since(*last);
                    if age > *max_age {
                        (
                            false,
                            format!("{name}: no progress for {:.0?} (limit {max_age:?})\n", age),
                        )
                    } else {
                        (true, format!("{name}: ok\n"))
                    }
                }
            };
            if fine {
                ok.push_str(&line);
            } else {
                bad.push_str(&line);
            }
        }
        if bad.is_empty() {
            Ok(format!("ok\n{ok}"))
        } else {
            Err(bad)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Check>> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_beating_fails_the_check() {
        let l = Liveness::default();
        let hb = l.heartbeat("supervisor", Duration::from_secs(60));
        assert!(l.check().is_ok());
        tokio::time::advance(Duration::from_secs(45)).await;
        hb.beat();
        tokio::time::advance(Duration::from_secs(45)).await;
        assert!(l.check().is_ok(), "beat 45 s ago");
        tokio::time::advance(Duration::from_secs(30)).await;
        let err = l.check().unwrap_err();
        assert!(err.contains("supervisor: no progress"), "{err}");
    }

    #[tokio::test]
    async fn a_finished_task_fails_the_check() {
        let l = Liveness::default();
        let running = tokio::spawn(std::future::pending::<()>());
        let ended = tokio::spawn(async {});
        l.task("publisher", running.abort_handle());
        assert!(l.check().unwrap().contains("publisher: running"));
        l.task("discovery", ended.abort_handle());
        let _ = ended.await;
        let err = l.check().unwrap_err();
        assert!(
            err.contains("discovery: ended") && !err.contains("publisher"),
            "{err}"
        );
        running.abort();
    }
}
