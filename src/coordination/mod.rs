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

/// A Lease request that did not finish within `after`.
fn timed_out(after: Duration) -> kube::Error {
    kube::Error::Service(format!("the API server did not answer within {after:?}").into())
}
