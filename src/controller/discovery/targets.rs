//! The relays a repository is synced from, as its announcement names them.
//!
//! Only `relays` tag values count. A `clone` URL names a relay only under NIP-34's GRASP
//! rule — `http(s)://<grasp-path>/<npub>/<id>.git` *together with* a `relays` entry
//! `ws(s)://<grasp-path>` — so a qualifying clone URL never adds a relay that `relays` does
//! not already list, and ordinary git hosts (github.com, codeberg.org, …) never become relay
//! targets. Our own service is excluded, URLs are normalised, and hosts pointing into private
//! or cluster networks are refused unless allow-listed.

use std::collections::BTreeSet;

use crate::nostr::nip34::Announcement;
use crate::nostr::{RelayUrl, RelayUrlError};
use crate::relay::address_policy::{AddressPolicy, SsrfError};

#[derive(Debug, Clone)]
pub struct TargetPolicy {
    /// Our relay's public host (optionally `host:port`): never a sync source.
    pub service_domain: String,
    pub addresses: AddressPolicy,
    /// Relays taken from one announcement (its first ones, in tag order).
    pub max_relays: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetRejection {
    #[error(transparent)]
    Url(#[from] RelayUrlError),
    #[error("our own service")]
    OwnService,
    #[error(transparent)]
    Address(#[from] SsrfError),
    #[error("the announcement already names {max} relays (the most taken from one)")]
    AnnouncementCap { max: usize },
}

impl TargetRejection {
    pub fn label(&self) -> &'static str {
        match self {
            TargetRejection::Url(_) => "invalid_url",
            TargetRejection::OwnService => "own_service",
            TargetRejection::Address(_) => "address_refused",
            TargetRejection::AnnouncementCap { .. } => "announcement_cap",
        }
    }
}

#[derive(Debug, Default)]
pub struct Targets {
    pub relays: BTreeSet<RelayUrl>,
    /// Values that were not usable, and why (for metrics and debug logs).
    pub rejected: Vec<(String, TargetRejection)>,
}

impl TargetPolicy {
    pub fn is_own_service(&self, url: &RelayUrl) -> bool {
        let service = self
            .service_domain
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if service.is_empty() {
            return false;
        }
        let authority = url.authority_and_path();
        let host_port = authority.split('/').next().unwrap_or(authority);
        // "git.example" matches any port on that host; "git.example:8443" only that port.
        host_port == service || (!service.contains(':') && url.host() == service)
    }

    /// Check one relay URL string.
    pub fn check(&self, value: &str) -> Result<RelayUrl, TargetRejection> {
        let url = RelayUrl::parse(value)?;
        if self.is_own_service(&url) {
            return Err(TargetRejection::OwnService);
        }
        self.addresses.check_host(&url)?;
        Ok(url)
    }

    pub fn targets(&self, announcement: &Announcement) -> Targets {
        let mut t = Targets::default();
        for value in &announcement.relays {
            match self.check(value) {
                Ok(url) if t.relays.contains(&url) => {}
                Ok(_) if t.relays.len() >= self.max_relays => t.rejected.push((
                    value.clone(),
                    TargetRejection::AnnouncementCap {
                        max: self.max_relays,
                    },
                )),
                Ok(url) => {
                    t.relays.insert(url);
                }
                Err(e) => t.rejected.push((value.clone(), e)),
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::discovery::caps::DEFAULT_PER_ANNOUNCEMENT;
    use crate::nostr::kinds::REPO_ANNOUNCEMENT;
    use nostr::{EventBuilder, Keys, Tag, TagKind};

    fn announcement(relays: &[&str], clones: &[&str]) -> Announcement {
        let ev = EventBuilder::new(REPO_ANNOUNCEMENT, "")
            .tag(Tag::identifier("repo"))
            .tag(Tag::custom(
                TagKind::custom("relays"),
                relays.iter().map(|s| s.to_string()),
            ))
            .tag(Tag::custom(
                TagKind::custom("clone"),
                clones.iter().map(|s| s.to_string()),
            ))
            .sign_with_keys(&Keys::generate())
            .unwrap();
        Announcement::from_event(&ev).unwrap()
    }

    fn policy() -> TargetPolicy {
        TargetPolicy {
            service_domain: "git.ours.example".into(),
            addresses: AddressPolicy::default(),
            max_relays: DEFAULT_PER_ANNOUNCEMENT,
        }
    }

    #[test]
    fn relays_are_normalised_deduplicated_and_filtered() {
        let a = announcement(
            &[
                "wss://Relay.Damus.io/",
                "wss://relay.damus.io",
                "wss://git.ours.example",
                "wss://GIT.OURS.EXAMPLE:443/",
                "https://not-a-relay.example",
                "ws://10.0.0.7:7777",
                "ws://grasp.default.svc.cluster.local",
                "wss://nos.lol",
            ],
            &[
                "https://github.com/someone/repo.git",
                "https://gitlab.example/x.git",
            ],
        );
        let t = policy().targets(&a);
        let got: Vec<&str> = t.relays.iter().map(RelayUrl::as_str).collect();
        assert_eq!(got, ["wss://nos.lol", "wss://relay.damus.io"]);
        let labels: Vec<&str> = t.rejected.iter().map(|(_, r)| r.label()).collect();
        assert_eq!(
            labels.iter().filter(|l| **l == "own_service").count(),
            2,
            "{labels:?}"
        );
        assert!(labels.contains(&"invalid_url"));
        assert_eq!(
            labels.iter().filter(|l| **l == "address_refused").count(),
            2
        );
    }

    #[test]
    fn clone_hosts_never_become_relays_on_their_own() {
        let a = announcement(
            &[],
            &[
                "https://relay.ngit.dev/npub1abc/repo.git",
                "https://github.com/x/y.git",
            ],
        );
        assert!(policy().targets(&a).relays.is_empty());
    }

    #[test]
    fn only_the_first_relays_of_an_announcement_are_taken() {
        let listed: Vec<String> = (0..40).map(|i| format!("wss://r{i}.example")).collect();
        // Duplicates and refused values do not use up the cap.
        let mut values = vec!["wss://r0.example/".to_string(), "ws://10.0.0.1".to_string()];
        values.extend(listed.iter().cloned());
        let refs: Vec<&str> = values.iter().map(|s| s.as_str()).collect();
        let a = announcement(&refs, &[]);
        let p = TargetPolicy {
            max_relays: 5,
            ..policy()
        };
        let t = p.targets(&a);
        let want: BTreeSet<RelayUrl> = listed[..5]
            .iter()
            .map(|u| RelayUrl::parse(u).unwrap())
            .collect();
        assert_eq!(t.relays, want);
        let capped = t
            .rejected
            .iter()
            .filter(|(_, why)| why.label() == "announcement_cap")
            .count();
        assert_eq!(capped, 35);
    }

    #[test]
    fn own_service_with_and_without_port() {
        let p = TargetPolicy {
            service_domain: "git.ours.example:8443".into(),
            addresses: AddressPolicy::default(),
            max_relays: DEFAULT_PER_ANNOUNCEMENT,
        };
        assert!(p.is_own_service(&RelayUrl::parse("wss://git.ours.example:8443").unwrap()));
        assert!(!p.is_own_service(&RelayUrl::parse("wss://git.ours.example").unwrap()));
        let p = policy();
        assert!(p.is_own_service(&RelayUrl::parse("wss://git.ours.example:8443/x").unwrap()));
        assert!(!p.is_own_service(&RelayUrl::parse("wss://sub.git.ours.example").unwrap()));
    }
}
