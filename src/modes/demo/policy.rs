//! A GRASP-01-like write policy for the demo's local relay: repository announcements must
//! list our service in `clone` and `relays`; state events must come from a repository's
//! owner or maintainers; every other event must tag an accepted repository or event.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;

use nostr::{Event, EventId, Kind, PublicKey, TagKind};
use nostr_relay_builder::prelude::{BoxedFuture, PolicyResult, WritePolicy};

use crate::nostr::kinds::REPO_ANNOUNCEMENT;
use crate::nostr::nip34::Announcement;

#[derive(Debug, Default)]
struct Accepted {
    /// identifier → (owner, owner and maintainers) of accepted repositories.
    repos: HashMap<String, Vec<(PublicKey, HashSet<PublicKey>)>>,
    coordinates: HashSet<String>,
    events: HashSet<EventId>,
}

#[derive(Debug)]
pub struct GraspPolicy {
    /// `host[:port]` of our service, as announcements must list it.
    service: String,
    accepted: Mutex<Accepted>,
}

impl GraspPolicy {
    pub fn new(service: impl Into<String>) -> Self {
        GraspPolicy {
            service: service.into(),
            accepted: Mutex::new(Accepted::default()),
        }
    }

    fn lists_us(&self, values: &[String]) -> bool {
        values.iter().any(|v| {
            let rest = v.split_once("://").map(|(_, r)| r).unwrap_or(v);
            let host = rest.split('/').next().unwrap_or(rest);
            host.eq_ignore_ascii_case(&self.service)
        })
    }

    /// Accept (and remember) `event`, or say why not.
    pub fn decide(&self, event: &Event) -> Result<(), String> {
        let mut acc = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        if event.kind == REPO_ANNOUNCEMENT {
            let a = Announcement::from_event(event).map_err(|e| e.to_string())?;
            if !(self.lists_us(&a.clones) && self.lists_us(&a.relays)) {
                return Err("announcement does not list this service in clone and relays".into());
            }
            let owner = event.pubkey;
            let entry = acc
                .repos
                .entry(a.coordinate.identifier().to_string())
                .or_default();
            entry.retain(|(o, _)| *o != owner);
            entry.push((owner, a.authors().into_iter().collect()));
            acc.coordinates.insert(a.coordinate.to_string());
            acc.events.insert(event.id);
            return Ok(());
        }
        if event.kind == Kind::from(30618u16) {
            let d = event.tags.identifier().unwrap_or_default();
            let ok = acc.repos.get(d).is_some_and(|rs| {
                rs.iter()
                    .any(|(_, authors)| authors.contains(&event.pubkey))
            });
            return if ok {
                Ok(())
            } else {
                Err("state of a repository this author does not maintain here".into())
            };
        }
        let references = event.tags.iter().any(|t| {
            let Some(v) = t.content() else { return false };
            match t.kind() {
                k if k == TagKind::a() || k == TagKind::custom("A") => acc.coordinates.contains(v),
                k if k == TagKind::e() || k == TagKind::custom("E") => {
                    EventId::from_hex(v).is_ok_and(|id| acc.events.contains(&id))
                }
                k if k == TagKind::q() => {
                    acc.coordinates.contains(v)
                        || EventId::from_hex(v).is_ok_and(|id| acc.events.contains(&id))
                }
                _ => false,
            }
        });
        if references {
            acc.events.insert(event.id);
            Ok(())
        } else {
            Err("does not reference an accepted repository or event".into())
        }
    }
}

impl WritePolicy for GraspPolicy {
    fn admit_event<'a>(
        &'a self,
        event: &'a Event,
        _addr: &'a SocketAddr,
    ) -> BoxedFuture<'a, PolicyResult> {
        Box::pin(async move {
            match self.decide(event) {
                Ok(()) => PolicyResult::Accept,
                Err(reason) => PolicyResult::Reject(reason),
            }
        })
    }
}
