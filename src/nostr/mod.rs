//! Nostr protocol logic that needs no I/O: NIP-34 coordinates and relay URL rules.

pub mod coordinate;
pub mod relay_url;

pub use coordinate::{CoordinateError, RepoCoordinate};
pub use relay_url::{RelayUrl, RelayUrlError};
