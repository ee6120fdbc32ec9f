//! Static API keys for simple setups, stored hashed.
//!
//! A key is `spk_` followed by 43 random URL-safe characters (256 bits), sent as a bearer
//! token. The configuration holds only its SHA-256 (a fast hash is enough for random keys of
//! this length: there is nothing to guess), so a leaked config file leaks no key.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::principal::{IdentifierScope, Principal, Role};

/// Every key starts with this, so a key is recognisable (and never parsed as a JWT).
pub const API_KEY_PREFIX: &str = "spk_";

/// A configured key.
#[derive(Debug, Clone)]
pub struct ApiKeyEntry {
    /// A name for logs and `Principal::subject`, never the key.
    pub name: String,
    /// Lower-case hex SHA-256 of the whole key (prefix included).
    pub sha256: String,
    pub roles: Vec<Role>,
    pub scope: IdentifierScope,
}

/// The configured keys, by hash.
#[derive(Debug, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], ApiKeyEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("API key '{name}': sha256 must be 64 hexadecimal characters (the output of 'sandpool api-key create')")]
pub struct BadKeyHash {
    pub name: String,
}

impl ApiKeys {
    pub fn new(entries: Vec<ApiKeyEntry>) -> Result<ApiKeys, BadKeyHash> {
        let mut by_hash = HashMap::new();
        for entry in entries {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(entry.sha256.trim(), &mut digest).map_err(|_| BadKeyHash { name: entry.name.clone() })?;
            by_hash.insert(digest, entry);
        }
        Ok(ApiKeys { by_hash })
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The caller a key stands for, if it is a configured key.
    pub fn lookup(&self, key: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash.get(&digest).map(|entry| Principal {
            issuer: "api-key".into(),
            subject: entry.name.clone(),
            roles: entry.roles.clone(),
            scope: entry.scope.clone(),
        })
    }
}

/// A new random key and its hash (hex).
pub fn generate() -> Result<(String, String), String> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("cannot get random bytes for a key: {e}"))?;
    let key = format!("{API_KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    Ok((key, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_found_by_its_hash_only() {
        let (key, hash) = generate().unwrap();
        assert!(key.starts_with(API_KEY_PREFIX) && key.len() == 47, "{key}");
        let keys = ApiKeys::new(vec![ApiKeyEntry {
            name: "ci".into(),
            sha256: hash.clone(),
            roles: vec![Role::Executor],
            scope: IdentifierScope::Any,
        }])
        .unwrap();
        let principal = keys.lookup(&key).unwrap();
        assert_eq!((principal.subject.as_str(), principal.roles.as_slice()), ("ci", &[Role::Executor][..]));
        assert!(keys.lookup(&hash).is_none(), "the hash is not a key");
        assert!(keys.lookup(&format!("{key}x")).is_none());
        let (other, _) = generate().unwrap();
        assert!(keys.lookup(&other).is_none());
    }

    #[test]
    fn a_malformed_hash_is_a_configuration_error() {
        let entry = ApiKeyEntry { name: "ci".into(), sha256: "abc".into(), roles: vec![], scope: IdentifierScope::Any };
        assert_eq!(ApiKeys::new(vec![entry]).unwrap_err(), BadKeyHash { name: "ci".into() });
    }
}
