//! A compact, exact record of which root events a session had confirmed, small enough for a
//! RelaySync status: roots are spread over [`BUCKETS`] buckets by their id, and each bucket
//! keeps the XOR of 64 bits of its roots' ids. After a restart the roots learned from the
//! local relay are bucketed the same way; a bucket whose XOR matches holds exactly the roots
//! confirmed before (a different set collides with probability 2⁻⁶⁴), and every root of a
//! bucket that does not match is fetched in full again.
//!
//! Why not the ids themselves: a relay may carry tens of thousands of roots, far over the
//! object-size budget. Why not a Bloom filter: a false positive there would be a root
//! wrongly taken as confirmed, i.e. a silent loss.

use std::collections::BTreeSet;

use nostr::EventId;

pub const BUCKETS: usize = 64;

/// Per-bucket XOR of the roots in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootDigest([u64; BUCKETS]);

/// Length of [`RootDigest::to_hex`].
pub const HEX_LEN: usize = BUCKETS * 16;

fn bucket(id: &EventId) -> usize {
    // Event ids are SHA-256 outputs: any byte is uniformly spread.
    id.as_bytes()[31] as usize % BUCKETS
}

fn value(id: &EventId) -> u64 {
    let b = id.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl RootDigest {
    pub fn of<'a>(roots: impl IntoIterator<Item = &'a EventId>) -> RootDigest {
        let mut d = [0u64; BUCKETS];
        for id in roots {
            d[bucket(id)] ^= value(id);
        }
        RootDigest(d)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|v| format!("{v:016x}")).collect()
    }

    /// `None` for anything that is not exactly what [`to_hex`](Self::to_hex) writes: a
    /// digest that cannot be read confirms nothing.
    pub fn from_hex(s: &str) -> Option<RootDigest> {
        if s.len() != HEX_LEN || !s.is_ascii() {
            return None;
        }
        let mut d = [0u64; BUCKETS];
        for (i, v) in d.iter_mut().enumerate() {
            *v = u64::from_str_radix(&s[i * 16..(i + 1) * 16], 16).ok()?;
        }
        Some(RootDigest(d))
    }

    /// The roots of `roots` that every digest in `confirmed` vouches for: those in buckets
    /// whose XOR over `roots` equals that bucket's value in each digest. With no digest,
    /// none.
    pub fn confirmed_among(
        roots: &BTreeSet<EventId>,
        confirmed: &[RootDigest],
    ) -> BTreeSet<EventId> {
        if confirmed.is_empty() {
            return BTreeSet::new();
        }
        let here = RootDigest::of(roots);
        roots
            .iter()
            .filter(|id| {
                let b = bucket(id);
                confirmed.iter().all(|d| d.0[b] == here.0[b])
            })
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> EventId {
        use sha2::Digest;
        EventId::from_byte_array(sha2::Sha256::digest(n.to_le_bytes()).into())
    }

    fn ids(range: std::ops::Range<u32>) -> BTreeSet<EventId> {
        range.map(id).collect()
    }

    #[test]
    fn the_same_set_is_confirmed_whole() {
        let roots = ids(0..500);
        let d = RootDigest::of(&roots);
        assert_eq!(RootDigest::confirmed_among(&roots, &[d]), roots);
    }

    #[test]
    fn roots_added_since_are_not_confirmed_and_nor_are_their_bucket_mates() {
        let before = ids(0..500);
        let d = RootDigest::of(&before);
        let mut now = before.clone();
        let new = id(10_000);
        now.insert(new);
        let confirmed = RootDigest::confirmed_among(&now, &[d]);
        assert!(!confirmed.contains(&new));
        // Only the new root's bucket is given up: about 1/64 of the rest.
        let lost = before.len() - confirmed.len();
        assert!(lost > 0 && lost < 40, "{lost} roots re-fetched");
        for r in &before {
            if bucket(r) != bucket(&new) {
                assert!(confirmed.contains(r));
            }
        }
    }

    #[test]
    fn every_part_must_vouch() {
        let roots = ids(0..100);
        let old = RootDigest::of(&ids(0..90));
        let new = RootDigest::of(&roots);
        let confirmed = RootDigest::confirmed_among(&roots, &[new, old]);
        assert!(confirmed.len() < roots.len());
        assert!(ids(90..100).iter().all(|r| !confirmed.contains(r)));
    }

    #[test]
    fn no_digest_confirms_nothing() {
        assert!(RootDigest::confirmed_among(&ids(0..10), &[]).is_empty());
        // An empty set confirmed is a digest of zeros: a root seen now is not vouched for.
        let empty = RootDigest::of(&BTreeSet::new());
        assert!(RootDigest::confirmed_among(&ids(0..10), &[empty]).is_empty());
    }

    #[test]
    fn hex_round_trips_and_rejects_anything_else() {
        let d = RootDigest::of(&ids(0..50));
        let hex = d.to_hex();
        assert_eq!(hex.len(), HEX_LEN);
        assert_eq!(RootDigest::from_hex(&hex), Some(d));
        assert_eq!(RootDigest::from_hex(&hex[1..]), None);
        assert_eq!(RootDigest::from_hex(&format!("{}g", &hex[1..])), None);
        assert_eq!(RootDigest::from_hex(&"é".repeat(HEX_LEN / 2)), None);
        assert_eq!(RootDigest::from_hex(""), None);
    }
}
