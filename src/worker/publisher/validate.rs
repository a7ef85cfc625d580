//! The checks an event from a remote passes before it is handed to the publisher, and the
//! memory that spares a copy its signature check: the same event reaches a worker once from
//! every remote relay that has it, and each copy's Schnorr check cost as much as the first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use nostr::secp256k1::schnorr::Signature;
use nostr::{Event, EventId, JsonUtil};
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
    /// Over the message limit the local relay states (NIP-11): it would not take it.
    #[error("event is {bytes} bytes, over the local relay's {max}-byte message limit")]
    OverLocalLimit { bytes: usize, max: usize },
}

impl EventRejection {
    pub fn label(self) -> &'static str {
        match self {
            EventRejection::InvalidId => "invalid_id",
            EventRejection::InvalidSignature => "invalid_signature",
            EventRejection::Oversize { .. } => "oversize",
            EventRejection::OverLocalLimit { .. } => "over_local_limit",
        }
    }
}

/// Size first (cheap), then id; the signature is [`SignatureMemory::validate`]'s to check.
fn check_size_and_id(event: &Event, max_bytes: usize) -> Result<(), EventRejection> {
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
    Ok(())
}

/// How an event passed [`SignatureMemory::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated {
    /// Its signature was checked now.
    Checked,
    /// An identical copy (same id, same signature) passed the check before; only its size
    /// and id were checked now.
    Known,
}

/// The ids of events whose signature passed the check, each with that signature; bounded,
/// the oldest goes first. Shared by a worker's sessions.
///
/// Why skipping the check for a known pair is sound: the id is still checked on every copy,
/// and it is the hash of the pubkey, kind, tags, content and `created_at`; a copy whose id
/// matches is that same event, and a copy whose signature also matches, byte for byte, is
/// the very event that was verified. A copy with another signature is checked in full.
#[derive(Debug)]
pub struct SignatureMemory {
    inner: Mutex<Known>,
}

#[derive(Debug)]
struct Known {
    sigs: HashMap<EventId, Signature>,
    order: VecDeque<EventId>,
    capacity: usize,
}

/// Verified events remembered at most: about 130 bytes each. Copies of one event reach a
/// worker within one sync of its relays, so a few thousand events back catch most of them.
pub const SIGNATURE_MEMORY: usize = 16_384;

impl SignatureMemory {
    /// Capacity 0: remembers nothing, every copy is checked.
    pub fn new(capacity: usize) -> Self {
        SignatureMemory {
            inner: Mutex::new(Known {
                sigs: HashMap::new(),
                order: VecDeque::new(),
                capacity,
            }),
        }
    }

    /// The checks every event from a remote passes before it is published: size, id and
    /// signature — without the signature check for a copy of an event that passed it.
    pub fn validate(&self, event: &Event, max_bytes: usize) -> Result<Validated, EventRejection> {
        check_size_and_id(event, max_bytes)?;
        if self.knows(event) {
            return Ok(Validated::Known);
        }
        if !event.verify_signature() {
            return Err(EventRejection::InvalidSignature);
        }
        self.remember(event);
        Ok(Validated::Checked)
    }

    fn knows(&self, event: &Event) -> bool {
        self.inner
            .lock()
            .is_ok_and(|k| k.sigs.get(&event.id) == Some(&event.sig))
    }

    fn remember(&self, event: &Event) {
        let Ok(mut k) = self.inner.lock() else {
            return;
        };
        if k.capacity == 0 || k.sigs.insert(event.id, event.sig).is_some() {
            return;
        }
        k.order.push_back(event.id);
        while k.order.len() > k.capacity {
            if let Some(old) = k.order.pop_front() {
                k.sigs.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|k| k.sigs.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nostr::{EventBuilder, Keys, Kind};

    fn signed(content: &str, keys: &Keys) -> Event {
        EventBuilder::new(Kind::TextNote, content)
            .sign_with_keys(keys)
            .unwrap()
    }

    fn with_sig_of(ev: &Event, other: &Event) -> Event {
        let mut json: serde_json::Value = serde_json::from_str(&ev.as_json()).unwrap();
        json["sig"] = other.sig.to_string().into();
        Event::from_json(json.to_string()).unwrap()
    }

    #[test]
    fn a_copy_of_a_verified_event_skips_only_the_signature_check() {
        let keys = Keys::generate();
        let m = SignatureMemory::new(16);
        let ev = signed("hello", &keys);
        assert_eq!(m.validate(&ev, 1024), Ok(Validated::Checked));
        assert_eq!(m.validate(&ev, 1024), Ok(Validated::Known));

        // Same id, another signature: checked in full, and refused.
        let forged = with_sig_of(&ev, &signed("other", &keys));
        assert_eq!(
            m.validate(&forged, 1024),
            Err(EventRejection::InvalidSignature)
        );
        // Its failure does not displace the verified pair.
        assert_eq!(m.validate(&ev, 1024), Ok(Validated::Known));

        // Another content under the verified id and signature: the id check catches it.
        let mut json: serde_json::Value = serde_json::from_str(&ev.as_json()).unwrap();
        json["content"] = "tampered".into();
        let tampered = Event::from_json(json.to_string()).unwrap();
        assert_eq!(m.validate(&tampered, 1024), Err(EventRejection::InvalidId));

        // Size is checked on every copy.
        assert!(matches!(
            m.validate(&ev, 64),
            Err(EventRejection::Oversize { .. })
        ));
    }

    #[test]
    fn the_signature_memory_is_bounded_and_forgets_the_oldest() {
        let keys = Keys::generate();
        let m = SignatureMemory::new(2);
        let evs: Vec<Event> = (0..3).map(|i| signed(&i.to_string(), &keys)).collect();
        for ev in &evs {
            assert_eq!(m.validate(ev, 1024), Ok(Validated::Checked));
        }
        assert_eq!(m.len(), 2);
        assert_eq!(m.validate(&evs[0], 1024), Ok(Validated::Checked));
        assert_eq!(m.validate(&evs[2], 1024), Ok(Validated::Known));

        let none = SignatureMemory::new(0);
        assert_eq!(none.validate(&evs[0], 1024), Ok(Validated::Checked));
        assert_eq!(none.validate(&evs[0], 1024), Ok(Validated::Checked));
        assert!(none.is_empty());
    }

    /// Every check, with nothing remembered.
    fn validate(event: &Event, max_bytes: usize) -> Result<(), EventRejection> {
        SignatureMemory::new(0)
            .validate(event, max_bytes)
            .map(|_| ())
    }

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
