//! The one task that writes to the store on behalf of a worker: every status report, drain
//! acknowledgement, final status and phase Event goes through it. The supervisor's pure
//! steps decide what to write; this task applies it, bounded in concurrency and in time,
//! counts each result (ok | error | timeout), and hands the result back so the supervisor
//! can update its bookkeeping (coalescers, released drains) from what really happened.
//!
//! Phase Events follow their status write in a lane of their own: they are for people
//! reading `kubectl describe`, so after a failover they must not hold back the status writes
//! that make the relays Live, nor the supervisor's bookkeeping of those writes. They wait
//! while status writes (final ones included, which wait out a stopping worker's handover)
//! are queued or in flight: each is a write to the same API server, and during a failover
//! or handover every one of them spent there delays a relay's Live status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
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

/// A stopping worker's relays are handed over while its final statuses wait: a final is
/// written once its relay has gone this long without any relay leaving this worker (the
/// controller is not moving them: it is waiting for this pod to come back, or is done), and
/// skipped once its relay has left. Written during the handover, each was a request the
/// API server took from the moves that make the relays Live elsewhere, for a status the
/// new holder overwrites a moment later.
const FINALS_QUIET: Duration = Duration::from_millis(300);

/// The longest a final status waits for the handover to go quiet (from when the stop
/// decided it), so a stop stays bounded.
const FINALS_HOLD_MAX: Duration = Duration::from_secs(5);

/// Phase Events published at once, behind the status writes.
const EVENTS_IN_FLIGHT: usize = 8;

/// On a stop, once every status is written, Events still queued get this long to go out (at
/// the same pace); the rest are counted dropped. Short: a pod that lingers on its Events
/// delays its own return in a rolling restart, and a backlog flushed at once (hundreds,
/// after a recent takeover) took the API server from the handover the stop began.
const EVENTS_FLUSH_WITHIN: Duration = Duration::from_millis(250);

/// Phase Events started per second at most: a failover's hundreds of transitions reach
/// `kubectl describe` over the next seconds instead of competing with the status writes
/// that make the relays Live.
const EVENTS_PER_SECOND: u32 = 20;

/// The longest an Event waits for the status writes to fall idle.
const EVENTS_DEFER_MAX: Duration = Duration::from_secs(5);

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
    /// Status writes queued or in flight (the Events lane waits for none).
    writes_pending: Arc<watch::Sender<usize>>,
    finals: mpsc::UnboundedSender<Write>,
    pub(crate) results: mpsc::UnboundedReceiver<Written>,
    task: JoinHandle<()>,
    /// A writer dropped without [`finish`](Self::finish) — its supervisor aborted after a
    /// lost Lease — writes nothing more: the next supervisor runs under the same worker
    /// name, so the label test would let a stale final status through over its own.
    _abort: AbortOnDrop,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
        let stopping = Arc::new(AtomicBool::new(false));
        let writes_pending = Arc::new(watch::Sender::new(0usize));
        // Queued and not yet published, so what a cut-short flush leaves is counted.
        let queued = Arc::new(AtomicUsize::new(0));
        let lane = tokio::spawn(publish_events(
            store.clone(),
            metrics.clone(),
            timeout,
            events_rx,
            stopping.clone(),
            queued.clone(),
            writes_pending.subscribe(),
        ));
        let pending = writes_pending.clone();
        // Aborted with the writer task: a dropped writer publishes no Events either.
        let lane_guard = AbortOnDrop(lane.abort_handle());
        let task = tokio::spawn(async move {
            let _lane_guard = lane_guard;
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
                .map(|w| async {
                    hold_final(store.as_ref(), &w.name, w.decided_at).await;
                    apply(store.as_ref(), &metrics, timeout, w).await
                })
                .buffer_unordered(FINALS_IN_FLIGHT);
            futures::stream::select(reports, finals)
                .for_each(|written| {
                    pending.send_modify(|n| *n = n.saturating_sub(1));
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
            // Every write is done; the Events still queued go out at the same pace, no longer
            // waiting for idle writes, for a bounded time.
            stopping.store(true, Ordering::Relaxed);
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
            writes_pending,
            finals,
            results,
            _abort: AbortOnDrop(task.abort_handle()),
            task,
        }
    }

    /// Queue a write (a final status in the slow lane). False if the writer has stopped.
    pub(crate) fn submit(&self, write: Write) -> bool {
        self.writes_pending.send_modify(|n| *n += 1);
        let sent = if write.kind == WriteKind::Final {
            self.finals.send(write).is_ok()
        } else {
            self.submit.send(write).is_ok()
        };
        if !sent {
            self.writes_pending
                .send_modify(|n| *n = n.saturating_sub(1));
        }
        sent
    }

    /// Stop accepting writes, let those queued finish, and return their results.
    pub(crate) async fn finish(self) -> Vec<Written> {
        let StatusWriter {
            submit,
            writes_pending: _,
            finals,
            mut results,
            task,
            _abort,
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

/// Wait until the final status of `name` (decided at `since`) is due: its relay has left
/// this worker (the write is then skipped), or no relay has left for [`FINALS_QUIET`], or
/// [`FINALS_HOLD_MAX`] has passed. At once for a store whose objects are never handed over.
async fn hold_final<S: RelaySyncStore>(store: &S, name: &str, since: Instant) {
    if !store.hands_over() {
        return;
    }
    let until = since + FINALS_HOLD_MAX;
    loop {
        if store.seen_leaving(name) {
            return;
        }
        let quiet_from = store.last_departure().map_or(since, |d| d.max(since));
        let due = (quiet_from + FINALS_QUIET).min(until);
        let now = Instant::now();
        if now >= due {
            return;
        }
        // Its relay may leave meanwhile: look again soon.
        tokio::time::sleep_until(due.min(now + Duration::from_millis(50))).await;
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
    stopping: Arc<AtomicBool>,
    waiting: Arc<AtomicUsize>,
    writes_pending: watch::Receiver<usize>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / EVENTS_PER_SECOND);
    // After a quiet spell, one at once and then the pace again (not a burst of every tick
    // missed meanwhile).
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let queued = futures::stream::unfold(
        (rx, tick, writes_pending),
        move |(mut rx, mut tick, mut writes_pending)| {
            let stopping = stopping.clone();
            async move {
                let e = rx.recv().await?;
                if !stopping.load(Ordering::Relaxed) {
                    // Gone (the writer stopping) counts as idle; a writer that is never
                    // idle (a write that keeps timing out) delays each Event only so long.
                    let _ = tokio::time::timeout(
                        EVENTS_DEFER_MAX,
                        writes_pending.wait_for(|n| *n == 0),
                    )
                    .await;
                }
                tick.tick().await;
                Some((e, (rx, tick, writes_pending)))
            }
        },
    );
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use prometheus::Registry;
    use tokio::sync::Notify;

    use super::*;
    use crate::crd::RelaySyncSpec;
    use crate::store::StoredRelaySync;
    use crate::store::memory::MemoryStore;

    /// A memory store whose status writes to `slow` wait for `release`, and which records
    /// the phase Events published.
    #[derive(Default)]
    struct SlowStore {
        inner: MemoryStore,
        release: Notify,
        events: Mutex<Vec<String>>,
        /// Like a worker's store in Kubernetes mode: objects leave it while it runs.
        hands_over: bool,
        departed: Mutex<Option<Instant>>,
        left: Mutex<BTreeSet<String>>,
        written: Mutex<Vec<(String, Instant)>>,
    }

    impl SlowStore {
        fn leave(&self, name: &str) {
            self.left.lock().unwrap().insert(name.to_string());
            *self.departed.lock().unwrap() = Some(Instant::now());
        }
    }

    impl RelaySyncStore for SlowStore {
        async fn list(&self) -> Result<Vec<StoredRelaySync>, StoreError> {
            self.inner.list().await
        }
        async fn get(&self, name: &str) -> Result<Option<StoredRelaySync>, StoreError> {
            self.inner.get(name).await
        }
        async fn apply_spec(
            &self,
            name: &str,
            spec: &RelaySyncSpec,
        ) -> Result<StoredRelaySync, StoreError> {
            self.inner.apply_spec(name, spec).await
        }
        async fn apply_status(
            &self,
            name: &str,
            status: &RelaySyncStatus,
        ) -> Result<(), StoreError> {
            if name == "slow" {
                self.release.notified().await;
            }
            self.written
                .lock()
                .unwrap()
                .push((name.to_string(), Instant::now()));
            self.inner.apply_status(name, status).await
        }
        async fn delete(&self, name: &str) -> Result<(), StoreError> {
            self.inner.delete(name).await
        }
        fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
            self.inner.changes()
        }
        fn hands_over(&self) -> bool {
            self.hands_over
        }
        fn last_departure(&self) -> Option<Instant> {
            *self.departed.lock().unwrap()
        }
        fn seen_leaving(&self, name: &str) -> bool {
            self.left.lock().unwrap().contains(name)
        }
        async fn record_phase(
            &self,
            name: &str,
            _from: Option<Phase>,
            _to: Phase,
            _note: Option<&str>,
        ) -> Result<bool, StoreError> {
            self.events.lock().unwrap().push(name.to_string());
            Ok(true)
        }
    }

    /// One object in `store` for each of `names`.
    async fn holding(store: &SlowStore, names: &[&str]) {
        for name in names {
            let spec = RelaySyncSpec {
                url: format!("wss://{name}.example"),
                ..RelaySyncSpec::default()
            };
            store.apply_spec(name, &spec).await.unwrap();
        }
    }

    fn live(name: &str) -> Write {
        Write {
            name: name.to_string(),
            status: RelaySyncStatus {
                phase: Some(Phase::Live),
                ..RelaySyncStatus::default()
            },
            kind: WriteKind::Report,
            event: Some(PhaseEvent {
                from: None,
                to: Phase::Live,
                note: None,
            }),
            decided_at: Instant::now(),
        }
    }

    /// A writer dropped with writes queued and in flight (its supervisor aborted after a lost
    /// Lease) writes nothing more, so no stale status lands over the next supervisor's.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_writer_writes_nothing_more() {
        let store = Arc::new(SlowStore {
            hands_over: true,
            ..SlowStore::default()
        });
        holding(&store, &["slow", "queued"]).await;
        let metrics = SupervisorMetrics::register(&Registry::new()).unwrap();
        let writer = StatusWriter::spawn(store.clone(), metrics, Duration::from_secs(60));
        let mut fin = live("queued");
        fin.kind = WriteKind::Final;
        assert!(writer.submit(live("slow")));
        assert!(writer.submit(fin));
        // The slow write is in flight, the final waits out its hold (a handover going on).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(store.written.lock().unwrap().is_empty());
        drop(writer);
        store.release.notify_one();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            store.written.lock().unwrap().is_empty(),
            "written after the writer was dropped: {:?}",
            store.written.lock().unwrap()
        );
        assert!(store.events.lock().unwrap().is_empty());
    }

    /// During a failover every write to the API server delays some relay's Live status: an
    /// Event for a status already written waits while another status write is pending.
    #[tokio::test(start_paused = true)]
    async fn phase_events_wait_while_status_writes_are_pending() {
        let store = Arc::new(SlowStore::default());
        holding(&store, &["fast", "slow"]).await;
        let metrics = SupervisorMetrics::register(&Registry::new()).unwrap();
        let mut writer = StatusWriter::spawn(store.clone(), metrics, Duration::from_secs(60));
        assert!(writer.submit(live("fast")));
        assert!(writer.submit(live("slow")));
        let first = writer.results.recv().await.unwrap();
        assert_eq!(
            (first.write.name.as_str(), first.result),
            ("fast", WriteResult::Ok)
        );
        // Far longer than the Events' pace: still held back by the pending write.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(store.events.lock().unwrap().is_empty());

        store.release.notify_one();
        let second = writer.results.recv().await.unwrap();
        assert_eq!(second.write.name, "slow");
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.events.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "the Events never went out");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let events = store.events.lock().unwrap().clone();
        assert_eq!(events, ["fast", "slow"]);
    }

    /// A stopping worker is being handed over: a backlog of Events (hundreds after a recent
    /// takeover) goes out at the usual pace for a short while and the rest is dropped, not
    /// flushed at once against the API server the handover needs, nor lingered on.
    #[tokio::test(start_paused = true)]
    async fn a_stop_does_not_flush_the_event_backlog_at_once() {
        let store = Arc::new(SlowStore::default());
        let registry = Registry::new();
        let metrics = SupervisorMetrics::register(&registry).unwrap();
        let mut writer =
            StatusWriter::spawn(store.clone(), metrics.clone(), Duration::from_secs(60));
        let n = 200;
        for i in 0..n {
            let name = format!("r{i}");
            let spec = RelaySyncSpec {
                url: format!("wss://{name}.example"),
                ..RelaySyncSpec::default()
            };
            store.apply_spec(&name, &spec).await.unwrap();
            assert!(writer.submit(live(&name)));
        }
        for _ in 0..n {
            writer.results.recv().await.unwrap();
        }
        let before = store.events.lock().unwrap().len();
        let t = Instant::now();
        writer.finish().await;
        let took = t.elapsed();
        let published = store.events.lock().unwrap().len();
        let on_stop = published - before;
        let at_pace = (EVENTS_PER_SECOND as f64 * EVENTS_FLUSH_WITHIN.as_secs_f64()) as usize + 1;
        assert!(on_stop <= at_pace, "{on_stop} Events published on a stop");
        assert!(on_stop > 0, "the stop published nothing");
        assert!(
            took <= EVENTS_FLUSH_WITHIN + Duration::from_millis(100),
            "{took:?}"
        );
        let dropped = metrics.phase_events.with_label_values(&["dropped"]).get();
        assert_eq!(
            dropped as usize,
            n - published,
            "what was not published is counted"
        );
    }

    /// A worker that stops is handed over meanwhile: its final statuses wait while its relays
    /// are leaving (a final whose relay left is skipped without a request), and the others
    /// are written once the moves have gone quiet.
    #[tokio::test(start_paused = true)]
    async fn final_statuses_wait_for_the_handover_to_go_quiet() {
        let store = Arc::new(SlowStore {
            hands_over: true,
            ..SlowStore::default()
        });
        let names: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
        for name in &names {
            let spec = RelaySyncSpec {
                url: format!("wss://{name}.example"),
                ..RelaySyncSpec::default()
            };
            store.apply_spec(name, &spec).await.unwrap();
        }
        let metrics = SupervisorMetrics::register(&Registry::new()).unwrap();
        let writer = StatusWriter::spawn(store.clone(), metrics, Duration::from_secs(60));
        let start = Instant::now();
        for name in &names {
            let mut w = live(name);
            w.kind = WriteKind::Final;
            w.decided_at = start;
            assert!(writer.submit(w));
        }
        // The controller moves r0..r7 over the next 1.6 s, one every 200 ms; r8 and r9
        // stay (their new holder is not there yet).
        let mover = {
            let store = store.clone();
            let names = names.clone();
            tokio::spawn(async move {
                for name in names.iter().take(8) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    store.leave(name);
                }
            })
        };
        let results = writer.finish().await;
        mover.await.unwrap();
        let written = store.written.lock().unwrap().clone();
        let names_written: BTreeSet<&str> = written.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names_written, BTreeSet::from(["r8", "r9"]), "{written:?}");
        let last_move = start + Duration::from_millis(1600);
        for (name, at) in &written {
            assert!(
                *at >= last_move + FINALS_QUIET,
                "{name} written {:?} after the stop, during the moves",
                *at - start
            );
        }
        let refused = results
            .iter()
            .filter(|w| w.result == WriteResult::Refused)
            .count();
        assert_eq!(refused, 8, "the moved relays' finals are skipped");
    }

    /// A store whose relays are never handed over (standalone) writes its finals at once.
    #[tokio::test(start_paused = true)]
    async fn final_statuses_are_not_held_where_nothing_is_handed_over() {
        let store = Arc::new(SlowStore::default());
        let spec = RelaySyncSpec {
            url: "wss://a.example".to_string(),
            ..RelaySyncSpec::default()
        };
        store.apply_spec("a", &spec).await.unwrap();
        let metrics = SupervisorMetrics::register(&Registry::new()).unwrap();
        let writer = StatusWriter::spawn(store.clone(), metrics, Duration::from_secs(60));
        let start = Instant::now();
        let mut w = live("a");
        w.kind = WriteKind::Final;
        assert!(writer.submit(w));
        writer.finish().await;
        let written = store.written.lock().unwrap().clone();
        assert_eq!(written.len(), 1);
        assert!(
            written[0].1 - start < Duration::from_millis(10),
            "{written:?}"
        );
    }
}
