//! Relays and fixtures for tests, benchmarks and `grasp-sync demo`. Loopback only.

pub mod scripted_relay;
