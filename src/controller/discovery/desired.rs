//! From the repo index to RelaySync objects: what should exist, and the create / update /
//! delete steps to get there. Removals wait out a grace period, so an announcement replaced
//! in two steps (or briefly missing) does not tear connections down and build them again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::crd::RelaySyncSpec;
use crate::crd::naming::object_name_part;
use crate::nostr::{RelayUrl, RepoCoordinate};

/// Default most repos per object (well under the CRD's limit and etcd's object size).
pub const DEFAULT_REPOS_PER_OBJECT: usize = 1000;

/// The objects that should exist: one per relay, split into parts of at most `cap` repos.
/// Bootstrap relays always have an object, even with no repos (Layer 1 keeps discovery fed).
pub fn desired_objects(
    relay_map: &BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>>,
    bootstrap: &BTreeSet<RelayUrl>,
    cap: usize,
) -> BTreeMap<String, RelaySyncSpec> {
    let cap = cap.max(1);
    let mut out = BTreeMap::new();
    let empty = BTreeSet::new();
    let urls: BTreeSet<&RelayUrl> = relay_map.keys().chain(bootstrap.iter()).collect();
    for url in urls {
        let repos: Vec<String> = relay_map
            .get(url)
            .unwrap_or(&empty)
            .iter()
            .map(|c| c.to_string())
            .collect();
        let is_bootstrap = bootstrap.contains(url).then_some(true);
        for (i, part) in split(repos, cap).into_iter().enumerate() {
            // Parts are hash buckets: an empty one has no object (part 0 always has one,
            // so a relay without repos keeps its object).
            if part.is_empty() && i > 0 {
                continue;
            }
            out.insert(
                object_name_part(url, i),
                RelaySyncSpec {
                    url: url.to_string(),
                    bootstrap: is_bootstrap,
                    repos: part,
                    paused: None,
                },
            );
        }
    }
    out
}

/// Most hash buckets one relay's repos are spread over.
const MAX_BUCKETS: usize = 1 << 16;

/// `repos` (sorted) in parts of at most `cap`, by a stable hash of each coordinate: adding or
/// removing a repo changes only its own part (so only that object's generation moves and
/// only its session restarts), except when the number of parts doubles or halves. The
/// bucket count starts at about twice what the cap needs and doubles while a bucket is over
/// the cap (coordinates are chosen by their authors, who could aim at one bucket).
fn split(repos: Vec<String>, cap: usize) -> Vec<Vec<String>> {
    if repos.len() <= cap {
        return vec![repos];
    }
    let hashes: Vec<u64> = repos.iter().map(|r| bucket_hash(r)).collect();
    let mut buckets = (repos.len() * 2).div_ceil(cap).next_power_of_two();
    while buckets <= MAX_BUCKETS {
        let mut parts = vec![Vec::new(); buckets];
        for (r, h) in repos.iter().zip(&hashes) {
            parts[(*h as usize) & (buckets - 1)].push(r.clone());
        }
        if parts.iter().all(|p| p.len() <= cap) {
            return parts;
        }
        buckets *= 2;
    }
    // Unreachable in practice (65,536 buckets); positional parts still respect the cap.
    repos.chunks(cap).map(<[String]>::to_vec).collect()
}

fn bucket_hash(coordinate: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(coordinate.as_bytes());
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create or update the object to this spec (server-side apply).
    Apply {
        name: String,
        spec: RelaySyncSpec,
    },
    Delete {
        name: String,
    },
}

/// Plans steps from desired and existing state, remembering since when things have been
/// unwanted.
#[derive(Debug)]
pub struct Planner {
    grace: Duration,
    repo_absent_since: HashMap<(String, String), Instant>,
    object_unwanted_since: HashMap<String, Instant>,
}

impl Planner {
    pub fn new(grace: Duration) -> Self {
        Planner {
            grace,
            repo_absent_since: HashMap::new(),
            object_unwanted_since: HashMap::new(),
        }
    }

    pub fn plan(
        &mut self,
        desired: &BTreeMap<String, RelaySyncSpec>,
        existing: &BTreeMap<String, RelaySyncSpec>,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let names: BTreeSet<&String> = desired.keys().chain(existing.keys()).collect();
        for name in names {
            let want = desired.get(name);
            let have = existing.get(name);
            // Repos the object has but should not: kept until their grace runs out.
            let mut kept = Vec::new();
            if let Some(have) = have {
                for repo in &have.repos {
                    let key = (name.clone(), repo.clone());
                    if want.is_some_and(|w| w.repos.contains(repo)) {
                        self.repo_absent_since.remove(&key);
                        continue;
                    }
                    let since = *self.repo_absent_since.entry(key).or_insert(now);
                    if now.saturating_duration_since(since) < self.grace {
                        kept.push(repo.clone());
                    }
                }
            }
            let spec = match (want, have) {
                (Some(w), _) => {
                    self.object_unwanted_since.remove(name);
                    let mut spec = w.clone();
                    spec.repos.extend(kept);
                    spec.repos.sort();
                    spec.repos.dedup();
                    spec
                }
                (None, Some(h)) => {
                    let since = *self
                        .object_unwanted_since
                        .entry(name.clone())
                        .or_insert(now);
                    if kept.is_empty() && now.saturating_duration_since(since) >= self.grace {
                        self.object_unwanted_since.remove(name);
                        self.repo_absent_since.retain(|(n, _), _| n != name);
                        actions.push(Action::Delete { name: name.clone() });
                        continue;
                    }
                    RelaySyncSpec {
                        url: h.url.clone(),
                        bootstrap: None,
                        repos: kept,
                        paused: None,
                    }
                }
                (None, None) => continue,
            };
            let unchanged = have.is_some_and(|h| {
                h.url == spec.url && h.repos == spec.repos && h.bootstrap == spec.bootstrap
            });
            if !unchanged {
                actions.push(Action::Apply {
                    name: name.clone(),
                    spec,
                });
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";

    fn c(id: &str) -> RepoCoordinate {
        RepoCoordinate::new(PK, id).unwrap()
    }

    fn url(u: &str) -> RelayUrl {
        RelayUrl::parse(u).unwrap()
    }

    fn map(entries: &[(&str, &[&str])]) -> BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>> {
        entries
            .iter()
            .map(|(u, ids)| (url(u), ids.iter().map(|i| c(i)).collect()))
            .collect()
    }

    /// Apply actions to an "API server" map, as the controller would.
    fn apply(existing: &mut BTreeMap<String, RelaySyncSpec>, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Apply { name, spec } => {
                    existing.insert(name.clone(), spec.clone());
                }
                Action::Delete { name } => {
                    existing.remove(name);
                }
            }
        }
    }

    #[test]
    fn one_object_per_relay_split_above_the_cap() {
        let ids: Vec<String> = (0..25).map(|i| format!("r{i:02}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let d = desired_objects(
            &map(&[("wss://a.example", &refs), ("wss://b.example", &["x"])]),
            &BTreeSet::new(),
            10,
        );
        let a_parts: Vec<&RelaySyncSpec> =
            d.values().filter(|s| s.url == "wss://a.example").collect();
        assert!(a_parts.len() >= 3, "{} parts", a_parts.len());
        assert_eq!(d.len(), a_parts.len() + 1);
        assert_eq!(a_parts.iter().map(|s| s.repos.len()).sum::<usize>(), 25);
        assert!(a_parts.iter().all(|s| s.repos.len() <= 10));
        for s in d.values() {
            assert!(s.repos.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        }
    }

    #[test]
    fn adding_a_repo_to_a_split_relay_changes_one_part() {
        let ids: Vec<String> = (0..2500).map(|i| format!("r{i:04}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let before = desired_objects(&map(&[("wss://a.example", &refs)]), &BTreeSet::new(), 1000);
        assert!(before.len() > 2);
        assert!(before.values().all(|s| s.repos.len() <= 1000));
        for extra in ["new-1", "new-2", "zzz"] {
            let mut more = refs.clone();
            more.push(extra);
            let after =
                desired_objects(&map(&[("wss://a.example", &more)]), &BTreeSet::new(), 1000);
            assert_eq!(
                after.keys().collect::<Vec<_>>(),
                before.keys().collect::<Vec<_>>()
            );
            let changed = after.iter().filter(|(n, s)| before[*n] != **s).count();
            assert_eq!(changed, 1, "adding {extra} rewrote {changed} parts");
        }
    }

    #[test]
    fn coordinates_aimed_at_one_bucket_still_fit_the_cap() {
        // Identifiers chosen so their hashes share the low bits: the split doubles its
        // buckets until none is over the cap.
        let mut ids = Vec::new();
        let mut i = 0u64;
        while ids.len() < 300 {
            let id = format!("aim{i}");
            if bucket_hash(&c(&id).to_string()) & 0b111 == 0 {
                ids.push(id);
            }
            i += 1;
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let d = desired_objects(&map(&[("wss://a.example", &refs)]), &BTreeSet::new(), 100);
        assert!(d.values().all(|s| s.repos.len() <= 100));
        assert_eq!(d.values().map(|s| s.repos.len()).sum::<usize>(), 300);
    }

    #[test]
    fn bootstrap_relays_always_exist() {
        let boot = BTreeSet::from([url("wss://boot.example")]);
        let d = desired_objects(&BTreeMap::new(), &boot, 10);
        assert_eq!(d.len(), 1);
        let spec = d.values().next().unwrap();
        assert_eq!((spec.bootstrap, spec.repos.len()), (Some(true), 0));
    }

    #[test]
    fn removals_wait_for_the_grace_period() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(900);
        let mut p = Planner::new(grace);
        let mut existing = BTreeMap::new();
        let boot = BTreeSet::new();

        let d1 = desired_objects(
            &map(&[
                ("wss://a.example", &["x", "y"]),
                ("wss://b.example", &["x"]),
            ]),
            &boot,
            100,
        );
        let steps = p.plan(&d1, &existing, t0);
        assert_eq!(steps.len(), 2);
        apply(&mut existing, &steps);
        assert!(p.plan(&d1, &existing, t0).is_empty(), "idempotent");

        // The announcement of x is replaced without relay b, and y leaves relay a.
        let d2 = desired_objects(&map(&[("wss://a.example", &["x"])]), &boot, 100);
        let steps = p.plan(&d2, &existing, t0 + Duration::from_secs(60));
        assert!(
            steps.is_empty(),
            "nothing changes within the grace period: {steps:?}"
        );

        // ... and is restored before the grace ends: nothing ever happened.
        assert!(
            p.plan(&d1, &existing, t0 + Duration::from_secs(120))
                .is_empty()
        );

        // Gone again, for longer than the grace period: y leaves a's spec, b's object goes.
        let t1 = t0 + Duration::from_secs(200);
        assert!(p.plan(&d2, &existing, t1).is_empty());
        let steps = p.plan(&d2, &existing, t1 + grace);
        apply(&mut existing, &steps);
        let name_b = object_name_part(&url("wss://b.example"), 0);
        let name_a = object_name_part(&url("wss://a.example"), 0);
        assert!(
            steps.contains(&Action::Delete {
                name: name_b.clone()
            }),
            "{steps:?}"
        );
        assert_eq!(existing[&name_a].repos, vec![c("x").to_string()]);
        assert!(!existing.contains_key(&name_b));
        assert!(p.plan(&d2, &existing, t1 + grace).is_empty());
    }

    #[test]
    fn operator_paused_does_not_cause_churn() {
        let t0 = Instant::now();
        let mut p = Planner::new(Duration::from_secs(1));
        let d = desired_objects(&map(&[("wss://a.example", &["x"])]), &BTreeSet::new(), 100);
        let mut existing = BTreeMap::new();
        let steps = p.plan(&d, &existing, t0);
        apply(&mut existing, &steps);
        for spec in existing.values_mut() {
            spec.paused = Some(true);
        }
        assert!(p.plan(&d, &existing, t0).is_empty());
    }
}
