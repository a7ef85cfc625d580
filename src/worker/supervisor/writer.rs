//! The one task that writes to the store on behalf of a worker: every status report, drain
//! acknowledgement, final status and phase Event goes through it. The supervisor's pure
//! steps decide what to write; this task applies it, bounded in concurrency and in time,
//! counts each result (ok | error | timeout), and hands the result back so the supervisor
//! can update its bookkeeping (coalescers, released drains) from what really happened.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::metrics::SupervisorMetrics;
use crate::crd::{Phase, RelaySyncStatus};
use crate::store::{RelaySyncStore, StoreError};

/// Writes in flight at once: after a failover a worker takes hundreds of relays at once,
/// and each phase change must reach the API server promptly.
pub(crate) const IN_FLIGHT: usize = 32;

/// Why a write is made; the supervisor reacts to each kind's result differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    /// A coalesced status report of a running (or paused) relay.
    Report,
    /// The final status that acknowledges a drain (`Assigned=False/Released`).
    Release,
    /// The last status written on a graceful stop.
    Final,
}

/// A phase transition to announce (Kubernetes Event) once the status is written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PhaseEvent {
    pub(crate) from: Option<Phase>,
    pub(crate) to: Phase,
    pub(crate) note: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub(crate) name: String,
    pub(crate) status: RelaySyncStatus,
    pub(crate) kind: WriteKind,
    pub(crate) event: Option<PhaseEvent>,
    /// When the supervisor decided on it (coalescing is measured from there).
    pub(crate) decided_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteResult {
    Ok,
    Error,
    Timeout,
    /// The object is no longer ours (its label moved on): not retried; the store's watch
    /// drops it, so nothing decides it again.
    Refused,
}

impl WriteResult {
    fn label(self) -> &'static str {
        match self {
            WriteResult::Ok => "ok",
            WriteResult::Error => "error",
            WriteResult::Timeout => "timeout",
            WriteResult::Refused => "refused",
        }
    }
}

/// A write and what became of it.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) write: Write,
    pub(crate) result: WriteResult,
}

/// Handle of the writer task: submit writes, read their results.
pub(crate) struct StatusWriter {
    submit: mpsc::UnboundedSender<Write>,
    pub(crate) results: mpsc::UnboundedReceiver<Written>,
    task: JoinHandle<()>,
}

impl StatusWriter {
    /// Start the writer. Each store call is abandoned after `timeout` (counted `timeout`):
    /// a stalled API server must not freeze the supervisor, and the write is decided again
    /// on a later pass.
    pub(crate) fn spawn<S: RelaySyncStore + 'static>(
        store: Arc<S>,
        metrics: SupervisorMetrics,
        timeout: Duration,
    ) -> Self {
        let (submit, rx) = mpsc::unbounded_channel::<Write>();
        let (done, results) = mpsc::unbounded_channel();
        let task =
            tokio::spawn(async move {
                let writes = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|w| (w, rx))
                });
                writes
                    .map(|w| apply(store.as_ref(), &metrics, timeout, w))
                    .buffer_unordered(IN_FLIGHT)
                    .for_each(|written| {
                        // The supervisor may be gone on shutdown; nothing to tell then.
                        let _ = done.send(written);
                        async {}
                    })
                    .await;
            });
        StatusWriter {
            submit,
            results,
            task,
        }
    }

    /// Queue a write. False if the writer has stopped.
    pub(crate) fn submit(&self, write: Write) -> bool {
        self.submit.send(write).is_ok()
    }

    /// Stop accepting writes, let those queued finish, and return their results.
    pub(crate) async fn finish(self) -> Vec<Written> {
        let StatusWriter {
            submit,
            mut results,
            task,
        } = self;
        drop(submit);
        let mut out = Vec::new();
        while let Some(w) = results.recv().await {
            out.push(w);
        }
        let _ = task.await;
        out
    }
}

async fn apply<S: RelaySyncStore>(
    store: &S,
    metrics: &SupervisorMetrics,
    timeout: Duration,
    write: Write,
) -> Written {
    let result = match tokio::time::timeout(timeout, store.apply_status(&write.name, &write.status))
        .await
    {
        Ok(Ok(())) => WriteResult::Ok,
        Ok(Err(StoreError::NotHeld(_))) => {
            tracing::info!(object = %write.name, kind = ?write.kind, "status not written: the relay is no longer assigned to this worker");
            WriteResult::Refused
        }
        Ok(Err(e)) => {
            tracing::debug!(object = %write.name, kind = ?write.kind, error = %e, "status write failed; will retry");
            WriteResult::Error
        }
        Err(_) => {
            tracing::debug!(object = %write.name, kind = ?write.kind, ?timeout, "status write timed out; will retry");
            WriteResult::Timeout
        }
    };
    metrics
        .status_writes
        .with_label_values(&[result.label()])
        .inc();
    if result == WriteResult::Ok
        && let Some(ev) = &write.event
    {
        let recorded = tokio::time::timeout(
            timeout,
            store.record_phase(&write.name, ev.from, ev.to, ev.note.as_deref()),
        )
        .await;
        let label = match recorded {
            Ok(Ok(true)) => Some("ok"),
            // This store has no event sink.
            Ok(Ok(false)) => None,
            Ok(Err(e)) => {
                tracing::debug!(object = %write.name, error = %e, "phase event not published");
                Some("error")
            }
            Err(_) => Some("timeout"),
        };
        if let Some(label) = label {
            metrics.phase_events.with_label_values(&[label]).inc();
        }
    }
    Written { write, result }
}
