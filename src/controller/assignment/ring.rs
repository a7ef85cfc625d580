//! Consistent-hash ring over live workers, keyed on the normalised relay URL: adding a worker
//! moves about 1/(N+1) of the relays (all to the new worker); losing one spreads only its
//! relays over the rest. Hashes are SHA-256 based, so every controller replica and version
//! computes the same ring.

use sha2::{Digest, Sha256};

/// Virtual nodes per worker: enough for an even spread at tens of workers.
pub const DEFAULT_VNODES: usize = 128;

#[derive(Debug, Clone)]
pub struct Ring {
    /// (point, worker index), sorted by point.
    points: Vec<(u64, usize)>,
    workers: Vec<String>,
}

fn hash(bytes: &[u8]) -> u64 {
    let d = Sha256::digest(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

impl Ring {
    pub fn new<I, S>(workers: I, vnodes: usize) -> Ring
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut workers: Vec<String> = workers.into_iter().map(Into::into).collect();
        workers.sort();
        workers.dedup();
        let mut points = Vec::with_capacity(workers.len() * vnodes.max(1));
        for (i, w) in workers.iter().enumerate() {
            for v in 0..vnodes.max(1) {
                points.push((hash(format!("{w}#{v}").as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points, workers }
    }

    pub fn workers(&self) -> &[String] {
        &self.workers
    }

    /// The worker that should hold `key` (a normalised relay URL); `None` with no workers.
    pub fn owner(&self, key: &str) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key.as_bytes());
        let i = self.points.partition_point(|(p, _)| *p < h);
        let (_, w) = self.points[i % self.points.len()];
        Some(&self.workers[w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("wss://relay-{i}.example")).collect()
    }

    fn assign(ring: &Ring, keys: &[String]) -> HashMap<String, String> {
        keys.iter()
            .map(|k| (k.clone(), ring.owner(k).unwrap().to_string()))
            .collect()
    }

    #[test]
    fn empty_ring_has_no_owner_and_duplicates_collapse() {
        assert_eq!(Ring::new(Vec::<String>::new(), 16).owner("wss://a"), None);
        let r = Ring::new(["w1", "w1", "w0"], 16);
        assert_eq!(r.workers(), ["w0", "w1"]);
    }

    #[test]
    fn stable_across_constructions_and_orders() {
        let a = Ring::new(["w0", "w1", "w2"], DEFAULT_VNODES);
        let b = Ring::new(["w2", "w0", "w1"], DEFAULT_VNODES);
        let ks = keys(500);
        assert_eq!(assign(&a, &ks), assign(&b, &ks));
    }

    #[test]
    fn spreads_evenly() {
        let ring = Ring::new(["w0", "w1", "w2"], DEFAULT_VNODES);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for k in keys(3000) {
            *counts
                .entry(ring.owner(&k).unwrap().to_string())
                .or_default() += 1;
        }
        for (w, c) in &counts {
            assert!((800..=1200).contains(c), "{w} holds {c} of 3000");
        }
    }

    #[test]
    fn scale_out_moves_about_a_quarter_and_only_to_the_new_worker() {
        let ks = keys(4000);
        let before = assign(&Ring::new(["w0", "w1", "w2"], DEFAULT_VNODES), &ks);
        let after = assign(&Ring::new(["w0", "w1", "w2", "w3"], DEFAULT_VNODES), &ks);
        let moved: Vec<&String> = ks.iter().filter(|k| before[*k] != after[*k]).collect();
        let share = moved.len() as f64 / ks.len() as f64;
        assert!((0.18..=0.32).contains(&share), "moved {share:.3}");
        assert!(moved.iter().all(|k| after[*k] == "w3"));
    }

    #[test]
    fn losing_a_worker_moves_only_its_relays() {
        let ks = keys(3000);
        let before = assign(&Ring::new(["w0", "w1", "w2"], DEFAULT_VNODES), &ks);
        let after = assign(&Ring::new(["w0", "w2"], DEFAULT_VNODES), &ks);
        for k in &ks {
            if before[k] != "w1" {
                assert_eq!(before[k], after[k], "{k} moved without need");
            }
        }
        let from_w1: Vec<&String> = ks.iter().filter(|k| before[*k] == "w1").collect();
        let to_w0 = from_w1.iter().filter(|k| after[**k] == "w0").count();
        let share = to_w0 as f64 / from_w1.len() as f64;
        assert!(
            (0.35..=0.65).contains(&share),
            "{share:.2} of w1's relays went to w0"
        );
    }
}
