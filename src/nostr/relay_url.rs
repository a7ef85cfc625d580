//! Relay URL normalisation.
//!
//! A relay is identified by its normalised URL everywhere: in RelaySync objects, in the
//! hash ring and in metrics. Two spellings of the same relay must normalise to the same
//! string, or the same relay gets two objects and two connections.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use url::Url;

/// Longest normalised relay URL we accept; also enforced by the CRD schema.
pub const MAX_RELAY_URL_LEN: usize = 512;

/// Why a string is not a usable relay URL.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RelayUrlError {
    #[error("relay URL is empty")]
    Empty,
    #[error("relay URL {input:?} is not a valid URL: {reason}")]
    Parse {
        input: String,
        reason: url::ParseError,
    },
    #[error("relay URL {input:?} has scheme {scheme:?}; only ws:// and wss:// are relays")]
    Scheme { input: String, scheme: String },
    #[error("relay URL {input:?} has no host")]
    NoHost { input: String },
    #[error("relay URL {input:?} carries user credentials (user:password@); they are not allowed")]
    UserInfo { input: String },
    #[error("relay URL {input:?} has a fragment (#…); relay URLs cannot have one")]
    Fragment { input: String },
    #[error(
        "relay URL {input:?} has a query string (?…); relay URLs with queries are not supported"
    )]
    Query { input: String },
    #[error("relay URL is {len} bytes long after normalisation; the limit is {MAX_RELAY_URL_LEN}")]
    TooLong { len: usize },
    #[error(
        "relay URL {input:?} has no stable normal form (its host reads differently once \
         normalised, e.g. a name ending in a number and empty labels)"
    )]
    Unstable { input: String },
}

/// A relay URL in canonical form: `ws[s]://host[:port][/path]`, host lower-case and in
/// punycode, default port dropped, no trailing slash, no credentials, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayUrl(String);

impl RelayUrl {
    /// Normalise `input`, rejecting anything that is not a plain websocket relay URL. The
    /// normal form is its own normal form; an input whose form would change again is refused.
    pub fn parse(input: &str) -> Result<Self, RelayUrlError> {
        let once = normalise(input)?;
        match normalise(&once) {
            Ok(twice) if twice == once => Ok(RelayUrl(once)),
            _ => Err(RelayUrlError::Unstable {
                input: input.trim().to_string(),
            }),
        }
    }
}

/// One normalisation pass (see [`RelayUrl::parse`]).
fn normalise(input: &str) -> Result<String, RelayUrlError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(RelayUrlError::Empty);
    }
    let owned = || trimmed.to_string();
    // ws and wss are "special" schemes in the WHATWG URL standard, so the parser
    // already lower-cases the host, applies IDNA (punycode), canonicalises IPv4/IPv6
    // literals (including decimal/hex IPv4 forms) and drops the default port.
    let url = Url::parse(trimmed).map_err(|reason| RelayUrlError::Parse {
        input: owned(),
        reason,
    })?;
    match url.scheme() {
        "ws" | "wss" => {}
        other => {
            return Err(RelayUrlError::Scheme {
                input: owned(),
                scheme: other.to_string(),
            });
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(RelayUrlError::UserInfo { input: owned() });
    }
    if url.fragment().is_some() {
        return Err(RelayUrlError::Fragment { input: owned() });
    }
    if url.query().is_some() {
        return Err(RelayUrlError::Query { input: owned() });
    }
    let host = match url.host_str() {
        Some(h) if !h.is_empty() => h,
        _ => return Err(RelayUrlError::NoHost { input: owned() }),
    };
    // "relay.example." and "relay.example" are the same host (and so is "relay.example..",
    // which must not normalise to a name that normalises again).
    let host = host.trim_end_matches('.');
    if host.is_empty() {
        return Err(RelayUrlError::NoHost { input: owned() });
    }

    let mut out = String::with_capacity(trimmed.len());
    out.push_str(url.scheme());
    out.push_str("://");
    out.push_str(host);
    if let Some(port) = url.port() {
        out.push(':');
        out.push_str(&port.to_string());
    }
    out.push_str(url.path().trim_end_matches('/'));
    if out.len() > MAX_RELAY_URL_LEN {
        return Err(RelayUrlError::TooLong { len: out.len() });
    }
    Ok(out)
}

impl RelayUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part: a DNS name in punycode, an IPv4 address, or a bracketed IPv6 literal.
    pub fn host(&self) -> &str {
        let rest = self.authority_and_path();
        let end = if rest.starts_with('[') {
            rest.find(']').map(|i| i + 1).unwrap_or(rest.len())
        } else {
            rest.find([':', '/']).unwrap_or(rest.len())
        };
        &rest[..end]
    }

    /// Everything after `scheme://`.
    pub fn authority_and_path(&self) -> &str {
        self.0.split_once("://").map(|(_, r)| r).unwrap_or(&self.0)
    }

    pub fn is_secure(&self) -> bool {
        self.0.starts_with("wss://")
    }

    /// The port connected to: the explicit one, else 443 for `wss` and 80 for `ws`.
    pub fn port(&self) -> u16 {
        let rest = &self.authority_and_path()[self.host().len()..];
        rest.strip_prefix(':')
            .map(|r| &r[..r.find('/').unwrap_or(r.len())])
            .and_then(|p| p.parse().ok())
            .unwrap_or(if self.is_secure() { 443 } else { 80 })
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RelayUrl {
    type Err = RelayUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RelayUrl::parse(s)
    }
}

impl AsRef<str> for RelayUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_explicit_and_default() {
        let port = |u: &str| RelayUrl::parse(u).unwrap().port();
        assert_eq!(port("wss://relay.example"), 443);
        assert_eq!(port("ws://relay.example/path"), 80);
        assert_eq!(port("wss://relay.example:7777/nostr"), 7777);
        assert_eq!(port("ws://[::1]:7000"), 7000);
        assert_eq!(port("wss://[2001:db8::1]/x"), 443);
        assert_eq!(port("ws://127.0.0.1:80"), 80);
    }

    #[test]
    fn normalises_equivalent_spellings() {
        let cases: &[(&str, &str)] = &[
            ("wss://relay.damus.io", "wss://relay.damus.io"),
            ("wss://relay.damus.io/", "wss://relay.damus.io"),
            ("  wss://relay.damus.io/  ", "wss://relay.damus.io"),
            ("WSS://Relay.Damus.IO/", "wss://relay.damus.io"),
            ("wss://relay.damus.io:443", "wss://relay.damus.io"),
            ("wss://relay.damus.io:443/", "wss://relay.damus.io"),
            ("ws://relay.example:80", "ws://relay.example"),
            ("ws://relay.example:443", "ws://relay.example:443"),
            ("wss://relay.example:80", "wss://relay.example:80"),
            ("wss://relay.example:7777/", "wss://relay.example:7777"),
            ("wss://relay.example.", "wss://relay.example"),
            ("wss://relay.example..", "wss://relay.example"),
            ("wss://relay.example/nostr/", "wss://relay.example/nostr"),
            ("wss://relay.example/nostr//", "wss://relay.example/nostr"),
            (
                "wss://relay.example/Case/Path",
                "wss://relay.example/Case/Path",
            ),
            ("wss://relay.example/a%20b", "wss://relay.example/a%20b"),
            ("wss://relay.example/a b", "wss://relay.example/a%20b"),
            ("wss://[::1]:7000/", "wss://[::1]:7000"),
            ("wss://[2001:DB8:0:0::1]", "wss://[2001:db8::1]"),
            ("wss://[2001:db8::1]:443", "wss://[2001:db8::1]"),
            ("ws://127.0.0.1:7000", "ws://127.0.0.1:7000"),
            ("ws://2130706433:7000", "ws://127.0.0.1:7000"),
            ("ws://0x7f.1:7000", "ws://127.0.0.1:7000"),
            ("wss://Bücher.example/", "wss://xn--bcher-kva.example"),
            ("wss://ÉCOLE.example", "wss://xn--cole-9oa.example"),
            ("wss://xn--bcher-kva.example", "wss://xn--bcher-kva.example"),
        ];
        for (input, want) in cases {
            let got = RelayUrl::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(got.as_str(), *want, "input {input:?}");
            // Normalisation is idempotent.
            assert_eq!(RelayUrl::parse(got.as_str()).as_ref(), Ok(&got), "{want:?}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_relay_url() {
        type Check = fn(&RelayUrlError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, RelayUrlError::Empty)),
            ("   ", |e| matches!(e, RelayUrlError::Empty)),
            // A domain while it ends in empty labels, an invalid IPv4 address without them.
            ("ws://a.0..", |e| {
                matches!(e, RelayUrlError::Unstable { .. })
            }),
            ("relay.damus.io", |e| {
                matches!(e, RelayUrlError::Parse { .. })
            }),
            (
                "https://relay.damus.io",
                |e| matches!(e, RelayUrlError::Scheme { scheme, .. } if scheme == "https"),
            ),
            ("http://relay.damus.io", |e| {
                matches!(e, RelayUrlError::Scheme { .. })
            }),
            ("ftp://relay.damus.io", |e| {
                matches!(e, RelayUrlError::Scheme { .. })
            }),
            ("javascript:alert(1)", |e| {
                matches!(e, RelayUrlError::Scheme { .. })
            }),
            ("wss://user@relay.example", |e| {
                matches!(e, RelayUrlError::UserInfo { .. })
            }),
            ("wss://user:pw@relay.example", |e| {
                matches!(e, RelayUrlError::UserInfo { .. })
            }),
            ("wss://:pw@relay.example", |e| {
                matches!(e, RelayUrlError::UserInfo { .. })
            }),
            ("wss://relay.example/#frag", |e| {
                matches!(e, RelayUrlError::Fragment { .. })
            }),
            ("wss://relay.example#", |e| {
                matches!(e, RelayUrlError::Fragment { .. })
            }),
            ("wss://relay.example/?token=x", |e| {
                matches!(e, RelayUrlError::Query { .. })
            }),
            ("wss://", |e| matches!(e, RelayUrlError::Parse { .. })),
            ("wss://:443", |e| matches!(e, RelayUrlError::Parse { .. })),
            ("wss://.", |e| matches!(e, RelayUrlError::NoHost { .. })),
            ("wss://relay.example:99999", |e| {
                matches!(e, RelayUrlError::Parse { .. })
            }),
            ("wss://[::1", |e| matches!(e, RelayUrlError::Parse { .. })),
            ("wss://exa mple.com", |e| {
                matches!(e, RelayUrlError::Parse { .. })
            }),
        ];
        for (input, check) in cases {
            match RelayUrl::parse(input) {
                Ok(u) => panic!("{input:?} was accepted as {u}"),
                Err(e) => assert!(check(&e), "{input:?} gave the wrong error: {e:?}"),
            }
        }
        let long = format!("wss://relay.example/{}", "a".repeat(600));
        assert_eq!(
            RelayUrl::parse(&long),
            Err(RelayUrlError::TooLong { len: long.len() })
        );
    }

    #[test]
    fn errors_name_the_input_and_the_reason() {
        let e = RelayUrl::parse("https://relay.example")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("https://relay.example") && e.contains("ws://"),
            "{e}"
        );
        let e = RelayUrl::parse("wss://a:b@relay.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials"), "{e}");
    }

    #[test]
    fn host_extraction() {
        let cases: &[(&str, &str)] = &[
            ("wss://relay.example", "relay.example"),
            ("wss://relay.example:7777/x", "relay.example"),
            ("wss://relay.example/x:y", "relay.example"),
            ("ws://[::1]:7000/p", "[::1]"),
            ("ws://10.0.0.1", "10.0.0.1"),
        ];
        for (input, host) in cases {
            assert_eq!(RelayUrl::parse(input).unwrap().host(), *host, "{input}");
        }
    }

    proptest::proptest! {
        /// Normalising is idempotent: a normalised URL is its own normal form, so every
        /// spelling of a relay lands on one object, one ring position and one metric series.
        #[test]
        fn prop_normalising_twice_changes_nothing(
            input in "(ws|wss|WS|Wss)://([a-zA-Z0-9-]{1,8}|xn--[a-z0-9]{1,6}|b\u{fc}cher|[0-9]{1,3})(\\.([a-zA-Z0-9-]{1,8}|[0-9]{1,3})){0,3}\\.{0,3}(:[0-9]{1,5})?(/[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,6}){0,3}/{0,2}"
        ) {
            if let Ok(once) = RelayUrl::parse(&input) {
                let twice = RelayUrl::parse(once.as_str());
                proptest::prop_assert_eq!(twice.as_ref(), Ok(&once), "{}", input);
            }
        }

        /// Any text at all: an error or a URL that is its own normal form, never a panic;
        /// the host and port it reports are the ones in its text.
        #[test]
        fn prop_any_text_parses_or_fails_cleanly(tail in "\\PC{0,80}", secure in proptest::bool::ANY) {
            let input = format!("{}://{tail}", if secure { "wss" } else { "ws" });
            if let Ok(url) = RelayUrl::parse(&input) {
                let again = RelayUrl::parse(url.as_str());
                proptest::prop_assert_eq!(again.as_ref(), Ok(&url));
                proptest::prop_assert!(!url.host().is_empty());
                proptest::prop_assert!(url.as_str().contains(url.host()));
                let _ = url.port();
            }
        }
    }
}
