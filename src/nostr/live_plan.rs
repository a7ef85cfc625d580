//! The live subscriptions of a session as stable, keyed REQs, so a change of the sync set
//! re-sends only the REQs whose content changed.
//!
//! Items (repos, roots) go to buckets by a hash of their id, not by their position in a sorted
//! list: adding one root changes one bucket, where positional chunks would shift every chunk
//! after it. The number of buckets is a power of two sized so a bucket holds about `chunk`
//! items; it changes only when the set doubles or halves (then every REQ of that layer is
//! re-planned once). Each bucket becomes one chunk of filters; a fixed group of consecutive
//! buckets becomes one REQ (split further only if it would exceed the byte budget), keyed by
//! layer, group and part. The session replaces a changed REQ in place (a REQ with the id of
//! an open subscription overwrites it, NIP-01), so a set change opens no gap and never holds
//! more subscriptions than the plan.

use nostr::{EventId, Filter};

use super::filters::{self, RepoScope};

/// Which REQ of a live plan this is; stable while the layout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LiveKey {
    Announcements,
    Repos { group: u32, part: u16 },
    Roots { group: u32, part: u16 },
}

/// Limits a plan must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Items per bucket the layout aims at (filters carry one bucket each).
    pub chunk: usize,
    /// Filters per REQ.
    pub max_filters: usize,
    /// Filters per REQ we may go up to when the REQ count would exceed `max_reqs` and the
    /// relay published no filter limit.
    pub max_filters_stretch: usize,
    /// REQs the relay takes on this connection for live use, if known.
    pub max_reqs: Option<usize>,
    /// Bytes of JSON per REQ.
    pub max_bytes: usize,
}

/// The keyed live REQs for a sync set, in key order. If even the widest layout needs more
/// REQs than `max_reqs`, that layout is returned and the caller keeps the excess as a gap.
pub fn plan(repos: &[RepoScope], roots: &[EventId], limits: Limits) -> Vec<(LiveKey, Vec<Filter>)> {
    let mut per_req = limits.max_filters.max(1);
    loop {
        let mut chunk = limits.chunk.max(1);
        loop {
            let p = layout(repos, roots, chunk, per_req, limits.max_bytes);
            let fits = limits.max_reqs.is_none_or(|m| p.len() <= m.max(1));
            if fits {
                return p;
            }
            if chunk < filters::MAX_CHUNK {
                chunk = (chunk * 2).min(filters::MAX_CHUNK);
                continue;
            }
            if per_req < limits.max_filters_stretch {
                break;
            }
            return p;
        }
        per_req = limits.max_filters_stretch.max(per_req);
    }
}

/// Buckets for `n` items at about `chunk` each: a power of two, at least one.
fn bucket_count(n: usize, chunk: usize) -> usize {
    n.div_ceil(chunk.max(1)).max(1).next_power_of_two()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A stable 64-bit hash (FNV-1a): the layout must not change between processes or versions.
fn fnv(bytes: &[u8]) -> u64 {
    fnv_from(FNV_OFFSET, bytes)
}

fn fnv_from(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn layout(
    repos: &[RepoScope],
    roots: &[EventId],
    chunk: usize,
    per_req: usize,
    max_bytes: usize,
) -> Vec<(LiveKey, Vec<Filter>)> {
    let mut out = vec![(LiveKey::Announcements, vec![filters::layer1().limit(0)])];
    // Repos: one bucket is 4 filters (state, #a, #A, #q); roots: 3 (#e, #E, #q).
    let repos = buckets(repos, chunk, |r| fnv(r.coordinate.to_string().as_bytes()));
    for (g, group) in repos.chunks((per_req / 4).max(1)).enumerate() {
        let fs = group
            .iter()
            .filter(|b| !b.is_empty())
            .flat_map(|b| filters::layer2(b, usize::MAX))
            .collect();
        push_group(&mut out, fs, per_req, max_bytes, |part| LiveKey::Repos {
            group: g as u32,
            part,
        });
    }
    let roots = buckets(roots, chunk, |id| fnv(id.as_bytes()));
    for (g, group) in roots.chunks((per_req / 3).max(1)).enumerate() {
        let fs = group
            .iter()
            .filter(|b| !b.is_empty())
            .flat_map(|b| filters::layer3(b, usize::MAX))
            .collect();
        push_group(&mut out, fs, per_req, max_bytes, |part| LiveKey::Roots {
            group: g as u32,
            part,
        });
    }
    out
}

/// `items` in `bucket_count` buckets by `hash`, each sorted (the layout must not depend on
/// the order items come in).
fn buckets<T: Ord + Clone>(items: &[T], chunk: usize, hash: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let n = bucket_count(items.len(), chunk);
    let mut out: Vec<Vec<T>> = vec![Vec::new(); n];
    for item in items {
        out[hash(item) as usize % n].push(item.clone());
    }
    out.iter_mut().for_each(|b| b.sort());
    out
}

fn push_group(
    out: &mut Vec<(LiveKey, Vec<Filter>)>,
    fs: Vec<Filter>,
    per_req: usize,
    max_bytes: usize,
    key: impl Fn(u16) -> LiveKey,
) {
    if fs.is_empty() {
        return;
    }
    let fs: Vec<Filter> = fs.into_iter().map(|f| f.limit(0)).collect();
    for (i, req) in filters::pack_within(fs, per_req, max_bytes)
        .into_iter()
        .enumerate()
    {
        out.push((key(i.min(u16::MAX as usize) as u16), req));
    }
}

/// A fingerprint of a REQ's filters: equal plans send nothing.
pub fn fingerprint(filters: &[Filter]) -> u64 {
    filters.iter().fold(FNV_OFFSET, |h, f| {
        fnv_from(h ^ 0xff, nostr::JsonUtil::as_json(f).as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nostr::RepoCoordinate;
    use nostr::filter::MatchEventOptions;
    use nostr::{EventBuilder, Keys, Kind, Tag, TagKind};
    use std::collections::BTreeMap;

    fn id(n: u32) -> EventId {
        use sha2::Digest;
        EventId::from_byte_array(sha2::Sha256::digest(n.to_le_bytes()).into())
    }

    fn roots(n: u32) -> Vec<EventId> {
        (0..n).map(id).collect()
    }

    fn repos(n: usize) -> Vec<RepoScope> {
        let k = Keys::generate();
        (0..n)
            .map(|i| {
                RepoScope::owned(
                    RepoCoordinate::new(&k.public_key().to_hex(), &format!("r{i}")).unwrap(),
                )
                .unwrap()
            })
            .collect()
    }

    fn limits() -> Limits {
        Limits {
            chunk: filters::DEFAULT_CHUNK,
            max_filters: 10,
            max_filters_stretch: 20,
            max_reqs: None,
            max_bytes: 64 * 1024,
        }
    }

    fn by_key(p: &[(LiveKey, Vec<Filter>)]) -> BTreeMap<LiveKey, u64> {
        p.iter().map(|(k, f)| (*k, fingerprint(f))).collect()
    }

    fn changed(a: &[(LiveKey, Vec<Filter>)], b: &[(LiveKey, Vec<Filter>)]) -> usize {
        let (a, b) = (by_key(a), by_key(b));
        b.iter().filter(|(k, f)| a.get(k) != Some(f)).count()
            + a.keys().filter(|k| !b.contains_key(k)).count()
    }

    #[test]
    fn adding_a_root_changes_one_req() {
        let rs = repos(300);
        let mut ids = roots(5_000);
        let before = plan(&rs, &ids, limits());
        ids.push(id(99_999));
        let after = plan(&rs, &ids, limits());
        assert!(before.len() > 20, "{} REQs", before.len());
        assert_eq!(changed(&before, &after), 1);
    }

    #[test]
    fn removing_a_repo_changes_one_req() {
        let mut rs = repos(900);
        let before = plan(&rs, &roots(10), limits());
        rs.remove(17);
        let after = plan(&rs, &roots(10), limits());
        assert_eq!(changed(&before, &after), 1);
    }

    #[test]
    fn every_item_is_covered_exactly_as_the_layers_say() {
        let k = Keys::generate();
        let rs = repos(250);
        let ids = roots(700);
        let p = plan(&rs, &ids, limits());
        let all: Vec<Filter> = p.iter().flat_map(|(_, f)| f.clone()).collect();
        assert!(all.iter().all(|f| f.limit == Some(0)));
        let matches = |e: &nostr::Event| {
            all.iter()
                .any(|f| f.match_event(e, MatchEventOptions::default()))
        };
        for root in &ids {
            let c = EventBuilder::new(Kind::from(1111u16), "")
                .tag(Tag::custom(TagKind::custom("E"), [root.to_hex()]))
                .sign_with_keys(&k)
                .unwrap();
            assert!(matches(&c));
        }
        for r in &rs {
            let c = EventBuilder::new(Kind::from(1621u16), "")
                .tag(Tag::custom(
                    TagKind::custom("a"),
                    [r.coordinate.to_string()],
                ))
                .sign_with_keys(&k)
                .unwrap();
            assert!(matches(&c));
        }
        let unrelated = EventBuilder::new(Kind::from(1111u16), "")
            .tag(Tag::custom(TagKind::custom("E"), [id(123_456).to_hex()]))
            .sign_with_keys(&k)
            .unwrap();
        assert!(!matches(&unrelated));
    }

    #[test]
    fn every_req_respects_the_limits() {
        let p = plan(&repos(2_000), &roots(20_000), limits());
        for (_, f) in &p {
            assert!(f.len() <= 10);
            let bytes: usize = f
                .iter()
                .map(|f| nostr::JsonUtil::as_json(f).len() + 1)
                .sum();
            assert!(bytes <= 64 * 1024 || f.len() == 1, "{bytes} bytes");
        }
    }

    #[test]
    fn a_req_cap_widens_the_layout_until_it_fits() {
        // Three filters per REQ: one root bucket per REQ, so 700 roots in 8 buckets need 8.
        let l = Limits {
            max_filters: 3,
            max_filters_stretch: 3,
            ..limits()
        };
        let unbounded = plan(&repos(30), &roots(700), l);
        assert!(unbounded.len() > 8, "{} REQs", unbounded.len());
        let capped = plan(
            &repos(30),
            &roots(700),
            Limits {
                max_reqs: Some(8),
                ..l
            },
        );
        assert!(capped.len() <= 8, "{} REQs", capped.len());
        // Cannot fit: the widest layout is returned for the caller to cap.
        let l = Limits {
            max_reqs: Some(1),
            ..limits()
        };
        assert!(plan(&repos(400), &roots(3_000), l).len() > 1);
    }

    #[test]
    fn the_layout_is_stable_across_calls_and_orders() {
        let rs = repos(120);
        let mut ids = roots(400);
        let a = by_key(&plan(&rs, &ids, limits()));
        ids.reverse();
        let b = by_key(&plan(&rs, &ids, limits()));
        assert_eq!(a, b);
    }
}
