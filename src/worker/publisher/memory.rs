//! A bounded, expiring memory keyed by event id, with generations: the oldest entry goes
//! first when it is full, an entry is forgotten `ttl` after it was (last) set, and emptying
//! it starts a new generation so that an answer to a send made before the emptying, read
//! after it, is not remembered. The publisher keeps two: events the local relay just said
//! it holds (`settled`) and events it refused on policy grounds (`refused`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nostr::EventId;

#[derive(Debug)]
pub(super) struct IdMemory<V> {
    at: HashMap<EventId, (Instant, V)>,
    order: VecDeque<(EventId, Instant)>,
    capacity: usize,
    ttl: Duration,
    generation: u64,
}

impl<V> IdMemory<V> {
    /// Capacity 0: a memory that remembers nothing.
    pub(super) fn new(capacity: usize, ttl: Duration) -> Self {
        IdMemory {
            at: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            ttl,
            generation: 0,
        }
    }

    /// The current generation (noted when a send, or a connection, begins).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Remember `id` with `value` at `now`, if `generation` is still the current one;
    /// returns what left to make room or expired meanwhile.
    pub(super) fn insert(
        &mut self,
        id: EventId,
        value: V,
        now: Instant,
        generation: u64,
    ) -> Vec<(EventId, V)> {
        if generation != self.generation || self.capacity == 0 {
            return Vec::new();
        }
        let mut gone = self.expire(now);
        if self.at.insert(id, (now, value)).is_none() {
            while self.at.len() > self.capacity {
                let Some((old, at)) = self.order.pop_front() else {
                    break;
                };
                // A re-inserted id has a newer entry further back; keep it.
                if self.at.get(&old).is_some_and(|(t, _)| *t == at)
                    && let Some((_, v)) = self.at.remove(&old)
                {
                    gone.push((old, v));
                }
            }
        }
        self.order.push_back((id, now));
        gone
    }

    /// What is remembered of `id` (expired entries are gone once [`expire`](Self::expire)
    /// ran at the time asked about).
    pub(super) fn get(&self, id: &EventId) -> Option<&V> {
        self.at.get(id).map(|(_, v)| v)
    }

    pub(super) fn remove(&mut self, id: &EventId) -> Option<V> {
        // Its slot in `order` goes stale and is skipped.
        self.at.remove(id).map(|(_, v)| v)
    }

    /// Forget everything and start a new generation.
    pub(super) fn clear(&mut self) {
        self.at.clear();
        self.order.clear();
        self.generation += 1;
    }

    pub(super) fn len(&self) -> usize {
        self.at.len()
    }

    /// Forget what is older than the TTL at `now`; returns it.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<(EventId, V)> {
        let mut gone = Vec::new();
        while let Some(&(id, at)) = self.order.front() {
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.order.pop_front();
            if self.at.get(&id).is_some_and(|(t, _)| *t == at)
                && let Some((_, v)) = self.at.remove(&id)
            {
                gone.push((id, v));
            }
        }
        // Entries superseded by a re-insert or removed leave stale slots behind; keep the
        // queue bounded.
        if self.order.len() > 2 * self.capacity.max(1) {
            let at = &self.at;
            self.order
                .retain(|(id, t)| at.get(id).is_some_and(|(a, _)| a == t));
        }
        gone
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
        let mut m = IdMemory::new(10, Duration::from_secs(60));
        m.insert(id(1), 'a', t, 0);
        m.expire(t + Duration::from_secs(59));
        assert_eq!(m.get(&id(1)), Some(&'a'));
        assert_eq!(m.get(&id(2)), None);
        assert_eq!(m.expire(t + Duration::from_secs(60)), vec![(id(1), 'a')]);
        assert_eq!(m.get(&id(1)), None);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn bounded_oldest_first() {
        let t = Instant::now();
        let mut m = IdMemory::new(3, Duration::from_secs(60));
        let mut gone = Vec::new();
        for n in 1..=5 {
            gone.extend(m.insert(id(n), n, t, 0));
        }
        assert_eq!(m.len(), 3);
        assert_eq!(gone, vec![(id(1), 1), (id(2), 2)]);
        assert!(m.get(&id(3)).is_some() && m.get(&id(5)).is_some());
    }

    #[test]
    fn a_renewed_entry_outlives_its_first_slot() {
        let t = Instant::now();
        let mut m = IdMemory::new(2, Duration::from_secs(60));
        m.insert(id(1), (), t, 0);
        m.insert(id(1), (), t + Duration::from_secs(30), 0);
        m.expire(t + Duration::from_secs(70));
        assert!(m.get(&id(1)).is_some());
        m.insert(id(2), (), t + Duration::from_secs(31), 0);
        m.insert(id(3), (), t + Duration::from_secs(32), 0);
        assert_eq!(m.len(), 2, "bounded by entries, not by stale slots");
    }

    #[test]
    fn an_answer_to_a_send_from_before_a_clear_is_not_remembered() {
        let t = Instant::now();
        let mut m = IdMemory::new(10, Duration::from_secs(60));
        let before = m.generation();
        m.insert(id(1), (), t, before);
        m.clear();
        assert!(m.get(&id(1)).is_none());
        m.insert(id(2), (), t, before);
        assert!(m.get(&id(2)).is_none());
        m.insert(id(3), (), t, m.generation());
        assert!(m.get(&id(3)).is_some());
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let mut m = IdMemory::new(0, Duration::from_secs(60));
        m.insert(id(1), (), Instant::now(), 0);
        assert_eq!(m.len(), 0);
    }
}
