//! The running sessions of a worker, one per relay URL (the split parts of one relay share
//! it), and how the RelaySyncs it holds map onto them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::facts::RepoFacts;
use crate::crd::Phase;
use crate::nostr::root_digest::RootDigest;
use crate::nostr::{RelayUrl, RepoCoordinate};
use crate::store::StoredRelaySync;
use crate::worker::publisher::Publisher;
use crate::worker::session::metrics::SessionMetrics;
use crate::worker::session::{self, Resume, SessionConfig, SessionHandle, SessionState, SyncSet};

/// What the supervisor needs of a running session.
pub(crate) trait SessionControl: Send + Sync {
    /// Replace what the session syncs; returns the hand-over's sequence number, which the
    /// session's state reports back (`applied_set`) once applied.
    fn set(&self, set: SyncSet) -> u64;
    fn state(&self) -> watch::Receiver<SessionState>;
    /// Stop without waiting.
    fn abort_soon(&self);
    /// Close subscriptions and connection; the final state once the task has ended.
    fn stop(self: Box<Self>) -> BoxFuture<'static, SessionState>;
    /// The task has ended without being stopped (it panicked).
    fn has_ended(&self) -> bool;
}

impl SessionControl for SessionHandle {
    fn set(&self, set: SyncSet) -> u64 {
        SessionHandle::set(self, set)
    }
    fn state(&self) -> watch::Receiver<SessionState> {
        SessionHandle::state(self)
    }
    fn abort_soon(&self) {
        SessionHandle::abort_soon(self)
    }
    fn stop(self: Box<Self>) -> BoxFuture<'static, SessionState> {
        SessionHandle::stop(*self).boxed()
    }
    fn has_ended(&self) -> bool {
        SessionHandle::has_ended(self)
    }
}

/// Starts sessions: the real relay sessions in a worker, scripted ones in the supervisor's
/// unit tests.
pub(crate) trait SessionStarter: Send + Sync {
    fn start(&self, url: RelayUrl, set: SyncSet, resume: Resume) -> Box<dyn SessionControl>;
}

/// Relay sessions publishing into the local relay through `publisher`.
pub(crate) struct RelaySessions {
    pub(crate) config: SessionConfig,
    pub(crate) publisher: Publisher,
    pub(crate) metrics: SessionMetrics,
}

impl SessionStarter for RelaySessions {
    fn start(&self, url: RelayUrl, set: SyncSet, resume: Resume) -> Box<dyn SessionControl> {
        Box::new(session::spawn(
            url,
            set,
            resume,
            self.config.clone(),
            self.publisher.clone(),
            self.metrics.clone(),
        ))
    }
}

pub(crate) struct Running {
    pub(crate) control: Box<dyn SessionControl>,
    pub(crate) state: watch::Receiver<SessionState>,
    pub(crate) set: SyncSet,
    pub(crate) given: Given,
}

/// What a session was last given: the hand-over number of its set, and the generation of
/// each part (object) that set was built from.
#[derive(Debug, Clone, Default)]
pub(crate) struct Given {
    pub(crate) set: u64,
    pub(crate) generations: BTreeMap<String, i64>,
}

impl Given {
    /// `state` as it may be reported for `o`: while the session has not applied the last set
    /// handed to it, or that set was built from an older spec of `o`, it says nothing about
    /// `o`'s current spec being confirmed.
    pub(crate) fn state_for(&self, state: &SessionState, o: &StoredRelaySync) -> SessionState {
        let mut s = state.clone();
        s.set_pending =
            state.applied_set < self.set || self.generations.get(&o.name) != Some(&o.generation);
        s
    }
}

/// First wait before a dead session is started again; it doubles with each death of the
/// same relay's session, up to [`RESTART_MAX`].
pub(crate) const RESTART_BASE: Duration = Duration::from_secs(1);
pub(crate) const RESTART_MAX: Duration = Duration::from_secs(300);

/// A relay whose session task ended without being stopped (it panicked).
pub(crate) struct Restart {
    pub(crate) attempts: u32,
    pub(crate) not_before: Instant,
    /// What to report until the new session runs: the last state, in `Backoff`.
    pub(crate) state: SessionState,
    /// No new session started yet.
    pub(crate) waiting: bool,
}

/// A worker's sessions: those running, and those waiting to be started again.
#[derive(Default)]
pub(crate) struct Sessions {
    pub(crate) running: HashMap<RelayUrl, Running>,
    pub(crate) restarts: HashMap<RelayUrl, Restart>,
}

impl Sessions {
    /// The state to report for `o` (of relay `url`), if it has a session.
    pub(crate) fn state_for(&self, url: &RelayUrl, o: &StoredRelaySync) -> Option<SessionState> {
        match self.running.get(url) {
            Some(r) => Some(r.given.state_for(&r.state.borrow(), o)),
            None => self
                .restarts
                .get(url)
                .filter(|r| r.waiting)
                .map(|r| SessionState {
                    set_pending: true,
                    ..r.state.clone()
                }),
        }
    }

    pub(crate) fn phase(&self, url: &RelayUrl) -> Option<Phase> {
        match self.running.get(url) {
            Some(r) => Some(r.state.borrow().phase),
            None => self
                .restarts
                .get(url)
                .filter(|r| r.waiting)
                .map(|r| r.state.phase),
        }
    }

    /// Take out the sessions whose task has ended on its own and schedule their restart with
    /// a growing delay; their last state is reported meanwhile. Returns how many died.
    pub(crate) fn reap(&mut self, now: Instant, wall: SystemTime) -> usize {
        let dead: Vec<RelayUrl> = self
            .running
            .iter()
            .filter(|(_, r)| r.control.has_ended())
            .map(|(url, _)| url.clone())
            .collect();
        for url in &dead {
            let Some(r) = self.running.remove(url) else {
                continue;
            };
            let attempts = self.restarts.get(url).map_or(0, |x| x.attempts) + 1;
            let delay = RESTART_BASE
                .saturating_mul(1 << (attempts - 1).min(16))
                .min(RESTART_MAX);
            let mut state = r.state.borrow().clone();
            state.phase = Phase::Backoff;
            state.subscriptions = 0;
            state.last_disconnected = Some(wall);
            state.next_retry_at = Some(wall + delay);
            state.last_error = Some("the session task ended unexpectedly; restarting".into());
            tracing::error!(relay = %url, attempts, ?delay, "session task ended unexpectedly; restarting it");
            self.restarts.insert(
                url.clone(),
                Restart {
                    attempts,
                    not_before: now + delay,
                    state,
                    waiting: true,
                },
            );
        }
        dead.len()
    }

    /// Relays whose restart is still waiting at `now`.
    pub(crate) fn held_off(&self, now: Instant) -> BTreeSet<RelayUrl> {
        self.restarts
            .iter()
            .filter(|(_, r)| r.waiting && r.not_before > now)
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// A restart is due: a pass of `reconcile_sessions` should run.
    pub(crate) fn restart_due(&self, now: Instant) -> bool {
        self.restarts
            .values()
            .any(|r| r.waiting && r.not_before <= now)
    }
}

/// The relay URLs of the held objects, parsed once per spec text. The supervisor's steps
/// run on every wake-up of its loop — each status write's result, each local event — and
/// parsing (normalising, IDNA) every held object's URL on each was most of a worker's CPU
/// while it took over hundreds of relays.
#[derive(Debug, Default)]
pub(crate) struct Urls(HashMap<String, Option<RelayUrl>>);

impl Urls {
    /// Parse what `objects` added; forget what they no longer hold.
    pub(crate) fn refresh(&mut self, objects: &BTreeMap<String, StoredRelaySync>) {
        let mut next = HashMap::with_capacity(objects.len());
        for o in objects.values() {
            if next.contains_key(&o.spec.url) {
                continue;
            }
            let parsed = self
                .0
                .remove(&o.spec.url)
                .unwrap_or_else(|| RelayUrl::parse(&o.spec.url).ok());
            next.insert(o.spec.url.clone(), parsed);
        }
        self.0 = next;
    }

    /// The relay of `o`; None if its URL is not one (the store validates it, so never in
    /// practice). An object not seen by `refresh` is parsed on the spot.
    pub(crate) fn of(&self, o: &StoredRelaySync) -> Option<RelayUrl> {
        match self.0.get(&o.spec.url) {
            Some(parsed) => parsed.clone(),
            None => RelayUrl::parse(&o.spec.url).ok(),
        }
    }
}

/// The objects a worker holds, with their relays.
#[derive(Clone, Copy)]
pub(crate) struct Held<'a> {
    pub(crate) objects: &'a BTreeMap<String, StoredRelaySync>,
    pub(crate) urls: &'a Urls,
}

impl<'a> Held<'a> {
    pub(crate) fn new(objects: &'a BTreeMap<String, StoredRelaySync>, urls: &'a Urls) -> Self {
        Held { objects, urls }
    }

    /// The objects by relay (the split parts of one relay together).
    pub(crate) fn by_url(self) -> BTreeMap<RelayUrl, Vec<&'a StoredRelaySync>> {
        let mut by_url: BTreeMap<RelayUrl, Vec<&StoredRelaySync>> = BTreeMap::new();
        for o in self.objects.values() {
            if let Some(url) = self.urls.of(o) {
                by_url.entry(url).or_default().push(o);
            }
        }
        by_url
    }
}

/// How a new session resumes: the earliest of its parts' cursors, only if every part's
/// current spec was confirmed, and each part's digest of the roots it had confirmed (a part
/// without a readable digest vouches for no root).
pub(crate) fn resume_from(parts: &[&StoredRelaySync]) -> Resume {
    let cursor = parts
        .iter()
        .map(|o| {
            o.status.as_ref().and_then(|s| {
                (s.confirmed_generation == Some(o.generation))
                    .then_some(s.cursor)
                    .flatten()
            })
        })
        .collect::<Option<Vec<i64>>>()
        .and_then(|c| c.into_iter().min())
        .map(|c| c.max(0) as u64);
    let digests: Option<Vec<RootDigest>> = parts
        .iter()
        .map(|o| {
            o.status
                .as_ref()
                .and_then(|s| s.confirmed_roots_digest.as_deref())
                .and_then(RootDigest::from_hex)
        })
        .collect();
    // The earliest part's: a reconciliation is due when any part's is.
    let last_reconciled: Option<Vec<SystemTime>> = parts
        .iter()
        .map(|o| {
            o.status
                .as_ref()
                .and_then(|s| s.last_reconciled.as_ref())
                .map(|t| SystemTime::from(t.0))
        })
        .collect();
    Resume {
        cursor,
        confirmed_roots: digests.unwrap_or_default(),
        last_reconciled: last_reconciled.and_then(|t| t.into_iter().min()),
    }
}

/// Bring the sessions in line with the objects: start what is missing (from the stored
/// cursor), update changed sync sets, stop what is no longer wanted or paused. Relays being
/// drained are left to the drain step; a relay in `hold` (its previous session still
/// closing, or a restart still waiting) gets a new session only later.
pub(crate) fn reconcile_sessions(
    held: Held<'_>,
    facts: &RepoFacts,
    all: &mut Sessions,
    hold: &BTreeSet<RelayUrl>,
    starter: &dyn SessionStarter,
) {
    let mut by_url = held.by_url();
    all.restarts.retain(|url, _| by_url.contains_key(url));
    by_url.retain(|url, parts| !parts.iter().all(|o| o.draining) && !hold.contains(url));
    let sessions = &mut all.running;
    sessions.retain(|url, r| {
        let keep = by_url
            .get(url)
            .is_some_and(|parts| parts.iter().any(|o| o.spec.paused != Some(true)));
        if !keep {
            r.control.abort_soon();
        }
        keep
    });
    for (url, parts) in by_url {
        if parts.iter().all(|o| o.spec.paused == Some(true)) {
            continue;
        }
        let coords: BTreeSet<RepoCoordinate> = parts
            .iter()
            .flat_map(|o| o.spec.repos.iter())
            .filter_map(|r| RepoCoordinate::parse(r).ok())
            .collect();
        let set = SyncSet {
            repos: coords.iter().filter_map(|c| facts.scope(c)).collect(),
            roots: coords
                .iter()
                .flat_map(|c| facts.roots.get(c).into_iter().flatten().copied())
                .collect(),
        };
        // A part with a repo whose maintainers are not known yet (its announcement not read
        // from the local relay: a new repo, our relay restarting) is synced with its owner
        // only, so that set does not stand for the part's generation: no status may claim
        // it confirmed (a maintainer's state event would be missing).
        let generations: BTreeMap<String, i64> = parts
            .iter()
            .map(|o| {
                let complete = o
                    .spec
                    .repos
                    .iter()
                    .filter_map(|r| RepoCoordinate::parse(r).ok())
                    .all(|c| facts.knows(&c));
                (o.name.clone(), if complete { o.generation } else { -1 })
            })
            .collect();
        match sessions.get_mut(&url) {
            Some(r) => {
                if r.set != set {
                    r.given.set = r.control.set(set.clone());
                    r.set = set;
                }
                r.given.generations = generations;
            }
            None => {
                if let Some(r) = all.restarts.get_mut(&url) {
                    r.waiting = false;
                }
                let control = starter.start(url.clone(), set.clone(), resume_from(&parts));
                let state = control.state();
                sessions.insert(
                    url,
                    Running {
                        control,
                        state,
                        set,
                        given: Given {
                            set: 0,
                            generations,
                        },
                    },
                );
            }
        }
    }
}

/// Relays whose every part is draining, with the parts not yet acknowledged by `worker`
/// (neither in status nor in `released`, the acknowledgements this supervisor wrote).
pub(crate) fn drains_due<'a>(
    held: Held<'a>,
    released: &BTreeSet<String>,
    worker: &str,
) -> Vec<(RelayUrl, Vec<&'a StoredRelaySync>)> {
    held.by_url()
        .into_iter()
        .filter(|(_, parts)| parts.iter().all(|o| o.draining))
        .filter_map(|(url, parts)| {
            let pending: Vec<&StoredRelaySync> = parts
                .into_iter()
                .filter(|o| {
                    !released.contains(&o.name)
                        && !crate::crd::is_released_by(o.status.as_ref(), worker)
                })
                .collect();
            (!pending.is_empty()).then_some((url, pending))
        })
        .collect()
}
