//! Machine-readable prefixes of `OK` and `CLOSED` messages (NIP-01), and what each means for
//! a retry.

/// Why the local relay accepted or refused an event, or why a relay closed a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Blocked,
    Invalid,
    RateLimited,
    AuthRequired,
    Restricted,
    Pow,
    Mute,
    Unsupported,
    Error,
    /// No recognised prefix.
    Other,
}

impl Outcome {
    /// Classify an `OK` (`ok` = its boolean) or a `CLOSED` (`ok` = false).
    pub fn classify(ok: bool, message: &str) -> Outcome {
        let prefix = message
            .split_once(':')
            .map(|(p, _)| p.trim().to_ascii_lowercase());
        let by_prefix = match prefix.as_deref() {
            Some("duplicate") => Some(Outcome::Duplicate),
            Some("blocked") => Some(Outcome::Blocked),
            Some("invalid") => Some(Outcome::Invalid),
            Some("rate-limited") => Some(Outcome::RateLimited),
            Some("auth-required") => Some(Outcome::AuthRequired),
            Some("restricted") => Some(Outcome::Restricted),
            Some("pow") => Some(Outcome::Pow),
            Some("mute") => Some(Outcome::Mute),
            Some("unsupported") => Some(Outcome::Unsupported),
            Some("error") => Some(Outcome::Error),
            _ => None,
        };
        match (ok, by_prefix) {
            // "duplicate:" comes with ok=true from most relays: already stored, fine.
            (_, Some(Outcome::Duplicate)) => Outcome::Duplicate,
            (true, _) => Outcome::Accepted,
            (false, Some(o)) => o,
            (false, None) => Outcome::Other,
        }
    }

    /// Worth sending again later (after a pause): the refusal was about load, not content.
    pub fn is_transient(self) -> bool {
        matches!(self, Outcome::RateLimited | Outcome::Error)
    }

    /// A refusal on policy grounds (`blocked:`, `invalid:`, `restricted:`, …): asking again
    /// the same way will most likely get the same answer.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Outcome::Blocked
                | Outcome::Invalid
                | Outcome::Restricted
                | Outcome::Pow
                | Outcome::Mute
                | Outcome::Unsupported
        )
    }

    /// Bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Blocked => "blocked",
            Outcome::Invalid => "invalid",
            Outcome::RateLimited => "rate-limited",
            Outcome::AuthRequired => "auth-required",
            Outcome::Restricted => "restricted",
            Outcome::Pow => "pow",
            Outcome::Mute => "mute",
            Outcome::Unsupported => "unsupported",
            Outcome::Error => "error",
            Outcome::Other => "other",
        }
    }
}

/// A NOTICE or CLOSED text that says the connection holds as many subscriptions as the
/// relay allows: nostr-rs-relay's "Subscription error: Maximum concurrent subscription
/// count reached", nostr-relay-builder's "rate-limited: too many REQs", and the "too many
/// subscriptions" / "too many concurrent REQs" of others.
pub fn means_subscription_cap(text: &str) -> bool {
    let n = text.to_ascii_lowercase();
    let subs = n.contains("subscription") || n.contains("reqs");
    subs && (n.contains("too many")
        || n.contains("maximum")
        || n.contains("max ")
        || n.contains("limit exceeded")
        || n.contains("limit reached"))
}

/// NOTICE texts that mean "slow down" (relays are not consistent about it).
pub fn notice_means_rate_limited(notice: &str) -> bool {
    let n = notice.to_ascii_lowercase();
    n.starts_with("rate-limited")
        || (n.contains("rate") && n.contains("limit"))
        || n.contains("too many")
        || n.contains("slow down")
        || n.contains("throttl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let cases = [
            (true, "", Outcome::Accepted),
            (true, "stored", Outcome::Accepted),
            (true, "duplicate: already have it", Outcome::Duplicate),
            (false, "duplicate: already have it", Outcome::Duplicate),
            (false, "blocked: not a GRASP repo event", Outcome::Blocked),
            (false, "invalid: bad signature", Outcome::Invalid),
            (false, "rate-limited: slow down", Outcome::RateLimited),
            (false, "RATE-LIMITED: slow down", Outcome::RateLimited),
            (false, "auth-required: who are you", Outcome::AuthRequired),
            (false, "restricted: members only", Outcome::Restricted),
            (false, "pow: difficulty 20 required", Outcome::Pow),
            (false, "mute: no", Outcome::Mute),
            (false, "unsupported: filter", Outcome::Unsupported),
            (false, "error: database is locked", Outcome::Error),
            (false, "something odd", Outcome::Other),
            (false, "", Outcome::Other),
            (false, "weird-prefix: x", Outcome::Other),
        ];
        for (ok, msg, want) in cases {
            assert_eq!(Outcome::classify(ok, msg), want, "{ok} {msg:?}");
        }
        assert!(Outcome::RateLimited.is_transient());
        assert!(Outcome::Error.is_transient());
        assert!(!Outcome::Blocked.is_transient());
        assert!(!Outcome::Invalid.is_transient());
    }

    #[test]
    fn subscription_caps_are_recognised() {
        for text in [
            "Subscription error: Maximum concurrent subscription count reached",
            "rate-limited: too many REQs",
            "error: too many concurrent REQs",
            "too many subscriptions",
            "blocked: max subscriptions reached",
        ] {
            assert!(means_subscription_cap(text), "{text}");
        }
        for text in [
            "rate-limited: slow down",
            "error: could not connect to upstream",
            "blocked: you are banned",
            "invalid: subscription id too long",
        ] {
            assert!(!means_subscription_cap(text), "{text}");
        }
    }

    #[test]
    fn policy_refusals_are_not_transient() {
        for msg in [
            "blocked: no",
            "invalid: bad filter",
            "restricted: members only",
            "unsupported: #q",
        ] {
            let o = Outcome::classify(false, msg);
            assert!(o.is_refusal(), "{msg}");
            assert!(!o.is_transient(), "{msg}");
        }
        for msg in [
            "rate-limited: slow down",
            "error: db",
            "auth-required: who",
            "closed for no reason",
        ] {
            assert!(!Outcome::classify(false, msg).is_refusal(), "{msg}");
        }
    }

    #[test]
    fn rate_limit_notices() {
        for n in [
            "rate-limited: too fast",
            "You are being rate limited",
            "Too many requests",
            "please slow down",
            "throttled",
        ] {
            assert!(notice_means_rate_limited(n), "{n}");
        }
        for n in ["unknown envelope label", "ERROR: bad filter", ""] {
            assert!(!notice_means_rate_limited(n), "{n}");
        }
    }

    use crate::nostr::remote_text::clean;
    use nostr::{JsonUtil, RelayMessage};
    use proptest::prelude::*;

    proptest! {
        /// Anything a relay may send as a frame: a message or a parse error, and the texts it
        /// carries classify and clean without a panic, into bounded printable text.
        #[test]
        fn prop_relay_frames_and_their_texts(
            frame in prop_oneof![
                "\\PC{0,120}",
                ("(EVENT|EOSE|CLOSED|NOTICE|OK|AUTH|NEG-MSG|NEG-ERR|COUNT)", "\\PC{0,40}", "\\PC{0,40}")
                    .prop_map(|(k, a, b)| serde_json::json!([k, a, b]).to_string()),
                ("\\PC{0,40}", any::<bool>(), "\\PC{0,60}")
                    .prop_map(|(id, ok, m)| serde_json::json!(["OK", id, ok, m]).to_string()),
            ],
            text in "\\PC{0,300}|[\\x00-\\x1f\\u{202a}-\\u{202e}a-z:]{0,300}",
            max in 0usize..200,
        ) {
            let _ = RelayMessage::from_json(&frame);
            let _ = Outcome::classify(true, &text);
            let o = Outcome::classify(false, &text);
            let _ = (o.is_transient(), o.is_refusal(), o.label());
            let _ = (means_subscription_cap(&text), notice_means_rate_limited(&text));
            let c = clean(&text, max);
            prop_assert!(!c.chars().any(|ch| ch.is_control()));
            prop_assert!(c.len() <= max + '…'.len_utf8());
            if text.len() <= max && !text.chars().any(|ch| ch.is_control() || ('\u{202a}'..='\u{202e}').contains(&ch) || ('\u{2066}'..='\u{2069}').contains(&ch) || ch == '\u{200e}' || ch == '\u{200f}' || ch == '\u{61c}') {
                prop_assert_eq!(c, text);
            }
        }
    }
}
