//! Why a connection of a session ended. `Display` is the text that lands in the status's
//! `last_error` (so it stays each cause's own message); `label` is bounded, for metrics and
//! log fields.

use thiserror::Error;

use crate::relay::address_policy::SsrfError;
use crate::relay::connection::ConnectionError;
use crate::worker::publisher::PublisherClosed;

#[derive(Debug, Error)]
pub(super) enum SessionError {
    /// The relay's name now resolves to an address we do not connect to.
    #[error(transparent)]
    AddressRefused(#[from] SsrfError),
    #[error(transparent)]
    Connect(ConnectionError),
    /// Reading failed or the relay closed the connection.
    #[error(transparent)]
    Read(ConnectionError),
    #[error(transparent)]
    Write(ConnectionError),
    /// Events can no longer be handed on, so reading more would only lose them.
    #[error(transparent)]
    PublisherClosed(#[from] PublisherClosed),
    /// Our relay URL is not one an AUTH event can carry.
    #[error(transparent)]
    AuthUrl(nostr::types::url::Error),
    #[error(transparent)]
    AuthSign(nostr::event::builder::Error),
    /// The relay sends mostly events that fail validation: we stop spending CPU on it.
    #[error(
        "the relay sent mostly invalid events ({invalid} invalid, {valid} valid on this connection)"
    )]
    MostlyInvalid { invalid: u64, valid: u64 },
    /// Told to stop while waiting (for the publisher's room): ends the session.
    #[error("the session was told to stop")]
    Stopped,
}

impl SessionError {
    /// Short, bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            SessionError::AddressRefused(_) => "address_refused",
            SessionError::Connect(_) => "connect_failed",
            SessionError::Read(_) => "connection_lost",
            SessionError::Write(_) => "write_failed",
            SessionError::PublisherClosed(_) => "publisher_closed",
            SessionError::AuthUrl(_) => "auth_url_invalid",
            SessionError::AuthSign(_) => "auth_sign_failed",
            SessionError::MostlyInvalid { .. } => "mostly_invalid",
            SessionError::Stopped => "stopped",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_cause_own_message() {
        let e = SessionError::Read(ConnectionError::Closed);
        assert_eq!(e.to_string(), "the relay closed the connection");
        assert_eq!(e.label(), "connection_lost");
        let e = SessionError::from(PublisherClosed);
        assert_eq!(e.to_string(), "the publisher has stopped");
        assert_eq!(e.label(), "publisher_closed");
    }
}
