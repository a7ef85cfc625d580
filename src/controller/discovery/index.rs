//! The repo index: every repository our relay accepted, with the relays to sync it from.
//! Fed by announcements and NIP-09 deletions from the local relay, in any order (a
//! self-subscription replays history, then streams); replaceable-event rules decide which
//! announcement of a coordinate counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nostr::{Event, EventId, Kind, TagKind};

use super::targets::TargetPolicy;
use crate::nostr::nip34::Announcement;
use crate::nostr::{RelayUrl, RepoCoordinate};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoEntry {
    pub announcement: Announcement,
    pub relays: BTreeSet<RelayUrl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Replaced,
    /// Older than (or the same as) what the index holds, or deleted already.
    Stale,
}

#[derive(Debug, Default)]
pub struct RepoIndex {
    repos: BTreeMap<RepoCoordinate, RepoEntry>,
    /// Coordinate deletions (NIP-09 `a` tags): versions created at or before this are gone.
    deleted_until: HashMap<RepoCoordinate, u64>,
    /// Deleted announcement ids (NIP-09 `e` tags).
    deleted_ids: HashMap<EventId, nostr::PublicKey>,
}

impl RepoIndex {
    pub fn len(&self) -> usize {
        self.repos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.repos.is_empty()
    }

    pub fn get(&self, c: &RepoCoordinate) -> Option<&RepoEntry> {
        self.repos.get(c)
    }

    pub fn repos(&self) -> impl Iterator<Item = &RepoEntry> {
        self.repos.values()
    }

    /// Apply a repository announcement (already accepted by our relay).
    pub fn apply_announcement(&mut self, a: Announcement, policy: &TargetPolicy) -> Change {
        if self
            .deleted_until
            .get(&a.coordinate)
            .is_some_and(|t| a.created_at <= *t)
            || self
                .deleted_ids
                .get(&a.event_id)
                .is_some_and(|by| by.to_hex() == a.coordinate.pubkey())
        {
            return Change::Stale;
        }
        if let Some(existing) = self.repos.get(&a.coordinate) {
            let old = &existing.announcement;
            // NIP-01 replaceable events: newest wins; on a tie, the lowest id.
            let newer = a.created_at > old.created_at
                || (a.created_at == old.created_at && a.event_id < old.event_id);
            if !newer {
                return Change::Stale;
            }
        }
        let relays = policy.targets(&a).relays;
        let change = if self.repos.contains_key(&a.coordinate) {
            Change::Replaced
        } else {
            Change::Added
        };
        self.repos.insert(
            a.coordinate.clone(),
            RepoEntry {
                announcement: a,
                relays,
            },
        );
        change
    }

    /// Apply a NIP-09 deletion. Only the author of an announcement can delete it. Returns the
    /// coordinates removed from the index.
    pub fn apply_deletion(&mut self, deletion: &Event) -> Vec<RepoCoordinate> {
        if deletion.kind != Kind::EventDeletion {
            return Vec::new();
        }
        let author = deletion.pubkey.to_hex();
        let at = deletion.created_at.as_secs();
        let mut removed = Vec::new();
        for tag in deletion.tags.iter() {
            let Some(value) = tag.content() else { continue };
            if tag.kind() == TagKind::a() {
                let Ok(c) = RepoCoordinate::parse(value) else {
                    continue;
                };
                if c.pubkey() != author {
                    continue;
                }
                let until = self.deleted_until.entry(c.clone()).or_insert(0);
                *until = (*until).max(at);
                if self
                    .repos
                    .get(&c)
                    .is_some_and(|e| e.announcement.created_at <= at)
                {
                    self.repos.remove(&c);
                    removed.push(c);
                }
            } else if tag.kind() == TagKind::e() {
                let Ok(id) = EventId::from_hex(value) else {
                    continue;
                };
                self.deleted_ids.insert(id, deletion.pubkey);
                let hit = self
                    .repos
                    .iter()
                    .find(|(_, e)| {
                        e.announcement.event_id == id
                            && e.announcement.coordinate.pubkey() == author
                    })
                    .map(|(c, _)| c.clone());
                if let Some(c) = hit {
                    self.repos.remove(&c);
                    removed.push(c);
                }
            }
        }
        removed
    }

    /// Relay → the repositories to sync from it.
    pub fn relay_map(&self) -> BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>> {
        let mut map: BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>> = BTreeMap::new();
        for (c, e) in &self.repos {
            for r in &e.relays {
                map.entry(r.clone()).or_default().insert(c.clone());
            }
        }
        map
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::nostr::kinds::REPO_ANNOUNCEMENT;
    use crate::relay::address_policy::AddressPolicy;
    use nostr::{EventBuilder, Keys, Tag, Timestamp};

    fn policy() -> TargetPolicy {
        TargetPolicy {
            service_domain: "git.ours.example".into(),
            addresses: AddressPolicy::default(),
            max_relays: 16,
        }
    }

    /// A signed announcement of `id` by `keys`, listing `relays`, created at `at`.
    pub(crate) fn announce(keys: &Keys, id: &str, relays: &[&str], at: u64) -> Event {
        EventBuilder::new(REPO_ANNOUNCEMENT, "")
            .tag(Tag::identifier(id))
            .tag(Tag::custom(
                TagKind::custom("relays"),
                relays.iter().map(|s| s.to_string()),
            ))
            .custom_created_at(Timestamp::from(at))
            .sign_with_keys(keys)
            .unwrap()
    }

    fn apply(ix: &mut RepoIndex, ev: &Event) -> Change {
        ix.apply_announcement(Announcement::from_event(ev).unwrap(), &policy())
    }

    fn urls(ix: &RepoIndex) -> Vec<String> {
        ix.relay_map().keys().map(|u| u.to_string()).collect()
    }

    #[test]
    fn newest_announcement_wins_in_any_order() {
        let k = Keys::generate();
        let v1 = announce(&k, "r", &["wss://a.example", "wss://b.example"], 100);
        let v2 = announce(&k, "r", &["wss://a.example"], 200);
        let mut ix = RepoIndex::default();
        assert_eq!(apply(&mut ix, &v2), Change::Added);
        assert_eq!(apply(&mut ix, &v1), Change::Stale);
        assert_eq!(urls(&ix), ["wss://a.example"]);
        let mut ix = RepoIndex::default();
        assert_eq!(apply(&mut ix, &v1), Change::Added);
        assert_eq!(urls(&ix), ["wss://a.example", "wss://b.example"]);
        assert_eq!(apply(&mut ix, &v2), Change::Replaced);
        assert_eq!(urls(&ix), ["wss://a.example"], "the index shrinks");
    }

    #[test]
    fn same_identifier_of_other_owners_are_separate_repos() {
        let (a, b) = (Keys::generate(), Keys::generate());
        let mut ix = RepoIndex::default();
        apply(&mut ix, &announce(&a, "r", &["wss://a.example"], 1));
        apply(&mut ix, &announce(&b, "r", &["wss://b.example"], 1));
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.relay_map().values().map(BTreeSet::len).sum::<usize>(), 2);
    }

    #[test]
    fn deletion_by_coordinate_and_by_id_by_the_author_only() {
        let (owner, other) = (Keys::generate(), Keys::generate());
        let ev = announce(&owner, "r", &["wss://a.example"], 100);
        let coord = format!("30617:{}:r", owner.public_key().to_hex());
        let mut ix = RepoIndex::default();
        apply(&mut ix, &ev);

        let forged = EventBuilder::new(Kind::EventDeletion, "")
            .tag(Tag::custom(TagKind::a(), [coord.clone()]))
            .sign_with_keys(&other)
            .unwrap();
        assert!(
            ix.apply_deletion(&forged).is_empty(),
            "only the author may delete"
        );
        assert_eq!(ix.len(), 1);

        let del = EventBuilder::new(Kind::EventDeletion, "")
            .tag(Tag::custom(TagKind::a(), [coord.clone()]))
            .custom_created_at(Timestamp::from(150))
            .sign_with_keys(&owner)
            .unwrap();
        assert_eq!(ix.apply_deletion(&del).len(), 1);
        assert!(ix.is_empty());
        // A version from before the deletion stays deleted; a later one revives the repo.
        assert_eq!(
            apply(&mut ix, &announce(&owner, "r", &["wss://a.example"], 120)),
            Change::Stale
        );
        assert_eq!(
            apply(&mut ix, &announce(&owner, "r", &["wss://a.example"], 200)),
            Change::Added
        );

        let by_id = EventBuilder::new(Kind::EventDeletion, "")
            .tag(Tag::event(ix.repos().next().unwrap().announcement.event_id))
            .sign_with_keys(&owner)
            .unwrap();
        assert_eq!(ix.apply_deletion(&by_id).len(), 1);
        assert!(ix.is_empty());
    }

    #[test]
    fn deletion_seen_before_the_announcement_still_applies() {
        let owner = Keys::generate();
        let ev = announce(&owner, "r", &["wss://a.example"], 100);
        let del = EventBuilder::new(Kind::EventDeletion, "")
            .tag(Tag::event(ev.id))
            .sign_with_keys(&owner)
            .unwrap();
        let mut ix = RepoIndex::default();
        ix.apply_deletion(&del);
        assert_eq!(apply(&mut ix, &ev), Change::Stale);

        // A deletion of someone else's announcement id blocks nothing.
        let other = announce(&owner, "s", &["wss://a.example"], 100);
        let forged = EventBuilder::new(Kind::EventDeletion, "")
            .tag(Tag::event(other.id))
            .sign_with_keys(&Keys::generate())
            .unwrap();
        ix.apply_deletion(&forged);
        assert_eq!(apply(&mut ix, &other), Change::Added);
    }
}
