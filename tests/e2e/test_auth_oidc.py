"""Bearer-token authentication against an OpenID Connect issuer, end to end.

A second `sandpool serve` is started for this module only, with an `[auth]` section that
trusts a small identity provider served from this process (`http.server` on 127.0.0.1):
discovery documents and a JWK set that the tests edit while the server runs (key rotation).
Every token is made by an independent JWT implementation (PyJWT with `cryptography`), or by
hand for the attacks PyJWT refuses to produce (`alg: none`, HMAC keyed with a public key).

The trusted sources in the server's configuration:
  - `ISSUER`        discovery at {ISSUER}/.well-known/openid-configuration, roles in `roles`,
                    `role_map` {"Sessions.Execute": executor, "Sessions.List": contributor},
                    the default audiences;
  - `KC_ISSUER`     a configured `jwks_uri` (no discovery document is served for it), roles
                    in the dotted claim `realm_access.roles`, its own audience "sandpool-api";
  - `LIAR_ISSUER`   whose discovery document names another issuer (must not be trusted);
  - `DOWN_ISSUER`   on a closed port (its keys can never be fetched);
  - the server's own issuer (`sandpool token issue`) and one API key (role executor).

What each response must be: 401 `Unauthorized` for a token that does not verify, 403
`AuthorizationFailed` for a verified token without the role or outside its identifier
scope, 503 `AuthenticationUnavailable` when the issuer's keys cannot be fetched; always with
the `{"error": {"code", "message", "traceId"}}` envelope and `x-ms-error-code`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from conftest import CONFIG_TEMPLATE, SandpoolServer
from e2e_support import EXECUTION_TIMEOUT_S, POOL_NAME, RUNTIME_DIR, SANDPOOL_BIN

LEGACY = "2024-02-02-preview"
NEW = "2025-02-02-preview"
AUDIENCE = "https://dynamicsessions.io"
OTHER_DEFAULT_AUDIENCE = "https://acasessions.io"
KC_AUDIENCE = "sandpool-api"
# The server's refetch throttle for unknown key ids (oidc::MIN_REFETCH), and how long the
# rotation tests wait for a refetch at most.
MIN_REFETCH_S = 5
REFETCH_WAIT_S = 15

OMIT = object()  # a claim value meaning "leave this claim out"


# -- keys and tokens -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class SigningKey:
    """A private key of the test issuer, its key id and the algorithm it signs with."""

    kid: str
    alg: str
    private: object
    declare_alg: bool = True  # put "alg" into the published JWK

    @classmethod
    def rsa(cls, kid: str, alg: str = "RS256") -> SigningKey:
        return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ed25519(cls, kid: str) -> SigningKey:
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate(), declare_alg=False)

    def jwk(self) -> dict:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig"})
        if self.declare_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict, *, alg: str | None = None, kid: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=alg or self.alg, headers={"kid": kid or self.kid})


def unsigned_token(claims: dict) -> str:
    """`alg: none`: header and claims, empty signature."""
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims)}."


def hs256_token(claims: dict, secret: bytes, kid: str) -> str:
    """HS256 made by hand (PyJWT refuses a PEM public key as an HMAC secret, rightly)."""
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64url_json(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


# -- the identity provider -------------------------------------------------------------------


class IdentityProvider:
    """Discovery documents and a JWK set on 127.0.0.1, editable while the server runs.

    `documents` maps a path to a function returning the JSON to serve (404 otherwise);
    `fetches` records (monotonic time, path) of every GET."""

    def __init__(self) -> None:
        self.documents: dict[str, callable] = {}
        self.fetches: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with provider.lock:
                    provider.fetches.append((time.monotonic(), self.path))
                    make = provider.documents.get(self.path)
                    body = json.dumps(make()).encode() if make else None
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:  # keep pytest's output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-idp", daemon=True)
        self.thread.start()

    def fetch_count(self, path: str) -> int:
        with self.lock:
            return sum(1 for _, p in self.fetches if p == path)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class JwkSet:
    """The keys the issuer publishes (a JWK set), changeable at any time."""

    def __init__(self, *keys: SigningKey, extra: list[dict] | None = None) -> None:
        self.lock = threading.Lock()
        self.keys: list[SigningKey] = list(keys)
        self.extra = list(extra or [])

    def publish(self, key: SigningKey) -> None:
        with self.lock:
            self.keys.append(key)

    def withdraw(self, kid: str) -> None:
        with self.lock:
            self.keys = [key for key in self.keys if key.kid != kid]

    def document(self) -> dict:
        with self.lock:
            return {"keys": [key.jwk() for key in self.keys] + self.extra}


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the server ------------------------------------------------------------------------------

AUTH_CONFIG = """
[auth]
local_issuer = true
audiences = ["{audience}", "{other_audience}"]

[[auth.oidc]]
issuer = "{issuer}"
roles_claim = "roles"
role_map = {{ "Sessions.Execute" = "executor", "Sessions.List" = "contributor" }}

[[auth.oidc]]
issuer = "{kc_issuer}"
jwks_uri = "{jwks_uri}"
audiences = ["{kc_audience}"]
roles_claim = "realm_access.roles"

[[auth.oidc]]
issuer = "{liar_issuer}"

[[auth.oidc]]
issuer = "{down_issuer}"

[[auth.api_keys]]
name = "e2e-ci"
sha256 = "{api_key_sha256}"
roles = ["executor"]
"""


@dataclass
class OidcEnv:
    server: SandpoolServer
    idp: IdentityProvider
    jwks: JwkSet
    keys: dict[str, SigningKey]
    issuer: str
    kc_issuer: str
    liar_issuer: str
    down_issuer: str
    api_key: str
    hmac_secret: bytes  # the "oct" key in the JWK set
    ready_at: float
    # Last time a request may have made the server try to fetch an issuer's keys.
    fetch_attempts: dict[str, float] = field(default_factory=dict)

    @property
    def pool_url(self) -> str:
        return f"{self.server.base_url}/pools/{POOL_NAME}"

    def claims(self, **overrides) -> dict:
        """Claims of a valid executor token from ISSUER; `name=OMIT` leaves a claim out."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": "e2e-user",
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,  # every token string is new, so never a cached one
            "roles": ["executor"],
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not OMIT}

    def token(self, key: str = "rsa", **overrides) -> str:
        return self.keys[key].sign(self.claims(**overrides))

    def local_token(self, *roles: str) -> str:
        """A token from `sandpool token issue` (the server's own issuer)."""
        args = [SANDPOOL_BIN, "token", "issue", "--state-dir", str(self.server.state_dir)]
        for role in roles:
            args += ["--role", role]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"`sandpool token issue` failed: {out.stderr}"
        return out.stdout.strip()


@pytest.fixture(scope="module")
def oidc(request):
    if not os.path.exists(SANDPOOL_BIN):
        pytest.fail(f"sandpool binary not found at {SANDPOOL_BIN}; build it (cargo build) or set SANDPOOL_BIN", pytrace=False)
    keys = {
        "rsa": SigningKey.rsa("rsa-1"),
        "ps": SigningKey.rsa("ps-1", alg="PS256"),
        "ec": SigningKey.ec("ec-1"),
        "ed": SigningKey.ed25519("ed-1"),
    }
    # A symmetric key in the set: a server must never accept HMAC tokens keyed with it.
    hmac_secret = secrets.token_bytes(32)
    jwks = JwkSet(*keys.values(), extra=[{"kty": "oct", "kid": "oct-1", "k": b64url(hmac_secret)}])

    idp = IdentityProvider()
    issuer = f"{idp.base_url}/realm"
    kc_issuer = f"{idp.base_url}/kc"
    liar_issuer = f"{idp.base_url}/liar"
    down_issuer = f"http://127.0.0.1:{closed_port()}/down"
    jwks_uri = f"{issuer}/jwks"
    idp.documents = {
        "/realm/.well-known/openid-configuration": lambda: {
            "issuer": issuer,
            "jwks_uri": jwks_uri,
            "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256", "EdDSA"],
        },
        "/realm/jwks": jwks.document,
        # Claims to be /liar but names /realm as its issuer (an issuer mix-up).
        "/liar/.well-known/openid-configuration": lambda: {"issuer": issuer, "jwks_uri": jwks_uri},
    }

    api_key = "spk_" + b64url(secrets.token_bytes(32))
    work_dir = Path(tempfile.mkdtemp(prefix="sandpool-e2e-oidc-"))
    config_path = work_dir / "config.toml"
    config_path.write_text(
        CONFIG_TEMPLATE.format(runtime_dir=RUNTIME_DIR, pool=POOL_NAME, timeout=EXECUTION_TIMEOUT_S)
        + AUTH_CONFIG.format(
            audience=AUDIENCE,
            other_audience=OTHER_DEFAULT_AUDIENCE,
            issuer=issuer,
            kc_issuer=kc_issuer,
            jwks_uri=jwks_uri,
            kc_audience=KC_AUDIENCE,
            liar_issuer=liar_issuer,
            down_issuer=down_issuer,
            api_key_sha256=hashlib.sha256(api_key.encode()).hexdigest(),
        )
    )
    Path(RUNTIME_DIR).mkdir(parents=True, exist_ok=True)
    server = SandpoolServer(
        state_dir=work_dir / "state", config_path=config_path, stderr_path=work_dir / "sandpool.stderr.log"
    )
    server.state_dir.mkdir()
    failed_before = request.session.testsfailed
    try:
        server.start()
    except BaseException:
        server.stop()
        idp.stop()
        raise
    env = OidcEnv(
        server=server,
        idp=idp,
        jwks=jwks,
        keys=keys,
        issuer=issuer,
        kc_issuer=kc_issuer,
        liar_issuer=liar_issuer,
        down_issuer=down_issuer,
        api_key=api_key,
        hmac_secret=hmac_secret,
        ready_at=time.monotonic(),
    )
    # The server tries every issuer's keys once at start.
    env.fetch_attempts = {name: env.ready_at for name in (issuer, kc_issuer, liar_issuer, down_issuer)}
    yield env
    code = server.stop()
    idp.stop()
    clean = code == 0 and request.session.testsfailed == failed_before
    if clean and not os.environ.get("SANDPOOL_TEST_KEEP_STATE"):
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        print(f"\nsandpool (OIDC) state and log kept in {work_dir}")
    assert code == 0, f"sandpool exited with {code} after SIGTERM\n{server.stderr_tail(100)}"


@pytest.fixture(scope="module")
def admin_token(oidc: OidcEnv) -> str:
    return oidc.local_token("admin")


@pytest.fixture
def new_id(oidc: OidcEnv, admin_token: str):
    """Makes unique session identifiers (`new_id("stem")`); their sessions are deleted after
    the test."""
    made: list[str] = []

    def make(stem: str = "oidc") -> str:
        made.append(f"{stem}-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield make
    for identifier in made:
        resp = requests.delete(
            f"{oidc.pool_url}/session",
            params={"api-version": NEW, "identifier": identifier},
            headers=bearer(admin_token),
            timeout=60,
        )
        assert resp.status_code in (200, 204, 404), f"DELETE session {identifier}: {resp.status_code} {resp.text}"


# -- requests and checks ---------------------------------------------------------------------


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def execute(env: OidcEnv, token: str, identifier: str, code: str = "1+1") -> requests.Response:
    return requests.post(
        f"{env.pool_url}/code/execute",
        params={"api-version": LEGACY, "identifier": identifier},
        headers=bearer(token),
        json={"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}},
        timeout=60,
    )


def list_sessions(env: OidcEnv, token: str) -> requests.Response:
    return requests.get(f"{env.pool_url}/listSessions", params={"api-version": NEW}, headers=bearer(token), timeout=60)


def session_exists(env: OidcEnv, admin_token: str, identifier: str) -> bool:
    resp = requests.get(
        f"{env.pool_url}/session", params={"api-version": NEW, "identifier": identifier}, headers=bearer(admin_token), timeout=30
    )
    assert resp.status_code in (200, 404), resp.text
    return resp.status_code == 200


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def describe(env: OidcEnv, resp: requests.Response) -> str:
    """The request and response, with what the server logged last."""
    log = ANSI_ESCAPE.sub("", env.server.stderr_tail(15))
    return f"{resp.request.method} {resp.url} -> {resp.status_code} {resp.text[:500]}\n--- sandpool stderr (last lines) ---\n{log}"


def expect_executed(env: OidcEnv, resp: requests.Response) -> None:
    """The execute request ran `1+1`."""
    assert resp.status_code == 200, describe(env, resp)
    properties = resp.json()["properties"]
    assert (properties["status"], properties["result"]) == ("Success", 2), properties


def expect_error(env: OidcEnv, resp: requests.Response, status: int, code: str, *, mentions: tuple[str, ...] = ()) -> str:
    """An error response with the Azure envelope; returns its message."""
    assert resp.status_code == status, describe(env, resp)
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    error = resp.json().get("error")
    assert isinstance(error, dict), resp.text
    assert error.get("code") == code, resp.text
    assert resp.headers.get("x-ms-error-code") == code, resp.headers
    assert isinstance(error.get("traceId"), str) and error["traceId"], resp.text
    message = error.get("message")
    assert isinstance(message, str) and message, resp.text
    for text in mentions:
        assert text in message, f"message does not mention {text!r}: {message!r}"
    return message


def expect_refused(env: OidcEnv, admin_token: str, identifier: str, token: str, status: int, code: str, **kw) -> str:
    """Execute with `token` is refused, and no session was created for the identifier."""
    message = expect_error(env, execute(env, token, identifier), status, code, **kw)
    assert not session_exists(env, admin_token, identifier), f"a refused request created session {identifier}"
    return message


def wait_until_refetch_allowed(env: OidcEnv, issuer: str) -> None:
    """Sleeps until the server may try to fetch `issuer`'s keys again (its 5 s throttle)."""
    delay = env.fetch_attempts[issuer] + MIN_REFETCH_S + 0.5 - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- 1. valid tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["rsa", "ps", "ec", "ed"], ids=["RS256", "PS256", "ES256", "EdDSA"])
def test_valid_token_from_the_issuer_executes_code(oidc, new_id, key):
    token = oidc.token(key)
    assert jwt.get_unverified_header(token)["alg"] == oidc.keys[key].alg
    identifier = new_id(key)
    expect_executed(oidc, execute(oidc, token, identifier, "x = 41\n1+1"))
    # The same token again (now from the server's cache of verified tokens) reaches the same session.
    resp = execute(oidc, token, identifier, "x + 1")
    assert resp.status_code == 200, describe(oidc, resp)
    assert resp.json()["properties"]["result"] == 42


@pytest.mark.parametrize(
    "aud", [OTHER_DEFAULT_AUDIENCE, ["https://graph.example", AUDIENCE]], ids=["second-default", "list-containing-one"]
)
def test_other_accepted_audience_forms(oidc, new_id, aud):
    expect_executed(oidc, execute(oidc, oidc.token(aud=aud), new_id("aud")))


def test_token_expired_within_the_clock_skew_leeway_is_accepted(oidc, new_id):
    now = int(time.time())
    expect_executed(oidc, execute(oidc, oidc.token(iat=now - 600, nbf=now - 600, exp=now - 20), new_id("leeway")))


# -- 2. signatures ---------------------------------------------------------------------------


def test_signature_by_an_unpublished_key_is_refused(oidc, new_id, admin_token):
    impostor = SigningKey.rsa(oidc.keys["rsa"].kid)  # same kid as a published key, another key
    expect_refused(oidc, admin_token, new_id("sig"), impostor.sign(oidc.claims()), 401, "Unauthorized", mentions=("signature",))


def test_token_with_altered_claims_is_refused(oidc, new_id, admin_token):
    header, _, signature = oidc.token(roles=["reader"]).split(".")
    elevated = f"{header}.{b64url_json(oidc.claims(roles=['admin']))}.{signature}"
    expect_refused(oidc, admin_token, new_id("altered"), elevated, 401, "Unauthorized", mentions=("signature",))


def test_key_declared_for_one_algorithm_is_not_used_for_another(oidc, new_id, admin_token):
    # rsa-1 is published with "alg": "RS256"; a PS256 signature by the same private key must not pass.
    token = oidc.keys["rsa"].sign(oidc.claims(), alg="PS256")
    expect_refused(oidc, admin_token, new_id("algbind"), token, 401, "Unauthorized")


# -- 3. issuer and audience ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["other-realm", "trailing-slash", "local-issuer-name", "missing"])
def test_wrong_issuer_is_refused(oidc, new_id, admin_token, which):
    iss = {
        "other-realm": f"{oidc.idp.base_url}/other",
        "trailing-slash": f"{oidc.issuer}/",  # issuers compare exactly
        "local-issuer-name": "sandpool-local",  # claims to be the server's own issuer, signed by ours
        "missing": OMIT,
    }[which]
    expect_refused(oidc, admin_token, new_id("iss"), oidc.token(iss=iss), 401, "Unauthorized")


@pytest.mark.parametrize("aud", ["https://management.azure.com", KC_AUDIENCE, OMIT], ids=["other", "other-issuers", "missing"])
def test_wrong_audience_is_refused(oidc, new_id, admin_token, aud):
    message = expect_refused(oidc, admin_token, new_id("aud"), oidc.token(aud=aud), 401, "Unauthorized")
    if aud is not OMIT:
        assert AUDIENCE in message and OTHER_DEFAULT_AUDIENCE in message, message


def test_issuer_with_its_own_audience_and_jwks_uri(oidc, new_id, admin_token):
    """KC_ISSUER: keys from the configured jwks_uri (there is no discovery document for it),
    audience "sandpool-api" only, roles in realm_access.roles."""
    claims = dict(iss=oidc.kc_issuer, aud=KC_AUDIENCE, roles=OMIT, realm_access={"roles": ["executor"]})
    expect_executed(oidc, execute(oidc, oidc.token(**claims), new_id("kc")))
    # The default audiences are not this issuer's.
    message = expect_refused(oidc, admin_token, new_id("kc"), oidc.token(**{**claims, "aud": AUDIENCE}), 401, "Unauthorized")
    assert KC_AUDIENCE in message, message
    # A top-level `roles` claim is not where this issuer's roles are.
    top_level = oidc.token(**{**claims, "realm_access": OMIT, "roles": ["executor"]})
    expect_refused(oidc, admin_token, new_id("kc"), top_level, 403, "AuthorizationFailed")


# -- 4. time ---------------------------------------------------------------------------------


def test_expired_token_is_refused(oidc, new_id, admin_token):
    now = int(time.time())
    token = oidc.token(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    expect_refused(oidc, admin_token, new_id("exp"), token, 401, "Unauthorized", mentions=("expired",))


def test_not_yet_valid_token_is_refused(oidc, new_id, admin_token):
    now = int(time.time())
    token = oidc.token(nbf=now + 3600, exp=now + 7200)
    expect_refused(oidc, admin_token, new_id("nbf"), token, 401, "Unauthorized", mentions=("not valid yet",))


def test_token_without_exp_is_refused(oidc, new_id, admin_token):
    expect_refused(oidc, admin_token, new_id("noexp"), oidc.token(exp=OMIT), 401, "Unauthorized")


# -- 5. algorithm attacks --------------------------------------------------------------------


def test_unsigned_alg_none_token_is_refused(oidc, new_id, admin_token):
    claims = oidc.claims(roles=["admin"])
    expect_refused(oidc, admin_token, new_id("none"), unsigned_token(claims), 401, "Unauthorized")
    # Also with a kid the server knows.
    with_kid = f"{b64url_json({'alg': 'none', 'kid': oidc.keys['rsa'].kid})}.{b64url_json(claims)}."
    expect_refused(oidc, admin_token, new_id("none"), with_kid, 401, "Unauthorized")


def test_hs256_keyed_with_the_public_rsa_key_is_refused(oidc, new_id, admin_token):
    """The classic RS256 -> HS256 confusion: the "secret" is the published public key."""
    key = oidc.keys["rsa"]
    for secret in (key.public_pem(), key.public_pem().strip()):
        token = hs256_token(oidc.claims(roles=["admin"]), secret, key.kid)
        expect_refused(oidc, admin_token, new_id("hs"), token, 401, "Unauthorized")


def test_hs256_with_a_symmetric_key_from_the_jwks_is_refused(oidc, new_id, admin_token):
    """The JWK set holds an "oct" key; its secret must never verify anything."""
    token = jwt.encode(oidc.claims(), oidc.hmac_secret, algorithm="HS256", headers={"kid": "oct-1"})
    expect_refused(oidc, admin_token, new_id("oct"), token, 401, "Unauthorized")


# -- 6. and 7. roles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "roles",
    [OMIT, [], ["reader"], ["contributor"], ["owner", "Sessions.Read"], "reader contributor"],
    ids=["no-claim", "empty", "reader", "contributor", "unknown-values", "string-without-executor"],
)
def test_token_without_the_executor_role_cannot_execute(oidc, new_id, admin_token, roles):
    expect_refused(
        oidc, admin_token, new_id("role"), oidc.token(roles=roles), 403, "AuthorizationFailed", mentions=("'executor'",)
    )


def test_listing_sessions_needs_the_contributor_role(oidc, new_id):
    identifier = new_id("listed")
    expect_executed(oidc, execute(oidc, oidc.token(), identifier))

    expect_error(oidc, list_sessions(oidc, oidc.token()), 403, "AuthorizationFailed", mentions=("'contributor'",))
    expect_error(oidc, list_sessions(oidc, oidc.token(roles=["reader"])), 403, "AuthorizationFailed")

    for roles in (["contributor"], ["Sessions.List"], ["admin"]):  # Sessions.List via role_map
        resp = list_sessions(oidc, oidc.token(roles=roles))
        assert resp.status_code == 200, describe(oidc, resp)
        assert identifier in [s["identifier"] for s in resp.json()["value"]], (roles, resp.text)


def test_admin_can_execute(oidc, new_id):
    expect_executed(oidc, execute(oidc, oidc.token(roles=["admin"]), new_id("admin")))


@pytest.mark.parametrize(
    "roles", [["Sessions.Execute"], "openid Sessions.Execute profile", ["EXECUTOR"]], ids=["mapped", "mapped-in-string", "case"]
)
def test_role_map_and_role_claim_forms(oidc, new_id, roles):
    expect_executed(oidc, execute(oidc, oidc.token(roles=roles), new_id("mapped")))


def test_mapped_role_is_only_the_role_it_maps_to(oidc):
    # Sessions.Execute maps to executor, which does not allow listing sessions.
    expect_error(oidc, list_sessions(oidc, oidc.token(roles=["Sessions.Execute"])), 403, "AuthorizationFailed")


# -- 8. identifier scopes --------------------------------------------------------------------


def test_token_scoped_to_one_identifier(oidc, new_id, admin_token):
    mine = new_id("user-1")
    # Both roles: the refusals below are then due to the scope, not to a missing role.
    token = oidc.token(identifier=mine, roles=["executor", "contributor"])
    expect_executed(oidc, execute(oidc, token, mine))

    for other in (new_id("user-2"), mine + "x", mine[:-1]):
        expect_refused(oidc, admin_token, other, token, 403, "AuthorizationFailed", mentions=(mine,))
    expect_error(oidc, list_sessions(oidc, token), 403, "AuthorizationFailed", mentions=("scoped",))


def test_token_scoped_to_an_identifier_prefix(oidc, new_id, admin_token):
    prefix = f"tenant-{uuid.uuid4().hex[:8]}-"
    token = oidc.token(identifier_prefix=prefix)
    first, second = new_id(prefix[:-1]), new_id(prefix[:-1])  # "{prefix}<random>"
    expect_executed(oidc, execute(oidc, token, first))
    expect_executed(oidc, execute(oidc, token, second))
    for other in (new_id("tenant-other"), prefix[:-1], "x" + first):
        expect_refused(oidc, admin_token, other, token, 403, "AuthorizationFailed", mentions=(prefix,))


# -- 9. key rotation -------------------------------------------------------------------------


def retry_until_accepted(env: OidcEnv, token: str, identifier: str) -> requests.Response:
    """Sends `token` until the server has fetched the keys again and accepts it; meanwhile it
    must answer 401 (key not published, as far as it knows)."""
    deadline = time.monotonic() + REFETCH_WAIT_S
    while True:
        env.fetch_attempts[env.issuer] = time.monotonic()
        resp = execute(env, token, identifier)
        if resp.status_code == 200 or time.monotonic() > deadline:
            return resp
        expect_error(env, resp, 401, "Unauthorized")
        time.sleep(0.5)


def test_key_rotation(oidc, new_id, admin_token):
    jwks_path = "/realm/jwks"
    # A key published after the server fetched the JWK set: an unknown kid makes it fetch again.
    first = SigningKey.rsa(f"rot-{uuid.uuid4().hex[:6]}")
    fetches = oidc.idp.fetch_count(jwks_path)
    oidc.jwks.publish(first)
    expect_executed(oidc, retry_until_accepted(oidc, first.sign(oidc.claims()), new_id("rot")))
    assert oidc.idp.fetch_count(jwks_path) > fetches, "accepted a new key without fetching the JWK set"

    # Rotate: the next key is published and the first withdrawn.
    second = SigningKey.rsa(f"rot-{uuid.uuid4().hex[:6]}")
    fetches = oidc.idp.fetch_count(jwks_path)
    oidc.jwks.publish(second)
    oidc.jwks.withdraw(first.kid)
    expect_executed(oidc, retry_until_accepted(oidc, second.sign(oidc.claims()), new_id("rot")))
    assert oidc.idp.fetch_count(jwks_path) > fetches

    # The server has the new set now: a new token (never seen before) signed by the withdrawn key is refused.
    fresh_old = first.sign(oidc.claims())
    expect_refused(oidc, admin_token, new_id("rot"), fresh_old, 401, "Unauthorized", mentions=("does not publish",))
    # The keys that stayed still work.
    expect_executed(oidc, execute(oidc, oidc.token("ec"), new_id("rot")))


def test_made_up_key_ids_do_not_flood_the_issuer(oidc, new_id, admin_token):
    jwks_path = "/realm/jwks"
    before = oidc.idp.fetch_count(jwks_path)
    started = time.monotonic()
    for _ in range(20):
        forged = SigningKey.ec(f"made-up-{uuid.uuid4().hex[:8]}")
        expect_error(oidc, execute(oidc, forged.sign(oidc.claims()), new_id("flood")), 401, "Unauthorized")
    oidc.fetch_attempts[oidc.issuer] = time.monotonic()
    elapsed = time.monotonic() - started
    assert elapsed < MIN_REFETCH_S, f"the burst took {elapsed:.1f} s; the check below needs it shorter than {MIN_REFETCH_S} s"
    fetched = oidc.idp.fetch_count(jwks_path) - before
    assert fetched <= 1, f"20 tokens with unknown key ids within {elapsed:.1f} s made the server fetch the JWK set {fetched} times"


# -- 10. the server's own issuer and API keys, alongside -------------------------------------


def test_local_issuer_still_works(oidc, new_id, admin_token):
    expect_executed(oidc, execute(oidc, oidc.local_token("executor"), new_id("local")))
    expect_refused(oidc, admin_token, new_id("local"), oidc.local_token("reader"), 403, "AuthorizationFailed")


def test_api_key(oidc, new_id, admin_token):
    expect_executed(oidc, execute(oidc, oidc.api_key, new_id("apikey")))
    expect_error(oidc, list_sessions(oidc, oidc.api_key), 403, "AuthorizationFailed")  # executor only
    for wrong in ("spk_wrong" + oidc.api_key[9:], oidc.api_key + "x", oidc.api_key[:-1]):
        expect_refused(oidc, admin_token, new_id("apikey"), wrong, 401, "Unauthorized", mentions=("API key",))
    # The configured hash is not a key.
    sha = hashlib.sha256(oidc.api_key.encode()).hexdigest()
    expect_refused(oidc, admin_token, new_id("apikey"), sha, 401, "Unauthorized")


# -- 11. issuers whose keys cannot be had ----------------------------------------------------


def test_unreachable_issuer_gets_503(oidc, new_id, admin_token):
    wait_until_refetch_allowed(oidc, oidc.down_issuer)
    oidc.fetch_attempts[oidc.down_issuer] = time.monotonic()
    resp = execute(oidc, oidc.token(iss=oidc.down_issuer), new_id("down"))
    expect_error(oidc, resp, 503, "AuthenticationUnavailable", mentions=(oidc.down_issuer,))
    assert resp.headers.get("retry-after"), resp.headers


def test_discovery_document_naming_another_issuer_is_not_trusted(oidc, new_id, admin_token):
    """/liar's discovery document names /realm as its issuer; its JWKS must not be used, even
    though the token is signed by a key in it."""
    wait_until_refetch_allowed(oidc, oidc.liar_issuer)
    oidc.fetch_attempts[oidc.liar_issuer] = time.monotonic()
    token = oidc.token(iss=oidc.liar_issuer)
    expect_refused(oidc, admin_token, new_id("liar"), token, 503, "AuthenticationUnavailable")


# -- regressions: server bugs this module found (fixed) -------------------------------------


# After one failed fetch of an issuer's keys, further tokens of that issuer within the 5 s
# refetch throttle must still get 503 (retry), not a final and untrue 401 "unknown key".
def test_unreachable_issuer_gets_503_also_right_after_a_failed_fetch(oidc, new_id):
    wait_until_refetch_allowed(oidc, oidc.down_issuer)
    oidc.fetch_attempts[oidc.down_issuer] = time.monotonic()
    for attempt in ("first", "second"):
        resp = execute(oidc, oidc.token(iss=oidc.down_issuer), new_id(f"down-{attempt}"))
        expect_error(oidc, resp, 503, "AuthenticationUnavailable")


# `exp` is a NumericDate, which may be fractional (RFC 7519 §2): such a token must keep working
# when it is served from the verified-token cache.
def test_token_with_a_fractional_exp_keeps_working(oidc, new_id):
    now = time.time()
    token = oidc.token(iat=int(now), nbf=int(now), exp=now + 600.5)
    identifier = new_id("frac")
    expect_executed(oidc, execute(oidc, token, identifier))
    expect_executed(oidc, execute(oidc, token, identifier))


# An `identifier` / `identifier_prefix` claim that is not a string must not leave the token
# unscoped (fail open): it is refused.
@pytest.mark.parametrize(
    "scope", [{"identifier": 12345}, {"identifier": ["user-1"]}, {"identifier_prefix": 7}], ids=["number", "list", "prefix-number"]
)
def test_non_string_identifier_scope_does_not_unscope_the_token(oidc, new_id, admin_token, scope):
    identifier = new_id("victim")
    resp = execute(oidc, oidc.token(**scope), identifier)
    assert resp.status_code in (401, 403), describe(oidc, resp)
    expect_error(oidc, resp, resp.status_code, {401: "Unauthorized", 403: "AuthorizationFailed"}[resp.status_code])
    assert not session_exists(oidc, admin_token, identifier)


# A token without `kid` is checked against every published key of the right type: an Ed25519
# key published without "alg" before the signing RSA key must not get in the way.
def test_token_without_kid_is_checked_against_every_key(oidc, new_id):
    late = SigningKey.rsa(f"late-{uuid.uuid4().hex[:6]}")  # published after ed-1 (no "alg")
    oidc.jwks.publish(late)
    expect_executed(oidc, retry_until_accepted(oidc, late.sign(oidc.claims()), new_id("late")))
    no_kid = jwt.encode(oidc.claims(), late.private, algorithm="RS256")
    assert "kid" not in jwt.get_unverified_header(no_kid)
    expect_executed(oidc, execute(oidc, no_kid, new_id("nokid")))
