//! The one task that writes to the store on behalf of a worker: every status report, drain
//! acknowledgement, final status and phase Event goes through it. The supervisor's pure
//! steps decide what to write; this task applies it, bounded in concurrency and in time,
//! counts each result (ok | error | timeout), and hands the result back so the supervisor
//! can update its bookkeeping (coalescers, released drains) from what really happened.
//!
//! Phase Events follow their status write in a lane of their own: they are for people
//! reading `kubectl describe`, so after a failover they must not hold back the status writes
//! that make the relays Live, nor the supervisor's bookkeeping of those writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Final statuses written at once on a stop. Few: a worker leaving for good is handed over
/// while they are written, and each final the store has seen move is refused without a
/// request — a slow trickle leaves the API server to the handover.
const FINALS_IN_FLIGHT: usize = 4;

/// Phase Events published at once, behind the status writes.
const EVENTS_IN_FLIGHT: usize = 8;

/// On a stop, Events still queued get this long to go out; the rest are counted dropped.
const EVENTS_FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Phase Events started per second at most while the worker runs: a failover's hundreds of
/// transitions reach `kubectl describe` over the next seconds instead of competing with the
/// status writes that make the relays Live. On a stop the rest go out unpaced.
const EVENTS_PER_SECOND: u32 = 20;

/// Phase Events waiting to be published; past this, new ones are dropped (counted
/// `dropped`) rather than held without bound while the API server is slow.
const EVENTS_QUEUED: usize = 4096;

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
    finals: mpsc::UnboundedSender<Write>,
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
        let (finals, finals_rx) = mpsc::unbounded_channel::<Write>();
        let (done, results) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::channel::<(String, PhaseEvent)>(EVENTS_QUEUED);
        let unpaced = Arc::new(AtomicBool::new(false));
        // Queued and not yet published, so what a cut-short flush leaves is counted.
        let queued = Arc::new(AtomicUsize::new(0));
        let lane = tokio::spawn(publish_events(
            store.clone(),
            metrics.clone(),
            timeout,
            events_rx,
            unpaced.clone(),
            queued.clone(),
        ));
        let task = tokio::spawn(async move {
            let queue = |rx: mpsc::UnboundedReceiver<Write>| {
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|w| (w, rx)) },
                )
            };
            let reports = queue(rx)
                .map(|w| apply(store.as_ref(), &metrics, timeout, w))
                .buffer_unordered(IN_FLIGHT);
            let finals = queue(finals_rx)
                .map(|w| apply(store.as_ref(), &metrics, timeout, w))
                .buffer_unordered(FINALS_IN_FLIGHT);
            futures::stream::select(reports, finals)
                .for_each(|written| {
                    if written.result == WriteResult::Ok
                        && let Some(ev) = &written.write.event
                    {
                        match events.try_send((written.write.name.clone(), ev.clone())) {
                            Ok(()) => {
                                queued.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                metrics.phase_events.with_label_values(&["dropped"]).inc();
                            }
                        }
                    }
                    // The supervisor may be gone on shutdown; nothing to tell then.
                    let _ = done.send(written);
                    async {}
                })
                .await;
            // Every write is done; the Events still queued are published before finishing,
            // without pacing (the process is stopping).
            unpaced.store(true, Ordering::Relaxed);
            drop(events);
            let abort = lane.abort_handle();
            if tokio::time::timeout(EVENTS_FLUSH_WITHIN, lane)
                .await
                .is_err()
            {
                // The stop must not wait on Events (the Lease, the pod's grace period).
                abort.abort();
                let left = queued.swap(0, Ordering::Relaxed) as u64;
                metrics
                    .phase_events
                    .with_label_values(&["dropped"])
                    .inc_by(left);
            }
        });
        StatusWriter {
            submit,
            finals,
            results,
            task,
        }
    }

    /// Queue a write (a final status in the slow lane). False if the writer has stopped.
    pub(crate) fn submit(&self, write: Write) -> bool {
        if write.kind == WriteKind::Final {
            self.finals.send(write).is_ok()
        } else {
            self.submit.send(write).is_ok()
        }
    }

    /// Stop accepting writes, let those queued finish, and return their results.
    pub(crate) async fn finish(self) -> Vec<Written> {
        let StatusWriter {
            submit,
            finals,
            mut results,
            task,
        } = self;
        drop(submit);
        drop(finals);
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
    if write.kind == WriteKind::Final && store.seen_leaving(&write.name) {
        metrics.status_writes.with_label_values(&["refused"]).inc();
        return Written {
            write,
            result: WriteResult::Refused,
        };
    }
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
    Written { write, result }
}

/// Publish the phase Events of written statuses, a few at a time, each bounded by `timeout`.
async fn publish_events<S: RelaySyncStore>(
    store: Arc<S>,
    metrics: SupervisorMetrics,
    timeout: Duration,
    rx: mpsc::Receiver<(String, PhaseEvent)>,
    unpaced: Arc<AtomicBool>,
    waiting: Arc<AtomicUsize>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / EVENTS_PER_SECOND);
    // After a quiet spell, one at once and then the pace again (not a burst of every tick
    // missed meanwhile).
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let queued = futures::stream::unfold((rx, tick), move |(mut rx, mut tick)| {
        let unpaced = unpaced.clone();
        async move {
            let e = rx.recv().await?;
            if !unpaced.load(Ordering::Relaxed) {
                tick.tick().await;
            }
            Some((e, (rx, tick)))
        }
    });
    queued
        .for_each_concurrent(EVENTS_IN_FLIGHT, |(name, ev)| {
            let store = store.clone();
            let metrics = metrics.clone();
            let waiting = waiting.clone();
            async move {
                let recorded = tokio::time::timeout(
                    timeout,
                    store.record_phase(&name, ev.from, ev.to, ev.note.as_deref()),
                )
                .await;
                let label = match recorded {
                    Ok(Ok(true)) => Some("ok"),
                    // This store has no event sink.
                    Ok(Ok(false)) => None,
                    Ok(Err(e)) => {
                        tracing::debug!(object = %name, error = %e, "phase event not published");
                        Some("error")
                    }
                    Err(_) => Some("timeout"),
                };
                if let Some(label) = label {
                    metrics.phase_events.with_label_values(&[label]).inc();
                }
                waiting.fetch_sub(1, Ordering::Relaxed);
            }
        })
        .await;
}
