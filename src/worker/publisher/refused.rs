//! Events the local relay refused on policy grounds (`blocked:`, `invalid:`, `restricted:`,
//! `pow:`, `mute:`, `unsupported:`), shared by a publisher's connections. The same refused
//! event reaches the publisher once from every remote relay that has it, and again with
//! every reconciliation; sent again, it is refused again, and under a per-connection ingress
//! limit (60 a minute on a stock GRASP relay) each send costs a second of a connection's
//! budget. A copy of a remembered refusal is answered here, as the relay would answer it.
//!
//! A refusal is remembered only as long as it would most likely still be given:
//! - bounded (the oldest goes first) and expiring; the TTL stays under the reconciliation
//!   period, so a reconciliation after it offers every refused event to the relay again, as
//!   before this memory existed;
//! - not at all when it is about time (`created_at` too far ahead, too old: it changes with
//!   the clock), or when the event references more than [`REFS_KEPT`] others (what it waits
//!   for could not all be followed);
//! - not when something it references is among the events the relay just said it holds
//!   (read on another connection first: the relay checked it before it stored that one);
//! - forgotten, all of it, when what the worker knows of its repos from the local relay
//!   changes (an announcement, maintainers, a root event): a GRASP relay refuses events of
//!   repos it does not host, and takes them once the repo is announced there; also on every
//!   new connection and after authenticating (a relay that restarted, or that now knows us,
//!   may answer otherwise);
//! - forgotten, one by one, when the relay tells this publisher it holds an event (`OK
//!   true` or `duplicate:`): that event's own refusal, the refusals that reference it (by id,
//!   or by its address if it is addressable), and the refusals of the events it references
//!   (GRASP relays take what a stored event points at);
//! - each forgetting of all starts a generation; a refusal is remembered only for a send made
//!   in the current one, so a refusal read after the forgetting, of a send made before it, is
//!   not taken for one after it.
//!
//! What the relay learns by other paths (an event another worker or a user published) is
//! not seen here: such a refusal stands until it expires.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nostr::{Event, EventId, TagKind};

use super::memory::IdMemory;
use crate::nostr::outcome::Outcome;

/// How many policy refusals a publisher remembers, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalMemory {
    /// Refusals remembered at most (up to about 1 KB each with their references); 0: none.
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

/// References followed per refusal; an event with more is not remembered.
const REFS_KEPT: usize = 8;

/// Words of a refusal about time rather than content (strfry: `invalid: created_at too
/// late`; khatru: `blocked: event too much in the future`).
const ABOUT_TIME: [&str; 6] = [
    "created_at",
    "future",
    "too old",
    "too late",
    "too early",
    "expired",
];

#[derive(Debug)]
struct Entry {
    outcome: Outcome,
    refs: Vec<String>,
}

#[derive(Debug)]
pub(super) struct Refused {
    memory: IdMemory<Entry>,
    /// A reference (an event id in hex, or an address `kind:pubkey:d`) → the refusals that
    /// reference it.
    by_ref: HashMap<String, HashSet<EventId>>,
}

/// What `event` points at: event ids (`e`, `E`, `q`) and addresses (`a`, `A`, `q`), as
/// written in its tags.
fn references(event: &Event) -> Vec<String> {
    event
        .tags
        .iter()
        .filter(|t| {
            let k = t.kind();
            k == TagKind::e()
                || k == TagKind::custom("E")
                || k == TagKind::q()
                || k == TagKind::a()
                || k == TagKind::custom("A")
        })
        .filter_map(|t| t.content().map(|c| c.trim().to_ascii_lowercase()))
        .filter(|c| !c.is_empty())
        .collect()
}

/// How other events point at `event`: its id, and its address if it is addressable.
fn names(event: &Event) -> Vec<String> {
    let mut out = vec![event.id.to_hex()];
    if event.kind.is_addressable() {
        let d = event.tags.identifier().unwrap_or_default();
        out.push(
            format!("{}:{}:{d}", event.kind.as_u16(), event.pubkey.to_hex()).to_ascii_lowercase(),
        );
    }
    out
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

    /// The local relay refused `event` with `outcome` and `message`, at `now`, answering a
    /// send made in `generation`; `held` says which events the relay just said it holds.
    /// Only policy refusals that are likely to stand are remembered.
    pub(super) fn insert(
        &mut self,
        event: &Event,
        outcome: Outcome,
        message: &str,
        now: Instant,
        generation: u64,
        mut held: impl FnMut(&EventId) -> bool,
    ) {
        if !outcome.is_refusal() {
            return;
        }
        let lower = message.to_ascii_lowercase();
        if ABOUT_TIME.iter().any(|w| lower.contains(w)) {
            return;
        }
        let mut refs = references(event);
        refs.sort();
        refs.dedup();
        if refs.len() > REFS_KEPT
            || refs
                .iter()
                .filter_map(|r| EventId::from_hex(r).ok())
                .any(|id| held(&id))
        {
            return;
        }
        let was_there = self.memory.get(&event.id).is_some();
        let gone = self.memory.insert(
            event.id,
            Entry {
                outcome,
                refs: refs.clone(),
            },
            now,
            generation,
        );
        self.unindex(gone);
        if self.memory.get(&event.id).is_some() && !was_there {
            for r in refs {
                self.by_ref.entry(r).or_default().insert(event.id);
            }
        }
    }

    /// The outcome the local relay gave `id` on policy grounds, if it still stands at `now`.
    pub(super) fn refusal(&mut self, id: &EventId, now: Instant) -> Option<Outcome> {
        let gone = self.memory.expire(now);
        self.unindex(gone);
        self.memory.get(id).map(|e| e.outcome)
    }

    /// The local relay said it holds `event`: its own refusal, those that were waiting for
    /// it, and those of what it points at are forgotten.
    pub(super) fn held(&mut self, event: &Event) {
        let mut forget: Vec<EventId> = vec![event.id];
        for name in names(event) {
            if let Some(waiting) = self.by_ref.remove(&name) {
                forget.extend(waiting);
            }
        }
        forget.extend(
            references(event)
                .iter()
                .filter_map(|r| EventId::from_hex(r).ok()),
        );
        for id in forget {
            if let Some(e) = self.memory.remove(&id) {
                self.unindex(vec![(id, e)]);
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
                if let Some(set) = self.by_ref.get_mut(&r) {
                    set.remove(&id);
                    if set.is_empty() {
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

    fn refuse(r: &mut Refused, e: &Event, t: Instant) {
        let g = r.generation();
        r.insert(e, Outcome::Blocked, "blocked: no", t, g, |_| false);
    }

    #[test]
    fn remembers_policy_refusals_that_stand() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let (a, b, c, d) = (event(&[]), event(&[]), event(&[]), event(&[]));
        refuse(&mut r, &a, t);
        r.insert(&b, Outcome::RateLimited, "rate-limited: slow", t, 0, |_| {
            false
        });
        r.insert(&c, Outcome::Error, "error: db", t, 0, |_| false);
        r.insert(
            &d,
            Outcome::Invalid,
            "invalid: created_at too late",
            t,
            0,
            |_| false,
        );
        assert_eq!(r.refusal(&a.id, t), Some(Outcome::Blocked));
        assert_eq!(r.refusal(&b.id, t), None, "about load, not content");
        assert_eq!(r.refusal(&c.id, t), None, "a failure of the relay's own");
        assert_eq!(r.refusal(&d.id, t), None, "about the clock");
        assert_eq!(
            r.refusal(&a.id, t + Duration::from_secs(60)),
            None,
            "expired"
        );
    }

    #[test]
    fn a_refusal_waiting_for_its_parent_is_forgotten_once_the_parent_is_held() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let parent = event(&[]);
        let reply = event(&[parent.id]);
        let other = event(&[]);
        refuse(&mut r, &reply, t);
        refuse(&mut r, &other, t);
        r.held(&parent);
        assert_eq!(r.refusal(&reply.id, t), None);
        assert_eq!(r.refusal(&other.id, t), Some(Outcome::Blocked));
        assert!(r.by_ref.is_empty());
    }

    #[test]
    fn what_a_held_event_points_at_and_the_event_itself_are_forgotten() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let parent = event(&[]);
        let child = event(&[parent.id]);
        refuse(&mut r, &parent, t);
        refuse(&mut r, &child, t);
        // Stored by then after all (another connection's copy): its refusal goes too.
        r.held(&child);
        assert_eq!(r.refusal(&child.id, t), None);
        assert_eq!(
            r.refusal(&parent.id, t),
            None,
            "a stored event points at it"
        );
    }

    #[test]
    fn a_refusal_of_what_waits_for_an_event_just_held_is_not_remembered() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let parent = event(&[]);
        let reply = event(&[parent.id]);
        r.insert(&reply, Outcome::Blocked, "blocked: no parent", t, 0, |id| {
            *id == parent.id
        });
        assert_eq!(r.refusal(&reply.id, t), None);
    }

    #[test]
    fn a_refusal_waiting_for_an_address_is_forgotten_once_it_is_held() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let keys = Keys::generate();
        let state = EventBuilder::new(Kind::Custom(30618), "")
            .tags([Tag::identifier("repo")])
            .sign_with_keys(&keys)
            .unwrap();
        let address = format!("30618:{}:repo", keys.public_key().to_hex());
        let pointer = EventBuilder::new(Kind::Custom(1111), "see")
            .tags([Tag::parse(["a", address.as_str()]).unwrap()])
            .sign_with_keys(&Keys::generate())
            .unwrap();
        refuse(&mut r, &pointer, t);
        r.held(&state);
        assert_eq!(r.refusal(&pointer.id, t), None);
    }

    #[test]
    fn an_event_pointing_at_too_many_others_is_not_remembered() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let parents: Vec<EventId> = (0..=REFS_KEPT).map(|_| event(&[]).id).collect();
        let e = event(&parents);
        refuse(&mut r, &e, t);
        assert_eq!(r.refusal(&e.id, t), None);
    }

    #[test]
    fn a_refusal_of_a_send_from_before_forgetting_is_not_remembered() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let sent_in = r.generation();
        r.forget_all();
        let e = event(&[]);
        r.insert(&e, Outcome::Blocked, "blocked: no", t, sent_in, |_| false);
        assert_eq!(r.refusal(&e.id, t), None);
        refuse(&mut r, &e, t);
        assert_eq!(r.refusal(&e.id, t), Some(Outcome::Blocked));
    }

    #[test]
    fn the_reference_index_stays_bounded_with_the_memory() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(2));
        let parent = event(&[]);
        for _ in 0..50 {
            refuse(&mut r, &event(&[parent.id]), t);
        }
        assert_eq!(r.len(), 2);
        assert_eq!(r.by_ref.get(&parent.id.to_hex()).map(HashSet::len), Some(2));
        r.refusal(&parent.id, t + Duration::from_secs(61));
        assert!(r.by_ref.is_empty());
    }
}
