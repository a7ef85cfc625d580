//! How many connections publish into the local relay. Real relays limit ingress per
//! connection (nostr-relay-builder, and so ngit-grasp: 60 events a minute each), so when the
//! relay pushes back while events wait, more connections mean more throughput — if the
//! limit really is per connection. A connection opened by a growth step reports on its
//! first answers: five accepted in a row mean the limit is per connection (grow again while
//! the push-back lasts); a `rate-limited:` among them means the limit is on the relay's
//! whole ingress (or our address), so growing stops for a while and the extra connections
//! retire when idle.
//!
//! Without push-back, events can still wait: the relay answers each connection in turn
//! (nostr-relay-builder serves a connection's messages one after another), so one connection
//! is bounded by the relay's work per event and the round trips, not by a limit. Then the
//! scaler probes: with events waiting for a whole window and no push-back, it doubles the
//! connections and keeps probing only if the next window took at least a fifth more events;
//! otherwise probing stops for a while (the extra connections retire when idle).

use std::time::{Duration, Instant};

/// Growth stops this long after new connections were refused at once.
pub(super) const FREEZE: Duration = Duration::from_secs(60);

/// How long a throughput probe measures the relay's intake.
pub(super) const PROBE_WINDOW: Duration = Duration::from_secs(1);

/// Probing stops this long after a step that did not raise the intake.
pub(super) const PROBE_FREEZE: Duration = Duration::from_secs(300);

/// A probe step counts if the intake grew by at least this factor.
const PROBE_GAIN: f64 = 1.2;

/// Events a window must take to say anything: a relay that takes nothing (hung, down,
/// refusing everything) is not one more connections would help.
const PROBE_MIN_TAKEN: u64 = 20;

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
    /// Events the relay took (accepted, or already held).
    pub(super) taken: u64,
}

/// The intake measured over the current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    since: Instant,
    taken: u64,
    /// Events waited at every look of the window.
    backlog: bool,
}

#[derive(Debug)]
pub(super) struct Scaler {
    min: usize,
    max: usize,
    /// Connections opened by the last growth step whose first answer is still due.
    awaiting: u64,
    frozen_until: Option<Instant>,
    window: Option<Window>,
    /// The intake before the last probe step and the connections open before it, while
    /// its window runs.
    probe_base: Option<(f64, usize)>,
    probing_frozen_until: Option<Instant>,
    /// Connections open before the last step that did not raise the intake: probing waits
    /// until the extra ones have retired (busy connections do not), so that it does not
    /// ratchet up a step per freeze.
    useful: Option<usize>,
    /// The relay last pushed back: probing is for a relay that does not.
    pushed_back_at: Option<Instant>,
}

impl Scaler {
    pub(super) fn new(min: usize, max: usize) -> Self {
        let min = min.max(1);
        Scaler {
            min,
            max: max.max(min),
            awaiting: 0,
            frozen_until: None,
            window: None,
            probe_base: None,
            probing_frozen_until: None,
            useful: None,
            pushed_back_at: None,
        }
    }

    pub(super) fn min(&self) -> usize {
        self.min
    }

    /// Connections to open now, `open` being open.
    pub(super) fn grow(&mut self, now: Instant, open: usize, s: Signals) -> usize {
        let grown = self.grow_pushed_back(now, open, s);
        if s.pushed_back > 0 {
            // The relay limits us: the push-back rules decide, not the intake.
            self.window = None;
            self.probe_base = None;
            self.pushed_back_at = Some(now);
            return grown;
        }
        self.probe_intake(now, open, s)
    }

    /// Throughput probing without push-back (the module's documentation says why).
    fn probe_intake(&mut self, now: Instant, open: usize, s: Signals) -> usize {
        let w = self.window.get_or_insert(Window {
            since: now,
            taken: 0,
            backlog: true,
        });
        w.taken += s.taken;
        w.backlog &= s.backlog;
        let elapsed = now.saturating_duration_since(w.since);
        if elapsed < PROBE_WINDOW {
            return 0;
        }
        let (taken, backlog) = (w.taken, w.backlog);
        let rate = taken as f64 / elapsed.as_secs_f64();
        self.window = None;
        if let Some((base, before)) = self.probe_base.take()
            && (rate < base * PROBE_GAIN || taken < PROBE_MIN_TAKEN)
        {
            self.probing_frozen_until = Some(now + PROBE_FREEZE);
            self.useful = Some(before);
            tracing::debug!(
                rate,
                before = base,
                open,
                "more connections did not raise the local relay's intake; probing stops for a while"
            );
            return 0;
        }
        let frozen = [self.frozen_until, self.probing_frozen_until]
            .into_iter()
            .flatten()
            .any(|t| now < t)
            || self.pushed_back_at.is_some_and(|t| now < t + FREEZE);
        if self.useful.is_some_and(|u| open <= u) {
            self.useful = None;
        }
        if !backlog
            || taken < PROBE_MIN_TAKEN
            || open >= self.max
            || frozen
            || self.useful.is_some()
        {
            return 0;
        }
        self.probe_base = Some((rate, open));
        let add = open.max(1).min(self.max - open);
        // Like a push-back step: if the relay starts pushing back, the next step waits for
        // these connections' first answers (a limit on its whole ingress refuses them too).
        self.awaiting = add as u64;
        add
    }

    /// Growth while the relay pushes back, and the freeze a limit on its whole ingress
    /// brings.
    fn grow_pushed_back(&mut self, now: Instant, open: usize, s: Signals) -> usize {
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
            "events wait, but nothing says more connections would help yet"
        );
    }

    fn waiting(taken: u64) -> Signals {
        Signals {
            backlog: true,
            taken,
            ..Signals::default()
        }
    }

    #[test]
    fn without_push_back_probes_while_more_connections_raise_the_intake() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let mut s = Scaler::new(1, 32);
        // A window of events waiting at 100 a second: one probe step (doubling).
        assert_eq!(s.grow(at(0), 1, waiting(0)), 0, "the window opens");
        assert_eq!(s.grow(at(500), 1, waiting(50)), 0);
        assert_eq!(s.grow(at(1000), 1, waiting(50)), 1);
        // Twice the intake with two: the step counts, and the next one follows.
        assert_eq!(s.grow(at(1250), 2, waiting(0)), 0);
        assert_eq!(s.grow(at(2250), 2, waiting(200)), 2);
        // With four, barely more: probing stops, for a while.
        assert_eq!(s.grow(at(2500), 4, waiting(0)), 0);
        assert_eq!(s.grow(at(3500), 4, waiting(210)), 0);
        for k in 0..10 {
            let ms = 3750 + k * 1000;
            assert_eq!(s.grow(at(ms), 4, waiting(0)), 0);
            assert_eq!(s.grow(at(ms + 1000), 4, waiting(200)), 0, "frozen");
        }
        // Later, not from the four that did not help (busy, they stay open): only once
        // the extra ones have retired.
        let later = 3500 + PROBE_FREEZE.as_millis() as u64;
        assert_eq!(s.grow(at(later), 4, waiting(0)), 0);
        assert_eq!(s.grow(at(later + 1000), 4, waiting(200)), 0, "no ratchet");
        assert_eq!(s.grow(at(later + 1250), 2, waiting(0)), 0);
        assert_eq!(
            s.grow(at(later + 2250), 2, waiting(200)),
            2,
            "probed again later"
        );
    }

    #[test]
    fn a_relay_that_takes_nothing_or_pushed_back_lately_is_not_probed() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        // Hung, down or refusing everything: events wait, nothing is taken.
        let mut s = Scaler::new(1, 32);
        for k in 0..5 {
            assert_eq!(s.grow(at(k * 1000), 1, waiting(0)), 0);
        }
        // A step whose window took nothing does not count as a gain over nothing.
        let mut s = Scaler::new(1, 32);
        assert_eq!(s.grow(at(0), 1, waiting(0)), 0);
        assert_eq!(s.grow(at(1000), 1, waiting(100)), 1);
        assert_eq!(s.grow(at(1100), 2, waiting(0)), 0);
        assert_eq!(s.grow(at(2100), 2, waiting(0)), 0);
        assert_eq!(s.grow(at(2200), 2, waiting(0)), 0);
        assert_eq!(s.grow(at(3200), 2, waiting(500)), 0, "frozen");
        // Pushed back a moment ago: the push-back rules have it, not the probe.
        let mut s = Scaler::new(1, 32);
        let answered = Signals {
            fresh_accepted: 1,
            ..Signals::default()
        };
        assert_eq!(s.grow(at(0), 1, pushed(true)), 1);
        assert_eq!(s.grow(at(100), 2, answered), 0);
        assert_eq!(s.grow(at(1100), 2, waiting(300)), 0);
        let after = FREEZE.as_millis() as u64 + 200;
        assert_eq!(s.grow(at(after), 2, waiting(0)), 0);
        assert_eq!(s.grow(at(after + 1000), 2, waiting(300)), 2);
    }

    #[test]
    fn probes_only_when_events_waited_the_whole_window_and_never_while_pushed_back() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let mut s = Scaler::new(1, 32);
        assert_eq!(s.grow(at(0), 1, waiting(0)), 0);
        let caught_up = Signals {
            taken: 50,
            ..Signals::default()
        };
        assert_eq!(s.grow(at(500), 1, caught_up), 0);
        assert_eq!(
            s.grow(at(1000), 1, waiting(50)),
            0,
            "the queue emptied once"
        );
        // Push-back: the per-connection rules decide (one step), and the window restarts.
        let mut s = Scaler::new(1, 32);
        assert_eq!(s.grow(at(0), 1, waiting(0)), 0);
        assert_eq!(s.grow(at(900), 1, pushed(true)), 1);
        assert_eq!(s.grow(at(1000), 2, waiting(100)), 0, "a new window");
        // A limit on the whole ingress (found by the push-back rules) stops probing too.
        let refused = Signals {
            fresh_limited: 1,
            ..pushed(true)
        };
        assert_eq!(s.grow(at(1100), 2, refused), 0);
        assert_eq!(s.grow(at(1200), 2, waiting(0)), 0);
        assert_eq!(s.grow(at(2200), 2, waiting(300)), 0, "frozen by the limit");
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
