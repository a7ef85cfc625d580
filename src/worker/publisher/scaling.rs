//! How many connections publish into the local relay. Real relays limit ingress per
//! connection (nostr-relay-builder, and so ngit-grasp: 60 events a minute each), so when the
//! relay pushes back while events wait, more connections mean more throughput — if the
//! limit really is per connection. A connection opened by a growth step reports on its
//! first answers: five accepted in a row mean the limit is per connection (grow again while
//! the push-back lasts); a `rate-limited:` among them means the limit is on the relay's
//! whole ingress (or our address), so growing stops for a while and the extra connections
//! retire when idle.

use std::time::{Duration, Instant};

/// Growth stops this long after new connections were refused at once.
pub(super) const FREEZE: Duration = Duration::from_secs(60);

/// What the connections reported since the scaler last looked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Signals {
    /// `rate-limited:` answers on any connection.
    pub(super) pushed_back: u64,
    /// Events wait (queued, or refused and waiting for any connection).
    pub(super) backlog: bool,
    /// Connections opened by growth that showed room of their own, and that were refused
    /// as rate-limited within their first answers.
    pub(super) fresh_accepted: u64,
    pub(super) fresh_limited: u64,
}

#[derive(Debug)]
pub(super) struct Scaler {
    min: usize,
    max: usize,
    /// Connections opened by the last growth step whose first answer is still due.
    awaiting: u64,
    frozen_until: Option<Instant>,
}

impl Scaler {
    pub(super) fn new(min: usize, max: usize) -> Self {
        let min = min.max(1);
        Scaler {
            min,
            max: max.max(min),
            awaiting: 0,
            frozen_until: None,
        }
    }

    pub(super) fn min(&self) -> usize {
        self.min
    }

    /// Connections to open now, `open` being open.
    pub(super) fn grow(&mut self, now: Instant, open: usize, s: Signals) -> usize {
        if s.fresh_limited > 0 && s.fresh_limited >= s.fresh_accepted {
            // Fresh connections were refused like the old ones: not a per-connection limit.
            self.frozen_until = Some(now + FREEZE);
            self.awaiting = 0;
        }
        self.awaiting = self
            .awaiting
            .saturating_sub(s.fresh_accepted + s.fresh_limited);
        if self.frozen_until.is_some_and(|t| now < t) {
            return 0;
        }
        self.frozen_until = None;
        // One step at a time: the next waits for the last one's first answers.
        if self.awaiting > 0 || s.pushed_back == 0 || !s.backlog || open >= self.max {
            return 0;
        }
        let add = open.max(1).min(self.max - open);
        self.awaiting = add as u64;
        add
    }

    /// A step's connections that ended before answering anything (a lost connection) no
    /// longer hold the next step back.
    pub(super) fn forget_unanswered(&mut self) {
        self.awaiting = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(backlog: bool) -> Signals {
        Signals {
            pushed_back: 3,
            backlog,
            ..Signals::default()
        }
    }

    #[test]
    fn grows_by_doubling_while_pushed_back_with_events_waiting_up_to_the_cap() {
        let t = Instant::now();
        let mut s = Scaler::new(1, 12);
        let mut open = 1;
        let mut steps = Vec::new();
        for _ in 0..6 {
            let add = s.grow(t, open, pushed(true));
            steps.push(add);
            open += add;
            // Each new connection's first event is accepted: the limit is per connection.
            let answers = Signals {
                fresh_accepted: add as u64,
                ..Signals::default()
            };
            assert_eq!(s.grow(t, open, answers), 0, "no push-back, no growth");
        }
        assert_eq!(steps, [1, 2, 4, 4, 0, 0]);
        assert_eq!(open, 12);
    }

    #[test]
    fn does_not_grow_without_push_back_or_without_events_waiting() {
        let t = Instant::now();
        let mut s = Scaler::new(2, 32);
        assert_eq!(s.grow(t, 2, Signals::default()), 0);
        assert_eq!(
            s.grow(t, 2, pushed(false)),
            0,
            "pushed back, but nothing waits"
        );
        assert_eq!(
            s.grow(
                t,
                2,
                Signals {
                    backlog: true,
                    ..Signals::default()
                }
            ),
            0,
            "events wait, but the relay takes them as fast as we send"
        );
    }

    #[test]
    fn waits_for_the_last_steps_first_answers_before_the_next() {
        let t = Instant::now();
        let mut s = Scaler::new(1, 32);
        assert_eq!(s.grow(t, 1, pushed(true)), 1);
        assert_eq!(
            s.grow(t, 2, pushed(true)),
            0,
            "the new one has not answered"
        );
        let answered = Signals {
            fresh_accepted: 1,
            ..pushed(true)
        };
        assert_eq!(s.grow(t, 2, answered), 2);
        // A step whose connections were lost before answering does not block for good.
        assert_eq!(s.grow(t, 4, pushed(true)), 0);
        s.forget_unanswered();
        assert_eq!(s.grow(t, 4, pushed(true)), 4);
    }

    #[test]
    fn a_limit_on_the_whole_ingress_stops_growth_for_a_while() {
        let t = Instant::now();
        let mut s = Scaler::new(1, 32);
        assert_eq!(s.grow(t, 1, pushed(true)), 1);
        // The new connection is refused at once, like the old one.
        let refused = Signals {
            fresh_limited: 1,
            ..pushed(true)
        };
        assert_eq!(s.grow(t, 2, refused), 0);
        assert_eq!(s.grow(t + FREEZE / 2, 2, pushed(true)), 0, "frozen");
        assert_eq!(s.grow(t + FREEZE, 2, pushed(true)), 2, "tried again later");
    }

    #[test]
    fn the_cap_is_never_below_the_floor() {
        let t = Instant::now();
        let mut s = Scaler::new(4, 2);
        assert_eq!(s.min(), 4);
        assert_eq!(s.grow(t, 4, pushed(true)), 0);
    }
}
