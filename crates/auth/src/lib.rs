//! Bearer tokens: the server's own issuer (EdDSA-signed JWTs) and their verification.
//!
//! The embedded default signs its own tokens with an Ed25519 key kept in the state directory
//! (`keys/local-issuer.pem`, created on first use, readable by root only). `sandpool token
//! issue` and the server load the same key. Verification checks the signature, the expiry
//! (with a small leeway for clock skew), the issuer and the audience; the Azure clients ask for
//! `https://dynamicsessions.io` (or Semantic Kernel's `https://acasessions.io`), so both are
//! accepted and issued tokens carry the first.
//!
//! Claims carry `roles` already so that role checks and OpenID Connect issuers can be added
//! without changing issued tokens. Tokens are secrets: no type here prints one in `Debug`.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Issuer name of tokens minted by this server.
pub const LOCAL_ISSUER: &str = "sandpool-local";
/// Audiences accepted by default: the one the Azure clients request, and Semantic Kernel's
/// legacy one.
pub const DEFAULT_AUDIENCES: &[&str] = &["https://dynamicsessions.io", "https://acasessions.io"];
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY: Duration = Duration::from_secs(60);
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
}

/// Why a token was refused. Messages are safe to return to the client and never contain the
/// token itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing Authorization header; send 'Authorization: Bearer <token>' (the server's operator can mint one with 'sandpool token issue')")]
    Missing,
    #[error("the Authorization header must be 'Bearer <token>'")]
    NotBearer,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("the bearer token has expired")]
    Expired,
    #[error("the bearer token is not valid yet")]
    NotYetValid,
    #[error("the bearer token's signature does not verify; it was not issued by this server")]
    BadSignature,
    #[error("the bearer token uses an unsupported signing algorithm; this server issues EdDSA tokens")]
    UnsupportedAlgorithm,
    #[error("the bearer token was issued by an issuer this server does not trust")]
    WrongIssuer,
    #[error("the bearer token's audience is not accepted (expected one of {0})")]
    WrongAudience(String),
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

/// The server's own token issuer.
pub struct LocalIssuer {
    key_id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    audiences: Vec<String>,
    /// Tokens whose signature already verified, with their claims. A client sends the same
    /// token with every request; checking an Ed25519 signature each time would be a large
    /// part of a request's cost. Times are still checked on every use.
    verified: std::sync::Mutex<std::collections::HashMap<String, Claims>>,
}

/// Verified tokens remembered at most; the cache is emptied when full.
const VERIFIED_CACHE: usize = 4096;

impl fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIssuer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl LocalIssuer {
    /// Loads the signing key from `dir`, creating the directory and a new key on first use.
    pub fn load_or_create(dir: &Path) -> Result<LocalIssuer, KeyError> {
        let io = |step| move |source| KeyError::Io { step, path: dir.to_owned(), source };
        fs::create_dir_all(dir).map_err(io("create"))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict"))?;
        let path = dir.join(KEY_FILE);
        let key = match fs::read_to_string(&path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::Invalid { path: path.clone() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(&path)?,
            Err(source) => return Err(KeyError::Io { step: "read", path, source }),
        };
        Ok(LocalIssuer::from_key(&key))
    }

    fn from_key(key: &SigningKey) -> LocalIssuer {
        let der = key.to_pkcs8_der().expect("an Ed25519 key encodes");
        let public = key.verifying_key().to_bytes();
        let key_id = hex::encode(&Sha256::digest(public)[..8]);
        LocalIssuer {
            key_id,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_der(&public),
            audiences: DEFAULT_AUDIENCES.iter().map(|s| s.to_string()).collect(),
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Mints a token for `subject`, valid for `ttl` from now.
    pub fn issue(&self, subject: &str, ttl: Duration, roles: &[&str]) -> String {
        let now = unix_now();
        let claims = Claims {
            iss: LOCAL_ISSUER.to_owned(),
            sub: subject.to_owned(),
            aud: self.audiences[0].clone(),
            iat: now,
            nbf: now,
            exp: now + ttl.as_secs().max(1),
            jti: uuid::Uuid::new_v4().to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("signing with a valid key cannot fail")
    }

    /// Checks an `Authorization` header value and returns the token's claims.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Claims, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        self.verify(token.trim())
    }

    /// Checks a bare token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let cached = self.verified.lock().expect("token cache lock").get(token).cloned();
        if let Some(claims) = cached {
            let now = unix_now();
            if now > claims.exp + LEEWAY.as_secs() {
                self.verified.lock().expect("token cache lock").remove(token);
                return Err(AuthError::Expired);
            }
            if now + LEEWAY.as_secs() < claims.nbf {
                return Err(AuthError::NotYetValid);
            }
            return Ok(claims);
        }
        let claims = self.verify_signed(token)?;
        let mut verified = self.verified.lock().expect("token cache lock");
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    fn verify_signed(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&self.audiences);
        validation.set_issuer(&[LOCAL_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation) {
            Ok(data) => Ok(data.claims),
            Err(err) => Err(match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience(self.audiences.join(", ")),
                ErrorKind::InvalidAlgorithm => AuthError::UnsupportedAlgorithm,
                _ => AuthError::Malformed,
            }),
        }
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

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn issuer() -> (tempfile::TempDir, LocalIssuer) {
        let dir = tempfile::tempdir().unwrap();
        let issuer = LocalIssuer::load_or_create(&dir.path().join("keys")).unwrap();
        (dir, issuer)
    }

    #[test]
    fn a_fresh_token_verifies_and_carries_its_claims() {
        let (_dir, issuer) = issuer();
        let token = issuer.issue("ci", Duration::from_secs(600), &["executor"]);
        let claims = issuer.verify_header(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!((claims.sub.as_str(), claims.aud.as_str()), ("ci", "https://dynamicsessions.io"));
        assert_eq!(claims.roles, vec!["executor"]);
        assert!(issuer.verify_header(Some(&format!("bearer  {token} "))).is_ok());
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let (_dir, issuer) = issuer();
        let now = unix_now();
        let claims = Claims {
            iss: LOCAL_ISSUER.into(),
            sub: "x".into(),
            aud: DEFAULT_AUDIENCES[0].into(),
            iat: now,
            nbf: now,
            exp: now + 600,
            jti: "j".into(),
            roles: vec![],
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &issuer.encoding).unwrap();
        assert!(issuer.verify(&token).is_ok());
        // Pretend time passed: the remembered claims expire like the token does.
        issuer.verified.lock().unwrap().get_mut(&token).unwrap().exp = now - 3600;
        assert_eq!(issuer.verify(&token), Err(AuthError::Expired));
        // A tampered copy is never taken from the cache.
        let tampered = format!("{}x", &token[..token.len() - 1]);
        assert!(issuer.verify(&tampered).is_err());
    }

    #[test]
    fn the_key_persists_and_is_private() {
        let (dir, issuer) = issuer();
        let token = issuer.issue("ci", Duration::from_secs(600), &[]);
        let again = LocalIssuer::load_or_create(&dir.path().join("keys")).unwrap();
        assert!(again.verify(&token).is_ok());
        let mode = fs::metadata(dir.path().join("keys").join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn foreign_expired_and_malformed_tokens_are_refused() {
        let (_dir, issuer) = issuer();
        let (_other_dir, other) = self::issuer();
        let foreign = other.issue("x", Duration::from_secs(600), &[]);
        assert_eq!(issuer.verify(&foreign), Err(AuthError::BadSignature));
        assert_eq!(issuer.verify_header(None), Err(AuthError::Missing));
        assert_eq!(issuer.verify_header(Some("Basic abc")), Err(AuthError::NotBearer));
        assert_eq!(issuer.verify_header(Some("Bearer")), Err(AuthError::NotBearer));
        assert_eq!(issuer.verify("not-a-jwt"), Err(AuthError::Malformed));

        // An expired token, signed by the right key.
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
        };
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &issuer.encoding).unwrap();
        assert_eq!(issuer.verify(&expired), Err(AuthError::Expired));

        let wrong_audience = Claims { aud: "https://management.azure.com".into(), exp: now + 600, ..claims.clone() };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &wrong_audience, &issuer.encoding).unwrap();
        assert!(matches!(issuer.verify(&token), Err(AuthError::WrongAudience(_))));

        let wrong_issuer = Claims { iss: "someone-else".into(), exp: now + 600, ..claims.clone() };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &wrong_issuer, &issuer.encoding).unwrap();
        assert_eq!(issuer.verify(&token), Err(AuthError::WrongIssuer));

        let future = Claims { nbf: now + 3600, exp: now + 7200, ..claims.clone() };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &future, &issuer.encoding).unwrap();
        assert_eq!(issuer.verify(&token), Err(AuthError::NotYetValid));

        // alg "none" with the claims of a valid token.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let valid = Claims { exp: now + 600, ..claims };
        let unsigned = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), b64.encode(serde_json::to_vec(&valid).unwrap()));
        assert!(issuer.verify(&unsigned).is_err());
        // An HMAC token "signed" with the public key must not pass either.
        let hs = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &valid, &EncodingKey::from_secret(b"guess")).unwrap();
        assert_eq!(issuer.verify(&hs), Err(AuthError::UnsupportedAlgorithm));
    }
}
