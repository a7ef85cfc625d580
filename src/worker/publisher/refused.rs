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
//! - forgotten, all of it, on every new connection and after authenticating (a relay that
//!   restarted, or that now knows us, may answer otherwise);
//! - forgotten, one by one, when the relay is seen holding an event — it told this publisher
//!   (`OK true` or `duplicate:`), or the worker's local feed read it there (an announcement
//!   or root event of the worker's repos, whoever published it): that event's own refusal,
//!   the refusals that reference it (by id, or by its address if it is addressable), the
//!   refusals of the events it references and of those that reference the same (ngit-relay
//!   takes an event a stored event points at, or that points where a stored event does), and
//!   for an announcement every refusal about its repository's identifier (state and
//!   announcements under that `d`, events tagging any of its coordinates: a GRASP relay takes
//!   them once the repo, or the maintainer, is known there).
//!   Forgetting everything on each such change, as before, threw away a first sync's
//!   refusals while its repos were still being learned, and the next reconciliation sent
//!   them all again;
//! - a refusal is remembered only if nothing it depends on was seen held after its send
//!   began (each forgetting marks what it forgot by a clock the send noted), so a refusal
//!   read after the relay took what it waited for, of a send made before, is not kept.
//!
//! What the relay learns by other paths and the feed does not read (state, maintainers' own
//! announcements, comments, statuses or PR updates published by others) is not seen here,
//! nor a change in what a relay decides by author rather than by reference (one taking
//! statuses only from maintainers): such a refusal stands until it expires, and a
//! reconciliation after that offers the event again.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use nostr::{Event, EventId, TagKind};

use super::memory::IdMemory;
use crate::nostr::filters::KIND_REPO_STATE;
use crate::nostr::kinds::REPO_ANNOUNCEMENT_NUMBER;
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

/// Names recently seen held, kept to judge refusals of sends made before: far more than the
/// sends a publisher has unanswered at once. A refusal of a send older than the oldest kept
/// mark is not remembered (it cannot be judged).
const MARKS_KEPT: usize = 16_384;

/// References of one held event marked one by one; an event with more (a remote's event
/// may carry thousands of tags) marks everything before it at once.
const MARKS_PER_EVENT: usize = 64;

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
    /// A reference (an event id in hex, an address `kind:pubkey:d`, or `repo:d`) → the
    /// refusals that reference it.
    by_ref: HashMap<String, HashSet<EventId>>,
    /// Advances with every forgetting; a send notes it ([`generation`](Self::generation)).
    clock: u64,
    /// The clock at the last forgetting of everything.
    cleared_at: u64,
    /// A name's hash → the clock when it was last seen held.
    marks: HashMap<u64, u64>,
    marks_order: VecDeque<(u64, u64)>,
    /// The clock of the newest mark dropped to keep `marks` within `marks_kept`.
    marks_floor: u64,
    marks_kept: usize,
    hasher: RandomState,
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

/// `repo:d` for a repository's identifier `d`: what an announcement under `d` may change.
fn repo_name(d: &str) -> String {
    format!("repo:{}", d.trim().to_ascii_lowercase())
}

fn is_repo_kind(kind: u16) -> bool {
    kind == REPO_ANNOUNCEMENT_NUMBER || kind == KIND_REPO_STATE
}

/// What a refusal of `event` waits for: what it references, and the repository identifier
/// it is about (its own, if it is an announcement or state; that of each repo coordinate it
/// tags), since a GRASP relay decides on those by who announced that repo there.
fn depends_on(event: &Event) -> Vec<String> {
    let mut refs = references(event);
    let mut repos: Vec<String> = refs
        .iter()
        .filter_map(|r| {
            let mut parts = r.splitn(3, ':');
            let kind = parts.next()?.parse::<u16>().ok()?;
            parts.next()?;
            let d = parts.next()?;
            is_repo_kind(kind).then(|| repo_name(d))
        })
        .collect();
    if is_repo_kind(event.kind.as_u16()) {
        repos.push(repo_name(event.tags.identifier().unwrap_or_default()));
    }
    refs.extend(repos);
    refs.sort();
    refs.dedup();
    refs
}

/// How other events, and refusals, point at `event`: its id, its address if it is
/// addressable, and its repository identifier if it is an announcement.
fn names(event: &Event) -> Vec<String> {
    let mut out = vec![event.id.to_hex()];
    if event.kind.is_addressable() {
        // Trimmed as references are, so a tag naming it matches.
        let d = event.tags.identifier().unwrap_or_default().trim();
        out.push(
            format!("{}:{}:{d}", event.kind.as_u16(), event.pubkey.to_hex()).to_ascii_lowercase(),
        );
        if event.kind.as_u16() == REPO_ANNOUNCEMENT_NUMBER {
            out.push(repo_name(d));
        }
    }
    out
}

impl Refused {
    pub(super) fn new(config: &RefusalMemory) -> Self {
        Refused {
            memory: IdMemory::new(config.entries, config.ttl),
            by_ref: HashMap::new(),
            clock: 0,
            cleared_at: 0,
            marks: HashMap::new(),
            marks_order: VecDeque::new(),
            marks_floor: 0,
            marks_kept: MARKS_KEPT,
            hasher: RandomState::new(),
        }
    }

    /// The current generation (a send notes it).
    pub(super) fn generation(&self) -> u64 {
        self.clock
    }

    /// Whether the relay was seen holding `name` after a send that noted `generation`.
    fn held_since(&self, name: &str, generation: u64) -> bool {
        self.marks
            .get(&self.hasher.hash_one(name))
            .is_some_and(|&at| at > generation)
    }

    fn mark(&mut self, name: &str) {
        let h = self.hasher.hash_one(name);
        self.marks.insert(h, self.clock);
        self.marks_order.push_back((h, self.clock));
        while self.marks_order.len() > self.marks_kept {
            if let Some((old, at)) = self.marks_order.pop_front() {
                if self.marks.get(&old) == Some(&at) {
                    self.marks.remove(&old);
                }
                self.marks_floor = self.marks_floor.max(at);
            }
        }
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
        // A send from before a forgetting, or too old to judge by the kept marks.
        if generation < self.cleared_at || generation < self.marks_floor {
            return;
        }
        let lower = message.to_ascii_lowercase();
        if ABOUT_TIME.iter().any(|w| lower.contains(w)) {
            return;
        }
        let mut refs = depends_on(event);
        if refs.len() > REFS_KEPT
            || refs
                .iter()
                .filter_map(|r| EventId::from_hex(r).ok())
                .any(|id| held(&id))
        {
            return;
        }
        // Indexed under its own names too: a stored event pointing at it, by id or address,
        // makes a GRASP relay take it.
        // (A name repeated here is indexed once: the index holds sets.)
        refs.extend(names(event));
        if refs.iter().any(|r| self.held_since(r, generation)) {
            return;
        }
        let was_there = self.memory.get(&event.id).is_some();
        let current = self.memory.generation();
        let gone = self.memory.insert(
            event.id,
            Entry {
                outcome,
                refs: refs.clone(),
            },
            now,
            current,
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

    /// The local relay holds `event` (it said so, or the feed read it there). Forgotten:
    /// its own refusal, those that wait for it (by id, address, or repository identifier),
    /// those of what it points at, and those that point at what it points at — ngit-relay
    /// takes an event that a stored event points at, or that points where a stored event
    /// does. Refusals of sends made before now that wait for any of it are not remembered
    /// when they are read.
    pub(super) fn held(&mut self, event: &Event) {
        self.clock += 1;
        let own = names(event);
        for name in &own {
            self.mark(name);
        }
        let pointed = references(event);
        if pointed.len() > MARKS_PER_EVENT {
            // Marking each would flush the marks; judging every earlier send is the same.
            self.marks_floor = self.clock;
        } else {
            for r in &pointed {
                self.mark(r);
            }
        }
        let mut forget: Vec<EventId> = vec![event.id];
        for name in own.iter().chain(&pointed) {
            if let Some(waiting) = self.by_ref.remove(name) {
                forget.extend(waiting);
            }
        }
        for id in forget {
            if let Some(e) = self.memory.remove(&id) {
                self.unindex(vec![(id, e)]);
            }
        }
    }

    /// Forget every refusal and start a new generation.
    pub(super) fn forget_all(&mut self) {
        self.clock += 1;
        self.cleared_at = self.clock;
        self.memory.clear();
        self.by_ref.clear();
        self.marks.clear();
        self.marks_order.clear();
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
        assert!(
            r.by_ref
                .values()
                .all(|s| s.len() == 1 && s.contains(&other.id)),
            "only what stands is indexed"
        );
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

    fn addressable(kind: u16, d: &str, keys: &Keys, tags: &[Tag]) -> Event {
        EventBuilder::new(Kind::Custom(kind), "")
            .tags([Tag::identifier(d)])
            .tags(tags.iter().cloned())
            .sign_with_keys(keys)
            .unwrap()
    }

    fn a_tag(address: &str) -> Tag {
        Tag::parse(["a", address]).unwrap()
    }

    #[test]
    fn an_announcement_held_forgets_only_the_refusals_about_its_repository() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let (owner, maintainer) = (Keys::generate(), Keys::generate());
        let announcement = addressable(30617, "repo", &owner, &[]);
        // A maintainer's state and announcement, an issue tagging the maintainer's
        // coordinate, and the same for another repository.
        let state = addressable(30618, "repo", &maintainer, &[]);
        let theirs = addressable(30617, "repo", &maintainer, &[]);
        let issue = EventBuilder::new(Kind::Custom(1621), "bug")
            .tags([a_tag(&format!(
                "30617:{}:repo",
                maintainer.public_key().to_hex()
            ))])
            .sign_with_keys(&Keys::generate())
            .unwrap();
        let other_state = addressable(30618, "other", &maintainer, &[]);
        let other_issue = EventBuilder::new(Kind::Custom(1621), "bug")
            .tags([a_tag(&format!(
                "30617:{}:other",
                owner.public_key().to_hex()
            ))])
            .sign_with_keys(&Keys::generate())
            .unwrap();
        for e in [&state, &theirs, &issue, &other_state, &other_issue] {
            refuse(&mut r, e, t);
        }
        r.held(&announcement);
        for e in [&state, &theirs, &issue] {
            assert_eq!(r.refusal(&e.id, t), None, "{:?} stood", e.kind);
        }
        for e in [&other_state, &other_issue] {
            assert_eq!(r.refusal(&e.id, t), Some(Outcome::Blocked));
        }
    }

    #[test]
    fn a_refusal_read_after_what_it_waits_for_was_seen_held_is_not_remembered() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let keys = Keys::generate();
        let announcement = addressable(30617, "repo", &keys, &[]);
        let parent = event(&[]);
        let reply = event(&[parent.id]);
        let issue = EventBuilder::new(Kind::Custom(1621), "bug")
            .tags([a_tag(&format!("30617:{}:repo", keys.public_key().to_hex()))])
            .sign_with_keys(&keys)
            .unwrap();
        let unrelated = event(&[]);
        // Sent, then the feed reads what they wait for, then the refusals are read.
        let sent = r.generation();
        r.held(&parent);
        r.held(&announcement);
        for e in [&reply, &issue, &unrelated] {
            r.insert(e, Outcome::Blocked, "blocked: no", t, sent, |_| false);
        }
        assert_eq!(r.refusal(&reply.id, t), None);
        assert_eq!(r.refusal(&issue.id, t), None);
        assert_eq!(
            r.refusal(&unrelated.id, t),
            Some(Outcome::Blocked),
            "nothing it waits for changed"
        );
        // Sent after: the relay refused them knowing the parent and the repo.
        refuse(&mut r, &reply, t);
        refuse(&mut r, &issue, t);
        assert_eq!(r.refusal(&reply.id, t), Some(Outcome::Blocked));
        assert_eq!(r.refusal(&issue.id, t), Some(Outcome::Blocked));
    }

    /// ngit-relay takes an event that a stored event points at (by id or address), or that
    /// points where a stored event points: an issue tagging a maintainer's coordinate once
    /// a root tagging both the owner's and that one is stored.
    #[test]
    fn a_held_event_forgets_refusals_it_points_at_or_that_point_where_it_does() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let (owner, maintainer) = (Keys::generate(), Keys::generate());
        let theirs = format!("30617:{}:repo", maintainer.public_key().to_hex());
        let ours = format!("30617:{}:repo", owner.public_key().to_hex());
        let sibling = EventBuilder::new(Kind::Custom(1621), "tags the maintainer's")
            .tags([a_tag(&theirs)])
            .sign_with_keys(&Keys::generate())
            .unwrap();
        let pointed_by_address = addressable(30618, "other", &maintainer, &[]);
        let unrelated = event(&[]);
        for e in [&sibling, &pointed_by_address, &unrelated] {
            refuse(&mut r, e, t);
        }
        let root = EventBuilder::new(Kind::Custom(1621), "tags both")
            .tags([
                a_tag(&ours),
                a_tag(&theirs),
                a_tag(&format!("30618:{}:other", maintainer.public_key().to_hex())),
            ])
            .sign_with_keys(&owner)
            .unwrap();
        r.held(&root);
        assert_eq!(r.refusal(&sibling.id, t), None, "points where it does");
        assert_eq!(
            r.refusal(&pointed_by_address.id, t),
            None,
            "it points at it"
        );
        assert_eq!(r.refusal(&unrelated.id, t), Some(Outcome::Blocked));
    }

    /// A refusal of a send that noted `sent` is not remembered; one of a send made now is.
    fn void_before_but_kept_after(r: &mut Refused, sent: u64, t: Instant) {
        let e = event(&[]);
        r.insert(&e, Outcome::Blocked, "blocked: no", t, sent, |_| false);
        assert_eq!(r.refusal(&e.id, t), None);
        refuse(r, &e, t);
        assert_eq!(r.refusal(&e.id, t), Some(Outcome::Blocked));
    }

    #[test]
    fn an_event_pointing_at_very_many_others_voids_earlier_sends_without_flushing_marks() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        let sent = r.generation();
        let many: Vec<EventId> = (0..=MARKS_PER_EVENT as u8)
            .map(|i| EventId::from_byte_array([i; 32]))
            .collect();
        r.held(&event(&many));
        assert!(r.marks.len() <= 2, "{} marks", r.marks.len());
        void_before_but_kept_after(&mut r, sent, t);
    }

    #[test]
    fn a_refusal_of_a_send_older_than_the_kept_marks_is_not_remembered() {
        let t = Instant::now();
        let mut r = Refused::new(&memory(10));
        r.marks_kept = 4;
        let sent = r.generation();
        for _ in 0..5 {
            r.held(&event(&[]));
        }
        assert!(r.marks.len() <= 4);
        void_before_but_kept_after(&mut r, sent, t);
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
