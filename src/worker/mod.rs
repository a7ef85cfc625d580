//! The worker's half: one session per remote relay ([`session`]), the publisher that hands
//! events to the local relay ([`publisher`]), the supervisor that turns the RelaySyncs this
//! worker holds into sessions and their state into status ([`supervisor`], [`status`]).

pub mod metrics;
pub mod publisher;
pub mod session;
pub mod status;
pub mod supervisor;

pub use metrics::WorkerMetrics;
