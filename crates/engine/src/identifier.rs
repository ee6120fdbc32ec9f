//! Session identifiers, validated as the Azure data plane does (contract §2.2).
//!
//! The accepted set is the union of the two published rules: 4 to 128 characters from ASCII
//! letters, digits and ``_|}{[]:";'<>?/.,@#$%^&*()-+=!~` ``. Validation happens after the
//! query string is percent-decoded.
//!
//! An identifier is a secret (whoever holds it and a token can use the session), so its
//! `Debug` and `Display` never show it; [`Identifier::redacted`] gives a stable short tag
//! for logs.

use std::fmt;
use std::hash::Hash;

const MIN_LEN: usize = 4;
const MAX_LEN: usize = 128;
const PUNCTUATION: &str = "_|}{[]:\";'<>?/.,@#$%^&*()-+=!~`";

/// A validated session identifier.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier(String);

/// Why a string is not a valid identifier. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifierError {
    #[error("the identifier must be 4 to 128 characters long; it has {0}")]
    Length(usize),
    #[error("the identifier contains {0:?}, which is not allowed; use letters, digits and {PUNCTUATION}")]
    Character(char),
}

impl Identifier {
    pub fn parse(text: &str) -> Result<Identifier, IdentifierError> {
        let len = text.chars().count();
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return Err(IdentifierError::Length(len));
        }
        if let Some(bad) = text.chars().find(|c| !(c.is_ascii_alphanumeric() || PUNCTUATION.contains(*c))) {
            return Err(IdentifierError::Character(bad));
        }
        Ok(Identifier(text.to_owned()))
    }

    /// The identifier itself, for the wire. Never log this.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short, stable, non-reversible tag for logs: `id:` and the first 12 hex digits of the
    /// identifier's SHA-256, so an operator who knows an identifier can find its lines
    /// (`printf %s ID | sha256sum | cut -c1-12`) while the log itself reveals none.
    pub fn redacted(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.0.as_bytes());
        format!("id:{}", digest[..6].iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identifier({})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_every_listed_punctuation_mark() {
        assert!(Identifier::parse("3f2b8a4e-9c1d-4b7a-8e2f-1a2b3c4d5e6f").is_ok());
        assert!(Identifier::parse(&format!("ab{PUNCTUATION}")).is_ok());
        assert!(Identifier::parse("user|42&x#%").is_ok());
    }

    #[test]
    fn rejects_bad_lengths_and_characters() {
        assert_eq!(Identifier::parse("abc"), Err(IdentifierError::Length(3)));
        assert_eq!(Identifier::parse(&"a".repeat(129)), Err(IdentifierError::Length(129)));
        assert!(Identifier::parse(&"a".repeat(128)).is_ok());
        assert_eq!(Identifier::parse("has space"), Err(IdentifierError::Character(' ')));
        assert_eq!(Identifier::parse("tab\there"), Err(IdentifierError::Character('\t')));
        assert_eq!(Identifier::parse("naïve-id"), Err(IdentifierError::Character('ï')));
        assert_eq!(Identifier::parse("back\\slash"), Err(IdentifierError::Character('\\')));
    }

    #[test]
    fn debug_output_never_contains_the_identifier() {
        let id = Identifier::parse("very-secret-conversation").unwrap();
        let shown = format!("{id:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(id.redacted(), Identifier::parse("very-secret-conversation").unwrap().redacted());
    }
}
