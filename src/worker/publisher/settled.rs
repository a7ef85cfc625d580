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

#[derive(Debug)]
pub(super) struct Settled(IdMemory<()>);

impl Default for Settled {
    fn default() -> Self {
        Settled(IdMemory::new(CAPACITY, TTL))
    }
}

impl Settled {
    /// The current generation (a connection notes it when it connects).
    pub(super) fn generation(&self) -> u64 {
        self.0.generation()
    }

    /// The local relay said, at `now`, on a connection made in `generation`, that it holds
    /// `id`. Ignored from a connection of an older generation.
    pub(super) fn insert(&mut self, id: EventId, now: Instant, generation: u64) {
        self.0.insert(id, (), now, generation);
    }

    /// Whether the local relay said it holds `id` within the TTL.
    pub(super) fn holds(&mut self, id: &EventId, now: Instant) -> bool {
        self.0.expire(now);
        self.0.get(id).is_some()
    }

    /// Forget everything (a connection to the relay was lost or made again), and start a new
    /// generation.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
