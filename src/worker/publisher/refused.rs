//! Events the local relay refused on policy grounds (`blocked:`, `invalid:`, `restricted:`,
//! `pow:`, `mute:`, `unsupported:`), shared by a publisher's connections. The same refused
//! event reaches the publisher once from every remote relay that has it, and again with
//! every reconciliation; sent again, it is refused again, and under a per-connection ingress
//! limit (60 a minute on a stock GRASP relay) each send costs a second of a connection's
//! budget. A copy of a remembered refusal is answered here, as the relay would answer it.
//!
//! A refusal is remembered only as long as it would still be given:
//! - bounded (the oldest goes first) and expiring; the TTL stays under the reconciliation
//!   period, so a reconciliation after it offers every refused event to the relay again, as
//!   before this memory existed;
//! - forgotten, all of it, when what the worker knows of its repos from the local relay
//!   changes (an announcement, maintainers, a root event): a GRASP relay refuses events of
//!   repos it does not host, and takes them once the repo is announced there;
//! - forgotten, for the refusals that reference it (`e`, `E` or `q` tag), when the local
//!   relay accepts an event from this publisher: a reply refused because its parent was not
//!   there yet is taken once the parent is;
//! - each forgetting starts a generation; a refusal is remembered only for a send made in
//!   the current one, so a refusal read after the forgetting, of a send made before it, is
//!   not taken for one after it.
//!
//! What the relay learns by other paths (an event another worker or a user published) is
//! not seen here: such a refusal stands until it expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nostr::{Event, EventId, TagKind};

use super::memory::IdMemory;
use crate::nostr::outcome::Outcome;

/// How many policy refusals a publisher remembers, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalMemory {
    /// Refusals remembered at most (about 150 bytes each); 0: none.
    pub entries: usize,
    /// How long one stands. Keep it under the reconciliation period: a reconciliation
    /// after it offers every refused event to the relay again.
    pub ttl: Duration,
}

impl Default for RefusalMemory {
    fn default() -> Self {
        RefusalMemory {
            entries: 16_384,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// Referenced ids kept per refusal (an event naming more is forgotten with the first few).
const REFS_KEPT: usize = 8;

#[derive(Debug)]
struct Entry {
    outcome: Outcome,
    refs: Vec<EventId>,
}

#[derive(Debug)]
pub(super) struct Refused {
    memory: IdMemory<Entry>,
    /// Referenced id → refusals that reference it.
    by_ref: HashMap<EventId, Vec<EventId>>,
}

impl Refused {
    pub(super) fn new(config: &RefusalMemory) -> Self {
        Refused {
            memory: IdMemory::new(config.entries, config.ttl),
            by_ref: HashMap::new(),
        }
    }

    /// The current generation (a send notes it).
    pub(super) fn generation(&self) -> u64 {
        self.memory.generation()
    }

    /// The local relay refused `event` with `outcome`, at `now`, answering a send made in
    /// `generation`. Only policy refusals are remembered.
    pub(super) fn insert(
        &mut self,
        event: &Event,
        outcome: Outcome,
        now: Instant,
        generation: u64,
    ) {
        if !outcome.is_refusal() {
            return;
        }
        let refs: Vec<EventId> = event
            .tags
            .iter()
            .filter(|t| {
                let k = t.kind();
                k == TagKind::e() || k == TagKind::custom("E") || k == TagKind::q()
            })
            .filter_map(|t| EventId::from_hex(t.content()?).ok())
            .take(REFS_KEPT)
            .collect();
        let entry = Entry {
            outcome,
            refs: refs.clone(),
        };
        let was_there = self.memory.get(&event.id).is_some();
        let gone = self.memory.insert(event.id, entry, now, generation);
        let kept = self.memory.get(&event.id).is_some();
        self.unindex(gone);
        if kept && !was_there {
            for r in refs {
                self.by_ref.entry(r).or_default().push(event.id);
            }
        }
    }

    /// The outcome the local relay gave `id` on policy grounds, if it still stands at `now`.
    pub(super) fn refusal(&mut self, id: &EventId, now: Instant) -> Option<Outcome> {
        let gone = self.memory.expire(now);
        self.unindex(gone);
        self.memory.get(id).map(|e| e.outcome)
    }

    /// The local relay accepted `id`: refusals that were waiting for it are forgotten.
    pub(super) fn accepted(&mut self, id: &EventId) {
        let Some(waiting) = self.by_ref.remove(id) else {
            return;
        };
        for w in waiting {
            if let Some(e) = self.memory.remove(&w) {
                self.unindex(vec![(w, e)]);
            }
        }
    }

    /// Forget every refusal and start a new generation.
    pub(super) fn forget_all(&mut self) {
        self.memory.clear();
        self.by_ref.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.memory.len()
    }

    fn unindex(&mut self, gone: Vec<(EventId, Entry)>) {
        for (id, e) in gone {
            for r in e.refs {
                if let Some(list) = self.by_ref.get_mut(&r) {
                    list.retain(|x| *x != id);
                    if list.is_empty() {
                        self.by_ref.remove(&r);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nostr::{EventBuilder, Keys, Kind, Tag};

    use super::*;

    fn memory(entries: usize) -> RefusalMemory {
        RefusalMemory {
            entries,
            ttl: Duration::from_secs(60),
        }
    }

    fn event(refs: &[EventId]) -> Event {
        EventBuilder::new(Kind::Custom(1111), "a reply")
            .tags(refs.iter().map(|r| Tag::event(*r)))
            .sign_with_keys(&Keys::generate())
            .unwrap()
    }

    #[test]
    fn remembers_policy_refusals_only() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let (a, b, c) = (event(&[]), event(&[]), event(&[]));
        r.insert(&a, Outcome::Blocked, t, 0);
        r.insert(&b, Outcome::RateLimited, t, 0);
        r.insert(&c, Outcome::Error, t, 0);
        assert_eq!(r.refusal(&a.id, t), Some(Outcome::Blocked));
        assert_eq!(r.refusal(&b.id, t), None, "about load, not content");
        assert_eq!(r.refusal(&c.id, t), None, "a failure of the relay's own");
        assert_eq!(
            r.refusal(&a.id, t + Duration::from_secs(60)),
            None,
            "expired"
        );
    }

    #[test]
    fn a_refusal_waiting_for_its_parent_is_forgotten_once_the_parent_is_taken() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let parent = event(&[]);
        let reply = event(&[parent.id]);
        let other = event(&[]);
        r.insert(&reply, Outcome::Blocked, t, 0);
        r.insert(&other, Outcome::Blocked, t, 0);
        r.accepted(&parent.id);
        assert_eq!(r.refusal(&reply.id, t), None);
        assert_eq!(r.refusal(&other.id, t), Some(Outcome::Blocked));
        assert!(r.by_ref.is_empty());
    }

    #[test]
    fn a_refusal_of_a_send_from_before_forgetting_is_not_remembered() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let sent_in = r.generation();
        r.forget_all();
        let e = event(&[]);
        r.insert(&e, Outcome::Blocked, t, sent_in);
        assert_eq!(r.refusal(&e.id, t), None);
        r.insert(&e, Outcome::Blocked, t, r.generation());
        assert_eq!(r.refusal(&e.id, t), Some(Outcome::Blocked));
    }

    #[test]
    fn the_reference_index_stays_bounded_with_the_memory() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(2));
        let parent = event(&[]);
        for _ in 0..50 {
            r.insert(&event(&[parent.id]), Outcome::Blocked, t, 0);
        }
        assert_eq!(r.len(), 2);
        assert_eq!(r.by_ref.get(&parent.id).map(Vec::len), Some(2));
        r.refusal(&parent.id, t + Duration::from_secs(61));
        assert!(r.by_ref.is_empty());
    }
}
