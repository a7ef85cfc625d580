//! Relay-client I/O shared by discovery and the sessions: websocket connections, the
//! address policy checked before every connection, the reconnect backoff, the local-relay
//! feed and index reads, NIP-11 documents, and the process-wide TLS set-up.

pub mod address_policy;
pub mod backoff;
pub mod connection;
pub mod feed;
pub mod local_index;
pub mod nip11;
pub mod resolve;
pub mod tls;
