"""Pool management, end to end: a real sandpool server of its own (one PythonLTS pool "main"
from its config file) is driven through the management API, `Microsoft.App/sessionPools`
resources under `/pools/{name}` and the Azure Resource Manager path, and through
`sandpool apply`; every pool made is then used through the data plane.

What a user would notice is checked: only contributors manage pools; resources look like
Azure's (and never show a secret's value); a PythonLTS pool and a CustomContainer pool (the
project's test app from an OCI layout, with a secret in its environment) are created, used,
changed and deleted; an identical PUT changes nothing; `whatIf` plans and changes nothing;
a template change (PUT or PATCH) keeps allocated sessions with their interpreter state and
files while new identifiers get the new template; broken definitions are refused with 400
naming the mistake, pools that cannot start with 422 and nothing changed; pools made through
the API survive a restart, config pools are re-applied at start and deleted once the config
file no longer lists them; `sandpool apply` plans (`--dry-run`), creates, changes and
deletes, keeps other pools with `--keep-others`, and is idempotent. The real Azure SDK
(`azure-mgmt-appcontainers`) creates, reads, lists and updates a pool.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

import oci_images
from conftest import SandpoolServer
from e2e_support import RUNTIME_DIR, SANDPOOL_BIN, new_id, wait_until

NEW = "2025-02-02-preview"
LEGACY = "2024-02-02-preview"
ARM_API_VERSION = "2025-10-02-preview"

# Unique per run, so finding it anywhere can only be a leak.
SECRET = f"pool-secret-{uuid.uuid4().hex}"
APPLY_SECRET = f"apply-secret-{uuid.uuid4().hex}"

# Config pools. No preloaded modules: the zygotes start in a moment, and a template change
# that adds one is visible from inside a session.
CONFIG = """\
[runtime]
dir = "{runtime_dir}"

[[pools]]
name = "{pool}"
max_concurrent_sessions = 5
ready_session_instances = {ready}
cooldown_period_in_seconds = 300
execution_timeout_in_seconds = 30
preload_modules = []
"""


def write_config(path: Path, pool: str, ready: int) -> Path:
    path.write_text(CONFIG.format(runtime_dir=RUNTIME_DIR, pool=pool, ready=ready))
    return path


def python_resource(max_sessions: int = 3, ready: int = 0, cooldown: int = 300, preload: list[str] | None = None) -> dict:
    """A PythonLTS `sessionPools` resource as an Azure client would send it."""
    return {
        "location": "westus",
        "properties": {
            "containerType": "PythonLTS",
            "poolManagementType": "Dynamic",
            "scaleConfiguration": {"maxConcurrentSessions": max_sessions, "readySessionInstances": ready},
            "dynamicPoolConfiguration": {"lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": cooldown}},
            "sessionNetworkConfiguration": {"status": "EgressDisabled"},
            "sandpoolSettings": {"executionTimeoutInSeconds": 30, "preloadModules": preload if preload is not None else []},
        },
    }


def container_resource(image: str, setting: str = "one") -> dict:
    """A CustomContainer resource running the test app, with a secret in its environment."""
    return {
        "location": "westus",
        "properties": {
            "containerType": "CustomContainer",
            "scaleConfiguration": {"maxConcurrentSessions": 4, "readySessionInstances": 1},
            "dynamicPoolConfiguration": {"lifecycleConfiguration": {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 300}},
            "secrets": [{"name": "apitoken", "value": SECRET}],
            "customContainerTemplate": {
                "containers": [
                    {
                        "name": "app",
                        "image": image,
                        "env": [{"name": "API_TOKEN", "secretRef": "apitoken"}, {"name": "POOL_SETTING", "value": setting}],
                        "resources": {"cpu": 0.5, "memory": "256Mi"},
                    }
                ],
                "ingress": {"targetPort": 8080},
            },
            "sandpoolSettings": {"resources": {"dataDirSize": "16Mi"}},
        },
    }


@dataclass
class Management:
    work: Path
    server: SandpoolServer
    layout: Path
    contributor: str = ""
    executor: str = ""
    reader: str = ""
    restarts: int = 0
    # (pool, identifier) of every session a test used, deleted after the test.
    used: set = field(default_factory=set)

    # -- URLs -------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return self.server.base_url

    def arm(self, name: str | None = None, sub: str = "sub", rg: str = "rg") -> str:
        url = f"{self.base}/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.App/sessionPools"
        return url if name is None else f"{url}/{name}"

    def short(self, name: str | None = None) -> str:
        return f"{self.base}/pools" if name is None else f"{self.base}/pools/{name}"

    @property
    def image(self) -> str:
        return f"oci:{self.layout}:v1"

    # -- management API ---------------------------------------------------------------------

    def call(self, method: str, url: str, *, token: str | None = "contributor", **kwargs) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {self.contributor if token == 'contributor' else token}"
        return requests.request(method, url, headers=headers, timeout=300, **kwargs)

    def get(self, name: str) -> requests.Response:
        return self.call("GET", self.short(name))

    def resource(self, name: str) -> dict:
        resp = self.get(name)
        assert resp.status_code == 200, f"GET {name}: {resp.status_code} {resp.text}"
        return resp.json()

    def put(self, name: str, resource: dict, *, arm: bool = False, what_if: bool = False) -> requests.Response:
        url = self.arm(name) if arm else self.short(name)
        params = {"api-version": ARM_API_VERSION} if arm else {}
        if what_if:
            params["whatIf"] = "true"
        return self.call("PUT", url, params=params, json=resource)

    def plan(self, name: str, resource: dict) -> dict:
        resp = self.put(name, resource, what_if=True)
        assert resp.status_code == 200, f"whatIf {name}: {resp.status_code} {resp.text}"
        return resp.json()

    def patch(self, name: str, changes: dict) -> requests.Response:
        return self.call("PATCH", self.short(name), json=changes)

    def delete(self, name: str) -> requests.Response:
        return self.call("DELETE", self.short(name))

    def listed(self) -> list[dict]:
        resp = self.call("GET", self.short())
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["nextLink"] is None, body
        return body["value"]

    def names(self) -> list[str]:
        return sorted(pool["name"] for pool in self.listed())

    # -- data plane -------------------------------------------------------------------------

    def execute_raw(self, pool: str, identifier: str, code: str, endpoint: str | None = None) -> requests.Response:
        self.used.add((pool, identifier))
        return requests.post(
            f"{endpoint or self.short(pool)}/executions",
            params={"api-version": NEW, "identifier": identifier},
            headers={"Authorization": f"Bearer {self.executor}"},
            json={"codeInputType": "Inline", "executionType": "Synchronous", "code": code, "timeoutInSeconds": 30},
            timeout=120,
        )

    def execute(self, pool: str, identifier: str, code: str, endpoint: str | None = None):
        resp = self.execute_raw(pool, identifier, code, endpoint)
        assert resp.status_code == 200, f"execute in {pool}: {resp.status_code} {resp.text}"
        body = resp.json()
        assert body["status"] == "Succeeded", body
        assert body["result"]["stderr"] == "", body
        return body["result"]["executionResult"]

    def upload(self, pool: str, identifier: str, name: str, data: bytes) -> None:
        resp = requests.post(
            f"{self.short(pool)}/files/upload",
            params={"api-version": LEGACY, "identifier": identifier},
            headers={"Authorization": f"Bearer {self.executor}"},
            files={"file": (name, data, "application/octet-stream")},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text

    def download(self, pool: str, identifier: str, name: str) -> bytes:
        resp = requests.get(
            f"{self.short(pool)}/files/content/{name}",
            params={"api-version": LEGACY, "identifier": identifier},
            headers={"Authorization": f"Bearer {self.executor}"},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        return resp.content

    def app(self, pool: str, path: str, identifier: str) -> dict:
        """A GET of the test app in `identifier`'s container."""
        self.used.add((pool, identifier))
        resp = requests.get(
            f"{self.short(pool)}{path}", params={"identifier": identifier}, headers={"Authorization": f"Bearer {self.executor}"}, timeout=120
        )
        assert resp.status_code == 200, f"{pool}{path}: {resp.status_code} {resp.text}"
        return resp.json()

    def delete_session(self, pool: str, identifier: str) -> None:
        resp = requests.delete(
            f"{self.short(pool)}/session",
            params={"api-version": "2025-10-02-preview", "identifier": identifier},
            headers={"Authorization": f"Bearer {self.executor}"},
            timeout=120,
        )
        assert resp.status_code in (200, 204, 404), resp.text

    def overview(self, pool: str) -> dict:
        """The pool's entry in the dashboard's JSON (ready count, allocated sessions)."""
        resp = self.call("GET", f"{self.base}/dashboard/api/overview")
        assert resp.status_code == 200, resp.text
        return next(p for p in resp.json()["pools"] if p["name"] == pool)

    def ready_count(self, pool: str) -> int:
        return self.overview(pool)["ready"]

    def settled_container_dirs(self, pool: str) -> set[str]:
        """container_dirs() once the pool has its ready container and no session is coming or going."""

        def settled():
            entry = self.overview(pool)
            dirs = self.container_dirs(pool)
            return entry["ready"] == 1 and entry["creating"] == 0 and len(dirs) == entry["ready"] + entry["allocated"] and dirs

        return wait_until(settled, 60, f"{pool} to have its ready container and nothing else in flux")

    def busy_identifiers(self, pool: str) -> list[str]:
        """Identifiers whose session is running a request now."""
        return [s["identifier"] for s in self.overview(pool)["sessions"] if s["inUse"]]

    def container_dirs(self, pool: str) -> set[str]:
        """The session directories of a custom container pool (ready and allocated)."""
        root = self.server.state_dir / "run" / pool / "containers"
        return {p.name for p in root.iterdir()} if root.exists() else set()

    # -- server ------------------------------------------------------------------------------

    def restart(self, config: Path) -> None:
        """SIGTERM, then a new server on the same state dir with `config`."""
        code = self.server.stop()
        assert code == 0, f"sandpool exited with {code} after SIGTERM\n{self.server.stderr_tail(100)}"
        self.restarts += 1
        self.server = SandpoolServer(
            state_dir=self.server.state_dir, config_path=config, stderr_path=self.work / f"sandpool.stderr.{self.restarts}.log"
        )
        self.server.start()

    def apply(self, file: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SANDPOOL_BIN, "apply", "-f", str(file), "--server", self.base, *args],
            capture_output=True,
            text=True,
            timeout=600,
        )

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.work.glob("sandpool.stderr.*.log")))


@pytest.fixture(scope="module")
def mgmt(request):
    binary = oci_images.build_testapp()
    work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-pools-"))
    layout = work / "layout"
    oci_images.write_testapp_layout(layout, binary, tag="v1", env={"GREETING": "from-image"})
    config = write_config(work / "config-main.toml", "main", ready=1)
    server = SandpoolServer(state_dir=work / "state", config_path=config, stderr_path=work / "sandpool.stderr.0.log")
    server.state_dir.mkdir()
    env = Management(work=work, server=server, layout=layout)
    failed_before = request.session.testsfailed
    code = None
    try:
        server.start()
        env.contributor = server.issue_token("contributor")
        env.executor = server.issue_token("executor")
        env.reader = server.issue_token("reader")
        yield env
    finally:
        code = env.server.stop()
        failed = request.session.testsfailed > failed_before
        if code == 0 and not failed and not os.environ.get("SANDPOOL_TEST_KEEP_STATE"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nsandpool state and logs kept in {work}")
    assert code == 0, f"sandpool exited with {code} after SIGTERM\n{env.server.stderr_tail(100)}"


@pytest.fixture(autouse=True)
def delete_used_sessions(mgmt: Management):
    """Keeps the small pools below their maxConcurrentSessions from test to test."""
    yield
    for pool, identifier in sorted(mgmt.used):
        mgmt.delete_session(pool, identifier)
    mgmt.used.clear()


@pytest.fixture(scope="module")
def apipool(mgmt: Management) -> dict:
    """A PythonLTS pool created through the Azure Resource Manager path; the PUT's answer."""
    resp = mgmt.put("apipool", python_resource(), arm=True)
    assert resp.status_code in (200, 201), resp.text
    return {"status": resp.status_code, "body": resp.json()}


@pytest.fixture(scope="module")
def webpool(mgmt: Management) -> dict:
    """A CustomContainer pool (the test app from an OCI layout, with a secret) made through the API."""
    resp = mgmt.put("webpool", container_resource(mgmt.image))
    assert resp.status_code in (200, 201), resp.text
    return {"status": resp.status_code, "body": resp.json(), "text": resp.text}


def assert_error(resp: requests.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    error = resp.json().get("error")
    assert isinstance(error, dict), resp.text
    assert error.get("code") and error.get("message") and error.get("traceId"), error
    assert resp.headers.get("x-ms-error-code") == error["code"], resp.headers
    if code is not None:
        assert error["code"] == code, error
    return error


# -- roles ------------------------------------------------------------------------------------

ROLE_CHECKED = {
    "list-short": ("GET", lambda m: m.short(), None),
    "list-resource-group": ("GET", lambda m: m.arm(), None),
    "list-subscription": ("GET", lambda m: f"{m.base}/subscriptions/sub/providers/Microsoft.App/sessionPools", None),
    "get-short": ("GET", lambda m: m.short("main"), None),
    "get-arm": ("GET", lambda m: m.arm("main"), None),
    "put-short": ("PUT", lambda m: m.short("denied"), python_resource()),
    "put-arm": ("PUT", lambda m: m.arm("denied"), python_resource()),
    "put-what-if": ("PUT", lambda m: m.short("denied") + "?whatIf=true", python_resource()),
    "patch": ("PATCH", lambda m: m.short("main"), {"properties": {"scaleConfiguration": {"readySessionInstances": 0}}}),
    "delete-short": ("DELETE", lambda m: m.short("main"), None),
    "delete-arm": ("DELETE", lambda m: m.arm("main"), None),
}


@pytest.mark.parametrize("operation", sorted(ROLE_CHECKED))
def test_managing_pools_needs_the_contributor_role(mgmt: Management, operation: str):
    method, url, body = ROLE_CHECKED[operation]
    kwargs = {"json": body} if body is not None else {}
    for token in (mgmt.executor, mgmt.reader):
        resp = mgmt.call(method, url(mgmt), token=token, **kwargs)
        error = assert_error(resp, 403, "AuthorizationFailed")
        assert "contributor" in error["message"], error
    assert_error(mgmt.call(method, url(mgmt), token=None, **kwargs), 401, "Unauthorized")
    assert_error(mgmt.call(method, url(mgmt), token="not-a-jwt", **kwargs), 401, "Unauthorized")
    # Nothing was done: main is there and unchanged, "denied" was never created.
    assert mgmt.get("denied").status_code == 404
    main = mgmt.resource("main")
    assert main["properties"]["scaleConfiguration"] == {"maxConcurrentSessions": 5, "readySessionInstances": 1}


# -- reading ----------------------------------------------------------------------------------


def test_list_and_get_show_session_pool_resources(mgmt: Management):
    listings = [
        mgmt.call("GET", mgmt.short()),
        mgmt.call("GET", mgmt.arm(), params={"api-version": ARM_API_VERSION}),
        mgmt.call("GET", mgmt.arm(sub=str(uuid.uuid4()), rg="other-rg"), params={"api-version": "2024-08-02-preview"}),
        mgmt.call("GET", f"{mgmt.base}/subscriptions/sub/providers/Microsoft.App/sessionPools"),
    ]
    for resp in listings:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"value", "nextLink"} and body["nextLink"] is None, body
        assert "main" in [pool["name"] for pool in body["value"]], body

    main = mgmt.resource("main")
    assert mgmt.call("GET", mgmt.arm("main"), params={"api-version": ARM_API_VERSION}).json() == main
    assert main["name"] == "main"
    assert main["type"] == "Microsoft.App/sessionPools"
    assert main["id"].endswith("/providers/Microsoft.App/sessionPools/main"), main["id"]
    props = main["properties"]
    assert props["containerType"] == "PythonLTS"
    assert props["scaleConfiguration"] == {"maxConcurrentSessions": 5, "readySessionInstances": 1}
    assert props["dynamicPoolConfiguration"]["lifecycleConfiguration"] == {"lifecycleType": "Timed", "cooldownPeriodInSeconds": 300}
    assert props["sessionNetworkConfiguration"] == {"status": "EgressDisabled"}
    assert props["poolManagementEndpoint"] == f"{mgmt.base}/pools/main"
    assert props["provisioningState"] == "Succeeded"
    assert props["sandpoolSettings"]["executionTimeoutInSeconds"] == 30
    # The endpoint shown is the pool's data plane.
    identifier = new_id()
    try:
        assert mgmt.execute("main", identifier, "1 + 1", endpoint=props["poolManagementEndpoint"]) == 2
    finally:
        mgmt.delete_session("main", identifier)


def test_an_unknown_pool_is_404(mgmt: Management):
    assert_error(mgmt.get("nosuchpool"), 404, "SessionPoolNotFound")
    assert_error(mgmt.call("GET", mgmt.arm("nosuchpool")), 404, "SessionPoolNotFound")
    assert_error(mgmt.patch("nosuchpool", {"properties": {}}), 404, "SessionPoolNotFound")


# -- a PythonLTS pool ---------------------------------------------------------------------------


def test_a_python_pool_created_through_the_arm_path_is_usable(mgmt: Management, apipool: dict):
    assert apipool["status"] == 201
    created = apipool["body"]
    assert created["name"] == "apipool" and created["type"] == "Microsoft.App/sessionPools"
    props = created["properties"]
    assert props["provisioningState"] == "Succeeded"
    assert props["containerType"] == "PythonLTS"
    assert props["scaleConfiguration"] == {"maxConcurrentSessions": 3, "readySessionInstances": 0}
    assert props["dynamicPoolConfiguration"]["lifecycleConfiguration"]["cooldownPeriodInSeconds"] == 300
    assert props["poolManagementEndpoint"] == f"{mgmt.base}/pools/apipool"
    # Reads back the same under both paths, and is listed.
    assert mgmt.resource("apipool") == created
    assert mgmt.call("GET", mgmt.arm("apipool", sub="another", rg="group")).json() == created
    assert "apipool" in mgmt.names()
    readyz = requests.get(f"{mgmt.base}/readyz", timeout=30).json()
    assert any(p["name"] == "apipool" and p["ready"] for p in readyz["pools"]), readyz

    # The data plane: through the endpoint shown, and the Azure data-plane prefix.
    identifier = new_id()
    try:
        assert mgmt.execute("apipool", identifier, "1 + 1", endpoint=props["poolManagementEndpoint"]) == 2
        azure = f"{mgmt.base}/subscriptions/sub/resourceGroups/rg/sessionPools/apipool"
        assert mgmt.execute("apipool", identifier, "value = 6 * 7\nvalue", endpoint=azure) == 42
        assert mgmt.execute("apipool", identifier, "value") == 42
    finally:
        mgmt.delete_session("apipool", identifier)


def test_an_identical_put_is_a_no_op_and_the_session_keeps_its_variables(mgmt: Management, apipool: dict):
    identifier = new_id()
    try:
        mgmt.execute("apipool", identifier, "x = 41")
        before = mgmt.resource("apipool")
        # The same body again, and what GET shows (read-only fields included) sent back.
        for body in (python_resource(), before):
            assert mgmt.plan("apipool", body) == {"change": "none"}
            resp = mgmt.put("apipool", body, arm=True)
            assert resp.status_code == 200, resp.text
            assert resp.json() == before
        assert mgmt.resource("apipool") == before
        assert mgmt.execute("apipool", identifier, "x + 1") == 42
    finally:
        mgmt.delete_session("apipool", identifier)


def test_what_if_plans_and_changes_nothing(mgmt: Management, apipool: dict):
    before = mgmt.resource("apipool")
    assert mgmt.plan("planned", python_resource()) == {"change": "create"}
    assert mgmt.get("planned").status_code == 404 and "planned" not in mgmt.names()

    assert mgmt.plan("apipool", python_resource()) == {"change": "none"}
    changed = python_resource(max_sessions=4, cooldown=900)
    plan = mgmt.plan("apipool", changed)
    assert plan["change"] == "update", plan
    assert sorted(plan["fields"]) == ["cooldown_period_in_seconds", "max_concurrent_sessions"], plan
    # Also on the ARM path, and for a GET's resource with one property changed.
    resp = mgmt.put("apipool", changed, arm=True, what_if=True)
    assert resp.status_code == 200 and resp.json() == plan, resp.text
    edited = copy.deepcopy(before)
    edited["properties"]["scaleConfiguration"]["readySessionInstances"] = 1
    assert mgmt.plan("apipool", edited) == {"change": "update", "fields": ["ready_session_instances"]}
    # A broken definition is refused by whatIf too.
    broken = python_resource()
    broken["properties"]["scaleConfiguration"]["maxSessions"] = 3
    error = assert_error(mgmt.put("apipool", broken, what_if=True), 400, "InvalidSessionPoolDefinition")
    assert "scaleConfiguration.maxSessions" in error["message"], error

    assert mgmt.resource("apipool") == before


def test_a_template_change_keeps_allocated_sessions_and_new_identifiers_get_the_new_template(mgmt: Management, apipool: dict):
    kept, fresh, later = new_id("kept"), new_id("fresh"), new_id("later")
    payload = os.urandom(4096)
    try:
        mgmt.execute("apipool", kept, "x = 41\nopen('/mnt/data/by-code.txt', 'w').write('written by code')")
        mgmt.upload("apipool", kept, "uploaded.bin", payload)
        assert mgmt.execute("apipool", kept, "import sys\n'colorsys' in sys.modules") is False

        changes = {
            "properties": {
                "scaleConfiguration": {"readySessionInstances": 1},
                "dynamicPoolConfiguration": {"lifecycleConfiguration": {"cooldownPeriodInSeconds": 600}},
                "sandpoolSettings": {"preloadModules": ["colorsys"]},
            }
        }
        resp = mgmt.patch("apipool", changes)
        assert resp.status_code == 200, resp.text
        props = resp.json()["properties"]
        assert props["scaleConfiguration"] == {"maxConcurrentSessions": 3, "readySessionInstances": 1}
        assert props["dynamicPoolConfiguration"]["lifecycleConfiguration"]["cooldownPeriodInSeconds"] == 600
        assert props["sandpoolSettings"]["preloadModules"] == ["colorsys"]
        assert props["sandpoolSettings"]["executionTimeoutInSeconds"] == 30, "a merge patch keeps what it does not name"
        assert props["provisioningState"] == "Succeeded"
        assert mgmt.resource("apipool") == resp.json()

        # The allocated session lives on (old template) with its variables and its files.
        code = "import sys\n(x + 1, open('/mnt/data/by-code.txt').read(), 'colorsys' in sys.modules)"
        assert mgmt.execute("apipool", kept, code) == "(42, 'written by code', False)"
        assert mgmt.download("apipool", kept, "uploaded.bin") == payload
        # A new identifier gets a session of the new template.
        assert mgmt.execute("apipool", fresh, "import sys\n('x' in globals(), 'colorsys' in sys.modules)") == "(False, True)"
        assert mgmt.execute("apipool", fresh, "y = 2\ny * 21") == 42

        # Once the last session of the old template is gone, new sessions still work.
        mgmt.delete_session("apipool", kept)
        assert mgmt.execute("apipool", later, "import sys\n'colorsys' in sys.modules") is True
        assert mgmt.execute("apipool", fresh, "y") == 2

        # A PATCH with a mistake changes nothing.
        before = mgmt.resource("apipool")
        error = assert_error(
            mgmt.patch("apipool", {"properties": {"dynamicPoolConfiguration": {"lifecycleConfiguration": {"cooldown": 5}}}}),
            400,
            "InvalidSessionPoolDefinition",
        )
        assert "cooldown" in error["message"], error
        assert mgmt.resource("apipool") == before
    finally:
        for identifier in (kept, fresh, later):
            mgmt.delete_session("apipool", identifier)
        # Back to the fixture's definition (ready 0), for the tests after this one.
        resp = mgmt.put("apipool", python_resource())
        assert resp.status_code == 200, resp.text


# -- a CustomContainer pool -----------------------------------------------------------------------


def test_a_custom_container_pool_with_a_secret(mgmt: Management, webpool: dict):
    assert webpool["status"] == 201
    props = webpool["body"]["properties"]
    assert props["containerType"] == "CustomContainer"
    assert props["provisioningState"] == "Succeeded"
    assert props["secrets"] == [{"name": "apitoken"}]
    template = props["customContainerTemplate"]
    assert template["ingress"] == {"targetPort": 8080}
    [container] = template["containers"]
    assert container["image"] == mgmt.image
    assert container["env"] == [{"name": "API_TOKEN", "secretRef": "apitoken"}, {"name": "POOL_SETTING", "value": "one"}]
    assert container["resources"] == {"cpu": 0.5, "memory": "256Mi"}
    assert props["sandpoolSettings"]["resources"] == {"dataDirSize": "16Mi"}

    # The secret's value is never shown: not by PUT, GET (both paths) or either list.
    shown = [
        webpool["text"],
        mgmt.get("webpool").text,
        mgmt.call("GET", mgmt.arm("webpool")).text,
        mgmt.call("GET", mgmt.short()).text,
        mgmt.call("GET", mgmt.arm()).text,
    ]
    for text in shown:
        assert "webpool" in text
        assert SECRET not in text

    # The container sees it.
    identifier = new_id()
    env = mgmt.app("webpool", "/env", identifier)
    assert env["API_TOKEN"] == SECRET
    assert env["POOL_SETTING"] == "one"
    assert env["GREETING"] == "from-image"
    assert mgmt.app("webpool", "/counter", identifier)["count"] == 1
    assert mgmt.app("webpool", "/counter", identifier)["count"] == 2
    assert SECRET not in mgmt.logs()


def test_an_identical_put_keeps_the_ready_containers(mgmt: Management, webpool: dict):
    before_dirs = mgmt.settled_container_dirs("webpool")
    resource = mgmt.resource("webpool")
    assert mgmt.plan("webpool", resource) == {"change": "none"}
    resp = mgmt.put("webpool", resource)
    assert resp.status_code == 200, resp.text
    assert resp.json() == resource
    # The pool was not rebuilt: the same containers, the ready one among them.
    assert mgmt.container_dirs("webpool") == before_dirs
    assert mgmt.ready_count("webpool") == 1


def test_a_put_without_the_secret_value_keeps_it_and_keeps_allocated_containers(mgmt: Management, webpool: dict):
    old = new_id("old")
    first = mgmt.app("webpool", "/counter", old)
    assert mgmt.app("webpool", "/env", old)["POOL_SETTING"] == "one"
    before_dirs = mgmt.settled_container_dirs("webpool")

    # What GET shows (secret names only) with one setting changed.
    resource = mgmt.resource("webpool")
    resource["properties"]["customContainerTemplate"]["containers"][0]["env"][1]["value"] = "two"
    assert mgmt.plan("webpool", resource) == {"change": "update", "fields": ["container"]}
    resp = mgmt.put("webpool", resource)
    assert resp.status_code == 200, resp.text
    assert resp.json()["properties"]["secrets"] == [{"name": "apitoken"}]
    assert SECRET not in resp.text

    # The allocated container lives on with the old template and its state...
    again = mgmt.app("webpool", "/counter", old)
    assert (again["instance"], again["count"]) == (first["instance"], first["count"] + 1)
    assert mgmt.app("webpool", "/env", old)["POOL_SETTING"] == "one"
    # ...the ready one was replaced, and new identifiers see the new setting and the kept secret.
    wait_until(lambda: before_dirs - mgmt.container_dirs("webpool"), 30, "the old ready container to go")
    new = mgmt.app("webpool", "/env", new_id("new"))
    assert (new["POOL_SETTING"], new["API_TOKEN"]) == ("two", SECRET)
    # The stored secret is still the one given at creation: the same resource with the
    # value given explicitly plans no change.
    explicit = copy.deepcopy(resource)
    explicit["properties"]["secrets"] = [{"name": "apitoken", "value": SECRET}]
    assert mgmt.plan("webpool", explicit) == {"change": "none"}
    explicit["properties"]["secrets"] = [{"name": "apitoken", "value": SECRET + "-rotated"}]
    assert mgmt.plan("webpool", explicit) == {"change": "update", "fields": ["secrets"]}


# -- refusals -----------------------------------------------------------------------------------


def test_a_pool_that_cannot_start_is_refused_with_422_and_nothing_changes(mgmt: Management, webpool: dict):
    missing = "oci:/nonexistent:v1"
    error = assert_error(mgmt.put("brokenimage", container_resource(missing)), 422, "SessionPoolCannotStart")
    assert "/nonexistent" in error["message"], error
    assert mgmt.get("brokenimage").status_code == 404
    assert "brokenimage" not in mgmt.names()

    # An existing pool asked to switch to a missing image keeps running as it was.
    identifier = new_id()
    instance = mgmt.app("webpool", "/counter", identifier)["instance"]
    before = mgmt.resource("webpool")
    broken = copy.deepcopy(before)
    broken["properties"]["customContainerTemplate"]["containers"][0]["image"] = missing
    assert_error(mgmt.put("webpool", broken), 422, "SessionPoolCannotStart")
    patch = {"properties": {"customContainerTemplate": {"containers": [{"name": "app", "image": missing}], "ingress": {"targetPort": 8080}}}}
    assert_error(mgmt.patch("webpool", patch), 422, "SessionPoolCannotStart")
    assert mgmt.resource("webpool") == before
    after = mgmt.app("webpool", "/counter", identifier)
    assert (after["instance"], after["count"]) == (instance, 2)
    assert mgmt.app("webpool", "/env", new_id())["API_TOKEN"] == SECRET


def _with(path: str, value) -> dict:
    """python_resource() with one more key at a dotted path under properties."""
    resource = python_resource()
    node = resource["properties"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return resource


INVALID = {
    "unknown-scale-key": (_with("scaleConfiguration.maxSessions", 3), "scaleConfiguration.maxSessions"),
    "unknown-lifecycle-key": (_with("dynamicPoolConfiguration.lifecycleConfiguration.coolDown", 3), "lifecycleConfiguration.coolDown"),
    "unknown-property": (_with("colour", "red"), "colour"),
    "unknown-sandpool-setting": (_with("sandpoolSettings.turbo", True), "sandpoolSettings.turbo"),
    "name-mismatch": ({"name": "someotherpool", "properties": {}}, "someotherpool"),
    "ready-above-max": (python_resource(max_sessions=1, ready=2), "ready_session_instances"),
    "manual-pool": (_with("poolManagementType", "Manual"), "Manual"),
    "unknown-secret-ref": (
        {
            "properties": {
                "containerType": "CustomContainer",
                "customContainerTemplate": {
                    "containers": [{"name": "app", "image": "oci:/nonexistent:v1", "env": [{"name": "K", "secretRef": "nope"}]}],
                    "ingress": {"targetPort": 8080},
                },
            }
        },
        "nope",
    ),
    "two-containers": (
        {"properties": {"containerType": "CustomContainer", "customContainerTemplate": {"containers": [{"image": "a"}, {"image": "b"}]}}},
        "exactly one container",
    ),
    "wrong-type": (_with("scaleConfiguration.maxConcurrentSessions", "many"), "max_concurrent_sessions"),
    "nested-unknown-key": (
        {
            "properties": {
                "containerType": "CustomContainer",
                "customContainerTemplate": {
                    "containers": [{"name": "app", "image": "oci:/nonexistent:v1", "env": [{"name": "K", "valu": "v"}]}],
                    "ingress": {"targetPort": 8080},
                },
            }
        },
        "container.env[0]",
    ),
}


def test_a_pool_cannot_change_its_container_type(mgmt: Management):
    assert mgmt.put("kindpool", python_resource(max_sessions=1)).status_code == 201
    try:
        custom = {
            "properties": {
                "containerType": "CustomContainer",
                "customContainerTemplate": {"containers": [{"name": "app", "image": "oci:/nonexistent:v1"}], "ingress": {"targetPort": 8080}},
            }
        }
        error = assert_error(mgmt.put("kindpool", custom), 400, "InvalidSessionPoolDefinition")
        assert "containerType cannot change from PythonLTS to CustomContainer" in error["message"], error
        assert mgmt.get("kindpool").json()["properties"]["containerType"] == "PythonLTS"
    finally:
        assert mgmt.delete("kindpool").status_code == 204


def test_what_if_takes_the_usual_spellings_and_refuses_others(mgmt: Management):
    for spelling in ("whatIf", "whatIf=1", "WHATIF=TRUE"):
        resp = mgmt.call("PUT", mgmt.short("planonly") + "?" + spelling, json=python_resource(max_sessions=1))
        assert resp.status_code == 200 and resp.json() == {"change": "create"}, (spelling, resp.text)
    error = assert_error(mgmt.call("PUT", mgmt.short("planonly") + "?whatIf=maybe", json=python_resource(max_sessions=1)), 400)
    assert "maybe" in error["message"], error
    assert mgmt.get("planonly").status_code == 404, "a plan or a refused request creates nothing"


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_definition_is_refused_with_400_naming_the_mistake(mgmt: Management, case: str):
    resource, named = INVALID[case]
    for arm in (False, True):
        error = assert_error(mgmt.put("invalidpool", resource, arm=arm), 400, "InvalidSessionPoolDefinition")
        assert named in error["message"], error
    assert mgmt.get("invalidpool").status_code == 404


def test_bad_json_and_bad_names_are_refused_with_400(mgmt: Management):
    for body in (b"{not json", b"", b"[1, 2]", b'"a string"'):
        resp = mgmt.call("PUT", mgmt.short("invalidpool"), data=body, headers={"Content-Type": "application/json"})
        assert_error(resp, 400)
    error = assert_error(mgmt.call("PUT", mgmt.short("invalidpool"), data=b"{not json"), 400)
    assert "JSON" in error["message"], error
    for name in ("Bad-Name", "ab", "9lives", "with_underscore"):
        error = assert_error(mgmt.put(name, python_resource()), 400, "InvalidSessionPoolDefinition")
        assert name in error["message"], error
    assert mgmt.get("invalidpool").status_code == 404
    assert "invalidpool" not in mgmt.names()


# -- deleting -------------------------------------------------------------------------------------


def test_delete_answers_200_then_204_and_the_data_plane_forgets_the_pool(mgmt: Management):
    resp = mgmt.put("doomed", python_resource(max_sessions=2))
    assert resp.status_code == 201, resp.text
    identifier = new_id()
    assert mgmt.execute("doomed", identifier, "kept = 'alive'\nkept") == "alive"
    # A cell still running when its pool is deleted ends instead of running on.
    running: dict = {}
    worker = threading.Thread(
        target=lambda: running.update(resp=mgmt.execute_raw("doomed", identifier, "import time\ntime.sleep(25)\n'finished'"))
    )
    worker.start()
    wait_until(lambda: identifier in mgmt.busy_identifiers("doomed"), 30, "the cell to start")

    resp = mgmt.delete("doomed")
    assert resp.status_code == 204, resp.text
    worker.join(60)
    assert not worker.is_alive()
    ended = running["resp"]
    assert ended.status_code != 200 or ended.json().get("status") != "Succeeded", ended.text
    assert "finished" not in ended.text, ended.text
    assert mgmt.delete("doomed").status_code == 204
    assert mgmt.call("DELETE", mgmt.arm("doomed"), params={"api-version": ARM_API_VERSION}).status_code == 204
    assert_error(mgmt.get("doomed"), 404, "SessionPoolNotFound")
    assert "doomed" not in mgmt.names()
    assert_error(mgmt.execute_raw("doomed", identifier, "kept"), 404, "SessionPoolNotFound")
    assert_error(mgmt.execute_raw("doomed", new_id(), "1"), 404, "SessionPoolNotFound")

    # The name can be used again: a fresh pool, with nothing of the old session.
    resp = mgmt.call("PUT", mgmt.arm("doomed"), params={"api-version": ARM_API_VERSION}, json=python_resource(max_sessions=2))
    assert resp.status_code == 201, resp.text
    assert mgmt.execute("doomed", identifier, "'kept' in globals()") is False
    resp = mgmt.call("DELETE", mgmt.arm("doomed"), params={"api-version": ARM_API_VERSION})
    assert resp.status_code == 204, resp.text
    assert mgmt.get("doomed").status_code == 404


# -- restarts -------------------------------------------------------------------------------------


def test_api_pools_survive_a_restart_and_config_pools_are_reapplied(mgmt: Management, apipool: dict, webpool: dict):
    # A change to the config pool through the API lasts until the next start.
    resp = mgmt.patch("main", {"properties": {"dynamicPoolConfiguration": {"lifecycleConfiguration": {"cooldownPeriodInSeconds": 999}}}})
    assert resp.status_code == 200, resp.text
    names = mgmt.names()
    assert {"main", "apipool", "webpool"} <= set(names), names
    resources = {name: mgmt.resource(name) for name in ("apipool", "webpool")}
    old_base = mgmt.base

    mgmt.restart(mgmt.server.config_path)

    assert mgmt.names() == names
    for name, before in resources.items():
        after = mgmt.resource(name)
        assert after["properties"]["poolManagementEndpoint"] == f"{mgmt.base}/pools/{name}"
        assert after["properties"]["provisioningState"] == "Succeeded"
        for props in (before["properties"], after["properties"]):
            props.pop("poolManagementEndpoint")
        assert after == before, f"{name} changed across the restart (old server {old_base})"
    main = mgmt.resource("main")["properties"]
    assert main["dynamicPoolConfiguration"]["lifecycleConfiguration"]["cooldownPeriodInSeconds"] == 300

    identifier = new_id()
    try:
        assert mgmt.execute("apipool", identifier, "1 + 1") == 2
        assert mgmt.execute("main", identifier, "2 + 2") == 4
    finally:
        mgmt.delete_session("apipool", identifier)
        mgmt.delete_session("main", identifier)
    # The secret was kept in the database, and still never shows.
    env = mgmt.app("webpool", "/env", new_id())
    assert (env["API_TOKEN"], env["POOL_SETTING"]) == (SECRET, resources["webpool"]["properties"]["customContainerTemplate"]["containers"][0]["env"][1]["value"])
    assert SECRET not in mgmt.get("webpool").text
    assert SECRET not in mgmt.logs()


def test_a_config_pool_dropped_from_the_config_is_deleted_at_the_next_start(mgmt: Management, apipool: dict, webpool: dict):
    assert {"main", "apipool", "webpool"} <= set(mgmt.names())
    mgmt.restart(write_config(mgmt.work / "config-spare.toml", "spare", ready=0))

    names = mgmt.names()
    assert "main" not in names, names
    assert {"spare", "apipool", "webpool"} <= set(names), names
    assert_error(mgmt.get("main"), 404, "SessionPoolNotFound")
    assert_error(mgmt.execute_raw("main", new_id(), "1"), 404, "SessionPoolNotFound")
    identifier = new_id()
    try:
        assert mgmt.execute("spare", identifier, "3 * 3") == 9
        assert mgmt.execute("apipool", identifier, "5 * 5") == 25
    finally:
        mgmt.delete_session("spare", identifier)
        mgmt.delete_session("apipool", identifier)
    assert mgmt.app("webpool", "/env", new_id())["API_TOKEN"] == SECRET


# -- sandpool apply -----------------------------------------------------------------------------

APPLY_FILE = """\
[[pools]]
name = "{config_pool}"
max_concurrent_sessions = 5
ready_session_instances = 0
cooldown_period_in_seconds = 300
execution_timeout_in_seconds = 30
preload_modules = []

[[pools]]
name = "third"
max_concurrent_sessions = 2
ready_session_instances = 0
cooldown_period_in_seconds = {cooldown}
execution_timeout_in_seconds = 30
preload_modules = []

[[pools]]
name = "appweb"
container_type = "CustomContainer"
max_concurrent_sessions = 2
ready_session_instances = 0

[pools.container]
image = "{image}"
target_port = 8080
env = [{{ name = "API_TOKEN", secret_ref = "apitoken" }}]

[[pools.secrets]]
name = "apitoken"
value = "{secret}"

[pools.resources]
memory = "128Mi"
data_dir_size = "16Mi"
"""


def plan_line(sign: str, name: str, rest: str) -> str:
    return f"  {sign} {name:<24} {rest}"


def test_sandpool_apply(mgmt: Management, apipool: dict, webpool: dict, tmp_path: Path):
    # The server runs the config pool that the file names too (whichever start this is).
    config_pool = "spare" if "spare" in mgmt.names() else "main"
    if config_pool == "main":
        # Run alone (-k): make main match the file.
        assert mgmt.patch("main", {"properties": {"scaleConfiguration": {"readySessionInstances": 0}}}).status_code == 200
    file = tmp_path / "pools.toml"
    write = lambda cooldown, secret: file.write_text(
        APPLY_FILE.format(config_pool=config_pool, cooldown=cooldown, image=mgmt.image, secret=secret)
    )
    write(120, APPLY_SECRET)
    others = sorted(set(mgmt.names()) - {config_pool, "third", "appweb"})
    assert others, "the earlier tests' API pools should be there to be deleted"
    state = ["--state-dir", str(mgmt.server.state_dir)]

    # --dry-run: the plan, and nothing changes.
    before = mgmt.names()
    out = mgmt.apply(file, *state, "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"Plan for {mgmt.base}: 2 to create, 0 to change, {len(others)} to delete.", out.stdout
    assert plan_line(" ", config_pool, "unchanged") in lines, out.stdout
    assert plan_line("+", "third", "create") in lines, out.stdout
    assert plan_line("+", "appweb", "create") in lines, out.stdout
    for name in others:
        assert plan_line("-", name, "delete (its sessions are deleted)") in lines, out.stdout
    assert lines[-1] == "Dry run: nothing was changed.", out.stdout
    assert mgmt.names() == before

    # --keep-others: the two pools are created, the others kept.
    out = mgmt.apply(file, *state, "--keep-others")
    assert out.returncode == 0, out.stderr
    assert f"Plan for {mgmt.base}: 2 to create, 0 to change, 0 to delete." in out.stdout
    assert "creating pool 'third'... done" in out.stdout and "creating pool 'appweb'... done" in out.stdout, out.stdout
    assert not [line for line in out.stdout.splitlines() if line.startswith("  - ")], out.stdout
    assert out.stdout.splitlines()[-1] == "Applied: 2 change(s).", out.stdout
    assert mgmt.names() == sorted(before + ["third", "appweb"])
    third = mgmt.resource("third")["properties"]
    assert third["scaleConfiguration"] == {"maxConcurrentSessions": 2, "readySessionInstances": 0}
    assert third["dynamicPoolConfiguration"]["lifecycleConfiguration"]["cooldownPeriodInSeconds"] == 120
    assert APPLY_SECRET not in mgmt.get("appweb").text
    kept = new_id("kept")
    assert mgmt.execute("third", kept, "state = 'third'\nstate") == "third"
    assert mgmt.app("appweb", "/env", new_id())["API_TOKEN"] == APPLY_SECRET

    # Again: nothing to do (secrets compared by the server, which knows them).
    out = mgmt.apply(file, *state, "--keep-others")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"No changes: the pools of {mgmt.base} match the file (3 pool(s)).", out.stdout

    # A changed cooldown and a rotated secret: planned as changes, others to be deleted.
    rotated = APPLY_SECRET + "-rotated"
    write(180, rotated)
    out = mgmt.apply(file, *state, "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"Plan for {mgmt.base}: 0 to create, 2 to change, {len(others)} to delete.", out.stdout
    assert any(line.startswith(plan_line("~", "third", "change cooldown_period_in_seconds")) for line in lines), out.stdout
    assert any(line.startswith(plan_line("~", "appweb", "change secrets")) for line in lines), out.stdout
    assert rotated not in out.stdout and APPLY_SECRET not in out.stdout
    assert mgmt.names() == sorted(before + ["third", "appweb"])

    out = mgmt.apply(file, *state)
    assert out.returncode == 0, out.stderr
    assert "updating pool 'third'... done" in out.stdout and "updating pool 'appweb'... done" in out.stdout, out.stdout
    for name in others:
        assert f"deleting pool '{name}'... done" in out.stdout, out.stdout
    assert out.stdout.splitlines()[-1] == f"Applied: {2 + len(others)} change(s).", out.stdout
    assert mgmt.names() == sorted([config_pool, "third", "appweb"])
    third = mgmt.resource("third")["properties"]
    assert third["dynamicPoolConfiguration"]["lifecycleConfiguration"]["cooldownPeriodInSeconds"] == 180
    # The session allocated before the change lives on; new containers get the new secret.
    assert mgmt.execute("third", kept, "state") == "third"
    assert mgmt.app("appweb", "/env", new_id())["API_TOKEN"] == rotated
    for name in others:
        assert mgmt.get(name).status_code == 404

    out = mgmt.apply(file, *state)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"No changes: the pools of {mgmt.base} match the file (3 pool(s)).", out.stdout
    mgmt.delete_session("third", kept)


def test_sandpool_apply_refuses_a_broken_file_and_a_token_without_the_role(mgmt: Management, tmp_path: Path):
    before = {pool["name"]: pool for pool in mgmt.listed()}
    broken = tmp_path / "broken.toml"
    broken.write_text('[[pools]]\nname = "brokenfile"\nmax_concurrent_sessions = 2\nmax_sessions = 3\n')
    out = mgmt.apply(broken, "--state-dir", str(mgmt.server.state_dir))
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "max_sessions" in out.stderr, out.stderr
    assert out.stdout == ""

    good = tmp_path / "good.toml"
    good.write_text('[[pools]]\nname = "brokenfile"\nmax_concurrent_sessions = 2\nready_session_instances = 0\n')
    out = mgmt.apply(good, "--token", mgmt.executor)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "403" in out.stderr, out.stderr

    assert {pool["name"]: pool for pool in mgmt.listed()} == before


# -- the Azure SDK ------------------------------------------------------------------------------


class StaticTokenCredential:
    """An azure-core TokenCredential handing out a sandpool token."""

    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture(scope="module")
def arm_client(mgmt: Management):
    appcontainers = pytest.importorskip("azure.mgmt.appcontainers")

    def client():
        # Built per use: the server's port changes when a test restarts it.
        return appcontainers.ContainerAppsAPIClient(
            StaticTokenCredential(mgmt.contributor), subscription_id="local", base_url=mgmt.base
        )

    return client


# The SDK refuses to send a bearer token over plain http unless told per call.
PLAIN_HTTP = {"enforce_https": False, "polling_interval": 0.1}


def test_the_azure_sdk_creates_reads_lists_and_updates_a_pool(mgmt: Management, arm_client):
    from azure.core.exceptions import ResourceNotFoundError
    from azure.mgmt.appcontainers import models

    pools = arm_client().container_apps_session_pools
    resource = models.SessionPool(
        location="westus",
        properties=models.SessionPoolProperties(
            container_type="PythonLTS",
            pool_management_type="Dynamic",
            scale_configuration=models.ScaleConfiguration(max_concurrent_sessions=2, ready_session_instances=0),
            dynamic_pool_configuration=models.DynamicPoolConfiguration(
                lifecycle_configuration=models.LifecycleConfiguration(lifecycle_type="Timed", cooldown_period_in_seconds=300)
            ),
            session_network_configuration=models.SessionNetworkConfiguration(status="EgressDisabled"),
        ),
    )
    try:
        created = pools.begin_create_or_update("rg", "sdkpool", resource, **PLAIN_HTTP).result()
        assert created.name == "sdkpool"
        assert created.properties.provisioning_state == "Succeeded"
        endpoint = created.properties.pool_management_endpoint
        assert endpoint == f"{mgmt.base}/pools/sdkpool"

        got = pools.get("rg", "sdkpool", enforce_https=False)
        assert got.properties.container_type == "PythonLTS"
        assert got.properties.scale_configuration.max_concurrent_sessions == 2
        assert got.properties.dynamic_pool_configuration.lifecycle_configuration.cooldown_period_in_seconds == 300
        assert "sdkpool" in [pool.name for pool in pools.list_by_resource_group("rg", enforce_https=False)]
        assert "sdkpool" in [pool.name for pool in pools.list_by_subscription(enforce_https=False)]

        update = models.SessionPoolUpdatableProperties(scale_configuration=models.ScaleConfiguration(max_concurrent_sessions=3))
        updated = pools.begin_update("rg", "sdkpool", update, **PLAIN_HTTP).result()
        assert updated.properties.scale_configuration.max_concurrent_sessions == 3
        assert updated.properties.scale_configuration.ready_session_instances == 0
        assert mgmt.resource("sdkpool")["properties"]["scaleConfiguration"] == {"maxConcurrentSessions": 3, "readySessionInstances": 0}

        identifier = new_id()
        assert mgmt.execute("sdkpool", identifier, "1 + 1", endpoint=endpoint) == 2
        with pytest.raises(ResourceNotFoundError):
            pools.get("rg", "nosdkpool", enforce_https=False)
    finally:
        assert mgmt.delete("sdkpool").status_code == 204


# Azure's sessionPools Delete answers 202 (with Location) or 204 (contract §5.1), and
# azure-mgmt-appcontainers 5.1.0's begin_delete raises on anything else (a 200 included).
def test_the_azure_sdk_deletes_a_pool(mgmt: Management, arm_client):
    assert mgmt.put("sdkgone", python_resource(max_sessions=1)).status_code == 201
    try:
        arm_client().container_apps_session_pools.begin_delete("rg", "sdkgone", **PLAIN_HTTP).result()
    finally:
        assert mgmt.get("sdkgone").status_code == 404 or mgmt.delete("sdkgone").status_code == 204
