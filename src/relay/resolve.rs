//! Resolve a relay's host once per connection attempt, check every answer against the
//! address policy, and hand the checked addresses to whoever connects. Resolving again at
//! connect time would let a name with a zero TTL pass the check with a public answer and then
//! point at `169.254.169.254`, a cluster IP or an internal relay (DNS rebinding), so the
//! websocket and the NIP-11 request go to exactly the addresses returned here.
//!
//! The resolver is injectable: tests rebind a name between look-ups.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::nostr::RelayUrl;
use crate::relay::address_policy::{AddressPolicy, SsrfError, absolute};

/// A name service: every address `host` has now, with `port`.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The operating system's resolver, asked for the absolute name (no search domains).
struct System;

impl Resolve for System {
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((absolute(&host).as_str(), port))
                .await?
                .collect())
        })
    }
}

/// A shared, cloneable resolver; the default is the system's.
#[derive(Clone)]
pub struct Resolver(Arc<dyn Resolve>);

impl Resolver {
    pub fn new(inner: impl Resolve) -> Self {
        Resolver(Arc::new(inner))
    }

    pub fn system() -> Self {
        Resolver::new(System)
    }

    /// The addresses to connect to for `url`: an IP literal as it is, a name as resolved
    /// now. With a policy, the host name and every resolved address must pass it (an
    /// allow-listed host is resolved but not checked). Never empty.
    pub async fn pin(
        &self,
        url: &RelayUrl,
        policy: Option<&AddressPolicy>,
    ) -> Result<Vec<SocketAddr>, SsrfError> {
        if let Some(policy) = policy {
            policy.check_host(url)?;
        }
        let host = url.host();
        let port = url.port();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]); // a literal: checked by check_host
        }
        let dns = |error: String| SsrfError::Dns {
            host: host.to_string(),
            error,
        };
        let mut addrs = self
            .0
            .resolve(bare.to_string(), port)
            .await
            .map_err(|e| dns(e.to_string()))?;
        // A resolver answers with its own port at best; we connect to the URL's.
        for a in &mut addrs {
            a.set_port(port);
        }
        addrs.dedup();
        if addrs.is_empty() {
            return Err(dns("no addresses".to_string()));
        }
        if let Some(policy) = policy.filter(|p| !p.host_allowed(host)) {
            for a in &addrs {
                policy
                    .check_ip(a.ip())
                    .map_err(|reason| SsrfError::Resolved {
                        host: host.to_string(),
                        ip: a.ip(),
                        reason,
                    })?;
            }
        }
        Ok(addrs)
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    /// Answers from a script, one answer per look-up (the last repeats).
    struct Scripted(Mutex<Vec<Vec<IpAddr>>>);

    impl Resolve for Scripted {
        fn resolve(&self, _: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
            let mut script = self.0.lock().unwrap();
            let answer = if script.len() > 1 {
                script.remove(0)
            } else {
                script[0].clone()
            };
            Box::pin(async move {
                Ok(answer
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect())
            })
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn every_answer_is_checked_and_returned_with_the_url_s_port() {
        let r = Resolver::new(Scripted(Mutex::new(vec![
            vec![ip("93.184.216.34"), ip("2606:2800:220:1::1")],
            vec![ip("93.184.216.34"), ip("127.0.0.1")],
            vec![ip("169.254.169.254")],
            vec![],
        ])));
        let p = AddressPolicy::default();
        let url = RelayUrl::parse("wss://relay.example:7777").unwrap();
        let first = r.pin(&url, Some(&p)).await.unwrap();
        assert_eq!(
            first,
            [
                "93.184.216.34:7777".parse::<SocketAddr>().unwrap(),
                "[2606:2800:220:1::1]:7777".parse().unwrap()
            ]
        );
        // One bad answer among good ones refuses the lot.
        assert!(matches!(
            r.pin(&url, Some(&p)).await,
            Err(SsrfError::Resolved { ip, .. }) if ip == self::ip("127.0.0.1")
        ));
        assert!(r.pin(&url, Some(&p)).await.is_err());
        assert!(matches!(
            r.pin(&url, Some(&p)).await,
            Err(SsrfError::Dns { .. })
        ));
    }

    #[tokio::test]
    async fn literals_names_and_the_allow_list() {
        let r = Resolver::new(Scripted(Mutex::new(vec![vec![ip("10.1.2.3")]])));
        let p = AddressPolicy {
            allow_hosts: BTreeSet::from(["relay.corp.example".to_string()]),
            ..AddressPolicy::default()
        };
        let pin = |u: &str| {
            let url = RelayUrl::parse(u).unwrap();
            let (r, p) = (r.clone(), p.clone());
            async move { r.pin(&url, Some(&p)).await }
        };
        // A literal is not resolved: it is checked as it stands.
        assert_eq!(
            pin("ws://[2001:4860::8888]:81").await.unwrap(),
            ["[2001:4860::8888]:81".parse::<SocketAddr>().unwrap()]
        );
        assert!(pin("ws://127.0.0.1:81").await.is_err());
        // Refused by name before any look-up.
        assert!(matches!(
            pin("ws://redis.default").await,
            Err(SsrfError::Blocked { .. })
        ));
        // A private answer for an allow-listed name is the operator's choice.
        assert_eq!(
            pin("wss://relay.corp.example").await.unwrap(),
            ["10.1.2.3:443".parse::<SocketAddr>().unwrap()]
        );
        assert!(pin("wss://other.example").await.is_err());
        // Without a policy nothing is checked, but the answer is still the one used.
        let url = RelayUrl::parse("ws://other.example:9").unwrap();
        assert_eq!(
            r.pin(&url, None).await.unwrap(),
            ["10.1.2.3:9".parse::<SocketAddr>().unwrap()]
        );
    }
}
