//! Discovery (self-subscription, repo index, relay targets) and assignment (hash ring,
//! worker leases, drain).

pub mod assigner;
pub mod assignment;
pub mod desired;
pub mod discovery;
pub mod index;
pub mod leader;
pub mod ring;
pub mod ssrf;
pub mod targets;
