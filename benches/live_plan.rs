//! REQ bytes a set change costs on a live session: before (every live REQ re-sent) and with
//! the keyed, hash-bucketed plan (only the REQs whose content changed); then the CPU a plan
//! costs per set change, planned from nothing and by a session's `Planner` (which rebuilds
//! only what changed), without a subscription cap and under one the set cannot fit.
//!
//! `cargo bench --bench live_plan`

use std::collections::BTreeMap;

use grasp_sync::nostr::RepoCoordinate;
use grasp_sync::nostr::filters::{DEFAULT_CHUNK, RepoScope};
use grasp_sync::nostr::live_plan::{self, Limits, LiveKey, Planner};
use nostr::{ClientMessage, EventId, JsonUtil, Keys, SubscriptionId};

fn id(n: u32) -> EventId {
    use sha2::Digest;
    EventId::from_byte_array(sha2::Sha256::digest(n.to_le_bytes()).into())
}

fn req_bytes(filters: &[nostr::Filter]) -> usize {
    ClientMessage::req(SubscriptionId::new("live-1234"), filters.to_vec())
        .as_json()
        .len()
}

fn old_plan_reqs(repos: &[RepoScope], roots: &[EventId]) -> usize {
    use grasp_sync::nostr::filters;
    let mut all = vec![filters::layer1()];
    all.extend(filters::layer2(repos, DEFAULT_CHUNK));
    all.extend(filters::layer3(roots, DEFAULT_CHUNK));
    let all: Vec<nostr::Filter> = all.into_iter().map(|f| f.limit(0)).collect();
    filters::pack_within(all, 10, 64 * 1024).len()
}

fn main() {
    let limits = Limits {
        chunk: DEFAULT_CHUNK,
        max_filters: 10,
        max_filters_stretch: 20,
        max_reqs: None,
        max_bytes: 64 * 1024,
    };
    let owner = Keys::generate().public_key().to_hex();
    println!(
        "repos  roots   live REQs  full plan (bytes)  re-sent per added root (bytes, mean of 100)  ratio"
    );
    let mut sizes = Vec::new();
    for (n_repos, n_roots) in [
        (1_000usize, 4_000u32),
        (3_333, 11_700),
        (5_000, 20_000),
        (5_000, 60_000),
    ] {
        let repos: Vec<RepoScope> = (0..n_repos)
            .map(|i| {
                RepoScope::owned(RepoCoordinate::new(&owner, &format!("repo-{i}")).unwrap())
                    .unwrap()
            })
            .collect();
        let mut roots: Vec<EventId> = (0..n_roots).map(id).collect();
        roots.sort();
        let mut plan: BTreeMap<LiveKey, Vec<nostr::Filter>> =
            live_plan::plan(&repos, &roots, limits)
                .into_iter()
                .collect();
        let full: usize = plan.values().map(|f| req_bytes(f)).sum();
        eprintln!(
            "old positional plan: {} REQs",
            old_plan_reqs(&repos, &roots)
        );
        let reqs = plan.len();
        let mut resent = 0usize;
        let adds = 100u32;
        for a in 0..adds {
            let new = id(10_000_000 + a);
            let pos = roots.binary_search(&new).unwrap_or_else(|p| p);
            roots.insert(pos, new);
            let next: BTreeMap<LiveKey, Vec<nostr::Filter>> =
                live_plan::plan(&repos, &roots, limits)
                    .into_iter()
                    .collect();
            for (k, f) in &next {
                if plan.get(k) != Some(f) {
                    resent += req_bytes(f);
                }
            }
            plan = next;
        }
        let per_add = resent / adds as usize;
        println!(
            "{n_repos:>5}  {n_roots:>6}  {reqs:>9}  {full:>17}  {per_add:>44}  {:>5.0}x",
            full as f64 / per_add.max(1) as f64
        );
        sizes.push((repos, roots));
    }
    println!();
    println!(
        "repos  roots   cap   plan from nothing (ms per change)  planner (ms per change)  ratio"
    );
    for (repos, roots) in &sizes {
        for cap in [None, Some(16)] {
            let l = Limits {
                max_reqs: cap,
                ..limits
            };
            let fresh = per_change(repos, roots, |r, ids| live_plan::plan(r, ids, l).len());
            let mut planner = Planner::default();
            let kept = per_change(repos, roots, |r, ids| planner.plan(r, ids, l).len());
            println!(
                "{:>5}  {:>6}  {:>4}  {:>33.2}  {:>23.2}  {:>5.0}x",
                repos.len(),
                roots.len(),
                cap.map_or("-".to_string(), |c| c.to_string()),
                fresh,
                kept,
                fresh / kept.max(1e-6)
            );
        }
    }
}

/// Mean milliseconds of `plan` per change over 20 changes of one added root each (after a
/// first plan of the whole set, not counted).
fn per_change(
    repos: &[RepoScope],
    roots: &[EventId],
    mut plan: impl FnMut(&[RepoScope], &[EventId]) -> usize,
) -> f64 {
    let mut roots = roots.to_vec();
    std::hint::black_box(plan(repos, &roots));
    let changes = 20u32;
    let t = std::time::Instant::now();
    for a in 0..changes {
        roots.push(id(20_000_000 + a));
        std::hint::black_box(plan(repos, &roots));
    }
    t.elapsed().as_secs_f64() * 1000.0 / f64::from(changes)
}
