//! NIP-11 relay information: what a relay supports and how much it lets us ask for.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use crate::crd::RelayCapabilities;
use crate::nostr::RelayUrl;

/// Largest NIP-11 document we read; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
struct Document {
    #[serde(default)]
    supported_nips: Vec<serde_json::Value>,
    #[serde(default)]
    limitation: Option<Limitation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Limitation {
    max_subscriptions: Option<serde_json::Value>,
    max_filters: Option<serde_json::Value>,
    max_limit: Option<serde_json::Value>,
    max_message_length: Option<serde_json::Value>,
    auth_required: Option<bool>,
}

/// Parse a NIP-11 document leniently: relays publish numbers as strings, floats or nonsense;
/// anything unusable is treated as absent rather than failing the whole document.
pub fn parse(body: &[u8]) -> Result<RelayCapabilities, serde_json::Error> {
    let doc: Document = serde_json::from_slice(body)?;
    let num = |v: &Option<serde_json::Value>| -> Option<u32> {
        match v.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|n| *n > 0)
    };
    let mut nips: Vec<u16> = doc
        .supported_nips
        .iter()
        .filter_map(|v| match v {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
        .collect();
    nips.sort_unstable();
    nips.dedup();
    nips.truncate(256);
    let lim = doc.limitation.unwrap_or_default();
    Ok(RelayCapabilities {
        negentropy: nips.contains(&77),
        supported_nips: nips,
        max_subscriptions: num(&lim.max_subscriptions),
        max_filters: num(&lim.max_filters),
        max_limit: num(&lim.max_limit),
        max_message_length: num(&lim.max_message_length),
        auth_required: lim.auth_required,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum Nip11Error {
    #[error("NIP-11 request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("NIP-11 document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("NIP-11 answer was HTTP {0}")]
    Status(u16),
    #[error("NIP-11 document is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot set up TLS for NIP-11 requests: {0}")]
    Tls(String),
}

/// The TLS settings every NIP-11 request shares. Building them loads and parses the system's
/// root certificates — milliseconds of CPU — and each request needs its own client (its
/// addresses are pinned), so without sharing, a failover that starts hundreds of sessions
/// at once spends its first seconds parsing the same certificates hundreds of times.
/// A failure is not kept: the next request tries again.
fn tls_config() -> Result<rustls::ClientConfig, Nip11Error> {
    static CONFIG: OnceLock<rustls::ClientConfig> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| Nip11Error::Tls(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Nip11Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(CONFIG.get_or_init(|| config).clone())
}

/// Fetch and parse the relay's NIP-11 document from exactly `addrs` (the addresses the policy
/// checked; the name is not resolved again), with no proxy from the environment and no
/// redirects: either could send the request somewhere the policy never saw.
pub async fn fetch(
    url: &RelayUrl,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<RelayCapabilities, Nip11Error> {
    crate::relay::tls::install_default_crypto();
    let http_url = if url.is_secure() {
        format!("https://{}", url.authority_and_path())
    } else {
        format!("http://{}", url.authority_and_path())
    };
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config()?)
        .timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    let host = url.host();
    if !host.starts_with('[') && host.parse::<std::net::IpAddr>().is_err() {
        builder = builder.resolve_to_addrs(host, addrs);
    }
    let client = builder.build()?;
    let mut resp = client
        .get(http_url)
        .header("Accept", "application/nostr+json")
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(Nip11Error::Status(resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(Nip11Error::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(parse(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_world_shapes() {
        let doc = br#"{"name":"x","supported_nips":[1,11,"77",77,-3,"x",70000],
            "limitation":{"max_subscriptions":"20","max_filters":10,"max_limit":500.0,
            "max_message_length":65536,"auth_required":false}}"#;
        let c = parse(doc).unwrap();
        assert_eq!(c.supported_nips, [1, 11, 77]);
        assert!(c.negentropy);
        assert_eq!(c.max_subscriptions, Some(20));
        assert_eq!(c.max_filters, Some(10));
        assert_eq!(c.max_limit, None, "floats are not trusted");
        assert_eq!(c.max_message_length, Some(65536));
        assert_eq!(c.auth_required, Some(false));
    }

    #[test]
    fn empty_and_hostile_documents() {
        assert_eq!(parse(b"{}").unwrap(), RelayCapabilities::default());
        let c = parse(br#"{"supported_nips":"all","limitation":{"max_filters":0}}"#);
        assert!(c.is_err() || c.unwrap().max_filters.is_none());
        assert!(parse(b"<html>").is_err());
    }

    use proptest::prelude::*;

    /// A JSON scalar of any kind.
    fn leaf() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u32>().prop_map(serde_json::Value::from),
            (0u32..100_000).prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            "\\PC{0,12}".prop_map(serde_json::Value::from),
            "[0-9 ]{0,6}".prop_map(serde_json::Value::from),
        ]
    }

    /// Any JSON value, nested a little.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        leaf().prop_recursive(2, 16, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Bytes from the network: parsed or refused, never a panic.
        #[test]
        fn prop_any_bytes_parse_or_fail_cleanly(body in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&body);
        }

        /// Documents of any shape: what is read is sane, whatever the relay wrote.
        #[test]
        fn prop_any_document_yields_sane_capabilities(
            nips in prop::collection::vec(leaf(), 0..300),
            subs in json(), filters in json(), limit in json(), msg in json(), auth in json(),
        ) {
            let doc = serde_json::json!({
                "supported_nips": nips,
                "limitation": {
                    "max_subscriptions": subs, "max_filters": filters, "max_limit": limit,
                    "max_message_length": msg, "auth_required": auth,
                },
            });
            // `auth_required` must be a boolean: anything else refuses the document.
            let Ok(c) = parse(doc.to_string().as_bytes()) else {
                prop_assert!(!doc["limitation"]["auth_required"].is_boolean()
                    && !doc["limitation"]["auth_required"].is_null());
                return Ok(());
            };
            prop_assert!(c.supported_nips.len() <= 256);
            prop_assert!(c.supported_nips.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(c.negentropy, c.supported_nips.contains(&77));
            for n in [c.max_subscriptions, c.max_filters, c.max_limit, c.max_message_length] {
                prop_assert!(n.is_none_or(|n| n > 0));
            }
        }
    }
}
