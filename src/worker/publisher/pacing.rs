//! Pace of publishing to the local relay: a token bucket whose rate adapts to the relay's
//! push-back (halved on `rate-limited:`, raised slowly while events are accepted), so the
//! syncer settles just under a relay's ingress limit instead of bouncing off it.

use std::time::{Duration, Instant};

/// Slowest pace we fall back to (events per second).
pub const MIN_RATE: f64 = 0.2;
/// The first push-back after running unpaced starts from at least this pace: the observed
/// rate is unreliable after idle periods, and one stray refusal must not cripple throughput
/// (the pace recovers exponentially while events are accepted).
pub const FIRST_PACE: f64 = 50.0;
/// Above this, with no configured cap, pacing switches off again.
const UNLIMITED_ABOVE: f64 = 10_000.0;
/// Rate increase per accepted event, relative: probing above a limit costs one refused
/// event, so probe rarely at low rates and ramp quickly at high ones.
const INCREASE: f64 = 0.01;
/// Multiplicative decrease on each push-back once a rate is established.
const DECREASE: f64 = 0.8;
const WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Pacer {
    rate: Option<f64>,
    max_rate: Option<f64>,
    tokens: f64,
    last: Instant,
    window_start: Instant,
    window_sent: u64,
    last_rate_estimate: f64,
    /// When the pace was last lowered: refusals of events sent before then reflect the same
    /// overload and must not lower it again.
    last_decrease: Option<Instant>,
}

impl Pacer {
    /// `max_rate`: a configured ceiling in events/s (None: unlimited until the relay objects).
    pub fn new(max_rate: Option<f64>, now: Instant) -> Self {
        let max_rate = max_rate.filter(|r| r.is_finite() && *r > 0.0);
        Pacer {
            rate: max_rate,
            max_rate,
            tokens: max_rate.map_or(1.0, |r| r.max(1.0)),
            last: now,
            window_start: now,
            window_sent: 0,
            last_rate_estimate: 0.0,
            last_decrease: None,
        }
    }

    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Whether an event may be sent now (without taking a token), or when.
    pub fn peek(&self, now: Instant) -> Result<(), Instant> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(now + Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }

    /// Take a token to send one event now, or learn when the next one is due.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        self.roll_window(now);
        let Some(rate) = self.rate else {
            self.window_sent += 1;
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        // Burst of at most one second's worth (and at least one event).
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.window_sent += 1;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate;
            Err(now + Duration::from_secs_f64(wait))
        }
    }

    /// The relay refused an event sent at `sent_at` as too fast: the first time, halve the
    /// pace we were actually sending at; after that, step down by `DECREASE` — once per
    /// overload, not once per refused event.
    pub fn on_rate_limited(&mut self, now: Instant, sent_at: Instant) {
        if self.last_decrease.is_some_and(|d| sent_at < d) {
            return;
        }
        self.last_decrease = Some(now);
        self.roll_window(now);
        let next = match self.rate {
            Some(r) => r * DECREASE,
            None => {
                let secs = now
                    .saturating_duration_since(self.window_start)
                    .as_secs_f64();
                let current = if secs > 0.0 {
                    self.window_sent as f64 / secs
                } else {
                    0.0
                };
                let observed = current.max(self.last_rate_estimate);
                if observed.is_finite() {
                    (observed / 2.0).max(FIRST_PACE)
                } else {
                    FIRST_PACE
                }
            }
        };
        self.rate = Some(next.max(MIN_RATE));
        self.tokens = 0.0;
        self.last = now;
    }

    /// An event was accepted: creep back up.
    pub fn on_accepted(&mut self) {
        if let Some(r) = self.rate {
            let next = r + r.max(1.0) * INCREASE;
            self.rate = match self.max_rate {
                Some(max) => Some(next.min(max)),
                None if next > UNLIMITED_ABOVE => None,
                None => Some(next),
            };
        }
    }

    fn roll_window(&mut self, now: Instant) {
        let secs = now
            .saturating_duration_since(self.window_start)
            .as_secs_f64();
        if secs >= WINDOW.as_secs_f64() {
            self.last_rate_estimate = self.window_sent as f64 / secs;
            self.window_start = now;
            self.window_sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a pacer for `secs` against a relay that says whether it allows an event sent
    /// at a moment: (accepted, refused).
    fn drive(secs: u64, mut allow: impl FnMut(Instant) -> bool) -> (u64, u64) {
        let t0 = Instant::now();
        let mut p = Pacer::new(None, t0);
        let mut now = t0;
        let (mut accepted, mut limited) = (0u64, 0u64);
        let end = t0 + Duration::from_secs(secs);
        while now < end {
            match p.take(now) {
                Ok(()) => {
                    if allow(now) {
                        accepted += 1;
                        p.on_accepted();
                    } else {
                        limited += 1;
                        p.on_rate_limited(now, now);
                    }
                    now += Duration::from_millis(1);
                }
                Err(at) => now = at.max(now + Duration::from_micros(100)),
            }
        }
        (accepted, limited)
    }

    /// A relay with a token bucket of `capacity` events per second.
    fn simulate(capacity: f64, secs: u64) -> (u64, u64) {
        let mut tokens = capacity;
        let mut last: Option<Instant> = None;
        drive(secs, |now| {
            let dt = last.map_or(0.0, |l| now.duration_since(l).as_secs_f64());
            last = Some(now);
            tokens = (tokens + dt * capacity).min(capacity);
            if tokens >= 1.0 {
                tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    #[test]
    fn settles_near_a_relays_limit() {
        // ngit-grasp / nostr-relay-builder default: 60 events per minute.
        let (accepted, limited) = simulate(1.0, 600);
        assert!(accepted >= 500, "accepted only {accepted} in 600 s at 1/s");
        assert!(
            limited < accepted / 5,
            "bounced {limited} times for {accepted} accepted"
        );
        let (accepted, limited) = simulate(200.0, 60);
        assert!(accepted >= 200 * 50, "accepted {accepted}");
        assert!(limited < accepted / 20, "limited {limited}");
    }

    /// The per-connection limiter of nostr-relay-builder (and so ngit-grasp) as it behaves
    /// at 60 events a minute: a budget of 60; on each EVENT it adds one token per *whole*
    /// second since the last event it allowed, then takes one — also from an event it goes
    /// on to refuse, refusing whenever that leaves none. Sending faster than one a second
    /// drains it, and once drained, even one a second is refused until a two-second gap.
    struct RelayBuilderLimiter {
        count: u32,
        last: Option<Instant>,
    }

    impl RelayBuilderLimiter {
        fn allow(&mut self, now: Instant) -> bool {
            let Some(last) = self.last else {
                self.last = Some(now);
                return true;
            };
            let secs = now
                .duration_since(last)
                .min(Duration::from_secs(60))
                .as_secs() as u32;
            self.count = (self.count.saturating_add(secs).saturating_sub(1)).min(59);
            if self.count == 0 {
                return false;
            }
            self.last = Some(now);
            true
        }
    }

    fn against_relay_builder(secs: u64) -> (u64, u64) {
        let mut relay = RelayBuilderLimiter {
            count: 60,
            last: None,
        };
        drive(secs, |now| relay.allow(now))
    }

    #[test]
    fn settles_near_the_limit_of_a_stock_grasp_relay() {
        let (accepted, limited) = against_relay_builder(600);
        // 60 at once, then at most one a second.
        assert!(
            accepted >= 60 + 480,
            "accepted {accepted} in 600 s ({limited} refused)"
        );
        assert!(
            limited < accepted / 5,
            "bounced {limited} times for {accepted}"
        );
    }

    #[test]
    fn unlimited_until_told_and_capped_when_configured() {
        let t0 = Instant::now();
        let mut p = Pacer::new(None, t0);
        for _ in 0..10_000 {
            assert!(p.take(t0).is_ok());
        }
        let mut capped = Pacer::new(Some(10.0), t0);
        let sent = (0..100).filter(|_| capped.take(t0).is_ok()).count();
        assert_eq!(sent, 10, "burst is one second's worth");
        assert!(capped.take(t0 + Duration::from_millis(100)).is_ok());
        for _ in 0..1000 {
            capped.on_accepted();
        }
        assert_eq!(capped.rate(), Some(10.0));
    }

    #[test]
    fn rate_limited_slows_down_and_has_a_floor() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(8.0), t0);
        p.on_rate_limited(t0, t0);
        assert!((p.rate().unwrap() - 6.4).abs() < 1e-9);
        // Refusals of events sent before that decrease change nothing.
        p.on_rate_limited(t0 + Duration::from_millis(5), t0 - Duration::from_millis(1));
        assert!((p.rate().unwrap() - 6.4).abs() < 1e-9);
        for i in 0..20 {
            let t = t0 + Duration::from_secs(i + 1);
            p.on_rate_limited(t, t);
        }
        assert_eq!(p.rate(), Some(MIN_RATE));
        let t = t0 + Duration::from_secs(21);
        assert!(p.peek(t).is_err());
        assert!(p.take(t).is_err());
    }
}
