//! Nostr protocol logic that needs no I/O: event kinds, NIP-34 coordinates and
//! announcements, relay URL rules, the L1/L2/L3 filters, the REQ pagination state machine,
//! the negentropy initiator, the OK/CLOSED/NOTICE prefix rules, and how remote text is
//! cleaned before it is shown.

pub mod coordinate;
pub mod filters;
pub mod kinds;
pub mod live_plan;
pub mod negentropy;
pub mod nip34;
pub mod outcome;
pub mod pagination;
pub mod relay_url;
pub mod remote_text;
pub mod root_digest;

pub use coordinate::{CoordinateError, RepoCoordinate};
pub use relay_url::{RelayUrl, RelayUrlError};
