//! grasp-sync: Kubernetes-native GRASP-02 proactive sync for nostr git relays.
//!
//! See DESIGN.md in the repository for the architecture. Module map:
//! - [`crd`]: the RelaySync resource;
//! - [`nostr`]: pure protocol logic (coordinates, relay URLs);
//! - [`controller`], [`worker`], [`store`]: discovery/assignment, relay sessions, and the
//!   RelaySync store.

pub mod controller;
pub mod crd;
pub mod demo;
pub mod http;
pub mod kube_mode;
pub mod nostr;
pub mod standalone;
pub mod store;
pub mod testing;
pub mod tls;
pub mod worker;
