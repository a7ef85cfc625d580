//! Nostr protocol logic that needs no I/O: NIP-34 coordinates, relay URL rules, filters.

pub mod coordinate;
pub mod filters;
pub mod nip34;
pub mod relay_url;

pub use coordinate::{CoordinateError, RepoCoordinate};
pub use relay_url::{RelayUrl, RelayUrlError};
