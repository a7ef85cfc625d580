//! From a session's state to the RelaySync status a worker writes, and when to write it:
//! at once on a phase change, otherwise at most once per interval (status writes are API
//! server load multiplied by every relay).

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::session::SessionState;
use crate::crd::conditions::{self, ASSIGNED, CONNECTED, HISTORIC_SYNCED, READY};
#[cfg(test)]
use crate::crd::is_released_by;
use crate::crd::{ConditionStatus, Phase, RELEASED, RelaySyncStatus};

fn time(t: SystemTime) -> Option<Time> {
    Timestamp::try_from(t).ok().map(Time)
}

/// The status for one object whose relay session is in `state`. `previous` carries the
/// conditions' transition times forward.
pub fn status_from_session(
    state: &SessionState,
    worker: &str,
    generation: i64,
    previous: Option<&RelaySyncStatus>,
    now: SystemTime,
) -> RelaySyncStatus {
    let now_t = time(now).unwrap_or(Time(Timestamp::UNIX_EPOCH));
    let connected = matches!(
        state.phase,
        Phase::Syncing | Phase::Live | Phase::LiveWithGaps
    );
    let historic_done = !state.set_pending
        && state.repos == state.confirmed_repos
        && state.roots == state.confirmed_roots;
    let live = state.phase == Phase::Live;
    let mut conds = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let g = Some(generation);
    let flag = |b: bool| {
        if b {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    };
    conditions::set_condition(
        &mut conds,
        conditions::condition(
            ASSIGNED,
            ConditionStatus::True,
            "Assigned",
            format!("held by {worker}"),
            now_t.clone(),
            g,
        ),
    );
    conditions::set_condition(
        &mut conds,
        conditions::condition(
            CONNECTED,
            flag(connected),
            state.phase.as_str(),
            state.last_error.clone().unwrap_or_default(),
            now_t.clone(),
            g,
        ),
    );
    conditions::set_condition(
        &mut conds,
        conditions::condition(
            HISTORIC_SYNCED,
            flag(historic_done && connected),
            if historic_done {
                "Confirmed"
            } else {
                "Pending"
            },
            format!(
                "{}/{} repos, {}/{} root events confirmed",
                state.confirmed_repos, state.repos, state.confirmed_roots, state.roots
            ),
            now_t.clone(),
            g,
        ),
    );
    conditions::set_condition(
        &mut conds,
        conditions::condition(READY, flag(live), state.phase.as_str(), "", now_t, g),
    );
    let confirmed_generation = if historic_done && connected {
        Some(generation)
    } else {
        previous.and_then(|p| p.confirmed_generation)
    };
    RelaySyncStatus {
        worker: Some(worker.to_string()),
        observed_generation: Some(generation),
        phase: Some(state.phase),
        last_connected: state.last_connected.and_then(time),
        last_reconciled: state
            .last_reconciled
            .and_then(time)
            .or_else(|| previous.and_then(|p| p.last_reconciled.clone())),
        last_disconnected: state.last_disconnected.and_then(time),
        consecutive_failures: Some(state.consecutive_failures),
        next_retry_at: state.next_retry_at.and_then(time),
        last_error: state
            .last_error
            .as_ref()
            .map(|e| e.chars().take(1000).collect()),
        repos: Some(state.repos as u32),
        confirmed_generation,
        confirmed_repos: Some(state.confirmed_repos as u32),
        cursor: state.cursor.map(|c| c as i64),
        confirmed_roots_digest: state
            .confirmed_roots_digest
            .clone()
            .or_else(|| previous.and_then(|p| p.confirmed_roots_digest.clone())),
        capabilities: Some(state.capabilities.clone()),
        subscriptions: Some(state.subscriptions as u32),
        events_published: Some(state.events_published),
        events_rejected: Some(state.events_rejected),
        conditions: conds,
    }
}

/// The final status a draining worker writes once its session is closed: the cursor and
/// confirmation stay (the next worker resumes from them), and `Assigned=False/Released` tells
/// the controller it may move the label.
/// Without a session (it never started here), the previous status is kept as it was.
pub fn released_status(
    state: Option<&SessionState>,
    worker: &str,
    generation: i64,
    previous: Option<&RelaySyncStatus>,
    now: SystemTime,
) -> RelaySyncStatus {
    let mut status = match state {
        Some(state) => status_from_session(state, worker, generation, previous, now),
        None => RelaySyncStatus {
            worker: Some(worker.to_string()),
            observed_generation: Some(generation),
            ..previous.cloned().unwrap_or_default()
        },
    };
    let now_t = time(now).unwrap_or(Time(Timestamp::UNIX_EPOCH));
    let g = Some(generation);
    status.phase = Some(Phase::Pending);
    status.subscriptions = Some(0);
    for (kind, msg) in [
        (ASSIGNED, format!("released by {worker} for reassignment")),
        (CONNECTED, format!("session closed by {worker}")),
        (READY, String::new()),
    ] {
        conditions::set_condition(
            &mut status.conditions,
            conditions::condition(
                kind,
                ConditionStatus::False,
                RELEASED,
                msg,
                now_t.clone(),
                g,
            ),
        );
    }
    status
}

/// The last status of a relay whose worker stopped gracefully (SIGTERM): the cursor and
/// counters stay, but it no longer claims to be connected — nobody syncs the relay until a
/// worker (the same one coming back, or the next owner) picks it up. Still assigned: this
/// is not a drain's acknowledgement.
pub fn stopped_status(
    state: &SessionState,
    worker: &str,
    generation: i64,
    previous: Option<&RelaySyncStatus>,
    now: SystemTime,
) -> RelaySyncStatus {
    let mut status = status_from_session(state, worker, generation, previous, now);
    let now_t = time(now).unwrap_or(Time(Timestamp::UNIX_EPOCH));
    status.phase = Some(Phase::Pending);
    status.subscriptions = Some(0);
    for (kind, msg) in [
        (CONNECTED, format!("{worker} stopped; waiting for a worker")),
        (READY, String::new()),
    ] {
        conditions::set_condition(
            &mut status.conditions,
            conditions::condition(
                kind,
                ConditionStatus::False,
                "WorkerStopped",
                msg,
                now_t.clone(),
                Some(generation),
            ),
        );
    }
    status
}

/// A cursor that moved less than this (and nothing else changed) is not worth a write.
pub const CURSOR_STEP_SECS: i64 = 300;

fn only_cursor_moved(a: &RelaySyncStatus, b: &RelaySyncStatus) -> bool {
    let strip = |s: &RelaySyncStatus| RelaySyncStatus {
        cursor: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}

/// Top-level status fields that differ between `a` and `b` (for logs).
pub fn changed_fields(a: &RelaySyncStatus, b: &RelaySyncStatus) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Decides when a status is worth writing.
#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    last: Option<(RelaySyncStatus, Instant)>,
}

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Coalescer {
            interval,
            last: None,
        }
    }

    /// Whether `status` should be written now.
    pub fn due(&self, status: &RelaySyncStatus, now: Instant) -> bool {
        match &self.last {
            None => true,
            Some((last, _)) if last.phase != status.phase => true,
            Some((last, _)) if last == status => false,
            // An idle live relay's cursor follows the clock. A resume re-reads
            // `cursor - slack` anyway, so a cursor a few minutes old costs little, while
            // writing it every interval would be a steady write load per relay.
            Some((last, _))
                if only_cursor_moved(last, status)
                    && status
                        .cursor
                        .zip(last.cursor)
                        .is_some_and(|(new, old)| new.saturating_sub(old) < CURSOR_STEP_SECS) =>
            {
                false
            }
            Some((_, at)) => now.saturating_duration_since(*at) >= self.interval,
        }
    }

    /// The phase last written, if any.
    pub fn last_phase(&self) -> Option<Phase> {
        self.last.as_ref().and_then(|(s, _)| s.phase)
    }

    /// What changed since the last write (for logs).
    pub fn changes(&self, status: &RelaySyncStatus) -> Vec<String> {
        match &self.last {
            Some((last, _)) => changed_fields(last, status),
            None => vec!["(first write)".into()],
        }
    }

    pub fn written(&mut self, status: RelaySyncStatus, now: Instant) {
        self.last = Some((status, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(phase: Phase) -> SessionState {
        SessionState {
            phase,
            repos: 3,
            confirmed_repos: 3,
            roots: 2,
            confirmed_roots: 2,
            cursor: Some(1_700_000_000),
            ..SessionState::default()
        }
    }

    #[test]
    fn live_session_is_ready_and_confirmed() {
        let s = status_from_session(&state(Phase::Live), "w0", 4, None, SystemTime::now());
        assert_eq!(s.phase, Some(Phase::Live));
        assert_eq!(s.confirmed_generation, Some(4));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(s.cursor, Some(1_700_000_000));
        let ready = s.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.status, ConditionStatus::True);
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(4))
        );
        assert_eq!(s.conditions.len(), 4);
    }

    #[test]
    fn confirmed_generation_is_kept_until_the_new_one_is_confirmed() {
        let t = SystemTime::now();
        let live = status_from_session(&state(Phase::Live), "w0", 4, None, t);
        let mut syncing = state(Phase::Syncing);
        syncing.confirmed_repos = 1;
        let s = status_from_session(&syncing, "w0", 5, Some(&live), t);
        assert_eq!(s.confirmed_generation, Some(4));
        let hs = s
            .conditions
            .iter()
            .find(|c| c.type_ == HISTORIC_SYNCED)
            .unwrap();
        assert_eq!(hs.status, ConditionStatus::False);
        assert!(hs.message.contains("1/3 repos"));
    }

    #[test]
    fn released_status_keeps_the_cursor_and_acknowledges_the_drain() {
        let t = SystemTime::now();
        let live = status_from_session(&state(Phase::Live), "w0", 4, None, t);
        assert!(!is_released_by(Some(&live), "w0"));
        let r = released_status(Some(&state(Phase::Live)), "w0", 4, Some(&live), t);
        assert_eq!(r.phase, Some(Phase::Pending));
        assert_eq!(r.cursor, Some(1_700_000_000));
        assert_eq!(r.confirmed_generation, Some(4));
        assert!(is_released_by(Some(&r), "w0"));
        assert!(
            !is_released_by(Some(&r), "w1"),
            "only the holder's ack counts"
        );
        // The next worker's first status clears the acknowledgement.
        let next = status_from_session(&state(Phase::Syncing), "w1", 4, Some(&r), t);
        assert!(!is_released_by(Some(&next), "w1"));
        assert!(!is_released_by(Some(&next), "w0"));
        // Released without a session of its own: the stored cursor survives.
        let r2 = released_status(None, "w2", 4, Some(&live), t);
        assert_eq!(r2.cursor, Some(1_700_000_000));
        assert!(is_released_by(Some(&r2), "w2"));
    }

    #[test]
    fn a_stopped_worker_s_last_status_keeps_the_cursor_but_claims_no_connection() {
        let t = SystemTime::now();
        let live = status_from_session(&state(Phase::Live), "w0", 4, None, t);
        let s = stopped_status(&state(Phase::Live), "w0", 4, Some(&live), t);
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(s.cursor, live.cursor);
        assert_eq!(s.confirmed_generation, Some(4));
        for kind in [CONNECTED, READY] {
            let c = s.conditions.iter().find(|c| c.type_ == kind).unwrap();
            assert_eq!(c.status, ConditionStatus::False, "{kind}");
        }
        // Still held: not mistaken for a drain's acknowledgement.
        assert!(!is_released_by(Some(&s), "w0"));
    }

    #[test]
    fn writes_phase_changes_at_once_and_the_rest_per_interval() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::from_secs(30));
        let now = SystemTime::now();
        let a = status_from_session(&state(Phase::Syncing), "w0", 1, None, now);
        assert!(c.due(&a, t0));
        c.written(a.clone(), t0);
        assert!(!c.due(&a, t0 + Duration::from_secs(60)), "unchanged: never");
        let mut b = a.clone();
        b.events_published = Some(10);
        assert!(!c.due(&b, t0 + Duration::from_secs(5)));
        assert!(c.due(&b, t0 + Duration::from_secs(30)));
        // An idle relay whose cursor alone follows the clock: written once it moved
        // CURSOR_STEP_SECS, not every interval.
        let mut idle = b.clone();
        idle.cursor = b.cursor.map(|c| c + 60);
        c.written(b.clone(), t0);
        assert!(!c.due(&idle, t0 + Duration::from_secs(120)));
        idle.cursor = b.cursor.map(|c| c + CURSOR_STEP_SECS);
        assert!(c.due(&idle, t0 + Duration::from_secs(120)));
        let live = status_from_session(&state(Phase::Live), "w0", 1, Some(&a), now);
        assert!(
            c.due(&live, t0 + Duration::from_secs(1)),
            "phase change: at once"
        );
    }
}
