//! Leases: worker membership (each worker holds `grasp-sync-worker-<name>`) and the
//! controller's leader election (`grasp-sync-controller`).

pub mod leader;
pub mod membership;
