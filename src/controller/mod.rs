//! The controller's half: discovery (the local relay's announcements → RelaySync specs) and
//! assignment (RelaySyncs → worker labels over a hash ring, with drains). It meets the
//! workers only through RelaySync objects and Leases.

pub mod assignment;
pub mod discovery;
