//! Relay sessions, the sync engine, the publisher and the status reporter.

pub mod health;
pub mod pagination;
