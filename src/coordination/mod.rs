//! Leases: worker membership (each worker holds `grasp-sync-worker-<name>`) and the
//! controller's leader election (`grasp-sync-controller`).

pub mod leader;
pub mod membership;

use std::time::Duration;

/// How long one Lease request may take: less than the renew interval, so a stalled API
/// server cannot keep a holder believing in a Lease that is about to expire elsewhere.
pub fn request_deadline(renew_every: Duration) -> Duration {
    renew_every.mul_f64(0.8).max(Duration::from_millis(100))
}

/// How long a renewal started at `now` may wait for its answer: `deadline`, but while the
/// Lease counts as held never past `held_until` (the last good renewal's start plus the
/// margin: the worker's hold margin, the leader's step-down margin). Nothing else in the renewal loop runs while a request waits, and after a
/// stalled renewal the next tick falls right on the margin's end: waited on in full, it
/// would give the Lease up `deadline` late, most of the interval the margin keeps for
/// stopping the sessions.
pub(crate) fn renewal_within(
    held: bool,
    deadline: Duration,
    held_until: tokio::time::Instant,
    now: tokio::time::Instant,
) -> Duration {
    if held {
        deadline.min(held_until.saturating_duration_since(now))
    } else {
        deadline
    }
}

/// A Lease request that did not finish within `after`.
fn timed_out(after: Duration) -> kube::Error {
    kube::Error::Service(format!("the API server did not answer within {after:?}").into())
}
