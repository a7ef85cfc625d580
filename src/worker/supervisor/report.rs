//! The pure step of status reporting: from the objects, the sessions' states and the
//! coalescers, which status writes are due now. The writer applies them.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use tokio::time::Instant;

use super::SupervisorConfig;
use super::sessions::{Held, Sessions};
use super::writer::{PhaseEvent, Write, WriteKind};
use crate::crd::Phase;
use crate::worker::session::SessionState;
use crate::worker::status::{Coalescer, status_from_session};

/// The phase each object is in, as this worker sees it (for the per-phase gauge).
pub(crate) fn phases(held: Held<'_>, sessions: &Sessions) -> HashMap<Phase, i64> {
    let Held { objects, urls } = held;
    let mut by_phase: HashMap<Phase, i64> = HashMap::new();
    for o in objects.values() {
        let phase =
            urls.of(o)
                .and_then(|u| sessions.phase(&u))
                .unwrap_or(if o.spec.paused == Some(true) {
                    Phase::Paused
                } else {
                    Phase::Pending
                });
        *by_phase.entry(phase).or_default() += 1;
    }
    by_phase
}

/// The status writes due at `now`, skipping objects with a write in flight (their result
/// decides the coalescer's next step).
pub(crate) fn due(
    config: &SupervisorConfig,
    held: Held<'_>,
    sessions: &Sessions,
    coalescers: &mut HashMap<String, Coalescer>,
    in_flight: &BTreeSet<String>,
    now: Instant,
    wall: SystemTime,
) -> Vec<Write> {
    let Held { objects, urls } = held;
    coalescers.retain(|name, _| objects.contains_key(name));
    let mut out = Vec::new();
    for (name, o) in objects.iter().filter(|(_, o)| !o.draining) {
        if in_flight.contains(name) {
            continue;
        }
        let Some(url) = urls.of(o) else {
            continue;
        };
        let state = match sessions.state_for(&url, o) {
            Some(state) => state,
            None if o.spec.paused == Some(true) => SessionState {
                phase: Phase::Paused,
                ..SessionState::default()
            },
            None => continue,
        };
        let status = status_from_session(
            &state,
            &config.worker,
            o.generation,
            o.status.as_ref(),
            wall,
        );
        let c = coalescers
            .entry(name.clone())
            .or_insert_with(|| Coalescer::new(config.status_interval));
        if c.due(&status, now.into_std()) {
            tracing::debug!(object = %name, changed = ?c.changes(&status), "writing status");
            let from = c
                .last_phase()
                .or_else(|| o.status.as_ref().and_then(|s| s.phase));
            let event = status
                .phase
                .filter(|p| Some(*p) != from)
                .map(|to| PhaseEvent {
                    from,
                    to,
                    note: state.last_error.clone(),
                });
            out.push(Write {
                name: name.clone(),
                status,
                kind: WriteKind::Report,
                event,
                decided_at: now,
            });
        }
    }
    out
}
