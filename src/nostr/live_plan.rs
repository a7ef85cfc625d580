//! The live subscriptions of a session as stable, keyed REQs, so a change of the sync set
//! re-sends only the REQs whose content changed.
//!
//! Items (repos, roots) go to buckets by a hash of their id, not by their position in a sorted
//! list: adding one root changes one bucket, where positional chunks would shift every chunk
//! after it. The number of buckets is a power of two sized so a bucket holds about `chunk`
//! items; it changes only when the set doubles or halves (then every REQ of that layer is
//! re-planned once). Each bucket becomes one chunk of filters; a fixed group of consecutive
//! buckets becomes one REQ (split further only if it would exceed the byte budget), keyed by
//! layer, group and part. A set change re-sends only the REQs whose content changed (how the
//! session swaps them without a gap: `worker/session/live.rs`).
//!
//! A session plans on every set change, and at thousands of repos the set changes every
//! half second while the historic sync discovers roots. So a [`Planner`] keeps what it
//! built: the layout it chose (searched again only when it stops fitting, the set shrinks,
//! or the limits change) and each group's REQs with their fingerprints (rebuilt only when
//! the group's items changed). A plan then costs a hash and a comparison per item and the
//! work of the groups that changed, not a rebuild and two serialisations of every filter,
//! times every layout the search tries.

use std::collections::HashMap;
use std::sync::Arc;

use nostr::{EventId, Filter};

use super::filters::{self, RepoScope};

/// Which REQ of a live plan this is; stable while the layout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LiveKey {
    Announcements,
    Repos { group: u32, part: u16 },
    Roots { group: u32, part: u16 },
}

/// The layer and group of a key (the REQs of one group share its items between them), if
/// it has one.
pub fn group_of(key: LiveKey) -> Option<(u8, u32)> {
    match key {
        LiveKey::Announcements => None,
        LiveKey::Repos { group, .. } => Some((2, group)),
        LiveKey::Roots { group, .. } => Some((3, group)),
    }
}

/// Limits a plan must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The keyed live REQs for a sync set, in key order, planned from nothing (see
/// [`Planner::plan`]).
pub fn plan(repos: &[RepoScope], roots: &[EventId], limits: Limits) -> Vec<(LiveKey, Vec<Filter>)> {
    Planner::default()
        .plan(repos, roots, limits)
        .into_iter()
        .map(|r| (r.key, r.filters.to_vec()))
        .collect()
}

/// One REQ of a plan: its filters (shared with the planner that built them) and their
/// [`fingerprint`].
#[derive(Debug, Clone)]
pub struct PlannedReq {
    pub key: LiveKey,
    pub filters: Arc<Vec<Filter>>,
    pub fingerprint: u64,
}

impl PlannedReq {
    fn new(key: LiveKey, filters: Vec<Filter>) -> Self {
        PlannedReq {
            key,
            fingerprint: fingerprint(&filters),
            filters: Arc::new(filters),
        }
    }
}

/// A layout: items per bucket and filters per REQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    chunk: usize,
    per_req: usize,
}

/// The layout a planner chose, for which limits and how many items.
#[derive(Debug, Clone, Copy)]
struct Chosen {
    limits: Limits,
    shape: Shape,
    items: usize,
}

/// One group of buckets as last built: the layer's bucket count then, the group's items (its
/// buckets' in order, each sorted) and its REQs.
#[derive(Debug)]
struct Group<T> {
    buckets: usize,
    items: Vec<T>,
    reqs: Vec<(Arc<Vec<Filter>>, u64)>,
}

/// Plans a session's live REQs across set changes; see the module documentation.
#[derive(Debug, Default)]
pub struct Planner {
    chosen: Option<Chosen>,
    /// The shape and byte budget the cached groups were built for.
    built: Option<(Shape, usize)>,
    announcements: Option<PlannedReq>,
    repos: HashMap<u32, Group<RepoScope>>,
    roots: HashMap<u32, Group<EventId>>,
}

impl Planner {
    /// The keyed live REQs for a sync set, in key order. If even the widest layout needs
    /// more REQs than `max_reqs`, that layout is returned and the caller keeps the excess as
    /// a gap.
    ///
    /// The layout is the first of the candidates (chunks doubling from `limits.chunk` up to
    /// [`filters::MAX_CHUNK`] at `max_filters` per REQ, then again at
    /// `max_filters_stretch`) whose REQs fit under `max_reqs`. The one chosen last is kept
    /// while it still fits (or while nothing did) and the set has not shrunk; a set that
    /// outgrows it resumes the search from it (a layer's REQs grow with its items).
    pub fn plan<'a>(
        &mut self,
        repos: impl IntoIterator<Item = &'a RepoScope>,
        roots: impl IntoIterator<Item = &'a EventId>,
        limits: Limits,
    ) -> Vec<PlannedReq> {
        let repos: Vec<&RepoScope> = repos.into_iter().collect();
        let roots: Vec<&EventId> = roots.into_iter().collect();
        let items = repos.len() + roots.len();
        let fits = |p: &[PlannedReq]| limits.max_reqs.is_none_or(|m| p.len() <= m.max(1));
        let candidates = candidates(limits);
        let mut from = 0;
        if let Some(c) = self
            .chosen
            .filter(|c| c.limits == limits && items >= c.items)
        {
            let p = self.layout(&repos, &roots, c.shape, limits.max_bytes);
            let last = candidates.last() == Some(&c.shape);
            if fits(&p) || last {
                return p;
            }
            from = candidates.iter().position(|s| *s == c.shape).unwrap_or(0);
        }
        let mut p = Vec::new();
        for (i, shape) in candidates.iter().enumerate().skip(from) {
            p = self.layout(&repos, &roots, *shape, limits.max_bytes);
            self.chosen = Some(Chosen {
                limits,
                shape: *shape,
                items,
            });
            if fits(&p) || i + 1 == candidates.len() {
                break;
            }
        }
        p
    }

    fn layout(
        &mut self,
        repos: &[&RepoScope],
        roots: &[&EventId],
        shape: Shape,
        max_bytes: usize,
    ) -> Vec<PlannedReq> {
        if self.built != Some((shape, max_bytes)) {
            self.repos.clear();
            self.roots.clear();
            self.built = Some((shape, max_bytes));
        }
        let announcements = self.announcements.get_or_insert_with(|| {
            PlannedReq::new(LiveKey::Announcements, vec![filters::layer1().limit(0)])
        });
        let mut out = vec![announcements.clone()];
        // Repos: one bucket is 4 filters (state, #a, #A, #q); roots: 3 (#e, #E, #q).
        layer(
            &mut out,
            &mut self.repos,
            repos,
            shape,
            max_bytes,
            4,
            |r| fnv(r.coordinate.to_string().as_bytes()),
            |b| filters::layer2(b, usize::MAX),
            |group, part| LiveKey::Repos { group, part },
        );
        layer(
            &mut out,
            &mut self.roots,
            roots,
            shape,
            max_bytes,
            3,
            |id| fnv(id.as_bytes()),
            |b| filters::layer3(b, usize::MAX),
            |group, part| LiveKey::Roots { group, part },
        );
        out
    }
}

/// The layouts a plan tries, in order.
fn candidates(limits: Limits) -> Vec<Shape> {
    let first = limits.max_filters.max(1);
    let mut per_reqs = vec![first];
    if limits.max_filters_stretch > first {
        per_reqs.push(limits.max_filters_stretch);
    }
    let mut out = Vec::new();
    for per_req in per_reqs {
        let mut chunk = limits.chunk.max(1);
        loop {
            out.push(Shape { chunk, per_req });
            if chunk >= filters::MAX_CHUNK {
                break;
            }
            chunk = (chunk * 2).min(filters::MAX_CHUNK);
        }
    }
    out
}

/// One layer's REQs: `items` in buckets, consecutive buckets grouped into REQs of at most
/// `per_req` filters (`per_bucket` each), each group's REQs taken from `cache` when its
/// items are those it was built from, built (and cached) otherwise.
#[allow(clippy::too_many_arguments)]
fn layer<T: Ord + Clone>(
    out: &mut Vec<PlannedReq>,
    cache: &mut HashMap<u32, Group<T>>,
    items: &[&T],
    shape: Shape,
    max_bytes: usize,
    per_bucket: usize,
    hash: impl Fn(&T) -> u64,
    build: impl Fn(&[T]) -> Vec<Filter>,
    key: impl Fn(u32, u16) -> LiveKey,
) {
    let buckets = buckets(items, shape.chunk, hash);
    let groups: Vec<&[Vec<&T>]> = buckets
        .chunks((shape.per_req / per_bucket).max(1))
        .collect();
    cache.retain(|g, _| (*g as usize) < groups.len());
    for (g, group) in groups.into_iter().enumerate() {
        let g = g as u32;
        // Bucket membership follows from the items and the bucket count, so equal items
        // under the same count mean equal buckets.
        let same = cache.get(&g).is_some_and(|c| {
            c.buckets == buckets.len()
                && c.items.len() == group.iter().map(Vec::len).sum::<usize>()
                && c.items.iter().eq(group.iter().flatten().copied())
        });
        if !same {
            let fs: Vec<Filter> = group
                .iter()
                .filter(|b| !b.is_empty())
                .flat_map(|b| build(&b.iter().map(|t| (*t).clone()).collect::<Vec<T>>()))
                .map(|f| f.limit(0))
                .collect();
            let reqs = if fs.is_empty() {
                Vec::new()
            } else {
                filters::pack_within(fs, shape.per_req, max_bytes)
                    .into_iter()
                    .map(|req| {
                        let print = fingerprint(&req);
                        (Arc::new(req), print)
                    })
                    .collect()
            };
            let items = group.iter().flatten().map(|t| (*t).clone()).collect();
            cache.insert(
                g,
                Group {
                    buckets: buckets.len(),
                    items,
                    reqs,
                },
            );
        }
        if let Some(c) = cache.get(&g) {
            for (i, (filters, print)) in c.reqs.iter().enumerate() {
                out.push(PlannedReq {
                    key: key(g, i.min(u16::MAX as usize) as u16),
                    filters: filters.clone(),
                    fingerprint: *print,
                });
            }
        }
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

/// `items` in `bucket_count` buckets by `hash`, each sorted (the layout must not depend on
/// the order items come in).
fn buckets<'a, T: Ord>(items: &[&'a T], chunk: usize, hash: impl Fn(&T) -> u64) -> Vec<Vec<&'a T>> {
    let n = bucket_count(items.len(), chunk);
    let mut out: Vec<Vec<&T>> = vec![Vec::new(); n];
    for item in items {
        out[hash(item) as usize % n].push(*item);
    }
    out.iter_mut().for_each(|b| b.sort());
    out
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

    fn planned(p: &[PlannedReq]) -> Vec<(LiveKey, Vec<Filter>, u64)> {
        p.iter()
            .map(|r| (r.key, r.filters.to_vec(), r.fingerprint))
            .collect()
    }

    fn fresh(rs: &[RepoScope], ids: &[EventId], l: Limits) -> Vec<(LiveKey, Vec<Filter>, u64)> {
        plan(rs, ids, l)
            .into_iter()
            .map(|(k, f)| {
                let print = fingerprint(&f);
                (k, f, print)
            })
            .collect()
    }

    /// The REQs of `after` whose filters are not the very ones (same allocation) of `before`.
    fn rebuilt(before: &[PlannedReq], after: &[PlannedReq]) -> Vec<LiveKey> {
        after
            .iter()
            .filter(|a| {
                !before
                    .iter()
                    .any(|b| b.key == a.key && Arc::ptr_eq(&b.filters, &a.filters))
            })
            .map(|a| a.key)
            .collect()
    }

    #[test]
    fn a_planner_plans_what_a_fresh_plan_does_through_changes() {
        let mut rs = repos(700);
        let mut ids = roots(3_000);
        let mut p = Planner::default();
        for step in 0..12u32 {
            match step % 4 {
                0 => ids.extend((0..50).map(|i| id(100_000 + step * 100 + i))),
                1 => {
                    ids.drain(..40);
                }
                2 => {
                    rs.remove(usize::try_from(step).unwrap());
                }
                _ => ids.extend((0..3_000).map(|i| id(200_000 + step * 10_000 + i))),
            }
            let got = p.plan(&rs, &ids, limits());
            assert_eq!(planned(&got), fresh(&rs, &ids, limits()), "step {step}");
        }
    }

    #[test]
    fn a_planner_rebuilds_only_the_groups_whose_items_changed() {
        let rs = repos(300);
        let mut ids = roots(5_000);
        let mut p = Planner::default();
        let before = p.plan(&rs, &ids, limits());
        ids.push(id(99_999));
        let after = p.plan(&rs, &ids, limits());
        assert!(after.len() > 20, "{} REQs", after.len());
        assert_eq!(rebuilt(&before, &after).len(), 1);
        // Nothing changed: nothing is built.
        let again = p.plan(&rs, &ids, limits());
        assert_eq!(rebuilt(&after, &again), []);
    }

    #[test]
    fn a_planner_keeps_a_layout_that_fits_and_searches_again_when_it_stops_fitting() {
        let l = Limits {
            max_filters: 3,
            max_filters_stretch: 3,
            max_reqs: Some(12),
            ..limits()
        };
        let rs = repos(30);
        let mut ids = roots(700);
        let mut p = Planner::default();
        let first = p.plan(&rs, &ids, l);
        assert!(first.len() <= 12, "{} REQs", first.len());
        assert_eq!(planned(&first), fresh(&rs, &ids, l));
        // Grown past the layout: searched again (from it), and it fits.
        ids.extend((0..1_300).map(|i| id(300_000 + i)));
        let grown = p.plan(&rs, &ids, l);
        assert!(grown.len() <= 12, "{} REQs", grown.len());
        let uncapped = Limits {
            max_reqs: None,
            ..l
        };
        assert!(
            plan(&rs, &ids, uncapped).len() > 12,
            "the first layout still fits"
        );
        assert_eq!(planned(&grown), fresh(&rs, &ids, l));
        // Back under half the size: the narrower layout a fresh plan takes.
        ids.truncate(600);
        assert_eq!(planned(&p.plan(&rs, &ids, l)), fresh(&rs, &ids, l));
    }

    #[test]
    fn a_plan_that_cannot_fit_is_not_searched_again_on_every_change() {
        // Nothing fits one REQ: the widest layout is the plan, and a change rebuilds only
        // what it touches instead of trying every layout again.
        let l = Limits {
            max_reqs: Some(1),
            ..limits()
        };
        let rs = repos(400);
        let mut ids = roots(3_000);
        let mut p = Planner::default();
        let before = p.plan(&rs, &ids, l);
        assert_eq!(planned(&before), fresh(&rs, &ids, l));
        assert!(before.len() > 1);
        ids.push(id(99_999));
        let after = p.plan(&rs, &ids, l);
        assert_eq!(planned(&after), fresh(&rs, &ids, l));
        // The roots' group holding the new root (split into parts by bytes) and nothing else:
        // a search from the first layout again would have rebuilt the repos' REQs too.
        let rebuilt = rebuilt(&before, &after);
        assert!(!rebuilt.is_empty());
        assert!(
            rebuilt.iter().all(|k| matches!(k, LiveKey::Roots { .. })),
            "{rebuilt:?}"
        );
        assert!(after.iter().any(|r| matches!(r.key, LiveKey::Repos { .. })));
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
