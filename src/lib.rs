//! grasp-sync: Kubernetes-native GRASP-02 proactive sync for nostr git relays.
//!
//! `ARCHITECTURE.md` at the repository root states the layers and who writes what. From the
//! top: [`modes`] wires processes; [`controller`] and [`worker`] are the two halves, which
//! never import each other; [`store`], [`coordination`], [`relay`] and [`observability`] are
//! the shared rooms below them; [`crd`] and [`nostr`] are pure. [`testing`] holds the
//! scriptable relay used by tests, benchmarks and the demo.

pub mod controller;
pub mod coordination;
pub mod crd;
pub mod modes;
pub mod nostr;
pub mod observability;
pub mod relay;
pub mod store;
pub mod testing;
pub mod worker;
