"""Plain-HTTP checks with `requests`: both path prefixes reach the pool, and requests without
a valid token are refused with the Azure error envelope."""

from __future__ import annotations

import subprocess
import uuid

import pytest
import requests

from e2e_support import AZURE_PREFIX, POOL_NAME, SANDPOOL_BIN

LEGACY = "2024-02-02-preview"
NEW = "2025-02-02-preview"

# (method, path suffix, api-version, request kwargs) for a few operations of both generations.
OPERATIONS = {
    "legacy-execute": ("POST", "code/execute", LEGACY, {"json": {"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": "1 + 1"}}}),
    "legacy-upload": ("POST", "files/upload", LEGACY, {"files": {"file": ("x.txt", b"data", "application/octet-stream")}}),
    "legacy-list": ("GET", "files", LEGACY, {}),
    "legacy-download": ("GET", "files/content/x.txt", LEGACY, {}),
    "execute": ("POST", "executions", NEW, {"json": {"codeInputType": "Inline", "executionType": "Synchronous", "code": "1 + 1", "timeoutInSeconds": 30}}),
}


@pytest.fixture(params=["pools", "azure"])
def prefix_url(request, base_url) -> str:
    return f"{base_url}/pools/{POOL_NAME}" if request.param == "pools" else f"{base_url}{AZURE_PREFIX}"


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def legacy_execute(url: str, token: str, identifier: str, code: str) -> dict:
    resp = requests.post(
        f"{url}/code/execute",
        params={"api-version": LEGACY, "identifier": identifier},
        headers=auth(token),
        json={"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["properties"]


def session_exists(pool_endpoint: str, token: str, identifier: str) -> bool:
    resp = requests.get(
        f"{pool_endpoint}/session",
        params={"api-version": NEW, "identifier": identifier},
        headers=auth(token),
        timeout=30,
    )
    assert resp.status_code in (200, 404), resp.text
    return resp.status_code == 200


def assert_error_envelope(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, f"{resp.status_code} {resp.text}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    error = body.get("error")
    assert isinstance(error, dict), body
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert resp.headers.get("x-ms-error-code") == error["code"], resp.headers
    return error


def test_readyz_reports_the_pool_ready(base_url):
    resp = requests.get(f"{base_url}/readyz", timeout=30)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ready"
    assert [p["name"] for p in body["pools"] if p["ready"]] == [POOL_NAME]


def test_both_prefixes_reach_the_same_session(base_url, pool_endpoint, token, session_id):
    written = legacy_execute(pool_endpoint, token, session_id, "shared = 'written via /pools'\nshared")
    assert (written["status"], written["result"]) == ("Success", "written via /pools")

    # Any subscription and resource group: the pool is what follows sessionPools/.
    for azure_like in (AZURE_PREFIX, f"/subscriptions/{uuid.uuid4()}/resourceGroups/other-rg/sessionPools/{POOL_NAME}"):
        read = legacy_execute(f"{base_url}{azure_like}", token, session_id, "shared")
        assert (read["status"], read["result"]) == ("Success", "written via /pools")


def test_files_uploaded_under_one_prefix_are_listed_under_the_other(base_url, pool_endpoint, token, session_id):
    resp = requests.post(
        f"{base_url}{AZURE_PREFIX}/files/upload",
        params={"api-version": LEGACY, "identifier": session_id},
        headers=auth(token),
        files={"file": ("hello.txt", b"hello\x00world", "application/octet-stream")},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    uploaded = resp.json()["value"][0]["properties"]
    assert (uploaded["filename"], uploaded["size"]) == ("hello.txt", 11)

    listed = requests.get(
        f"{pool_endpoint}/files", params={"api-version": LEGACY, "identifier": session_id}, headers=auth(token), timeout=60
    )
    assert listed.status_code == 200, listed.text
    assert [(e["properties"]["filename"], e["properties"]["size"]) for e in listed.json()["value"]] == [("hello.txt", 11)]

    content = requests.get(
        f"{pool_endpoint}/files/content/hello.txt",
        params={"api-version": LEGACY, "identifier": session_id},
        headers=auth(token),
        timeout=60,
    )
    assert (content.status_code, content.content) == (200, b"hello\x00world")


def test_new_generation_execute_works_on_both_prefixes(prefix_url, token, session_id):
    resp = requests.post(
        f"{prefix_url}/executions",
        params={"api-version": NEW, "identifier": session_id},
        headers=auth(token),
        json={"codeInputType": "Inline", "executionType": "Synchronous", "code": "print('hi')\n6 * 7", "timeoutInSeconds": 30},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["identifier"] == session_id
    assert body["status"] == "Succeeded"
    assert body["result"]["stdout"] == "hi\n"
    assert body["result"]["stderr"] == ""
    assert body["result"]["executionResult"] == 42


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_request_without_token_gets_401_envelope_and_no_session(prefix_url, pool_endpoint, token, operation):
    method, suffix, api_version, kwargs = OPERATIONS[operation]
    identifier = str(uuid.uuid4())
    resp = requests.request(
        method, f"{prefix_url}/{suffix}", params={"api-version": api_version, "identifier": identifier}, timeout=60, **kwargs
    )
    assert_error_envelope(resp, 401)
    # Refused before anything happened: no session was allocated for the identifier.
    assert not session_exists(pool_endpoint, token, identifier)


def _foreign_token(tmp_path) -> str:
    """A well-formed token signed by a different server's key."""
    other_state = tmp_path / "other-state"
    other_state.mkdir()
    out = subprocess.run(
        [SANDPOOL_BIN, "token", "issue", "--state-dir", str(other_state)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _tampered(token: str) -> str:
    header, claims, signature = token.split(".")
    pos = len(signature) // 2
    flipped = "B" if signature[pos] != "B" else "C"
    return ".".join([header, claims, signature[:pos] + flipped + signature[pos + 1 :]])


@pytest.mark.parametrize("kind", ["garbage", "tampered-signature", "other-servers-key", "basic-scheme", "empty-bearer"])
def test_invalid_credentials_get_401_envelope(kind, pool_endpoint, token, tmp_path):
    header = {
        "garbage": lambda: "Bearer not-a-jwt",
        "tampered-signature": lambda: f"Bearer {_tampered(token)}",
        "other-servers-key": lambda: f"Bearer {_foreign_token(tmp_path)}",
        "basic-scheme": lambda: "Basic dXNlcjpwYXNzd29yZA==",
        "empty-bearer": lambda: "Bearer ",
    }[kind]()
    identifier = str(uuid.uuid4())
    resp = requests.post(
        f"{pool_endpoint}/code/execute",
        params={"api-version": LEGACY, "identifier": identifier},
        headers={"Authorization": header},
        json={"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": "1 + 1"}},
        timeout=60,
    )
    assert_error_envelope(resp, 401)
    assert not session_exists(pool_endpoint, token, identifier)


def test_unknown_pool_gets_404_envelope(base_url, token):
    resp = requests.get(
        f"{base_url}/subscriptions/sub/resourceGroups/rg/sessionPools/no-such-pool/files",
        params={"api-version": LEGACY, "identifier": str(uuid.uuid4())},
        headers=auth(token),
        timeout=60,
    )
    assert_error_envelope(resp, 404)
