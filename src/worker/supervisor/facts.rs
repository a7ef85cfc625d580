//! What the local relay says about the repos this worker syncs: each repo's owner and
//! maintainers (Layer 2 `authors`) and its root events (Layer 3), and the feed filters that
//! ask for them.

use std::collections::{BTreeSet, HashMap};

use nostr::{Event, EventId, Filter, Kind, PublicKey, TagKind};

use crate::nostr::RepoCoordinate;
use crate::nostr::filters::{ROOT_KINDS, RepoScope};
use crate::nostr::kinds::REPO_ANNOUNCEMENT;
use crate::nostr::nip34::Announcement;

/// What the local relay says about the repos this worker syncs.
#[derive(Default)]
pub(crate) struct RepoFacts {
    /// coordinate → (announcement created_at, owner and maintainers)
    pub(crate) authors: HashMap<RepoCoordinate, (u64, BTreeSet<PublicKey>)>,
    pub(crate) roots: HashMap<RepoCoordinate, BTreeSet<EventId>>,
}

impl RepoFacts {
    /// Learn from one local event; true if anything changed.
    pub(crate) fn learn(&mut self, event: &Event, wanted: &BTreeSet<RepoCoordinate>) -> bool {
        if event.kind == REPO_ANNOUNCEMENT {
            let Ok(a) = Announcement::from_event(event) else {
                return false;
            };
            if !wanted.contains(&a.coordinate) {
                return false;
            }
            let entry = self.authors.entry(a.coordinate.clone()).or_default();
            if a.created_at < entry.0 {
                return false;
            }
            let authors = a.authors();
            let changed = entry.1 != authors;
            *entry = (a.created_at, authors);
            return changed;
        }
        if !ROOT_KINDS.contains(&event.kind.as_u16()) {
            return false;
        }
        let mut changed = false;
        for tag in event.tags.iter().filter(|t| t.kind() == TagKind::a()) {
            let Some(c) = tag.content().and_then(|v| RepoCoordinate::parse(v).ok()) else {
                continue;
            };
            if wanted.contains(&c) {
                changed |= self.roots.entry(c).or_default().insert(event.id);
            }
        }
        changed
    }

    /// Whether the repo's announcement (its maintainers) has been read from the local relay.
    pub(crate) fn knows(&self, c: &RepoCoordinate) -> bool {
        self.authors.contains_key(c)
    }

    pub(crate) fn scope(&self, c: &RepoCoordinate) -> Option<RepoScope> {
        let mut scope = RepoScope::owned(c.clone()).ok()?;
        if let Some((_, authors)) = self.authors.get(c) {
            scope.authors.extend(authors.iter().copied());
        }
        Some(scope)
    }
}

/// The kinds of root events [`RepoFacts::learn`] learns roots from.
pub(crate) fn root_kinds() -> Vec<nostr::Kind> {
    ROOT_KINDS.iter().map(|k| Kind::from(*k)).collect()
}

pub(crate) fn feed_filters(coords: &BTreeSet<RepoCoordinate>) -> Vec<Filter> {
    let list: Vec<&RepoCoordinate> = coords.iter().collect();
    let mut out = Vec::new();
    for part in list.chunks(100) {
        let owners: BTreeSet<PublicKey> = part
            .iter()
            .filter_map(|c| PublicKey::from_hex(c.pubkey()).ok())
            .collect();
        out.push(
            Filter::new()
                .kind(REPO_ANNOUNCEMENT)
                .authors(owners)
                .identifiers(part.iter().map(|c| c.identifier().to_string())),
        );
        out.push(Filter::new().kinds(root_kinds()).custom_tags(
            nostr::SingleLetterTag::lowercase(nostr::Alphabet::A),
            part.iter().map(|c| c.to_string()),
        ));
    }
    out
}
