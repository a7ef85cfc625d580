//! Bounds on what announcements can make us connect to. Announcements are cheap to make, and
//! each may list many relays (and paths make distinct URLs on one host): without bounds, a
//! thousand announcements become tens of thousands of RelaySyncs, sessions, DNS look-ups and
//! NIP-11 requests — a flood reflected at third parties and a load on the API server.
//!
//! Relays per announcement are cut where the announcement is read (its first ones, in tag
//! order); relays per host and in total are cut here, over the whole index, keeping the relays
//! that the most repositories name (then the URL, so the choice is stable). Bootstrap relays
//! are the operator's: always kept, and counted.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::nostr::{RelayUrl, RepoCoordinate};

/// Defaults: well above what real announcements and the relay ecosystem need.
pub const DEFAULT_PER_ANNOUNCEMENT: usize = 16;
pub const DEFAULT_PER_HOST: usize = 4;
pub const DEFAULT_TOTAL: usize = 5000;

/// The caps over the whole index (the per-announcement one is `TargetPolicy::max_relays`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayCaps {
    /// Relay URLs (ports, paths) on one host.
    pub per_host: usize,
    /// Relays synced in all.
    pub total: usize,
}

impl Default for RelayCaps {
    fn default() -> Self {
        RelayCaps {
            per_host: DEFAULT_PER_HOST,
            total: DEFAULT_TOTAL,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LeftOut {
    PerHost,
    Total,
}

impl LeftOut {
    pub const ALL: [LeftOut; 2] = [LeftOut::PerHost, LeftOut::Total];

    pub fn label(self) -> &'static str {
        match self {
            LeftOut::PerHost => "per_host",
            LeftOut::Total => "total",
        }
    }
}

/// The relay map within the per-host and total caps, and what was left out.
#[derive(Debug, Default)]
pub struct Capped {
    pub relays: BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>>,
    pub left_out: BTreeMap<RelayUrl, LeftOut>,
}

impl Capped {
    pub fn count(&self, why: LeftOut) -> usize {
        self.left_out.values().filter(|w| **w == why).count()
    }
}

/// Keep at most `caps.per_host` relays per host and `caps.total` in all (bootstrap relays
/// included, and always kept), preferring relays named by more repositories.
pub fn cap_relays(
    relay_map: &BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>>,
    bootstrap: &BTreeSet<RelayUrl>,
    caps: RelayCaps,
) -> Capped {
    let mut ranked: Vec<(&RelayUrl, &BTreeSet<RepoCoordinate>)> = relay_map
        .iter()
        .filter(|(url, _)| !bootstrap.contains(*url))
        .collect();
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(b.0)));
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    for url in bootstrap {
        *per_host.entry(url.host()).or_default() += 1;
    }
    let mut kept = bootstrap.len();
    let mut out = Capped::default();
    for url in bootstrap {
        if let Some(repos) = relay_map.get(url) {
            out.relays.insert(url.clone(), repos.clone());
        }
    }
    for (url, repos) in ranked {
        let on_host = per_host.entry(url.host()).or_default();
        if *on_host >= caps.per_host {
            out.left_out.insert(url.clone(), LeftOut::PerHost);
        } else if kept >= caps.total {
            out.left_out.insert(url.clone(), LeftOut::Total);
        } else {
            *on_host += 1;
            kept += 1;
            out.relays.insert(url.clone(), repos.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> RelayUrl {
        RelayUrl::parse(s).unwrap()
    }

    /// `entries`: relay → how many repos name it.
    fn map(entries: &[(&str, usize)]) -> BTreeMap<RelayUrl, BTreeSet<RepoCoordinate>> {
        entries
            .iter()
            .map(|(u, n)| {
                let repos = (0..*n)
                    .map(|i| format!("30617:{}:r{i}", "a".repeat(64)).parse().unwrap())
                    .collect();
                (url(u), repos)
            })
            .collect()
    }

    fn kept(c: &Capped) -> Vec<&str> {
        c.relays.keys().map(|u| u.as_str()).collect()
    }

    #[test]
    fn per_host_keeps_the_most_named_urls_of_a_host() {
        let m = map(&[
            ("wss://flood.example/a", 1),
            ("wss://flood.example/b", 3),
            ("wss://flood.example:444", 2),
            ("wss://flood.example/c", 1),
            ("wss://other.example", 1),
        ]);
        let caps = RelayCaps {
            per_host: 2,
            ..RelayCaps::default()
        };
        let c = cap_relays(&m, &BTreeSet::new(), caps);
        assert_eq!(
            kept(&c),
            [
                "wss://flood.example/b",
                "wss://flood.example:444",
                "wss://other.example"
            ]
        );
        assert_eq!(c.count(LeftOut::PerHost), 2);
        assert_eq!(c.left_out[&url("wss://flood.example/a")], LeftOut::PerHost);
    }

    #[test]
    fn the_total_keeps_bootstrap_relays_and_then_the_most_named() {
        let m = map(&[
            ("wss://a.example", 1),
            ("wss://b.example", 5),
            ("wss://c.example", 2),
            ("wss://d.example", 2),
            ("wss://boot.example", 0),
        ]);
        let boot = BTreeSet::from([url("wss://boot.example"), url("wss://boot2.example")]);
        let caps = RelayCaps {
            total: 4,
            ..RelayCaps::default()
        };
        let c = cap_relays(&m, &boot, caps);
        // boot2 has no repos: it is counted but has no entry (desired objects add it).
        assert_eq!(
            kept(&c),
            ["wss://b.example", "wss://boot.example", "wss://c.example"]
        );
        assert_eq!(c.count(LeftOut::Total), 2, "{:?}", c.left_out);
        // Ties go to the smaller URL, so the choice does not change between passes.
        assert!(c.left_out.contains_key(&url("wss://d.example")));
    }

    #[test]
    fn within_the_caps_nothing_is_left_out() {
        let m = map(&[("wss://a.example", 1), ("wss://a.example/x", 1)]);
        let c = cap_relays(&m, &BTreeSet::new(), RelayCaps::default());
        assert_eq!(c.relays, m);
        assert!(c.left_out.is_empty());
    }
}
