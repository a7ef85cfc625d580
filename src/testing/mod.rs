//! Relays and fixtures for tests, benchmarks and `grasp-sync demo`. Loopback only.

pub mod nostr_rs_relay;
pub mod scripted_relay;
