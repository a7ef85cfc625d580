//! Drains: a relay moving to another worker. Its session is closed in a task of its own,
//! awaited (never detached) before every part is acknowledged with its final status, so two
//! workers never hold one relay's connection.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::sessions::{Given, Held};
use super::writer::{PhaseEvent, StatusWriter, Write, WriteKind};
use super::{State, SupervisorConfig, sessions, submit};
use crate::crd::Phase;
use crate::nostr::RelayUrl;
use crate::store::StoredRelaySync;
use crate::worker::session::SessionState;
use crate::worker::status::released_status;

/// A draining session still closing after this long is worth a warning (it is never
/// acknowledged while its connection might still be open).
const DRAIN_STOP_WARN: Duration = Duration::from_secs(10);

/// A draining session's stop, running in its own task so the loop never waits on it.
pub(super) struct Stopping {
    pub(super) task: tokio::task::JoinHandle<SessionState>,
    /// What the session had been given, to judge which specs its final state speaks for.
    given: Given,
    since: Instant,
    warned: bool,
}

/// Close the sessions of relays whose every part is draining and, once a session's task has
/// ended, acknowledge each part with its final status. True when a relay's closed session
/// was forgotten because its drain ended without us (cancelled, or moved on): if the relay
/// is still ours, its session is due again.
pub(super) async fn release_drained(
    config: &SupervisorConfig,
    st: &mut State,
    writer: &StatusWriter,
) -> bool {
    // This runs on every pass of the loop; drains are rare.
    if st.stopping.is_empty() && !st.objects.values().any(|o| o.draining) {
        st.released.clear();
        st.stopped.clear();
        return false;
    }
    st.released
        .retain(|name| st.objects.get(name).is_some_and(|o| o.draining));
    let mut decided = Vec::new();
    let due = sessions::drains_due(
        Held::new(&st.objects, &st.urls),
        &st.released,
        &config.worker,
    );
    let due_urls: BTreeSet<RelayUrl> = due.iter().map(|(url, _)| url.clone()).collect();
    // A stop whose drain is no longer due (the controller cancelled it, or the relay moved
    // on) would otherwise stay in `stopping`, and the relay held off, for good.
    let before = st.stopping.len();
    st.stopping
        .retain(|url, s| due_urls.contains(url) || !s.task.is_finished());
    let forgot = st.stopping.len() != before;
    for (url, pending) in due {
        let pending: Vec<&StoredRelaySync> = pending
            .into_iter()
            .filter(|o| !st.in_flight.contains(&o.name))
            .collect();
        if pending.is_empty() {
            continue;
        }
        if let Some(r) = st.sessions.running.remove(&url) {
            tracing::info!(relay = %url, "draining: closing the session for reassignment");
            st.stopping.insert(
                url.clone(),
                Stopping {
                    task: tokio::spawn(r.control.stop()),
                    given: r.given,
                    since: Instant::now(),
                    warned: false,
                },
            );
        }
        if let Some(s) = st.stopping.get_mut(&url) {
            if !s.task.is_finished() {
                if !s.warned && s.since.elapsed() >= DRAIN_STOP_WARN {
                    s.warned = true;
                    tracing::warn!(relay = %url, "session did not stop in time; not releasing yet");
                }
                continue;
            }
            if let Some(s) = st.stopping.remove(&url) {
                // A session task that panicked is gone with its connection: released with
                // the stored status.
                let given = s.given;
                st.stopped
                    .insert(url.clone(), s.task.await.ok().map(|state| (state, given)));
            }
        }
        let stopped = st.stopped.get(&url).and_then(|s| s.as_ref());
        for o in pending {
            let state = stopped.map(|(state, given)| given.state_for(state, o));
            let status = released_status(
                state.as_ref(),
                &config.worker,
                o.generation,
                o.status.as_ref(),
                SystemTime::now(),
            );
            decided.push(Write {
                name: o.name.clone(),
                status,
                kind: WriteKind::Release,
                event: Some(PhaseEvent {
                    from: o.status.as_ref().and_then(|s| s.phase),
                    to: Phase::Pending,
                    note: Some("released for reassignment".into()),
                }),
                decided_at: Instant::now(),
            });
        }
    }
    for w in decided {
        submit(st, writer, w);
    }
    // Keep a drained session's final state only while one of its parts still drains.
    let draining: BTreeSet<RelayUrl> = Held::new(&st.objects, &st.urls)
        .by_url()
        .into_iter()
        .filter(|(_, parts)| parts.iter().all(|o| o.draining))
        .map(|(url, _)| url)
        .collect();
    st.stopped.retain(|url, _| draining.contains(url));
    forgot
}
