//! NIP-77 reconciliation as the initiating side: our item set is what the *local relay*
//! already holds for a filter, so only the ids the local relay lacks cross the WAN.

use negentropy::{Id, Negentropy, NegentropyStorageVector};
use nostr::{EventId, Timestamp};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NegError {
    #[error("negentropy: {0}")]
    Protocol(String),
    #[error("negentropy message is not valid hex")]
    Hex,
    #[error("negentropy went on for more than {0} rounds")]
    TooManyRounds(u32),
    #[error("the relay has more than {0} events we lack for this filter")]
    TooManyNeeded(usize),
}

impl From<negentropy::Error> for NegError {
    fn from(e: negentropy::Error) -> Self {
        NegError::Protocol(e.to_string())
    }
}

/// Rounds after which a reconciliation is abandoned (a relay that never converges).
pub const MAX_ROUNDS: u32 = 500;

/// Ids we lack after which a reconciliation is abandoned for REQ pagination, which streams:
/// a relay (honest with a huge history, or lying) must not make us hold millions of ids.
pub const MAX_NEED: usize = 50_000;

pub struct NegSession {
    neg: Negentropy<'static, NegentropyStorageVector>,
    need: Vec<Id>,
    rounds: u32,
}

impl NegSession {
    /// Start reconciling `items` (what we have). Returns the session and the hex-encoded
    /// initial message for NEG-OPEN. `frame_size_limit` 0 means unlimited.
    pub fn open(
        items: &[(EventId, Timestamp)],
        frame_size_limit: u64,
    ) -> Result<(NegSession, String), NegError> {
        let mut storage = NegentropyStorageVector::with_capacity(items.len());
        for (id, at) in items {
            storage.insert(at.as_secs(), Id::from_byte_array(id.to_bytes()))?;
        }
        storage.seal()?;
        let mut neg = Negentropy::owned(storage, frame_size_limit)?;
        let init = neg.initiate()?;
        Ok((
            NegSession {
                neg,
                need: Vec::new(),
                rounds: 0,
            },
            hex::encode(init),
        ))
    }

    /// Feed the relay's NEG-MSG. `Some(next)` is our next NEG-MSG; `None` means done.
    pub fn on_message(&mut self, hex_msg: &str) -> Result<Option<String>, NegError> {
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return Err(NegError::TooManyRounds(MAX_ROUNDS));
        }
        let msg = hex::decode(hex_msg).map_err(|_| NegError::Hex)?;
        let mut have = Vec::new();
        let next = self
            .neg
            .reconcile_with_ids(&msg, &mut have, &mut self.need)?;
        if self.need.len() > MAX_NEED {
            return Err(NegError::TooManyNeeded(MAX_NEED));
        }
        Ok(next.map(hex::encode))
    }

    /// Ids the relay has and we do not.
    pub fn need(&self) -> Vec<EventId> {
        let mut ids: Vec<EventId> = self
            .need
            .iter()
            .map(|id| EventId::from_byte_array(id.to_bytes()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn rounds(&self) -> u32 {
        self.rounds
    }
}

/// NOTICE texts with which relays answer a NEG-OPEN they do not understand.
pub fn notice_means_unsupported(notice: &str) -> bool {
    let n = notice.to_ascii_lowercase();
    [
        "negentropy",
        "neg-",
        "envelope",
        "unknown cmd",
        "unknown command",
        "unknown message",
        "unsupported",
    ]
    .iter()
    .any(|needle| n.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: u32, at: u64) -> (EventId, Timestamp) {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b[31] = 7;
        (EventId::from_byte_array(b), Timestamp::from(at))
    }

    /// Reconcile against an in-memory "relay" and return what we would fetch.
    fn reconcile(
        ours: &[(EventId, Timestamp)],
        theirs: &[(EventId, Timestamp)],
        frame: u64,
    ) -> (Vec<EventId>, u32) {
        let mut storage = NegentropyStorageVector::new();
        for (id, at) in theirs {
            storage
                .insert(at.as_secs(), Id::from_byte_array(id.to_bytes()))
                .unwrap();
        }
        storage.seal().unwrap();
        let mut relay = Negentropy::owned(storage, frame).unwrap();
        let (mut s, init) = NegSession::open(ours, frame).unwrap();
        let mut msg = relay.reconcile(&hex::decode(init).unwrap()).unwrap();
        while let Some(next) = s.on_message(&hex::encode(&msg)).unwrap() {
            msg = relay.reconcile(&hex::decode(next).unwrap()).unwrap();
        }
        (s.need(), s.rounds())
    }

    #[test]
    fn asks_only_for_what_we_lack() {
        let theirs: Vec<_> = (0..2000).map(|i| item(i, 1_000 + i as u64 % 97)).collect();
        let ours: Vec<_> = theirs
            .iter()
            .filter(|(id, _)| id.as_bytes()[3] % 10 != 0)
            .copied()
            .collect();
        let (need, _) = reconcile(&ours, &theirs, 0);
        let mut want: Vec<EventId> = theirs
            .iter()
            .filter(|(id, _)| id.as_bytes()[3] % 10 == 0)
            .map(|(id, _)| *id)
            .collect();
        want.sort_unstable();
        assert_eq!(want.len(), 203);
        assert_eq!(need, want);
    }

    #[test]
    fn small_frames_take_more_rounds_but_agree() {
        let theirs: Vec<_> = (0..3000).map(|i| item(i, 5_000 + i as u64)).collect();
        let ours: Vec<_> = theirs[..1500].to_vec();
        let (need, rounds) = reconcile(&ours, &theirs, 4096);
        assert_eq!(need.len(), 1500);
        assert!(rounds > 1);
        let (need, _) = reconcile(&theirs, &theirs, 0);
        assert!(need.is_empty());
        let (need, _) = reconcile(&[], &theirs[..10], 0);
        assert_eq!(need.len(), 10);
    }

    #[test]
    fn a_relay_claiming_too_much_we_lack_ends_the_reconciliation() {
        let theirs: Vec<_> = (0..MAX_NEED as u32 + 10)
            .map(|i| item(i, 1_000 + i as u64))
            .collect();
        let mut storage = NegentropyStorageVector::new();
        for (id, at) in &theirs {
            storage
                .insert(at.as_secs(), Id::from_byte_array(id.to_bytes()))
                .unwrap();
        }
        storage.seal().unwrap();
        let mut relay = Negentropy::owned(storage, 0).unwrap();
        let (mut s, init) = NegSession::open(&[], 0).unwrap();
        let mut msg = relay.reconcile(&hex::decode(init).unwrap()).unwrap();
        let err = loop {
            match s.on_message(&hex::encode(&msg)) {
                Ok(Some(next)) => msg = relay.reconcile(&hex::decode(next).unwrap()).unwrap(),
                Ok(None) => panic!("finished holding {} ids", s.need().len()),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, NegError::TooManyNeeded(MAX_NEED)), "{err}");
    }

    #[test]
    fn garbage_from_the_relay_is_an_error_not_a_panic() {
        let (mut s, _) = NegSession::open(&[item(1, 1)], 0).unwrap();
        assert!(matches!(s.on_message("zz"), Err(NegError::Hex)));
        // Wrong protocol version, truncated input, nothing at all: errors, never panics.
        assert!(s.on_message("62").is_err());
        assert!(s.on_message("").is_err());
        let _ = s.on_message("61ffffffffffffffffff");
        let _ = s.on_message("61000102");
    }

    #[test]
    fn unsupported_notices() {
        for n in [
            "ERROR: unknown cmd",
            "unknown envelope label",
            "negentropy disabled",
            "Unsupported: NEG-OPEN",
        ] {
            assert!(notice_means_unsupported(n), "{n}");
        }
        assert!(!notice_means_unsupported("rate-limited: slow down"));
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever a relay sends as NEG-MSG (hex or not, any bytes), at any point of a
        /// reconciliation: an answer or an error, never a panic.
        #[test]
        fn prop_any_relay_message_is_answered_or_refused(
            ours in prop::collection::vec((any::<u32>(), 0u64..50), 0..40),
            msgs in prop::collection::vec(
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..96).prop_map(hex::encode),
                    prop::collection::vec(any::<u8>(), 0..16)
                        .prop_map(|b| format!("61{}", hex::encode(b))),
                    "\\PC{0,24}",
                ],
                1..6,
            ),
        ) {
            let items: Vec<_> = ours.iter().map(|(n, at)| item(*n, *at)).collect();
            let (mut s, init) = NegSession::open(&items, 0).unwrap();
            prop_assert!(hex::decode(init).is_ok());
            for m in &msgs {
                if s.on_message(m).is_err() {
                    break;
                }
                prop_assert!(s.need().len() <= MAX_NEED);
            }
        }
    }
}
