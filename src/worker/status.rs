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
    not_connected(
        &mut status,
        RELEASED,
        [
            (ASSIGNED, format!("released by {worker} for reassignment")),
            (CONNECTED, format!("session closed by {worker}")),
            (READY, String::new()),
        ],
        generation,
        now,
    );
    status
}

/// `Pending` with no subscriptions, and each of `set` (type, message) False for
/// `reason`: a status that no longer claims a connection.
fn not_connected<const N: usize>(
    status: &mut RelaySyncStatus,
    reason: &str,
    set: [(&str, String); N],
    generation: i64,
    now: SystemTime,
) {
    let now_t = time(now).unwrap_or(Time(Timestamp::UNIX_EPOCH));
    status.phase = Some(Phase::Pending);
    status.subscriptions = Some(0);
    for (kind, msg) in set {
        conditions::set_condition(
            &mut status.conditions,
            conditions::condition(
                kind,
                ConditionStatus::False,
                reason,
                msg,
                now_t.clone(),
                Some(generation),
            ),
        );
    }
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
    not_connected(
        &mut status,
        "WorkerStopped",
        [
            (CONNECTED, format!("{worker} stopped; waiting for a worker")),
            (READY, String::new()),
        ],
        generation,
        now,
    );
    status
}

/// Progress alone is written once per this many status intervals (6 min at the default
/// 30 s, so a busy relay costs at most 1/6 of a write a minute): on a busy relay it moves with every event — the cursor, the event counters, the
/// last reconciliation, the confirmed roots of new issues and patches with their counts and
/// subscriptions — and writing it each interval would be a steady write load per relay.
/// Holding it back costs little: a resume re-reads `cursor - slack` and fetches roots the
/// stored digest does not vouch for in full, and the counters are live in the metrics.
pub const PROGRESS_INTERVALS: u32 = 12;

/// Whether `a` and `b` differ in progress only. A first cursor, a phase, a condition's
/// status or reason, an error, a generation are news.
fn only_progress_moved(a: &RelaySyncStatus, b: &RelaySyncStatus) -> bool {
    let strip = |s: &RelaySyncStatus| RelaySyncStatus {
        cursor: s.cursor.map(|_| 0),
        events_published: None,
        events_rejected: None,
        last_reconciled: None,
        confirmed_roots_digest: s.confirmed_roots_digest.as_ref().map(|_| String::new()),
        subscriptions: None,
        conditions: s
            .conditions
            .iter()
            .map(|c| crate::crd::Condition {
                message: String::new(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                ..c.clone()
            })
            .collect(),
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
    /// Since when a Live relay has been back in `Syncing`.
    syncing_since: Option<Instant>,
    /// When this worker first reported on the relay (before its first write).
    first_seen: Option<Instant>,
}

/// A relay this worker has just taken (a failover moves hundreds at once) gets its first
/// status once it is Live, or after this long: one write (and one Event) instead of one for
/// `Connecting` and another a moment later for `Live`, when the API server is busiest.
pub const FIRST_WRITE_HOLD: Duration = Duration::from_secs(2);

/// A Live relay that goes back to `Syncing` — its set changed: a new issue or patch is a new
/// root whose thread is fetched, usually within a second — is reported only once it stays
/// there this long (or one status interval, if shorter): on a busy relay every new root
/// would otherwise cost two status writes and two Events.
pub const SYNCING_HOLD: Duration = Duration::from_secs(10);

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Coalescer {
            interval,
            last: None,
            syncing_since: None,
            first_seen: None,
        }
    }

    /// Whether `status` should be written now (asked every pass: it keeps track of how long
    /// a relay has been back in `Syncing`).
    pub fn due(&mut self, status: &RelaySyncStatus, now: Instant) -> bool {
        let back_to_syncing = self.last.as_ref().is_some_and(|(last, _)| {
            last.phase == Some(Phase::Live) && status.phase == Some(Phase::Syncing)
        });
        if !back_to_syncing {
            self.syncing_since = None;
        }
        match &self.last {
            None => {
                let since = *self.first_seen.get_or_insert(now);
                status.phase == Some(Phase::Live)
                    || now.saturating_duration_since(since) >= FIRST_WRITE_HOLD.min(self.interval)
            }
            Some(_) if back_to_syncing => {
                let since = *self.syncing_since.get_or_insert(now);
                now.saturating_duration_since(since) >= SYNCING_HOLD.min(self.interval)
            }
            Some((last, _)) if last.phase != status.phase => true,
            // A spec generation fully synced: what the next holder resumes from.
            Some((last, _)) if last.confirmed_generation != status.confirmed_generation => true,
            Some((last, _)) if last == status => false,
            Some((last, at)) if only_progress_moved(last, status) => {
                now.saturating_duration_since(*at) >= self.interval * PROGRESS_INTERVALS
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
        self.syncing_since = None;
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
        // The first status: at once when Live, else once FIRST_WRITE_HOLD passed.
        assert!(!c.due(&a, t0 - Duration::from_secs(2)));
        assert!(!c.due(&a, t0 - Duration::from_secs(1)));
        assert!(c.due(&a, t0));
        assert!(Coalescer::new(Duration::from_secs(30)).due(
            &status_from_session(&state(Phase::Live), "w0", 1, None, now),
            t0
        ));
        c.written(a.clone(), t0);
        assert!(!c.due(&a, t0 + Duration::from_secs(60)), "unchanged: never");
        let mut b = a.clone();
        b.last_error = Some("a relay notice".into());
        b.confirmed_roots_digest = Some("one".into());
        assert!(!c.due(&b, t0 + Duration::from_secs(5)));
        assert!(c.due(&b, t0 + Duration::from_secs(30)));
        c.written(b.clone(), t0);
        // Progress alone (counters, a cursor following the clock): once per
        // PROGRESS_INTERVALS intervals, not every interval.
        let mut idle = b.clone();
        idle.cursor = b.cursor.map(|c| c + 60);
        idle.events_published = Some(10);
        idle.events_rejected = Some(1);
        idle.subscriptions = Some(7);
        idle.confirmed_roots_digest = Some("another".into());
        if let Some(c) = idle.conditions.first_mut() {
            c.message = "4/4 repos, 9/9 root events confirmed".into();
        }
        assert!(!c.due(&idle, t0 + Duration::from_secs(120)));
        assert!(!c.due(&idle, t0 + Duration::from_secs(359)));
        assert!(c.due(&idle, t0 + Duration::from_secs(360)));
        // A first cursor is news.
        let mut first = b.clone();
        first.cursor = None;
        c.written(first.clone(), t0);
        assert!(c.due(&b, t0 + Duration::from_secs(30)));
        let live = status_from_session(&state(Phase::Live), "w0", 1, Some(&a), now);
        assert!(
            c.due(&live, t0 + Duration::from_secs(1)),
            "phase change: at once"
        );
        // Back from Live to Syncing (a new root's thread): only once it stays there.
        c.written(live.clone(), t0);
        let syncing = status_from_session(&state(Phase::Syncing), "w0", 1, Some(&live), now);
        assert!(!c.due(&syncing, t0 + Duration::from_secs(1)));
        assert!(!c.due(&syncing, t0 + Duration::from_secs(10)));
        assert!(c.due(&syncing, t0 + Duration::from_secs(11)), "held 10 s");
        // Live again before anything was written: nothing to write at all, and the next
        // return to Syncing is held afresh.
        assert!(!c.due(&live, t0 + Duration::from_secs(20)), "unchanged");
        assert!(!c.due(&syncing, t0 + Duration::from_secs(21)));
        assert!(!c.due(&syncing, t0 + Duration::from_secs(22)));
        // Other phases are news at once.
        let backoff = status_from_session(&state(Phase::Backoff), "w0", 1, Some(&live), now);
        assert!(c.due(&backoff, t0 + Duration::from_secs(22)));
    }
}
