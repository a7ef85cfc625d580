//! RelaySync object names derived from relay URLs.
//!
//! Names must be valid DNS-1123 labels (≤ 63 characters of `[a-z0-9-]`, alphanumeric at
//! both ends), readable in `kubectl get`, stable for a URL across restarts and versions, and
//! distinct for distinct URLs even when the readable part is truncated or lossy (`ws://` vs
//! `wss://`, `_` vs `-`, IDN hosts). So: a readable slug plus a hash of the whole URL.

use sha2::{Digest, Sha256};

use crate::nostr::RelayUrl;

pub const MAX_NAME_LEN: usize = 63;
const PREFIX: &str = "relay-";
/// Hex digits of the URL hash: 48 bits keeps accidental collisions negligible even across
/// millions of relays, and the slug in front separates almost all of them anyway.
const HASH_HEX: usize = 12;

/// The object name for `url`, e.g. `relay-relay-damus-io-3f2a91c0b7d1`.
pub fn object_name(url: &RelayUrl) -> String {
    let hash = Sha256::digest(url.as_str().as_bytes());
    let hash_hex: String = hash
        .iter()
        .take(HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect();

    let room = MAX_NAME_LEN - PREFIX.len() - 1 - HASH_HEX;
    let slug = slug(url.authority_and_path(), room);

    let mut name = String::with_capacity(MAX_NAME_LEN);
    name.push_str(PREFIX);
    if !slug.is_empty() {
        name.push_str(&slug);
        name.push('-');
    }
    name.push_str(&hash_hex);
    name
}

/// The name of part `part` of a relay whose repos are split over several objects (part 0 is
/// [`object_name`]); the same readable prefix, a hash of the URL and the part number.
pub fn object_name_part(url: &RelayUrl, part: usize) -> String {
    if part == 0 {
        return object_name(url);
    }
    let hash = Sha256::digest(format!("{url}#{part}").as_bytes());
    let hash_hex: String = hash
        .iter()
        .take(HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    let base = object_name(url);
    format!("{}{hash_hex}", &base[..base.len() - HASH_HEX])
}

/// Lower-case alphanumerics, every other run of characters turned into one '-', trimmed
/// of dashes, at most `max` characters.
fn slug(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(max);
    let mut pending_dash = false;
    for c in s.chars() {
        if out.len() >= max {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            if pending_dash && !out.is_empty() && out.len() + 1 < max {
                out.push('-');
            }
            pending_dash = false;
            out.push(c);
        } else {
            pending_dash = true;
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// True if `name` is a DNS-1123 label.
pub fn is_dns1123_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// True if `name` is a DNS-1123 subdomain (the names of most Kubernetes objects):
/// dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn subdomains_are_dot_separated_labels() {
        assert!(is_dns1123_subdomain("gs-grasp-sync-controller"));
        assert!(is_dns1123_subdomain("a.b-c.d"));
        for bad in ["", ".a", "a.", "a..b", "A", "-a", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    fn name(s: &str) -> String {
        object_name(&RelayUrl::parse(s).unwrap())
    }

    #[test]
    fn readable_and_valid() {
        let cases: &[(&str, &str)] = &[
            ("wss://relay.damus.io", "relay-relay-damus-io-"),
            ("wss://nos.lol", "relay-nos-lol-"),
            ("ws://127.0.0.1:7000", "relay-127-0-0-1-7000-"),
            ("wss://[::1]:7000/x", "relay-1-7000-x-"),
            (
                "wss://relay.example/nostr/v1",
                "relay-relay-example-nostr-v1-",
            ),
            ("wss://xn--bcher-kva.example", "relay-xn-bcher-kva-example-"),
        ];
        for (url, prefix) in cases {
            let n = name(url);
            assert!(n.starts_with(prefix), "{url} → {n}");
            assert_eq!(n.len(), prefix.len() + HASH_HEX, "{url} → {n}");
            assert!(is_dns1123_label(&n), "{url} → {n}");
        }
    }

    #[test]
    fn stable() {
        // Golden value (sha256 of the URL, checked with `sha256sum`): changing the naming scheme would orphan every existing object.
        assert_eq!(
            name("wss://relay.damus.io"),
            "relay-relay-damus-io-549f7241cefd"
        );
        assert_eq!(
            name("WSS://Relay.Damus.io:443/"),
            name("wss://relay.damus.io")
        );
    }

    #[test]
    fn long_urls_are_truncated_to_a_valid_label() {
        let host = format!("{}.example", "a".repeat(200));
        let n = name(&format!("wss://{host}/{}", "p-".repeat(100)));
        assert_eq!(n.len(), MAX_NAME_LEN, "{n}");
        assert!(is_dns1123_label(&n), "{n}");
        // Slug cut on a separator must not leave a dangling dash before the hash.
        let n = name("wss://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.b.example");
        assert!(is_dns1123_label(&n) && !n.contains("--"), "{n}");
    }

    #[test]
    fn lossy_slugs_still_get_distinct_names() {
        let urls = [
            "wss://relay.example",
            "ws://relay.example",
            "wss://relay-example",
            "wss://relay.example/",
            "wss://relay.example/a_b",
            "wss://relay.example/a-b",
            "wss://relay.example:444",
            "wss://relay.example/444",
            "wss://bücher.example",
            "wss://xn--bcher-kva.example.org",
        ];
        let names: HashSet<_> = urls.iter().map(|u| name(u)).collect();
        // "wss://relay.example/" normalises to the same URL as "wss://relay.example".
        assert_eq!(names.len(), urls.len() - 1);
        for n in &names {
            assert!(is_dns1123_label(n), "{n}");
        }
        let long_a = format!("wss://{}.example/a", "x".repeat(80));
        let long_b = format!("wss://{}.example/b", "x".repeat(80));
        assert_ne!(name(&long_a), name(&long_b));
    }

    #[test]
    fn split_parts_share_the_prefix_and_differ() {
        let url = RelayUrl::parse("wss://relay.damus.io").unwrap();
        assert_eq!(object_name_part(&url, 0), object_name(&url));
        let names: HashSet<String> = (0..20).map(|i| object_name_part(&url, i)).collect();
        assert_eq!(names.len(), 20);
        for n in &names {
            assert!(
                n.starts_with("relay-relay-damus-io-") && is_dns1123_label(n),
                "{n}"
            );
        }
        let long = RelayUrl::parse(&format!("wss://{}.example", "a".repeat(100))).unwrap();
        assert!(is_dns1123_label(&object_name_part(&long, 7)));
    }

    #[test]
    fn dns1123_checker() {
        for ok in ["a", "a-b", "relay-1", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
    }
}
