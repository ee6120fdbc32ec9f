//! The server's own token issuer: EdDSA-signed JWTs from a key in the state directory.
//!
//! The key (`keys/local-issuer.pem`, created on first use, readable by root only) is shared by
//! `sandpool token issue` and the server. Tokens carry `roles` and, for tokens handed to one
//! end user, `identifier` or `identifier_prefix`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::principal::{IdentifierScope, Principal, Role};
use crate::{jwt_error, unix_now, AuthError, Verified, LEEWAY};

/// Issuer name of tokens minted by this server.
pub const LOCAL_ISSUER: &str = "sandpool-local";
const KEY_FILE: &str = "local-issuer.pem";

/// The claims of a sandpool token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The only identifier this token may name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    /// The prefix every identifier this token names must start with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier_prefix: Option<String>,
}

impl Claims {
    fn into_principal(self) -> Principal {
        let roles = self.roles.iter().filter_map(|role| role.parse().ok()).collect();
        Principal { issuer: self.iss, subject: self.sub, roles, scope: scope_of(self.identifier, self.identifier_prefix) }
    }
}

/// The scope named by a token's `identifier` / `identifier_prefix` claims.
pub fn scope_of(identifier: Option<String>, prefix: Option<String>) -> IdentifierScope {
    match (identifier, prefix) {
        (Some(id), _) => IdentifierScope::Exactly(id),
        (None, Some(prefix)) => IdentifierScope::StartingWith(prefix),
        (None, None) => IdentifierScope::Any,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot {step} {path}")]
    Io { step: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} is not an Ed25519 private key in PKCS#8 PEM form")]
    Invalid { path: PathBuf },
    #[error("cannot get random bytes for a new key: {0}")]
    Random(String),
}

/// What a minted token may do.
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: String,
    pub ttl: Duration,
    pub roles: Vec<Role>,
    pub scope: IdentifierScope,
}

/// The server's own token issuer.
pub struct LocalIssuer {
    key_id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    audiences: Vec<String>,
}

impl fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIssuer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl LocalIssuer {
    /// Loads the signing key from `dir`, creating the directory and a new key on first use.
    /// Issued tokens carry the first of `audiences`; verification accepts any of them.
    pub fn load_or_create(dir: &Path, audiences: &[String]) -> Result<LocalIssuer, KeyError> {
        let io = |step| move |source| KeyError::Io { step, path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(io("create"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict"))?;
        let path = dir.join(KEY_FILE);
        let key = match fs::read_to_string(&path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::Invalid { path: path.clone() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(&path)?,
            Err(source) => return Err(KeyError::Io { step: "read", path, source }),
        };
        Ok(LocalIssuer::from_key(&key, audiences))
    }

    fn from_key(key: &SigningKey, audiences: &[String]) -> LocalIssuer {
        let der = key.to_pkcs8_der().expect("an Ed25519 key encodes");
        let public = key.verifying_key().to_bytes();
        let key_id = hex::encode(&Sha256::digest(public)[..8]);
        assert!(!audiences.is_empty(), "at least one audience");
        LocalIssuer {
            key_id,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_der(&public),
            audiences: audiences.to_vec(),
        }
    }

    /// Mints a token.
    pub fn issue(&self, grant: &Grant) -> String {
        let now = unix_now();
        let (identifier, identifier_prefix) = match &grant.scope {
            IdentifierScope::Any => (None, None),
            IdentifierScope::Exactly(id) => (Some(id.clone()), None),
            IdentifierScope::StartingWith(prefix) => (None, Some(prefix.clone())),
        };
        let claims = Claims {
            iss: LOCAL_ISSUER.to_owned(),
            sub: grant.subject.clone(),
            aud: self.audiences[0].clone(),
            iat: now,
            nbf: now,
            exp: now + grant.ttl.as_secs().max(1),
            jti: uuid::Uuid::new_v4().to_string(),
            roles: grant.roles.iter().map(|r| r.as_str().to_owned()).collect(),
            identifier,
            identifier_prefix,
        };
        self.sign(&claims)
    }

    fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("signing with a valid key cannot fail")
    }

    /// Verifies a token this server issued: signature, times, issuer and audience.
    pub(crate) fn verify(&self, token: &str, header: &Header) -> Result<Verified, AuthError> {
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&self.audiences);
        validation.set_issuer(&[LOCAL_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(|err| jwt_error(&err, &self.audiences))?.claims;
        let (nbf, exp) = (claims.nbf, claims.exp);
        Ok(Verified { principal: claims.into_principal(), nbf, exp })
    }
}

fn create_key(path: &Path) -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let pem = key.to_pkcs8_pem(Default::default()).expect("an Ed25519 key encodes");
    // create_new: if another process created the key meanwhile, use theirs.
    match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut file) => {
            file.write_all(pem.as_bytes()).map_err(|source| KeyError::Io { step: "write", path: path.to_owned(), source })?;
            file.sync_all().map_err(|source| KeyError::Io { step: "sync", path: path.to_owned(), source })?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let pem = fs::read_to_string(path).map_err(|source| KeyError::Io { step: "read", path: path.to_owned(), source })?;
            SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::Invalid { path: path.to_owned() })
        }
        Err(source) => Err(KeyError::Io { step: "create", path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_AUDIENCES;
    use base64::Engine;

    fn audiences() -> Vec<String> {
        DEFAULT_AUDIENCES.iter().map(|s| s.to_string()).collect()
    }

    fn issuer() -> (tempfile::TempDir, LocalIssuer) {
        let dir = tempfile::tempdir().unwrap();
        let issuer = LocalIssuer::load_or_create(&dir.path().join("keys"), &audiences()).unwrap();
        (dir, issuer)
    }

    fn verify(issuer: &LocalIssuer, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        issuer.verify(token, &header).map(|verified| verified.principal)
    }

    fn grant(roles: &[Role], scope: IdentifierScope) -> Grant {
        Grant { subject: "ci".into(), ttl: Duration::from_secs(600), roles: roles.to_vec(), scope }
    }

    #[test]
    fn a_fresh_token_verifies_and_carries_its_roles_and_scope() {
        let (_dir, issuer) = issuer();
        let token = issuer.issue(&grant(&[Role::Executor, Role::Reader], IdentifierScope::StartingWith("u-".into())));
        let principal = verify(&issuer, &token).unwrap();
        assert_eq!(principal.subject, "ci");
        assert_eq!(principal.roles, vec![Role::Executor, Role::Reader]);
        assert_eq!(principal.scope, IdentifierScope::StartingWith("u-".into()));
        let token = issuer.issue(&grant(&[Role::Admin], IdentifierScope::Any));
        assert_eq!(verify(&issuer, &token).unwrap().scope, IdentifierScope::Any);
    }

    #[test]
    fn the_key_persists_and_is_private() {
        let (dir, issuer) = issuer();
        let token = issuer.issue(&grant(&[], IdentifierScope::Any));
        let again = LocalIssuer::load_or_create(&dir.path().join("keys"), &audiences()).unwrap();
        assert!(verify(&again, &token).is_ok());
        let mode = fs::metadata(dir.path().join("keys").join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn foreign_expired_and_malformed_tokens_are_refused() {
        let (_dir, issuer) = issuer();
        let (_other_dir, other) = self::issuer();
        let foreign = other.issue(&grant(&[], IdentifierScope::Any));
        assert_eq!(verify(&issuer, &foreign), Err(AuthError::BadSignature));
        assert_eq!(verify(&issuer, "not-a-jwt"), Err(AuthError::Malformed));

        let now = unix_now();
        let claims = Claims {
            iss: LOCAL_ISSUER.into(),
            sub: "x".into(),
            aud: DEFAULT_AUDIENCES[0].into(),
            iat: now - 7200,
            nbf: now - 7200,
            exp: now - 3600,
            jti: "j".into(),
            roles: vec![],
            identifier: None,
            identifier_prefix: None,
        };
        assert_eq!(verify(&issuer, &issuer.sign(&claims)), Err(AuthError::Expired));
        let wrong_audience = Claims { aud: "https://management.azure.com".into(), exp: now + 600, ..claims.clone() };
        assert!(matches!(verify(&issuer, &issuer.sign(&wrong_audience)), Err(AuthError::WrongAudience(_))));
        let wrong_issuer = Claims { iss: "someone-else".into(), exp: now + 600, ..claims.clone() };
        assert_eq!(verify(&issuer, &issuer.sign(&wrong_issuer)), Err(AuthError::WrongIssuer));
        let future = Claims { nbf: now + 3600, exp: now + 7200, ..claims.clone() };
        assert_eq!(verify(&issuer, &issuer.sign(&future)), Err(AuthError::NotYetValid));

        // alg "none" with the claims of a valid token.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let valid = Claims { exp: now + 600, ..claims };
        let unsigned = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), b64.encode(serde_json::to_vec(&valid).unwrap()));
        assert!(verify(&issuer, &unsigned).is_err());
        // An HMAC token "signed" with a guessed secret must not pass either.
        let hs = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &valid, &EncodingKey::from_secret(b"guess")).unwrap();
        assert_eq!(verify(&issuer, &hs), Err(AuthError::UnsupportedAlgorithm));
    }
}
