//! NIP-34 repository coordinates: `30617:<owner pubkey hex>:<d identifier>`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::kinds::REPO_ANNOUNCEMENT_NUMBER;

/// Longest `d` identifier we accept, in characters; also enforced by the CRD schema.
pub const MAX_IDENTIFIER_CHARS: usize = 256;

/// Longest coordinate string: `30617:` + 64 hex + `:` + identifier.
pub const MAX_COORDINATE_CHARS: usize = 6 + 64 + 1 + MAX_IDENTIFIER_CHARS;

/// The same rule as [`RepoCoordinate::parse`], as the (RE2) pattern the API server enforces.
pub const COORDINATE_PATTERN: &str = r"^30617:[0-9a-f]{64}:[^\x00-\x1f\x7f]+$";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoordinateError {
    #[error("repo coordinate {input:?} must have the form 30617:<pubkey hex>:<identifier>")]
    Shape { input: String },
    #[error("repo coordinate {input:?} has kind {kind:?}; repository announcements are kind 30617")]
    Kind { input: String, kind: String },
    #[error("repo coordinate {input:?}: the pubkey must be 64 lower-case hex characters")]
    Pubkey { input: String },
    #[error("repo coordinate {input:?}: the identifier is empty")]
    EmptyIdentifier { input: String },
    #[error(
        "repo coordinate {input:?}: the identifier is longer than {MAX_IDENTIFIER_CHARS} characters"
    )]
    IdentifierTooLong { input: String },
    #[error("repo coordinate {input:?}: the identifier contains a control character")]
    ControlCharacter { input: String },
}

/// A repository announcement's address: owner pubkey (lower-case hex) and `d` identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoCoordinate {
    pubkey: String,
    identifier: String,
}

impl RepoCoordinate {
    /// Build from parts, checking them as [`RepoCoordinate::parse`] would.
    pub fn new(pubkey: &str, identifier: &str) -> Result<Self, CoordinateError> {
        Self::parse(&format!("{REPO_ANNOUNCEMENT_NUMBER}:{pubkey}:{identifier}"))
    }

    pub fn parse(input: &str) -> Result<Self, CoordinateError> {
        let owned = || input.to_string();
        // The identifier may itself contain ':' so split at most twice.
        let mut parts = input.splitn(3, ':');
        let (Some(kind), Some(pubkey), Some(identifier)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(CoordinateError::Shape { input: owned() });
        };
        if kind != "30617" {
            return Err(CoordinateError::Kind {
                input: owned(),
                kind: kind.to_string(),
            });
        }
        if pubkey.len() != 64
            || !pubkey
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(CoordinateError::Pubkey { input: owned() });
        }
        if identifier.is_empty() {
            return Err(CoordinateError::EmptyIdentifier { input: owned() });
        }
        if identifier.chars().count() > MAX_IDENTIFIER_CHARS {
            return Err(CoordinateError::IdentifierTooLong { input: owned() });
        }
        if identifier.chars().any(|c| c.is_ascii_control()) {
            return Err(CoordinateError::ControlCharacter { input: owned() });
        }
        Ok(RepoCoordinate {
            pubkey: pubkey.to_string(),
            identifier: identifier.to_string(),
        })
    }

    pub fn pubkey(&self) -> &str {
        &self.pubkey
    }

    pub fn identifier(&self) -> &str {
        &self.identifier
    }
}

impl fmt::Display for RepoCoordinate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{REPO_ANNOUNCEMENT_NUMBER}:{}:{}",
            self.pubkey, self.identifier
        )
    }
}

impl FromStr for RepoCoordinate {
    type Err = CoordinateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";

    #[test]
    fn accepts_valid_coordinates() {
        for id in [
            "ngit",
            "my-repo",
            "a:b:c",
            "ünïcode",
            "x".repeat(256).as_str(),
        ] {
            let s = format!("30617:{PK}:{id}");
            let c = RepoCoordinate::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(c.pubkey(), PK);
            assert_eq!(c.identifier(), id);
            assert_eq!(c.to_string(), s);
        }
    }

    #[test]
    fn rejects_invalid_coordinates() {
        type Check = fn(&CoordinateError) -> bool;
        let upper = PK.to_uppercase();
        let cases: Vec<(String, Check)> = vec![
            ("".into(), |e| matches!(e, CoordinateError::Shape { .. })),
            ("30617".into(), |e| {
                matches!(e, CoordinateError::Shape { .. })
            }),
            (format!("30617:{PK}"), |e| {
                matches!(e, CoordinateError::Shape { .. })
            }),
            (format!("30618:{PK}:x"), |e| {
                matches!(e, CoordinateError::Kind { .. })
            }),
            (format!("1:{PK}:x"), |e| {
                matches!(e, CoordinateError::Kind { .. })
            }),
            (format!("30617:{upper}:x"), |e| {
                matches!(e, CoordinateError::Pubkey { .. })
            }),
            (format!("30617:{}:x", &PK[1..]), |e| {
                matches!(e, CoordinateError::Pubkey { .. })
            }),
            (format!("30617:{PK}0:x"), |e| {
                matches!(e, CoordinateError::Pubkey { .. })
            }),
            ("30617:zz:x".into(), |e| {
                matches!(e, CoordinateError::Pubkey { .. })
            }),
            (format!("30617:{PK}:"), |e| {
                matches!(e, CoordinateError::EmptyIdentifier { .. })
            }),
            (format!("30617:{PK}:{}", "x".repeat(257)), |e| {
                matches!(e, CoordinateError::IdentifierTooLong { .. })
            }),
            (format!("30617:{PK}:a\nb"), |e| {
                matches!(e, CoordinateError::ControlCharacter { .. })
            }),
            (format!("30617:{PK}:a\u{7f}"), |e| {
                matches!(e, CoordinateError::ControlCharacter { .. })
            }),
        ];
        for (input, check) in cases {
            match RepoCoordinate::parse(&input) {
                Ok(c) => panic!("{input:?} was accepted as {c}"),
                Err(e) => assert!(check(&e), "{input:?} gave the wrong error: {e:?}"),
            }
        }
    }

    #[test]
    fn ordering_is_by_pubkey_then_identifier() {
        let a = RepoCoordinate::new(PK, "b").unwrap();
        let b = RepoCoordinate::new(PK, "c").unwrap();
        assert!(a < b);
        assert_eq!(RepoCoordinate::new(PK, "b").unwrap(), a);
    }
}
