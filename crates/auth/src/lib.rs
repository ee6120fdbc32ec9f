//! Authentication and authorisation: who sent a request, and what they may do.
//!
//! A bearer token is one of:
//! - a JWT from the server's own issuer ([`local`]: EdDSA, key in the state directory, minted
//!   by `sandpool token issue`);
//! - a JWT from a configured OpenID Connect issuer ([`oidc`]: discovery, cached JWKS, key
//!   rotation);
//! - a static API key ([`api_key`], `spk_...`, configured as a SHA-256 hash).
//!
//! The token's `iss` picks the issuer; every check (signature, algorithm, expiry and
//! not-before with [`LEEWAY`] for clock skew, issuer, audience) must pass. The result is a
//! [`Principal`] whose roles and identifier scope the API checks per operation
//! ([`Principal::authorize`]). Tokens are secrets: nothing here logs or prints one.

pub mod api_key;
pub mod local;
pub mod oidc;
pub mod principal;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub use api_key::{ApiKeyEntry, ApiKeys, API_KEY_PREFIX};
pub use local::{Claims, Grant, KeyError, LocalIssuer, LOCAL_ISSUER};
pub use oidc::{OidcIssuer, OidcSettings};
pub use principal::{Forbidden, IdentifierScope, Principal, Role};

/// Audiences accepted by default: the one the Azure clients request, and Semantic Kernel's
/// legacy one.
pub const DEFAULT_AUDIENCES: &[&str] = &["https://dynamicsessions.io", "https://acasessions.io"];
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// Verified tokens remembered at most; the cache is emptied when full.
const VERIFIED_CACHE: usize = 4096;
/// How long a verified token is trusted without checking its signature again (so a key the
/// issuer withdrew stops working within this time).
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Why a request is not authenticated (HTTP 401, or 503 for [`AuthError::IssuerUnavailable`]).
/// Messages are safe to return to the client and never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing Authorization header; send 'Authorization: Bearer <token>' (the server's operator can mint one with 'sandpool token issue')")]
    Missing,
    #[error("the Authorization header must be 'Bearer <token>'")]
    NotBearer,
    #[error("the bearer token is not a well-formed JWT or API key")]
    Malformed,
    #[error("the API key is not known to this server")]
    UnknownApiKey,
    #[error("the bearer token has expired")]
    Expired,
    #[error("the bearer token is not valid yet")]
    NotYetValid,
    #[error("the bearer token's signature does not verify")]
    BadSignature,
    #[error("the bearer token names a signing key its issuer does not publish")]
    UnknownKey,
    #[error("the bearer token uses an unsupported signing algorithm (only asymmetric algorithms are accepted)")]
    UnsupportedAlgorithm,
    #[error("the bearer token was issued by an issuer this server does not trust")]
    WrongIssuer,
    #[error("the bearer token's audience is not accepted (expected one of {0})")]
    WrongAudience(String),
    #[error("cannot fetch the signing keys of the token's issuer {0}; try again shortly")]
    IssuerUnavailable(String),
    #[error("the bearer token's '{0}' claim must be a string")]
    BadClaim(&'static str),
}

/// A token whose checks passed, with the times that still matter when it is reused.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub principal: Principal,
    pub nbf: u64,
    pub exp: u64,
}

/// The authentication part of the configuration.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub audiences: Vec<String>,
    /// Accept tokens of the server's own issuer.
    pub local_issuer: bool,
    pub oidc: Vec<OidcSettings>,
    pub api_keys: Vec<ApiKeyEntry>,
}

impl Default for AuthSettings {
    fn default() -> AuthSettings {
        AuthSettings {
            audiences: DEFAULT_AUDIENCES.iter().map(|s| s.to_string()).collect(),
            local_issuer: true,
            oidc: Vec::new(),
            api_keys: Vec::new(),
        }
    }
}

/// Checks `Authorization` headers against every configured source.
pub struct Authenticator {
    local: Option<LocalIssuer>,
    oidc: Vec<OidcIssuer>,
    api_keys: ApiKeys,
    /// Tokens whose signature already verified. A client sends the same token with every
    /// request; checking a signature each time would be a large part of a request's cost.
    /// Times are still checked on every use.
    verified: Mutex<HashMap<String, (Verified, Instant)>>,
}

impl Authenticator {
    pub fn new(local: Option<LocalIssuer>, oidc: Vec<OidcIssuer>, api_keys: ApiKeys) -> Authenticator {
        Authenticator { local, oidc, api_keys, verified: Mutex::new(HashMap::new()) }
    }

    pub fn oidc_issuers(&self) -> &[OidcIssuer] {
        &self.oidc
    }

    /// Checks an `Authorization` header value and returns the caller.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        self.authenticate_token(token.trim()).await
    }

    /// Checks a bare token.
    pub async fn authenticate_token(&self, token: &str) -> Result<Principal, AuthError> {
        if token.starts_with(API_KEY_PREFIX) {
            return self.api_keys.lookup(token).ok_or(AuthError::UnknownApiKey);
        }
        let cached = self.verified.lock().expect("token cache lock").get(token).cloned();
        if let Some((verified, at)) = cached {
            if at.elapsed() < VERIFIED_FOR {
                check_times(&verified)?;
                return Ok(verified.principal);
            }
        }
        let verified = self.verify(token).await?;
        let mut cache = self.verified.lock().expect("token cache lock");
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(token.to_owned(), (verified.clone(), Instant::now()));
        Ok(verified.principal)
    }

    async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        // The issuer claim only picks whose keys to check the token with; nothing else of it
        // is trusted before the signature verified.
        let issuer = unverified_issuer(token).ok_or(AuthError::Malformed)?;
        if issuer == LOCAL_ISSUER {
            if let Some(local) = &self.local {
                return local.verify(token, &header);
            }
        }
        match self.oidc.iter().find(|oidc| oidc.issuer() == issuer) {
            Some(oidc) => oidc.verify(token, &header).await,
            None => Err(AuthError::WrongIssuer),
        }
    }
}

/// Expiry and not-before of a token verified earlier, against the clock now.
fn check_times(verified: &Verified) -> Result<(), AuthError> {
    let now = unix_now();
    if now > verified.exp + LEEWAY.as_secs() {
        return Err(AuthError::Expired);
    }
    if now + LEEWAY.as_secs() < verified.nbf {
        return Err(AuthError::NotYetValid);
    }
    Ok(())
}

/// The `iss` claim of a JWT, read without verifying anything.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// Maps a jsonwebtoken error to ours.
pub(crate) fn jwt_error(err: &jsonwebtoken::errors::Error, audiences: &[String]) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience(audiences.join(", ")),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::UnsupportedAlgorithm,
        _ => AuthError::Malformed,
    }
}

/// Installs ring as the process's TLS crypto provider. reqwest is built without one of its
/// own (the default, aws-lc, needs a C toolchain with cmake), so every process that builds an
/// HTTP client calls this first. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> (tempfile::TempDir, Authenticator, LocalIssuer) {
        let dir = tempfile::tempdir().unwrap();
        let audiences = AuthSettings::default().audiences;
        let server = LocalIssuer::load_or_create(&dir.path().join("keys"), &audiences).unwrap();
        let cli = LocalIssuer::load_or_create(&dir.path().join("keys"), &audiences).unwrap();
        let (key, hash) = api_key::generate().unwrap();
        std::fs::write(dir.path().join("api-key"), key).unwrap();
        let keys =
            ApiKeys::new(vec![ApiKeyEntry { name: "ci".into(), sha256: hash, roles: vec![Role::Reader], scope: IdentifierScope::Any }])
                .unwrap();
        (dir, Authenticator::new(Some(server), Vec::new(), keys), cli)
    }

    fn grant(ttl: Duration) -> Grant {
        Grant { subject: "ci".into(), ttl, roles: vec![Role::Executor], scope: IdentifierScope::Any }
    }

    #[tokio::test]
    async fn headers_are_checked_and_tokens_routed_by_issuer() {
        let (dir, auth, cli) = authenticator();
        let token = cli.issue(&grant(Duration::from_secs(600)));
        let principal = auth.authenticate(Some(&format!("bearer  {token} "))).await.unwrap();
        assert_eq!((principal.issuer.as_str(), principal.roles.as_slice()), (LOCAL_ISSUER, &[Role::Executor][..]));
        assert_eq!(auth.authenticate(None).await, Err(AuthError::Missing));
        assert_eq!(auth.authenticate(Some("Basic abc")).await, Err(AuthError::NotBearer));
        assert_eq!(auth.authenticate(Some("Bearer")).await, Err(AuthError::NotBearer));
        assert_eq!(auth.authenticate_token("not-a-jwt").await, Err(AuthError::Malformed));
        let key = std::fs::read_to_string(dir.path().join("api-key")).unwrap();
        assert_eq!(auth.authenticate_token(&key).await.unwrap().roles, vec![Role::Reader]);
        assert_eq!(auth.authenticate_token("spk_guess").await, Err(AuthError::UnknownApiKey));
        // A token naming an issuer nobody configured.
        let foreign = token.replace(&token.split('.').nth(1).unwrap().to_string(), &{
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"iss":"https://elsewhere","sub":"x","aud":"a","exp":9999999999}"#)
        });
        assert_eq!(auth.authenticate_token(&foreign).await, Err(AuthError::WrongIssuer));
    }

    #[tokio::test]
    async fn a_remembered_token_still_expires_and_a_tampered_copy_is_not_remembered() {
        let (_dir, auth, cli) = authenticator();
        let token = cli.issue(&grant(Duration::from_secs(600)));
        assert!(auth.authenticate_token(&token).await.is_ok());
        // Pretend time passed: the remembered claims expire like the token does.
        auth.verified.lock().unwrap().get_mut(&token).unwrap().0.exp = unix_now() - 3600;
        assert_eq!(auth.authenticate_token(&token).await, Err(AuthError::Expired));
        // Change a character inside the signature (the last one may only carry padding bits).
        let at = token.len() - 10;
        let replacement = if &token[at..=at] == "x" { "y" } else { "x" };
        let tampered = format!("{}{replacement}{}", &token[..at], &token[at + 1..]);
        assert!(auth.authenticate_token(&tampered).await.is_err());
    }
}
