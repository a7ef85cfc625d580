//! Events the local relay has just said it holds (`OK true`, or `duplicate:`), shared by a
//! publisher's connections. The same event reaches the publisher once from every remote
//! relay that has it, often after the first copy was answered; each later copy sent is
//! answered `duplicate:`, and under a per-connection ingress limit (60 a minute on a stock
//! GRASP relay) it costs that connection a second of its budget. A copy of a settled event
//! is answered here, as the relay would answer it.
//!
//! Bounded (the oldest entry goes first), short-lived, and emptied whenever a connection to
//! the local relay is lost or made again: a relay that restarted may have lost what it held,
//! and then the copies must reach it again. Each emptying starts a new generation; an answer
//! is remembered only from a connection made in the current one, so an answer from before a
//! restart, read late on another connection, is not taken for one after it.

use std::time::{Duration, Instant};

use nostr::EventId;

use super::memory::IdMemory;

/// Events remembered at most (about 100 bytes each).
pub(super) const CAPACITY: usize = 16_384;

/// How long an answer is trusted.
pub(super) const TTL: Duration = Duration::from_secs(600);

/// Default for how long an event the relay holds in purgatory is not sent again: well under
/// a GRASP relay's own purgatory expiry (ngit-grasp: 30 min), whose clock starts when the
/// relay first received the event — often from its author, before us. A copy after the
/// relay dropped it puts it back in purgatory, to be served if git data comes later.
pub const PURGATORY_TTL: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub(super) struct Settled {
    served: IdMemory<()>,
    /// Accepted with `OK true "purgatory: …"`: held, not served until git data arrives
    /// (and dropped without it). A copy sent meanwhile would only be answered the same way,
    /// at the cost of a second of a stock relay's allowance; once the relay's purgatory has
    /// expired a copy is sent again. Emptied with `served`, so the two share a generation.
    purgatory: IdMemory<()>,
}

impl Default for Settled {
    fn default() -> Self {
        Settled::new(PURGATORY_TTL)
    }
}

impl Settled {
    pub(super) fn new(purgatory_ttl: Duration) -> Self {
        Settled {
            served: IdMemory::new(CAPACITY, TTL),
            purgatory: IdMemory::new(CAPACITY, purgatory_ttl),
        }
    }

    /// The current generation (a connection notes it when it connects).
    pub(super) fn generation(&self) -> u64 {
        self.served.generation()
    }

    /// The local relay said, at `now`, on a connection made in `generation`, that it holds
    /// `id`. Ignored from a connection of an older generation.
    pub(super) fn insert(&mut self, id: EventId, now: Instant, generation: u64) {
        self.served.insert(id, (), now, generation);
    }

    /// The local relay said, at `now`, that it holds `id` in purgatory.
    pub(super) fn insert_purgatory(&mut self, id: EventId, now: Instant, generation: u64) {
        self.purgatory.insert(id, (), now, generation);
    }

    /// Whether the local relay said it holds `id` within the TTL.
    pub(super) fn holds(&mut self, id: &EventId, now: Instant) -> bool {
        self.served.expire(now);
        self.served.get(id).is_some()
    }

    /// Whether the local relay said it holds `id` in purgatory, within the purgatory TTL.
    pub(super) fn in_purgatory(&mut self, id: &EventId, now: Instant) -> bool {
        self.purgatory.expire(now);
        self.purgatory.get(id).is_some()
    }

    /// Forget everything (a connection to the relay was lost or made again), and start a new
    /// generation.
    pub(super) fn clear(&mut self) {
        self.served.clear();
        self.purgatory.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.served.len()
    }

    pub(super) fn purgatory_len(&self) -> usize {
        self.purgatory.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EventId {
        EventId::from_byte_array([n; 32])
    }

    #[test]
    fn purgatory_is_remembered_for_its_own_ttl_and_emptied_with_the_rest() {
        let t = Instant::now();
        let mut s = Settled::new(Duration::from_secs(1800));
        let g = s.generation();
        s.insert_purgatory(id(1), t, g);
        s.insert(id(2), t, g);
        assert!(s.in_purgatory(&id(1), t + Duration::from_secs(1799)));
        assert!(!s.holds(&id(1), t), "held in purgatory is not served");
        assert!(!s.in_purgatory(&id(2), t));
        assert!(!s.in_purgatory(&id(1), t + Duration::from_secs(1800)));
        s.insert_purgatory(id(3), t, g);
        s.clear();
        assert!(!s.in_purgatory(&id(3), t));
        // An answer to a send made before the emptying is not remembered after it.
        s.insert_purgatory(id(4), t, g);
        assert!(!s.in_purgatory(&id(4), t));
        let mut off = Settled::new(Duration::ZERO);
        let g = off.generation();
        off.insert_purgatory(id(5), t, g);
        assert!(!off.in_purgatory(&id(5), t), "a zero TTL remembers nothing");
    }
}
