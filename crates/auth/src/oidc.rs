//! Tokens from OpenID Connect issuers: discovery, a cached JWKS, key rotation.
//!
//! The discovery document (`{issuer}/.well-known/openid-configuration`, unless a `jwks_uri` is
//! configured) names the JWKS; its keys are cached and fetched again after `refresh`, or when
//! a token names a key id the cache does not hold (a rotation), at most once per
//! [`MIN_REFETCH`] so that tokens with made-up key ids cannot flood the issuer. Only
//! asymmetric algorithms are accepted; a JWK that declares an algorithm is used for that
//! algorithm only.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde_json::Value;

use crate::local::scope_of;
use crate::principal::{Principal, Role};
use crate::{jwt_error, AuthError, Verified, LEEWAY};

/// Shortest time between two fetches of the JWKS triggered by unknown key ids.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);
/// Limit for one request to the issuer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Algorithms accepted from an OIDC issuer: asymmetric ones only (never `none` or HMAC,
/// whose "key" would be public).
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// One trusted issuer, as configured.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// The exact `iss` of its tokens (and of its discovery document).
    pub issuer: String,
    /// Where the keys are; when unset, found through discovery.
    pub jwks_uri: Option<String>,
    pub audiences: Vec<String>,
    /// Dotted path of the claim that holds roles (`roles`, `realm_access.roles`, ...): an array
    /// of strings or a space-separated string.
    pub roles_claim: String,
    /// Claim values that stand for sandpool roles (for example `Sessions.Execute` →
    /// executor); values not in the map are taken as role names.
    pub role_map: HashMap<String, Role>,
    /// How long fetched keys are used before they are fetched again.
    pub refresh: Duration,
}

/// One verification key of the issuer.
struct Key {
    kid: Option<String>,
    /// The algorithm the JWK declares, if any.
    alg: Option<Algorithm>,
    family: KeyFamily,
    decoding: DecodingKey,
}

/// Which algorithms a key's type can verify at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    EllipticCurve,
    Edwards,
}

impl KeyFamily {
    fn of(alg: Algorithm) -> Option<KeyFamily> {
        match alg {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => {
                Some(KeyFamily::Rsa)
            }
            Algorithm::ES256 | Algorithm::ES384 => Some(KeyFamily::EllipticCurve),
            Algorithm::EdDSA => Some(KeyFamily::Edwards),
            _ => None,
        }
    }
}

/// The issuer's keys as last fetched.
struct KeySet {
    keys: Vec<Arc<Key>>,
    fetched_at: Instant,
}

/// A trusted OIDC issuer and its cached keys.
pub struct OidcIssuer {
    settings: OidcSettings,
    http: reqwest::Client,
    keys: RwLock<Option<KeySet>>,
    /// Serialises fetches; holds when the last one was attempted.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl OidcIssuer {
    pub fn new(settings: OidcSettings) -> Result<OidcIssuer, String> {
        check_url(&settings.issuer)?;
        if let Some(uri) = &settings.jwks_uri {
            check_url(uri)?;
        }
        crate::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!("sandpool/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(OidcIssuer { settings, http, keys: RwLock::new(None), fetching: tokio::sync::Mutex::new(None) })
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Fetches the keys now (at start, so the first request does not wait for them).
    pub async fn prefetch(&self) -> Result<(), AuthError> {
        self.refresh(true).await
    }

    /// Verifies a token whose `iss` names this issuer.
    pub(crate) async fn verify(&self, token: &str, header: &Header) -> Result<Verified, AuthError> {
        if !ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let mut candidates = self.candidates(header, false);
        if candidates.is_none() {
            // Unknown key id (a rotation?), stale or missing keys: fetch them again.
            let refreshed = self.refresh(false).await;
            // Keys past their refresh time still verify while the issuer cannot be reached.
            candidates = self.candidates(header, true);
            if candidates.is_none() {
                refreshed?;
                if self.keys.read().expect("keys lock").is_none() {
                    // Never fetched: the last attempt (less than MIN_REFETCH ago) failed.
                    return Err(AuthError::IssuerUnavailable(self.settings.issuer.clone()));
                }
            }
        }
        let keys = candidates.ok_or(AuthError::UnknownKey)?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&self.settings.audiences);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let mut last_error = AuthError::UnknownKey;
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.decoding, &validation) {
                Ok(data) => return self.verified(data.claims),
                Err(err) => {
                    last_error = jwt_error(&err, &self.settings.audiences);
                    // Only a signature mismatch makes another key worth trying.
                    if last_error != AuthError::BadSignature {
                        return Err(last_error);
                    }
                }
            }
        }
        Err(last_error)
    }

    /// The keys that may have signed a token with this header, if the cached keys are fresh
    /// (or `allow_stale`) and hold any.
    fn candidates(&self, header: &Header, allow_stale: bool) -> Option<Vec<Arc<Key>>> {
        let guard = self.keys.read().expect("keys lock");
        let set = guard.as_ref()?;
        if !allow_stale && set.fetched_at.elapsed() > self.settings.refresh {
            return None;
        }
        let family = KeyFamily::of(header.alg)?;
        let keys: Vec<Arc<Key>> = set
            .keys
            .iter()
            .filter(|key| header.kid.is_none() || key.kid == header.kid)
            .filter(|key| key.family == family && key.alg.is_none_or(|alg| alg == header.alg))
            .cloned()
            .collect();
        (!keys.is_empty()).then_some(keys)
    }

    /// Fetches the JWKS again, unless another task just did or the last attempt was less
    /// than [`MIN_REFETCH`] ago (`force` skips the latter check).
    async fn refresh(&self, force: bool) -> Result<(), AuthError> {
        let mut last_attempt = self.fetching.lock().await;
        let fresh = |keys: &RwLock<Option<KeySet>>| {
            keys.read().expect("keys lock").as_ref().is_some_and(|set| set.fetched_at.elapsed() < MIN_REFETCH)
        };
        if !force && (fresh(&self.keys) || last_attempt.is_some_and(|at| at.elapsed() < MIN_REFETCH)) {
            return Ok(());
        }
        *last_attempt = Some(Instant::now());
        let keys = self.fetch_keys().await.map_err(|message| {
            tracing::warn!(issuer = %self.settings.issuer, error = %message, "cannot fetch the issuer's signing keys");
            AuthError::IssuerUnavailable(self.settings.issuer.clone())
        })?;
        tracing::info!(issuer = %self.settings.issuer, keys = keys.len(), "fetched the issuer's signing keys");
        *self.keys.write().expect("keys lock") = Some(KeySet { keys, fetched_at: Instant::now() });
        Ok(())
    }

    async fn fetch_keys(&self) -> Result<Vec<Arc<Key>>, String> {
        let jwks_uri = match &self.settings.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let url = format!("{}/.well-known/openid-configuration", self.settings.issuer.trim_end_matches('/'));
                let document: Value = self.get_json(&url).await?;
                // OpenID Connect Discovery §4.3: the document must name the same issuer.
                if document.get("issuer").and_then(Value::as_str) != Some(self.settings.issuer.as_str()) {
                    return Err(format!("{url} names another issuer than '{}'", self.settings.issuer));
                }
                let uri = document.get("jwks_uri").and_then(Value::as_str).ok_or_else(|| format!("{url} has no jwks_uri"))?;
                check_url(uri)?;
                uri.to_owned()
            }
        };
        let set: Value = self.get_json(&jwks_uri).await?;
        let entries = set.get("keys").and_then(Value::as_array).ok_or_else(|| format!("{jwks_uri} is not a JWK set"))?;
        // One key in a format we do not know must not hide the others.
        let keys: Vec<Arc<Key>> =
            entries.iter().filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok()).filter_map(key_of).collect();
        if keys.is_empty() {
            return Err(format!("{jwks_uri} holds no usable signing key"));
        }
        Ok(keys)
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let response = self.http.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status()));
        }
        response.json().await.map_err(|e| format!("GET {url}: not JSON: {e}"))
    }

    fn verified(&self, claims: serde_json::Map<String, Value>) -> Result<Verified, AuthError> {
        let claims = Value::Object(claims);
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        // A scope claim that is not a string must not silently widen the token to every
        // identifier.
        let scope_claim = |name: &'static str| match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(AuthError::BadClaim(name)),
        };
        let scope = scope_of(scope_claim("identifier")?, scope_claim("identifier_prefix")?);
        let mut roles: Vec<Role> = claim_values(&claims, &self.settings.roles_claim)
            .iter()
            .filter_map(|value| self.settings.role_map.get(value).copied().or_else(|| value.parse().ok()))
            .collect();
        roles.sort();
        roles.dedup();
        // NumericDate may have a fraction (RFC 7519 §2); whole seconds are enough here.
        let number = |name: &str| claims.get(name).and_then(Value::as_f64).map_or(0, |seconds| seconds.max(0.0) as u64);
        Ok(Verified {
            principal: Principal { issuer: self.settings.issuer.clone(), subject: text("sub").unwrap_or_default(), roles, scope },
            nbf: number("nbf"),
            exp: number("exp"),
        })
    }
}

/// The strings at a dotted claim path: an array of strings, or one space-separated string.
fn claim_values(claims: &Value, path: &str) -> Vec<String> {
    let mut node = claims;
    for part in path.split('.') {
        match node.get(part) {
            Some(next) => node = next,
            None => return Vec::new(),
        }
    }
    match node {
        Value::Array(items) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Value::String(text) => text.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// A verification key from a JWK, or `None` for keys we must not or cannot use.
fn key_of(jwk: Jwk) -> Option<Arc<Key>> {
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return None; // symmetric: never from a public key set
    }
    if jwk.common.public_key_use.as_ref().is_some_and(|usage| *usage != jsonwebtoken::jwk::PublicKeyUse::Signature) {
        return None;
    }
    let alg = match &jwk.common.key_algorithm {
        Some(declared) => Some(declared.to_string().parse::<Algorithm>().ok().filter(|alg| ALGORITHMS.contains(alg))?),
        None => None,
    };
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => KeyFamily::EllipticCurve,
        AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Edwards,
        AlgorithmParameters::OctetKey(_) => return None,
    };
    if alg.is_some_and(|alg| KeyFamily::of(alg) != Some(family)) {
        return None; // a key published for an algorithm of another type
    }
    let decoding = DecodingKey::from_jwk(&jwk).ok()?;
    Some(Arc::new(Key { kid: jwk.common.key_id.clone(), alg, family, decoding }))
}

/// Issuer and key URLs must be https, except on loopback (tests, a local identity provider).
fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!("'{url}' must be an https URL (plain http is accepted on loopback only)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_read_from_a_dotted_claim_as_a_list_or_a_string() {
        let claims = serde_json::json!({"roles": ["executor", 3], "realm_access": {"roles": ["reader"]}, "scp": "a b"});
        assert_eq!(claim_values(&claims, "roles"), vec!["executor"]);
        assert_eq!(claim_values(&claims, "realm_access.roles"), vec!["reader"]);
        assert_eq!(claim_values(&claims, "scp"), vec!["a", "b"]);
        assert!(claim_values(&claims, "missing.path").is_empty());
    }

    #[test]
    fn issuer_urls_must_be_https_except_on_loopback() {
        assert!(check_url("https://login.example.com/tenant/v2.0").is_ok());
        assert!(check_url("http://127.0.0.1:8080/").is_ok());
        assert!(check_url("http://localhost/").is_ok());
        assert!(check_url("http://[::1]:9/").is_ok());
        assert!(check_url("http://login.example.com/").unwrap_err().contains("https"));
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn symmetric_and_encryption_keys_are_never_used() {
        let hmac: Jwk = serde_json::from_value(serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"})).unwrap();
        assert!(key_of(hmac).is_none());
        let ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "e"});
        assert!(key_of(serde_json::from_value(ed.clone()).unwrap()).is_some());
        let mut encryption = ed;
        encryption["use"] = "enc".into();
        assert!(key_of(serde_json::from_value(encryption).unwrap()).is_none());
    }
}
