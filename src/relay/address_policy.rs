//! Which relay hosts we may connect to. Relay URLs come from announcements — untrusted
//! input — so without this check anyone could make the syncer open connections into the
//! cluster or the host's private network. Checked when a relay is discovered and again at
//! connect time, on the very addresses connected to (`relay::resolve`).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

use crate::nostr::RelayUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Blocked {
    #[error("loopback address")]
    Loopback,
    #[error("private network address")]
    Private,
    #[error("link-local address")]
    LinkLocal,
    #[error("unique local IPv6 address")]
    UniqueLocal,
    #[error("carrier-grade NAT address")]
    SharedAddressSpace,
    #[error("unspecified, broadcast or multicast address")]
    NotUnicast,
    #[error("reserved or special-purpose address (documentation, benchmarking, future use)")]
    Reserved,
    #[error("address in a configured cluster range")]
    ClusterRange,
    #[error("local or cluster-internal host name")]
    LocalName,
}

impl Blocked {
    pub fn label(self) -> &'static str {
        match self {
            Blocked::Loopback => "loopback",
            Blocked::Private => "private",
            Blocked::LinkLocal => "link_local",
            Blocked::UniqueLocal => "unique_local",
            Blocked::SharedAddressSpace => "shared_address_space",
            Blocked::NotUnicast => "not_unicast",
            Blocked::Reserved => "reserved",
            Blocked::ClusterRange => "cluster_range",
            Blocked::LocalName => "local_name",
        }
    }
}

#[derive(Debug, Error)]
pub enum SsrfError {
    #[error("relay host {host} refused: {reason} (allow-list it to sync from it)")]
    Blocked { host: String, reason: Blocked },
    #[error(
        "relay host {host} resolves to {ip}, refused: {reason} (allow-list it to sync from it)"
    )]
    Resolved {
        host: String,
        ip: IpAddr,
        reason: Blocked,
    },
    #[error("resolving relay host {host}: {error}")]
    Dns { host: String, error: String },
}

/// What may be reached: everything public, plus what the operator allow-lists.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Host names (lower-case) or IP literals always allowed.
    pub allow_hosts: BTreeSet<String>,
    /// Networks always allowed (e.g. a test network on loopback).
    pub allow_nets: Vec<IpNet>,
    /// Extra networks refused, e.g. the cluster's pod and service ranges.
    pub deny_nets: Vec<IpNet>,
}

impl AddressPolicy {
    /// A policy that allows everything (tests and the offline demo on loopback).
    pub fn allow_all() -> Self {
        AddressPolicy {
            allow_nets: vec![
                "0.0.0.0/0".parse().expect("static net"),
                "::/0".parse().expect("static net"),
            ],
            allow_hosts: BTreeSet::from(["localhost".to_string()]),
            deny_nets: Vec::new(),
        }
    }

    pub(crate) fn host_allowed(&self, host: &str) -> bool {
        self.allow_hosts.contains(&host.to_ascii_lowercase())
    }

    fn ip_allowed(&self, ip: IpAddr) -> bool {
        self.allow_nets.iter().any(|n| n.contains(&ip))
    }

    /// Check an IP address.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Blocked> {
        if self.ip_allowed(ip) {
            return Ok(());
        }
        if self.deny_nets.iter().any(|n| n.contains(&ip)) {
            return Err(Blocked::ClusterRange);
        }
        classify(ip)
    }

    /// Check a URL's host without DNS: IP literals and special names.
    pub fn check_host(&self, url: &RelayUrl) -> Result<(), SsrfError> {
        let host = url.host();
        if self.host_allowed(host) {
            return Ok(());
        }
        let blocked = |reason| SsrfError::Blocked {
            host: host.to_string(),
            reason,
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_ip(ip).map_err(blocked);
        }
        if is_local_name(host) {
            return Err(blocked(Blocked::LocalName));
        }
        Ok(())
    }
}

/// Names that resolve inside the host or cluster rather than on the internet: `localhost`,
/// mDNS and internal suffixes, single-label names (which a cluster resolver completes with its
/// search domains, e.g. `redis` → `redis.default.svc.cluster.local`), and names whose last
/// label is a Kubernetes namespace or an internal pseudo-TLD rather than a public TLD (`redis.default`
/// → `redis.default.svc.cluster.local`). Other names are resolved as absolute names (see
/// [`absolute`]), so no search domain is ever appended to them.
fn is_local_name(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let Some((_, last)) = h.rsplit_once('.') else {
        return true;
    };
    const SUFFIXES: [&str; 7] = [
        ".localhost",
        ".local",
        ".internal",
        ".svc",
        ".cluster.local",
        ".home.arpa",
        ".localdomain",
    ];
    // Not public TLDs, but a namespace or site name a resolver's search list completes.
    const INTERNAL_LAST_LABELS: [&str; 12] = [
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "cluster",
        "lan",
        "home",
        "corp",
        "intranet",
        "private",
        "localdomain",
        "test",
    ];
    SUFFIXES.iter().any(|s| h.ends_with(s))
        || INTERNAL_LAST_LABELS.contains(&last)
        // A TLD is letters (or punycode): a numeric or empty last label is no public name.
        || last.is_empty()
        || last.bytes().all(|b| b.is_ascii_digit())
}

/// `host` as an absolute DNS name (a trailing dot), so the resolver does not try it with
/// the search domains first: in a pod (`ndots: 5`) `nos.lol` would otherwise be looked up
/// as `nos.lol.<namespace>.svc.cluster.local` before the public name.
pub fn absolute(host: &str) -> String {
    format!("{}.", host.trim_end_matches('.'))
}

fn classify_v4(v4: std::net::Ipv4Addr) -> Result<(), Blocked> {
    let o = v4.octets();
    if v4.is_loopback() {
        Err(Blocked::Loopback)
    } else if v4.is_private() {
        Err(Blocked::Private)
    } else if v4.is_link_local() {
        Err(Blocked::LinkLocal)
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Err(Blocked::SharedAddressSpace)
    } else if v4.is_unspecified() || v4.is_multicast() || o[0] == 0 {
        Err(Blocked::NotUnicast)
    } else if o[0] >= 240 // 240.0.0.0/4, future use, and the broadcast address
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24, IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || v4.is_documentation()
    {
        Err(Blocked::Reserved)
    } else {
        Ok(())
    }
}

fn classify(ip: IpAddr) -> Result<(), Blocked> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let low32 = std::net::Ipv4Addr::new(
                (seg[6] >> 8) as u8,
                seg[6] as u8,
                (seg[7] >> 8) as u8,
                seg[7] as u8,
            );
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            if v6.is_loopback() {
                return Err(Blocked::Loopback);
            }
            if v6.is_unspecified() || v6.is_multicast() {
                return Err(Blocked::NotUnicast);
            }
            // Addresses that carry an IPv4 address reach it: judge that address.
            // IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks) and
            // NAT64 64:ff9b::/96 (with DNS64 in an IPv6-only cluster it reaches 10/8).
            if seg[..6] == [0; 6] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return classify_v4(low32);
            }
            // 6to4 2002::/16 carries it in bits 16–47.
            if seg[0] == 0x2002 {
                let v4 = std::net::Ipv4Addr::new(
                    (seg[1] >> 8) as u8,
                    seg[1] as u8,
                    (seg[2] >> 8) as u8,
                    seg[2] as u8,
                );
                return classify_v4(v4);
            }
            if (seg[0] & 0xffc0) == 0xfe80 {
                Err(Blocked::LinkLocal)
            } else if (seg[0] & 0xfe00) == 0xfc00 {
                Err(Blocked::UniqueLocal)
            } else if (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1) // 64:ff9b:1::/48 local NAT64
                || (seg[0] == 0x2001 && seg[1] == 0) // Teredo 2001::/32
                || (seg[0] == 0x2001 && seg[1] == 0xdb8) // documentation
                || (seg[0] == 0x100 && seg[1..4] == [0, 0, 0]) // discard-only 100::/64
                || (seg[0] == 0x3fff && seg[1] < 0x1000)
            // documentation 3fff::/20
            {
                Err(Blocked::Reserved)
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &AddressPolicy, url: &str) -> Result<(), Blocked> {
        match policy.check_host(&RelayUrl::parse(url).unwrap()) {
            Ok(()) => Ok(()),
            Err(SsrfError::Blocked { reason, .. }) => Err(reason),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn refuses_internal_targets() {
        let p = AddressPolicy::default();
        let cases: &[(&str, Blocked)] = &[
            ("ws://127.0.0.1:7000", Blocked::Loopback),
            ("ws://127.1.2.3", Blocked::Loopback),
            ("ws://2130706433", Blocked::Loopback), // decimal form
            ("ws://0x7f000001", Blocked::Loopback), // hex form
            ("ws://0177.0.0.1", Blocked::Loopback), // octal form
            ("ws://10.0.0.5", Blocked::Private),
            ("ws://172.16.3.4", Blocked::Private),
            ("ws://172.31.255.255", Blocked::Private),
            ("ws://192.168.1.1", Blocked::Private),
            ("ws://169.254.169.254", Blocked::LinkLocal), // cloud metadata
            ("ws://100.64.0.1", Blocked::SharedAddressSpace),
            ("ws://0.0.0.0", Blocked::NotUnicast),
            ("ws://224.0.0.1", Blocked::NotUnicast),
            ("ws://[::1]", Blocked::Loopback),
            ("ws://[::]", Blocked::NotUnicast),
            ("ws://[fe80::1]", Blocked::LinkLocal),
            ("ws://[fd12:3456::1]", Blocked::UniqueLocal),
            ("ws://[fc00::1]", Blocked::UniqueLocal),
            ("ws://[::ffff:10.0.0.1]", Blocked::Private), // IPv4-mapped
            ("ws://[::ffff:127.0.0.1]", Blocked::Loopback),
            ("ws://localhost:7000", Blocked::LocalName),
            ("ws://LOCALHOST", Blocked::LocalName),
            ("ws://relay.localhost", Blocked::LocalName),
            ("ws://printer.local", Blocked::LocalName),
            ("ws://api.kube-system.svc", Blocked::LocalName),
            ("ws://grasp.default.svc.cluster.local", Blocked::LocalName),
            ("ws://metadata.google.internal", Blocked::LocalName),
            ("ws://redis", Blocked::LocalName),
            ("ws://redis.default", Blocked::LocalName),
            ("ws://api.kube-system", Blocked::LocalName),
            ("ws://nas.lan", Blocked::LocalName),
            ("ws://relay.test", Blocked::LocalName),
            ("ws://[64:ff9b::a00:1]", Blocked::Private), // NAT64 of 10.0.0.1
            ("ws://[64:ff9b::7f00:1]", Blocked::Loopback),
            ("ws://[64:ff9b:1::1]", Blocked::Reserved), // local-use NAT64
            ("ws://[::7f00:1]", Blocked::Loopback),     // IPv4-compatible ::127.0.0.1
            ("ws://[::a9fe:a9fe]", Blocked::LinkLocal), // ::169.254.169.254
            ("ws://[2002:a00:1::1]", Blocked::Private), // 6to4 of 10.0.0.1
            ("ws://[2001:0:1::1]", Blocked::Reserved),  // Teredo
            ("ws://[2001:db8::1]", Blocked::Reserved),
            ("ws://[100::1]", Blocked::Reserved),
            ("ws://240.0.0.1", Blocked::Reserved),
            ("ws://255.255.255.255", Blocked::Reserved),
            ("ws://198.18.0.1", Blocked::Reserved),
            ("ws://198.19.255.1", Blocked::Reserved),
            ("ws://192.0.0.8", Blocked::Reserved),
            ("ws://192.0.2.1", Blocked::Reserved),
            ("ws://203.0.113.7", Blocked::Reserved),
        ];
        for (url, want) in cases {
            assert_eq!(check(&p, url), Err(*want), "{url}");
        }
    }

    #[test]
    fn allows_public_targets() {
        let p = AddressPolicy::default();
        for url in [
            "wss://relay.damus.io",
            "wss://nos.lol",
            "ws://8.8.8.8:7777",
            "ws://172.32.0.1",
            "ws://100.128.0.1",
            "wss://[2001:4860:4860::8888]",
            "wss://[64:ff9b::808:808]", // NAT64 of 8.8.8.8
            "wss://[2002:808:808::1]",  // 6to4 of 8.8.8.8
            "wss://xn--bcher-kva.example",
            "ws://198.20.0.1",
            "ws://192.0.1.1",
            "ws://223.255.255.1",
            "wss://nos.lol",
            "wss://relay.nostr.band",
            "wss://xn--80ak6aa92e.xn--p1ai",
        ] {
            assert_eq!(check(&p, url), Ok(()), "{url}");
        }
    }

    #[test]
    fn allow_list_and_cluster_ranges() {
        let p = AddressPolicy {
            allow_hosts: BTreeSet::from(["relay.internal".to_string(), "localhost".to_string()]),
            allow_nets: vec!["127.0.0.0/8".parse().unwrap()],
            deny_nets: vec!["34.118.224.0/20".parse().unwrap()],
        };
        assert_eq!(check(&p, "ws://relay.internal"), Ok(()));
        assert_eq!(check(&p, "ws://localhost:7000"), Ok(()));
        assert_eq!(check(&p, "ws://127.0.0.1:7000"), Ok(()));
        assert_eq!(check(&p, "ws://10.0.0.1"), Err(Blocked::Private));
        assert_eq!(check(&p, "ws://34.118.230.1"), Err(Blocked::ClusterRange));
        assert_eq!(check(&p, "ws://34.118.240.1"), Ok(()));
    }
}
