//! Which worker holds which relay, and how relays move — decided from the objects' labels,
//! the live workers and the hash ring, free of I/O.
//!
//! The `grasp-sync.dev/worker` label is the single record of ownership. A relay moves between
//! two *live* workers through a drain: the controller marks it, the old worker closes the
//! session and acknowledges (final status written), and only then is the label moved — so at
//! most one worker holds a relay's connection. A dead worker (expired Lease) cannot
//! acknowledge: its relays are reassigned at once. Split objects of one relay share the key
//! (the URL), so they always land on the same worker.

use std::collections::{BTreeMap, BTreeSet};

use super::ring::Ring;

/// What the planner needs to know about one RelaySync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub name: String,
    pub url: String,
    /// The worker label, if any.
    pub worker: Option<String>,
    /// The drain label is set.
    pub draining: bool,
    /// The labelled worker has released the relay (closed the session, wrote final status).
    pub released: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Label an unassigned object.
    Assign { name: String, worker: String },
    /// Ask the current (live) worker to let go.
    StartDrain { name: String },
    /// The ring changed back: keep the current worker.
    CancelDrain { name: String },
    /// Move the label (and clear the drain): after the old worker released the relay, or at
    /// once when it is dead.
    Reassign {
        name: String,
        from: String,
        to: String,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Objects with no live owner after this plan (an operator-visible gauge).
    pub unassigned: usize,
    /// Relays moving between live workers after this plan.
    pub draining: usize,
}

/// Plan the next steps. At most `max_moves` relays drain at once — a relay, not an object:
/// its worker lets go of a split relay only once every part is draining, so the parts start
/// draining together and count as one move (counted per object, a relay split into more
/// parts than the bound, or several split relays sharing it, could take every slot with
/// parts their worker never lets go of, and no relay would move again). Dead workers'
/// relays and unassigned ones are never held back by that bound.
pub fn plan(objects: &[Assigned], live: &BTreeSet<String>, ring: &Ring, max_moves: usize) -> Plan {
    let mut out = Plan::default();
    // Relays (URLs) draining away from a live worker, and of each, the parts not yet
    // released: a relay's slot frees once its last part moves.
    let mut draining: BTreeSet<&str> = BTreeSet::new();
    let mut unreleased: BTreeMap<&str, usize> = BTreeMap::new();
    for o in objects {
        if o.draining && o.worker.as_ref().is_some_and(|w| live.contains(w)) {
            draining.insert(&o.url);
            if !o.released {
                *unreleased.entry(&o.url).or_default() += 1;
            }
        }
    }
    for o in objects {
        let Some(want) = ring.owner(&o.url) else {
            if o.worker.as_ref().is_none_or(|w| !live.contains(w)) {
                out.unassigned += 1;
            }
            continue;
        };
        let want = want.to_string();
        match &o.worker {
            None => out.steps.push(Step::Assign {
                name: o.name.clone(),
                worker: want,
            }),
            Some(current) if !live.contains(current) => out.steps.push(Step::Reassign {
                name: o.name.clone(),
                from: current.clone(),
                to: want,
            }),
            Some(current) if *current == want => {
                if o.draining {
                    out.steps.push(Step::CancelDrain {
                        name: o.name.clone(),
                    });
                    draining.remove(o.url.as_str());
                }
            }
            Some(current) => {
                if o.draining && o.released {
                    out.steps.push(Step::Reassign {
                        name: o.name.clone(),
                        from: current.clone(),
                        to: want,
                    });
                    if unreleased.get(o.url.as_str()).is_none_or(|n| *n == 0) {
                        draining.remove(o.url.as_str());
                    }
                } else if !o.draining
                    && (draining.contains(o.url.as_str()) || draining.len() < max_moves)
                {
                    out.steps.push(Step::StartDrain {
                        name: o.name.clone(),
                    });
                    draining.insert(&o.url);
                    *unreleased.entry(&o.url).or_default() += 1;
                }
            }
        }
    }
    out.draining = draining.len();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::assignment::ring::DEFAULT_VNODES;

    fn objects(n: usize) -> Vec<Assigned> {
        (0..n)
            .map(|i| Assigned {
                name: format!("relay-{i}"),
                url: format!("wss://relay-{i}.example"),
                worker: None,
                draining: false,
                released: false,
            })
            .collect()
    }

    fn live(ws: &[&str]) -> BTreeSet<String> {
        ws.iter().map(|w| w.to_string()).collect()
    }

    /// Apply steps as the controller would, with workers releasing drained relays at once
    /// when `ack` is set.
    fn apply(objs: &mut [Assigned], steps: &[Step], ack: bool) {
        for s in steps {
            match s {
                Step::Assign { name, worker } => {
                    let o = objs.iter_mut().find(|o| &o.name == name).unwrap();
                    o.worker = Some(worker.clone());
                }
                Step::StartDrain { name } => {
                    let o = objs.iter_mut().find(|o| &o.name == name).unwrap();
                    o.draining = true;
                    o.released = ack;
                }
                Step::CancelDrain { name } => {
                    let o = objs.iter_mut().find(|o| &o.name == name).unwrap();
                    o.draining = false;
                    o.released = false;
                }
                Step::Reassign { name, to, .. } => {
                    let o = objs.iter_mut().find(|o| &o.name == name).unwrap();
                    o.worker = Some(to.clone());
                    o.draining = false;
                    o.released = false;
                }
            }
        }
    }

    #[test]
    fn everything_is_assigned_to_its_ring_owner() {
        let ws = live(&["w0", "w1", "w2"]);
        let ring = Ring::new(ws.iter().cloned(), DEFAULT_VNODES);
        let mut objs = objects(300);
        let p = plan(&objs, &ws, &ring, 10);
        assert_eq!(p.steps.len(), 300);
        apply(&mut objs, &p.steps, false);
        assert!(
            objs.iter()
                .all(|o| o.worker.as_deref() == ring.owner(&o.url))
        );
        assert_eq!(plan(&objs, &ws, &ring, 10), Plan::default(), "settled");
        // No workers at all: everything counts as unassigned.
        let p = plan(
            &objects(5),
            &BTreeSet::new(),
            &Ring::new(Vec::<String>::new(), 8),
            10,
        );
        assert_eq!((p.steps.len(), p.unassigned), (0, 5));
    }

    #[test]
    fn a_dead_workers_relays_move_at_once_without_a_drain() {
        let ws = live(&["w0", "w1", "w2"]);
        let mut objs = objects(300);
        let ring = Ring::new(ws.iter().cloned(), DEFAULT_VNODES);
        let steps = plan(&objs, &ws, &ring, 1).steps;
        apply(&mut objs, &steps, false);
        let survivors = live(&["w0", "w2"]);
        let ring2 = Ring::new(survivors.iter().cloned(), DEFAULT_VNODES);
        let p = plan(&objs, &survivors, &ring2, 1);
        let held_by_w1 = objs
            .iter()
            .filter(|o| o.worker.as_deref() == Some("w1"))
            .count();
        assert_eq!(
            p.steps.len(),
            held_by_w1,
            "only w1's relays move, all of them, max_moves notwithstanding"
        );
        assert!(
            p.steps
                .iter()
                .all(|s| matches!(s, Step::Reassign { from, .. } if from == "w1"))
        );
        apply(&mut objs, &p.steps, false);
        assert!(objs.iter().all(|o| o.worker.as_deref() != Some("w1")));
        assert_eq!(plan(&objs, &survivors, &ring2, 1).unassigned, 0);
    }

    #[test]
    fn scale_out_drains_a_bounded_number_at_a_time() {
        let three = live(&["w0", "w1", "w2"]);
        let mut objs = objects(400);
        let ring3 = Ring::new(three.iter().cloned(), DEFAULT_VNODES);
        let steps = plan(&objs, &three, &ring3, 5).steps;
        apply(&mut objs, &steps, false);
        let four = live(&["w0", "w1", "w2", "w3"]);
        let ring4 = Ring::new(four.iter().cloned(), DEFAULT_VNODES);
        let to_move = objs
            .iter()
            .filter(|o| o.worker.as_deref() != ring4.owner(&o.url))
            .count();
        assert!(
            (60..=140).contains(&to_move),
            "{to_move} of 400 should move"
        );

        let mut rounds = 0;
        loop {
            let p = plan(&objs, &four, &ring4, 5);
            assert!(p.draining <= 5, "{} drains at once", p.draining);
            if p.steps.is_empty() {
                break;
            }
            // No relay is ever labelled for w3 before its old worker released it.
            for s in &p.steps {
                if let Step::Reassign { name, .. } = s {
                    let o = objs.iter().find(|o| &o.name == name).unwrap();
                    assert!(o.released, "{name} moved without a release");
                }
            }
            apply(&mut objs, &p.steps, true);
            rounds += 1;
            assert!(rounds < 1000);
        }
        assert!(
            objs.iter()
                .all(|o| o.worker.as_deref() == ring4.owner(&o.url))
        );
        assert!(rounds >= to_move / 5, "moves were not bounded");
    }

    #[test]
    fn a_drain_is_cancelled_when_the_ring_changes_back() {
        let three = live(&["w0", "w1", "w2"]);
        let four = live(&["w0", "w1", "w2", "w3"]);
        let ring3 = Ring::new(three.iter().cloned(), DEFAULT_VNODES);
        let ring4 = Ring::new(four.iter().cloned(), DEFAULT_VNODES);
        let mut objs = objects(200);
        let steps = plan(&objs, &three, &ring3, 50).steps;
        apply(&mut objs, &steps, false);
        let steps = plan(&objs, &four, &ring4, 50).steps;
        apply(&mut objs, &steps, false); // drains start, no ack
        assert!(objs.iter().any(|o| o.draining));
        // w3 goes away again before anything was released.
        let p = plan(&objs, &three, &ring3, 50);
        assert!(
            p.steps
                .iter()
                .all(|s| matches!(s, Step::CancelDrain { .. }))
        );
        apply(&mut objs, &p.steps, false);
        assert!(objs.iter().all(|o| !o.draining));
    }

    /// The worker's side of a drain, as `supervisor::sessions::drains_due` does it: a relay
    /// is let go (every part acknowledged) only once all its parts are draining.
    fn worker_acks_whole_relays(objs: &mut [Assigned]) {
        let urls: BTreeSet<String> = objs.iter().map(|o| o.url.clone()).collect();
        for url in urls {
            let all = objs.iter().filter(|o| o.url == url).all(|o| o.draining);
            if all {
                for o in objs.iter_mut().filter(|o| o.url == url) {
                    o.released = true;
                }
            }
        }
    }

    #[test]
    fn split_relays_drain_whole_within_the_bound_and_all_of_them_move() {
        // Two relays split into five parts each (interleaved by name, as hashed names are),
        // and plain ones, with at most two moves at once.
        let mut objs: Vec<Assigned> = (0..5)
            .flat_map(|p| {
                ["wss://big-a.example", "wss://big-b.example"]
                    .into_iter()
                    .map(move |url| Assigned {
                        name: format!("{url}-part-{p}"),
                        url: url.to_string(),
                        worker: None,
                        draining: false,
                        released: false,
                    })
            })
            .chain(objects(200))
            .collect();
        let one = live(&["w0"]);
        let ring1 = Ring::new(one.iter().cloned(), DEFAULT_VNODES);
        let steps = plan(&objs, &one, &ring1, 2).steps;
        apply(&mut objs, &steps, false);
        let four = live(&["w0", "w1", "w2", "w3"]);
        let ring4 = Ring::new(four.iter().cloned(), DEFAULT_VNODES);
        assert!(
            ["wss://big-a.example", "wss://big-b.example"]
                .iter()
                .all(|u| ring4.owner(u) != Some("w0")),
            "both split relays move (pick other URLs if the ring changes)"
        );
        let mut rounds = 0;
        loop {
            let p = plan(&objs, &four, &ring4, 2);
            assert!(p.draining <= 2, "{} relays draining at once", p.draining);
            if p.steps.is_empty() {
                break;
            }
            apply(&mut objs, &p.steps, false);
            worker_acks_whole_relays(&mut objs);
            rounds += 1;
            assert!(rounds < 1000, "no progress: the moves are stuck");
        }
        assert!(
            objs.iter()
                .all(|o| o.worker.as_deref() == ring4.owner(&o.url)),
            "every relay, split or not, reached its owner"
        );
    }
}
