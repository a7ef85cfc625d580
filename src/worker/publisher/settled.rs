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

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nostr::EventId;

/// Events remembered at most (about 100 bytes each).
pub(super) const CAPACITY: usize = 16_384;

/// How long an answer is trusted.
pub(super) const TTL: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub(super) struct Settled {
    at: HashMap<EventId, Instant>,
    order: VecDeque<(EventId, Instant)>,
    capacity: usize,
    ttl: Duration,
    generation: u64,
}

impl Default for Settled {
    fn default() -> Self {
        Settled::new(CAPACITY, TTL)
    }
}

impl Settled {
    pub(super) fn new(capacity: usize, ttl: Duration) -> Self {
        Settled {
            at: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
            generation: 0,
        }
    }

    /// The current generation (a connection notes it when it connects).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The local relay said, at `now`, on a connection made in `generation`, that it holds
    /// `id`. Ignored from a connection of an older generation.
    pub(super) fn insert(&mut self, id: EventId, now: Instant, generation: u64) {
        if generation != self.generation {
            return;
        }
        self.expire(now);
        if self.at.insert(id, now).is_none() {
            while self.order.len() >= self.capacity {
                if let Some((old, at)) = self.order.pop_front() {
                    // A re-inserted id has a newer entry further back; keep it.
                    if self.at.get(&old) == Some(&at) {
                        self.at.remove(&old);
                    }
                }
            }
        }
        self.order.push_back((id, now));
    }

    /// Whether the local relay said it holds `id` within the TTL.
    pub(super) fn holds(&mut self, id: &EventId, now: Instant) -> bool {
        self.expire(now);
        self.at.contains_key(id)
    }

    /// Forget everything (a connection to the relay was lost or made again), and start a new
    /// generation.
    pub(super) fn clear(&mut self) {
        self.at.clear();
        self.order.clear();
        self.generation += 1;
    }

    pub(super) fn len(&self) -> usize {
        self.at.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(id, at)) = self.order.front() {
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.order.pop_front();
            if self.at.get(&id) == Some(&at) {
                self.at.remove(&id);
            }
        }
        // Entries superseded by a re-insert leave stale slots behind; keep the queue bounded.
        if self.order.len() > 2 * self.capacity {
            let at = &self.at;
            self.order.retain(|(id, t)| at.get(id) == Some(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EventId {
        EventId::from_byte_array([n; 32])
    }

    #[test]
    fn remembers_within_the_ttl_and_forgets_after() {
        let t = Instant::now();
        let mut s = Settled::new(10, Duration::from_secs(60));
        s.insert(id(1), t, 0);
        assert!(s.holds(&id(1), t + Duration::from_secs(59)));
        assert!(!s.holds(&id(2), t));
        assert!(!s.holds(&id(1), t + Duration::from_secs(60)));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn bounded_oldest_first() {
        let t = Instant::now();
        let mut s = Settled::new(3, Duration::from_secs(60));
        for n in 1..=5 {
            s.insert(id(n), t, 0);
        }
        assert_eq!(s.len(), 3);
        assert!(!s.holds(&id(1), t) && !s.holds(&id(2), t));
        assert!(s.holds(&id(3), t) && s.holds(&id(5), t));
    }

    #[test]
    fn a_renewed_answer_outlives_its_first_entry() {
        let t = Instant::now();
        let mut s = Settled::new(2, Duration::from_secs(60));
        s.insert(id(1), t, 0);
        s.insert(id(1), t + Duration::from_secs(30), 0);
        assert!(s.holds(&id(1), t + Duration::from_secs(70)));
        s.insert(id(2), t + Duration::from_secs(31), 0);
        s.insert(id(3), t + Duration::from_secs(32), 0);
        assert_eq!(s.len(), 2, "bounded by entries, not by stale slots");
    }

    #[test]
    fn cleared_when_the_connection_is_lost_and_old_answers_ignored_after() {
        let t = Instant::now();
        let mut s = Settled::default();
        let before = s.generation();
        s.insert(id(1), t, before);
        s.clear();
        assert!(!s.holds(&id(1), t));
        // An answer read late on a connection made before the clear.
        s.insert(id(2), t, before);
        assert!(!s.holds(&id(2), t));
        s.insert(id(3), t, s.generation());
        assert!(s.holds(&id(3), t));
    }
}
