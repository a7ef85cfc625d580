//! Connection health and reconnect scheduling for one relay, free of I/O and clocks: every
//! method takes `now`, and jitter comes in as a number in [0, 1).

use std::time::{Duration, Instant};

/// Tunables (defaults from DESIGN.md).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// First reconnect delay; doubles with each consecutive failure.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Relative jitter applied to every delay (0.2 = ±20 %).
    pub jitter: f64,
    /// Failing continuously this long makes the relay `Dead`.
    pub dead_after: Duration,
    /// Retry interval of a dead relay.
    pub dead_retry: Duration,
    /// Pause after the relay says we are rate-limited.
    pub rate_limit_cooldown: Duration,
    /// A connection must stay up this long to count as recovered.
    pub stability_period: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            base_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
            jitter: 0.2,
            dead_after: Duration::from_secs(24 * 3600),
            dead_retry: Duration::from_secs(24 * 3600),
            rate_limit_cooldown: Duration::from_secs(65),
            stability_period: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Never connected, no failure yet.
    New,
    /// Connected for less than the stability period, or after failures.
    Degraded,
    /// Connected and stable.
    Healthy,
    /// Disconnected, waiting to retry.
    Backoff,
    /// Cooling down after a rate-limit signal.
    RateLimited,
    /// Failing for longer than `dead_after`.
    Dead,
}

#[derive(Debug, Clone)]
pub struct Health {
    config: HealthConfig,
    consecutive_failures: u32,
    failing_since: Option<Instant>,
    connected_since: Option<Instant>,
    next_retry_at: Option<Instant>,
    rate_limited_until: Option<Instant>,
}

impl Health {
    pub fn new(config: HealthConfig) -> Self {
        Health {
            config,
            consecutive_failures: 0,
            failing_since: None,
            connected_since: None,
            next_retry_at: None,
            rate_limited_until: None,
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn next_retry_at(&self) -> Option<Instant> {
        self.next_retry_at
    }

    pub fn connected_since(&self) -> Option<Instant> {
        self.connected_since
    }

    pub fn on_connected(&mut self, now: Instant) {
        self.connected_since = Some(now);
        self.next_retry_at = None;
    }

    /// We end this connection for the relay's misconduct: however long it lasted, it does
    /// not count as stable, so the next failure backs off further instead of starting over.
    pub fn on_misconduct(&mut self) {
        self.connected_since = None;
    }

    /// The connection attempt failed or an established connection dropped. Returns the delay
    /// before the next attempt. A connection that dropped before the stability period counts
    /// as a failure, so a relay that accepts and then drops does not get hammered every
    /// `base_backoff`.
    pub fn on_failure(&mut self, now: Instant, jitter_unit: f64) -> Duration {
        if let Some(since) = self.connected_since.take()
            && now.saturating_duration_since(since) >= self.config.stability_period
        {
            self.consecutive_failures = 0;
            self.failing_since = None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let failing_since = *self.failing_since.get_or_insert(now);

        let delay = if now.saturating_duration_since(failing_since) >= self.config.dead_after {
            self.config.dead_retry
        } else {
            doubled(
                self.config.base_backoff,
                self.consecutive_failures.saturating_sub(1),
                self.config.max_backoff,
            )
        };
        let delay = apply_jitter(delay, self.config.jitter, jitter_unit);
        let mut at = now + delay;
        // A pending rate-limit cool-down is never shortened by a failure.
        if let Some(rl) = self.rate_limited_until
            && rl > at
        {
            at = rl;
        }
        self.next_retry_at = Some(at);
        at - now
    }

    /// The relay said "rate-limited". Returns when we may resume.
    pub fn on_rate_limited(&mut self, now: Instant) -> Instant {
        let until = now + self.config.rate_limit_cooldown;
        self.rate_limited_until = Some(self.rate_limited_until.map_or(until, |u| u.max(until)));
        until
    }

    pub fn rate_limited_until(&self, now: Instant) -> Option<Instant> {
        self.rate_limited_until.filter(|u| *u > now)
    }

    /// True when a (re)connect may be attempted now.
    pub fn may_connect(&self, now: Instant) -> bool {
        self.next_retry_at.is_none_or(|t| t <= now) && self.rate_limited_until(now).is_none()
    }

    pub fn state(&self, now: Instant) -> HealthState {
        if self.rate_limited_until(now).is_some() {
            return HealthState::RateLimited;
        }
        if let Some(since) = self.connected_since {
            return if now.saturating_duration_since(since) >= self.config.stability_period {
                HealthState::Healthy
            } else {
                HealthState::Degraded
            };
        }
        match self.failing_since {
            None => HealthState::New,
            Some(f) if now.saturating_duration_since(f) >= self.config.dead_after => {
                HealthState::Dead
            }
            Some(_) => HealthState::Backoff,
        }
    }
}

fn apply_jitter(delay: Duration, jitter: f64, unit: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let factor = 1.0 - jitter + 2.0 * jitter * unit;
    delay.mul_f64(factor)
}

/// `base` doubled `doublings` times, never over `cap`: the growing delay every retry of this
/// crate follows (a relay's reconnects, the local feed's retries, an abandoned
/// reconciliation's).
pub fn doubled(base: Duration, doublings: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << doublings.min(31)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn doubled_grows_from_the_base_up_to_the_cap_and_never_overflows() {
        assert_eq!(doubled(secs(5), 0, secs(60)), secs(5));
        assert_eq!(doubled(secs(5), 1, secs(60)), secs(10));
        assert_eq!(doubled(secs(5), 3, secs(60)), secs(40));
        assert_eq!(doubled(secs(5), 4, secs(60)), secs(60));
        assert_eq!(doubled(secs(5), u32::MAX, secs(60)), secs(60));
        assert_eq!(doubled(Duration::MAX, 40, Duration::MAX), Duration::MAX);
        assert_eq!(doubled(secs(5), 2, secs(1)), secs(1), "the cap wins");
    }

    fn no_jitter() -> HealthConfig {
        HealthConfig {
            jitter: 0.0,
            ..HealthConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_from_5s_to_1h() {
        let t0 = Instant::now();
        let mut h = Health::new(no_jitter());
        let delays: Vec<u64> = (0..12).map(|_| h.on_failure(t0, 0.5).as_secs()).collect();
        assert_eq!(
            delays,
            [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        );
        assert_eq!(h.consecutive_failures(), 12);
        assert_eq!(h.state(t0), HealthState::Backoff);
        assert!(!h.may_connect(t0));
        assert!(h.may_connect(t0 + secs(3600)));
    }

    #[test]
    fn misconduct_keeps_backing_off_however_long_each_connection_lasted() {
        let t0 = Instant::now();
        let mut h = Health::new(no_jitter());
        let mut delays = Vec::new();
        let mut now = t0;
        for _ in 0..4 {
            h.on_connected(now);
            now += secs(3600); // far past the stability period
            h.on_misconduct();
            delays.push(h.on_failure(now, 0.5).as_secs());
        }
        assert_eq!(delays, [5, 10, 20, 40]);
        // A stable connection without misconduct starts over.
        h.on_connected(now);
        now += secs(3600);
        assert_eq!(h.on_failure(now, 0.5).as_secs(), 5);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let t0 = Instant::now();
        for (unit, want) in [
            (0.0, 4.0),
            (0.5, 5.0),
            (0.999_999, 6.0),
            (f64::NAN, 5.0),
            (7.0, 6.0),
        ] {
            let mut h = Health::new(HealthConfig::default());
            let d = h.on_failure(t0, unit).as_secs_f64();
            assert!((d - want).abs() < 0.01, "unit {unit}: {d}");
        }
    }

    #[test]
    fn dead_after_a_day_then_daily_retries() {
        let t0 = Instant::now();
        let mut h = Health::new(no_jitter());
        let mut now = t0;
        while now.duration_since(t0) < secs(24 * 3600) {
            now += h.on_failure(now, 0.5);
        }
        assert_eq!(h.state(now), HealthState::Dead);
        assert_eq!(h.on_failure(now, 0.5), secs(24 * 3600));
    }

    #[test]
    fn flapping_connection_keeps_backing_off_but_stable_one_resets() {
        let t0 = Instant::now();
        let mut h = Health::new(no_jitter());
        assert_eq!(h.on_failure(t0, 0.5), secs(5));
        // Connects, drops after 10 s: still counted as failing.
        h.on_connected(t0 + secs(5));
        assert_eq!(h.state(t0 + secs(6)), HealthState::Degraded);
        assert_eq!(h.on_failure(t0 + secs(15), 0.5), secs(10));
        // Connects and stays up past the stability period: healthy, and the next drop starts over.
        h.on_connected(t0 + secs(30));
        assert_eq!(h.state(t0 + secs(30 + 300)), HealthState::Healthy);
        assert_eq!(h.on_failure(t0 + secs(1000), 0.5), secs(5));
        assert_eq!(h.consecutive_failures(), 1);
    }

    #[test]
    fn rate_limit_cooldown_blocks_reconnects_and_outlasts_short_backoff() {
        let t0 = Instant::now();
        let mut h = Health::new(no_jitter());
        let until = h.on_rate_limited(t0);
        assert_eq!(until - t0, secs(65));
        assert_eq!(h.state(t0 + secs(1)), HealthState::RateLimited);
        assert!(!h.may_connect(t0 + secs(64)));
        // A failure during the cool-down does not schedule a retry before it ends.
        assert_eq!(h.on_failure(t0, 0.5), secs(65));
        assert!(h.may_connect(t0 + secs(65)));
        assert_eq!(h.state(t0 + secs(66)), HealthState::Backoff);
    }
}
