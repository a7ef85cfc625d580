//! Historic REQs: one page of a paginated filter, or the ids negentropy found missing.

use std::time::Instant;

use nostr::{ClientMessage, EventId, Filter, SubscriptionId};

use super::{FetchSub, HistoricSub};
use crate::nostr::pagination::Paginator;
use crate::worker::session::{Conn, Session, SessionError};

impl Session {
    pub(in crate::worker::session) async fn send_page(
        &mut self,
        conn: &mut Conn,
        batch: u64,
        mut paginator: Paginator,
    ) -> Result<(), SessionError> {
        paginator.start_page();
        conn.next_id += 1;
        let id = SubscriptionId::new(format!("hist-{}", conn.next_id));
        conn.writer
            .send(&ClientMessage::req(id.clone(), vec![paginator.current()]))
            .await
            .map_err(SessionError::Write)?;
        conn.sent_req(&id);
        conn.historic.insert(
            id,
            HistoricSub {
                batch,
                paginator,
                last_activity: Instant::now(),
                opened_at: Instant::now(),
            },
        );
        Ok(())
    }

    pub(super) async fn send_fetch(
        &mut self,
        conn: &mut Conn,
        batch: u64,
        filter: std::sync::Arc<Filter>,
        ids: Vec<EventId>,
        retried: bool,
    ) -> Result<(), SessionError> {
        conn.next_id += 1;
        let id = SubscriptionId::new(format!("ids-{}", conn.next_id));
        let req = Filter::new().ids(ids.iter().copied()).limit(ids.len());
        conn.writer
            .send(&ClientMessage::req(id.clone(), vec![req]))
            .await
            .map_err(SessionError::Write)?;
        conn.sent_req(&id);
        conn.fetches.insert(
            id,
            FetchSub {
                batch,
                filter,
                requested: ids.into_iter().collect(),
                retried,
                last_activity: Instant::now(),
            },
        );
        Ok(())
    }
}
