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
        let parts: Vec<&[String]> = if repos.is_empty() {
            vec![&[]]
        } else {
            repos.chunks(cap).collect()
        };
        for (i, part) in parts.into_iter().enumerate() {
            out.insert(
                object_name_part(url, i),
                RelaySyncSpec {
                    url: url.to_string(),
                    bootstrap: is_bootstrap,
                    repos: part.to_vec(),
                    paused: None,
                },
            );
        }
    }
    out
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
        assert_eq!(d.len(), 3 + 1);
        let a_parts: Vec<&RelaySyncSpec> =
            d.values().filter(|s| s.url == "wss://a.example").collect();
        assert_eq!(a_parts.iter().map(|s| s.repos.len()).sum::<usize>(), 25);
        assert!(a_parts.iter().all(|s| s.repos.len() <= 10));
        for s in d.values() {
            assert!(s.repos.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        }
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
