//! Relay sessions, the sync engine, the publisher and the status reporter.

pub mod connection;
pub mod feed;
pub mod health;
pub mod lease;
pub mod local_index;
pub mod metrics;
pub mod negentropy;
pub mod nip11;
pub mod outcome;
pub mod pacing;
pub mod pagination;
pub mod publisher;
pub mod runtime;
pub mod session;
pub mod status;
