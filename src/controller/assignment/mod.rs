//! Assignment: which worker holds each relay's session. A pure planner ([`plan`]) over a
//! consistent-hash ring ([`ring`]) decides; the [`reconciler`] loop watches RelaySyncs and
//! worker Leases and applies the plan as label writes.

pub mod metrics;
pub mod plan;
pub mod reconciler;
pub mod ring;
