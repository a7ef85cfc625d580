//! NIP-42: relays that require authentication get an AUTH event signed with our key.

use nostr::{ClientMessage, EventBuilder};

use super::{Conn, Session, SessionError};

impl Session {
    /// Answer an AUTH challenge when we have a key.
    pub(super) async fn authenticate(
        &mut self,
        conn: &mut Conn,
        challenge: &str,
    ) -> Result<(), SessionError> {
        let Some(keys) = &self.config.auth_keys else {
            return Ok(());
        };
        if conn.authenticated {
            return Ok(());
        }
        let relay = nostr::RelayUrl::parse(self.url.as_str()).map_err(SessionError::AuthUrl)?;
        let event = EventBuilder::auth(challenge, relay)
            .sign_with_keys(keys)
            .map_err(SessionError::AuthSign)?;
        conn.auth_pending = Some(event.id);
        conn.writer
            .send(&ClientMessage::auth(event))
            .await
            .map_err(SessionError::Write)
    }
}
