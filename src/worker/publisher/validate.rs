//! The checks an event from a remote passes before it is handed to the publisher.

use nostr::{Event, JsonUtil};
use thiserror::Error;

/// Why an event from a remote relay is not published at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EventRejection {
    #[error("event id does not match its content")]
    InvalidId,
    #[error("invalid signature")]
    InvalidSignature,
    #[error("event is {bytes} bytes, over the {max}-byte limit")]
    Oversize { bytes: usize, max: usize },
}

impl EventRejection {
    pub fn label(self) -> &'static str {
        match self {
            EventRejection::InvalidId => "invalid_id",
            EventRejection::InvalidSignature => "invalid_signature",
            EventRejection::Oversize { .. } => "oversize",
        }
    }
}

/// The checks every event from a remote passes before it is published: size first (cheap),
/// then id, then signature.
pub fn validate(event: &Event, max_bytes: usize) -> Result<(), EventRejection> {
    let bytes = event.as_json().len();
    if bytes > max_bytes {
        return Err(EventRejection::Oversize {
            bytes,
            max: max_bytes,
        });
    }
    if !event.verify_id() {
        return Err(EventRejection::InvalidId);
    }
    if !event.verify_signature() {
        return Err(EventRejection::InvalidSignature);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Kind};

    #[test]
    fn validation_catches_tampering_and_size() {
        let keys = Keys::generate();
        let ev = EventBuilder::new(Kind::TextNote, "hello")
            .sign_with_keys(&keys)
            .unwrap();
        assert_eq!(validate(&ev, 1024), Ok(()));

        let mut json: serde_json::Value = serde_json::from_str(&ev.as_json()).unwrap();
        json["content"] = "tampered".into();
        let tampered = Event::from_json(json.to_string()).unwrap();
        assert_eq!(validate(&tampered, 1024), Err(EventRejection::InvalidId));

        let other = EventBuilder::new(Kind::TextNote, "other")
            .sign_with_keys(&keys)
            .unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&ev.as_json()).unwrap();
        json["sig"] = other.sig.to_string().into();
        let bad_sig = Event::from_json(json.to_string()).unwrap();
        assert_eq!(
            validate(&bad_sig, 1024),
            Err(EventRejection::InvalidSignature)
        );

        let big = EventBuilder::new(Kind::TextNote, "x".repeat(2000))
            .sign_with_keys(&keys)
            .unwrap();
        assert!(matches!(
            validate(&big, 1024),
            Err(EventRejection::Oversize { max: 1024, .. })
        ));
    }
}
