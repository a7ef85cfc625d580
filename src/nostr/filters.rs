//! The subscription filters of a relay session (DESIGN.md, "Worker: one session per relay").
//!
//! - Layer 1: every repository announcement (kind 30617) so discovery sees new repos.
//! - Layer 2, per batch of repos: their state (30618 by `#d`, restricted to the repo's owner and
//!   maintainers) and everything that tags a repo through `#a`, `#A` or `#q`.
//! - Layer 3, per batch of root events (patches, PRs, issues): everything that tags one of
//!   them through `#e`, `#E` or `#q`.
//!
//! Filters are built per chunk of items so one filter stays well under relays' message size
//! limits, then packed into as few REQs as the relay's `max_filters` allows.

use std::collections::BTreeSet;

use nostr::{Alphabet, EventId, Filter, Kind, PublicKey, SingleLetterTag, Timestamp};

use super::RepoCoordinate;
use super::kinds::REPO_ANNOUNCEMENT;

pub const KIND_REPO_STATE: u16 = 30618;
/// Kinds whose events are Layer 3 roots.
pub const ROOT_KINDS: [u16; 3] = [1617, 1618, 1621];

/// Values per tag filter. 100 coordinates of ~100 bytes keep a filter near 10 KiB.
pub const DEFAULT_CHUNK: usize = 100;

/// A repository to sync and the pubkeys whose state events count (owner and maintainers).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RepoScope {
    pub coordinate: RepoCoordinate,
    pub authors: BTreeSet<PublicKey>,
}

impl RepoScope {
    /// A scope whose only author is the owner in the coordinate.
    pub fn owned(coordinate: RepoCoordinate) -> Result<Self, nostr::key::Error> {
        let owner = PublicKey::from_hex(coordinate.pubkey())?;
        Ok(RepoScope {
            coordinate,
            authors: BTreeSet::from([owner]),
        })
    }
}

/// Layer 1: repository announcements.
pub fn layer1() -> Filter {
    Filter::new().kind(REPO_ANNOUNCEMENT)
}

/// The state filter (30618 by `#d`, by owner and maintainers) of a chunk of repos.
fn state_filter(part: &[RepoScope]) -> Filter {
    let identifiers: BTreeSet<&str> = part.iter().map(|r| r.coordinate.identifier()).collect();
    let authors: BTreeSet<PublicKey> = part
        .iter()
        .flat_map(|r| r.authors.iter().copied())
        .collect();
    Filter::new()
        .kind(Kind::from(KIND_REPO_STATE))
        .identifiers(identifiers)
        .authors(authors)
}

/// Only the state filters of Layer 2 for `repos`, `chunk` repos per filter: the part of
/// Layer 2 that depends on who maintains a repo, not only on which repo it is.
pub fn layer2_states(repos: &[RepoScope], chunk: usize) -> Vec<Filter> {
    repos.chunks(chunk.max(1)).map(state_filter).collect()
}

/// Layer 2 filters for `repos`, `chunk` repos per filter.
pub fn layer2(repos: &[RepoScope], chunk: usize) -> Vec<Filter> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for part in repos.chunks(chunk) {
        let coords: Vec<String> = part.iter().map(|r| r.coordinate.to_string()).collect();
        out.push(state_filter(part));
        for tag in [
            SingleLetterTag::lowercase(Alphabet::A),
            SingleLetterTag::uppercase(Alphabet::A),
            SingleLetterTag::lowercase(Alphabet::Q),
        ] {
            out.push(Filter::new().custom_tags(tag, coords.iter().cloned()));
        }
    }
    out
}

/// Layer 3 filters for `roots`, `chunk` event ids per filter.
pub fn layer3(roots: &[EventId], chunk: usize) -> Vec<Filter> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for part in roots.chunks(chunk) {
        let ids: Vec<String> = part.iter().map(|id| id.to_hex()).collect();
        for tag in [
            SingleLetterTag::lowercase(Alphabet::E),
            SingleLetterTag::uppercase(Alphabet::E),
            SingleLetterTag::lowercase(Alphabet::Q),
        ] {
            out.push(Filter::new().custom_tags(tag, ids.iter().cloned()));
        }
    }
    out
}

/// The same filters restricted to events at or after `since`.
pub fn with_since(filters: Vec<Filter>, since: Option<Timestamp>) -> Vec<Filter> {
    match since {
        Some(since) => filters.into_iter().map(|f| f.since(since)).collect(),
        None => filters,
    }
}

/// Most values one tag filter may carry when widening chunks to fit a relay's limits.
pub const MAX_CHUNK: usize = 1000;

/// Group filters into REQs of at most `max_filters_per_req` filters and (unless a single
/// filter is larger) at most `max_bytes` of JSON each: relays bound the size of a message
/// or frame, and one over it costs the connection.
pub fn pack_within(
    filters: Vec<Filter>,
    max_filters_per_req: usize,
    max_bytes: usize,
) -> Vec<Vec<Filter>> {
    let per_req = max_filters_per_req.max(1);
    let mut out: Vec<Vec<Filter>> = Vec::new();
    let mut current: Vec<Filter> = Vec::new();
    let mut bytes = 0;
    for f in filters {
        let size = nostr::JsonUtil::as_json(&f).len() + 1;
        if !current.is_empty() && (current.len() >= per_req || bytes + size > max_bytes) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(f);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Group filters into REQs of at most `max_filters_per_req` filters each.
pub fn pack(filters: Vec<Filter>, max_filters_per_req: usize) -> Vec<Vec<Filter>> {
    let per_req = max_filters_per_req.max(1);
    let mut out = Vec::with_capacity(filters.len().div_ceil(per_req));
    let mut it = filters.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(per_req).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::filter::MatchEventOptions;
    use nostr::{EventBuilder, JsonUtil, Keys, Tag, TagKind};

    fn scope(keys: &Keys, id: &str) -> RepoScope {
        RepoScope::owned(RepoCoordinate::new(&keys.public_key().to_hex(), id).unwrap()).unwrap()
    }

    fn matches_any(filters: &[Filter], event: &nostr::Event) -> bool {
        filters
            .iter()
            .any(|f| f.match_event(event, MatchEventOptions::default()))
    }

    #[test]
    fn layer2_matches_state_and_every_tag_variant() {
        let owner = Keys::generate();
        let other = Keys::generate();
        let repos = vec![scope(&owner, "alpha"), scope(&owner, "beta")];
        let filters = layer2(&repos, DEFAULT_CHUNK);
        assert_eq!(filters.len(), 4);
        let coord = repos[0].coordinate.to_string();

        let state = EventBuilder::new(Kind::from(KIND_REPO_STATE), "")
            .tag(Tag::identifier("alpha"))
            .sign_with_keys(&owner)
            .unwrap();
        assert!(matches_any(&filters, &state));

        // Same `d` from someone who is not owner or maintainer: not ours.
        let squatter = EventBuilder::new(Kind::from(KIND_REPO_STATE), "")
            .tag(Tag::identifier("alpha"))
            .sign_with_keys(&other)
            .unwrap();
        assert!(!matches_any(&filters, &squatter));

        for tag in ["a", "A", "q"] {
            let ev = EventBuilder::new(Kind::from(1111), "hi")
                .tag(Tag::custom(TagKind::custom(tag), [coord.clone()]))
                .sign_with_keys(&other)
                .unwrap();
            assert!(
                matches_any(&filters, &ev),
                "#{tag} not matched: {}",
                ev.as_json()
            );
        }
        let unrelated = EventBuilder::new(Kind::from(1111), "hi")
            .tag(Tag::custom(
                TagKind::custom("a"),
                [format!("30617:{}:gamma", owner.public_key().to_hex())],
            ))
            .sign_with_keys(&other)
            .unwrap();
        assert!(!matches_any(&filters, &unrelated));
    }

    #[test]
    fn layer3_matches_every_tag_variant() {
        let keys = Keys::generate();
        let root = EventBuilder::new(Kind::from(1621), "issue")
            .sign_with_keys(&keys)
            .unwrap();
        let filters = layer3(&[root.id], DEFAULT_CHUNK);
        assert_eq!(filters.len(), 3);
        for tag in ["e", "E", "q"] {
            let ev = EventBuilder::new(Kind::from(1630), "")
                .tag(Tag::custom(TagKind::custom(tag), [root.id.to_hex()]))
                .sign_with_keys(&keys)
                .unwrap();
            assert!(matches_any(&filters, &ev), "#{tag} not matched");
        }
        let other = EventBuilder::new(Kind::from(1630), "")
            .sign_with_keys(&keys)
            .unwrap();
        assert!(!matches_any(&filters, &other));
    }

    #[test]
    fn chunking_and_packing() {
        let keys = Keys::generate();
        let repos: Vec<_> = (0..250).map(|i| scope(&keys, &format!("r{i}"))).collect();
        let filters = layer2(&repos, 100);
        assert_eq!(filters.len(), 3 * 4); // 3 chunks × (state, #a, #A, #q)
        let reqs = pack(filters.clone(), 10);
        assert_eq!(reqs.iter().map(Vec::len).collect::<Vec<_>>(), [10, 2]);
        assert_eq!(pack(filters.clone(), 0).len(), 12);
        assert_eq!(pack(Vec::new(), 10).len(), 0);
        // Every repo appears in exactly one #a filter.
        let a = SingleLetterTag::lowercase(Alphabet::A);
        let total: usize = filters
            .iter()
            .filter_map(|f| f.generic_tags.get(&a))
            .map(|v| v.len())
            .sum();
        assert_eq!(total, 250);
    }

    #[test]
    fn packing_within_a_byte_budget_keeps_every_filter() {
        let keys = Keys::generate();
        let repos: Vec<_> = (0..300).map(|i| scope(&keys, &format!("r{i}"))).collect();
        let filters = layer2(&repos, 100);
        let total = filters.len();
        let budget = 20_000;
        let reqs = pack_within(filters.clone(), 10, budget);
        assert_eq!(reqs.iter().map(Vec::len).sum::<usize>(), total);
        for req in &reqs {
            let size: usize = req.iter().map(|f| f.as_json().len() + 1).sum();
            assert!(
                req.len() == 1 || size <= budget,
                "{size} bytes in {} filters",
                req.len()
            );
            assert!(req.len() <= 10);
        }
        assert!(
            reqs.len() > pack(filters, 10).len(),
            "the budget split some REQs"
        );
    }

    #[test]
    fn since_applies_to_every_filter() {
        let keys = Keys::generate();
        let fs = with_since(
            layer2(&[scope(&keys, "x")], 10),
            Some(Timestamp::from(1000)),
        );
        assert!(fs.iter().all(|f| f.since == Some(Timestamp::from(1000))));
        let fs = with_since(vec![layer1()], None);
        assert!(fs[0].since.is_none());
    }
}
