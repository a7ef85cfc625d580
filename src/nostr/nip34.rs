//! Repository announcements (NIP-34 kind 30617) as the discovery reads them. Announcements
//! are untrusted input: tags may repeat, be empty, hold junk or be huge; parsing keeps what
//! is usable and bounds the rest.

use std::collections::BTreeSet;

use nostr::{Event, PublicKey, TagKind};

use super::kinds::REPO_ANNOUNCEMENT;
use super::{CoordinateError, RepoCoordinate};

/// Most `relays`/`clone`/`maintainers` values read from one announcement.
pub const MAX_VALUES_PER_TAG: usize = 64;

/// What discovery needs from a repository announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub coordinate: RepoCoordinate,
    pub created_at: u64,
    pub event_id: nostr::EventId,
    /// `relays` tag values, as written and in that order (not yet normalised or checked).
    pub relays: Vec<String>,
    /// `clone` tag values, as written.
    pub clones: Vec<String>,
    pub maintainers: BTreeSet<PublicKey>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnouncementError {
    #[error("event kind {0} is not a repository announcement (30617)")]
    Kind(u16),
    #[error("announcement has no `d` tag")]
    MissingIdentifier,
    #[error("announcement coordinate is invalid: {0}")]
    Coordinate(#[from] CoordinateError),
}

impl Announcement {
    pub fn from_event(event: &Event) -> Result<Self, AnnouncementError> {
        if event.kind != REPO_ANNOUNCEMENT {
            return Err(AnnouncementError::Kind(event.kind.as_u16()));
        }
        let identifier = event
            .tags
            .iter()
            .find(|t| t.kind() == TagKind::d())
            .and_then(|t| t.content())
            .ok_or(AnnouncementError::MissingIdentifier)?;
        let coordinate = RepoCoordinate::new(&event.pubkey.to_hex(), identifier)?;
        // In the order written (authors list their preferred relays first), without repeats.
        let values = |name: &str| -> Vec<String> {
            let mut seen = std::collections::HashSet::new();
            event
                .tags
                .iter()
                .filter(|t| t.kind() == TagKind::custom(name))
                .flat_map(|t| t.as_slice().iter().skip(1))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty() && v.len() <= 2048 && seen.insert(*v))
                .take(MAX_VALUES_PER_TAG)
                .map(str::to_string)
                .collect()
        };
        let maintainers = values("maintainers")
            .iter()
            .filter_map(|v| PublicKey::parse(v).ok())
            .collect();
        Ok(Announcement {
            coordinate,
            created_at: event.created_at.as_secs(),
            event_id: event.id,
            relays: values("relays"),
            clones: values("clone"),
            maintainers,
        })
    }

    /// Owner and maintainers: the pubkeys whose state events count for this repository.
    pub fn authors(&self) -> BTreeSet<PublicKey> {
        let mut a = self.maintainers.clone();
        if let Ok(owner) = PublicKey::from_hex(self.coordinate.pubkey()) {
            a.insert(owner);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Tag};

    fn announce(keys: &Keys, tags: Vec<Tag>) -> Event {
        EventBuilder::new(REPO_ANNOUNCEMENT, "")
            .tags(tags)
            .sign_with_keys(keys)
            .unwrap()
    }

    fn tag(name: &str, values: &[&str]) -> Tag {
        Tag::custom(TagKind::custom(name), values.iter().map(|v| v.to_string()))
    }

    #[test]
    fn reads_multi_value_and_repeated_tags() {
        let owner = Keys::generate();
        let m = Keys::generate();
        let ev = announce(
            &owner,
            vec![
                Tag::identifier("ngit"),
                tag("relays", &["wss://a.example", "wss://b.example"]),
                tag("relays", &["wss://b.example", " ", "wss://c.example"]),
                tag("clone", &["https://git.example/npub1x/ngit.git"]),
                tag("maintainers", &[&m.public_key().to_hex(), "not-a-key"]),
            ],
        );
        let a = Announcement::from_event(&ev).unwrap();
        assert_eq!(a.coordinate.identifier(), "ngit");
        assert_eq!(
            a.relays,
            ["wss://a.example", "wss://b.example", "wss://c.example"]
        );
        assert_eq!(a.clones.len(), 1);
        assert_eq!(a.maintainers, BTreeSet::from([m.public_key()]));
        assert_eq!(
            a.authors(),
            BTreeSet::from([m.public_key(), owner.public_key()])
        );
    }

    #[test]
    fn rejects_what_is_not_an_announcement() {
        let k = Keys::generate();
        let note = EventBuilder::new(nostr::Kind::TextNote, "")
            .sign_with_keys(&k)
            .unwrap();
        assert_eq!(
            Announcement::from_event(&note),
            Err(AnnouncementError::Kind(1))
        );
        assert_eq!(
            Announcement::from_event(&announce(&k, vec![])),
            Err(AnnouncementError::MissingIdentifier)
        );
        let bad = announce(&k, vec![Tag::identifier("a\nb")]);
        assert!(matches!(
            Announcement::from_event(&bad),
            Err(AnnouncementError::Coordinate(_))
        ));
    }

    #[test]
    fn bounds_hostile_tag_lists() {
        let k = Keys::generate();
        let many: Vec<String> = (0..500).map(|i| format!("wss://r{i}.example")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let ev = announce(&k, vec![Tag::identifier("x"), tag("relays", &refs)]);
        assert_eq!(
            Announcement::from_event(&ev).unwrap().relays.len(),
            MAX_VALUES_PER_TAG
        );
    }

    use proptest::prelude::*;
    use std::sync::LazyLock;

    static KEYS: LazyLock<Keys> = LazyLock::new(Keys::generate);

    proptest! {
        /// Announcements with any tags: read or refused, never a panic; values keep their
        /// first-seen order, without repeats or blanks, bounded in number.
        #[test]
        fn prop_any_tags_read_as_a_bounded_announcement(
            tags in prop::collection::vec(
                (
                    prop_oneof![Just("d"), Just("relays"), Just("clone"), Just("maintainers"), Just("r"), Just("x")],
                    prop::collection::vec(
                        prop_oneof!["\\PC{0,12}", "wss://[a-c]{1,2}\\.example", " wss://a\\.example "],
                        0..8,
                    ),
                ),
                0..20,
            ),
        ) {
            let tags: Vec<Tag> = tags
                .into_iter()
                .map(|(name, values)| {
                    let mut all = vec![name.to_string()];
                    all.extend(values);
                    Tag::parse(all).unwrap()
                })
                .collect();
            let ev = announce(&KEYS, tags);
            let Ok(a) = Announcement::from_event(&ev) else { return Ok(()) };
            for values in [&a.relays, &a.clones] {
                prop_assert!(values.len() <= MAX_VALUES_PER_TAG);
                prop_assert!(values.iter().all(|v| !v.is_empty() && v.trim() == v));
                let distinct: std::collections::HashSet<_> = values.iter().collect();
                prop_assert_eq!(distinct.len(), values.len());
            }
            let written: Vec<String> = ev.tags.iter()
                .filter(|t| t.kind() == TagKind::custom("relays"))
                .flat_map(|t| t.as_slice().iter().skip(1))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty() && v.len() <= 2048)
                .collect();
            let mut first_seen: Vec<String> = Vec::new();
            for v in written {
                if !first_seen.contains(&v) {
                    first_seen.push(v);
                }
            }
            first_seen.truncate(MAX_VALUES_PER_TAG);
            prop_assert_eq!(&a.relays, &first_seen);
        }
    }
}
