"""Custom container pools, end to end: a real sandpool server runs the project's own test app
(crates/testapp, built static by cargo) as an OCI image, pulled from a real docker-registry
on loopback (with basic auth), read from an OCI layout directory, and from a docker-archive
tarball, under crun and under gVisor (runsc). Requests go through the pool endpoint with an
identifier and reach that identifier's own container.

What a user would notice is checked: per-identifier instances, state kept per session,
isolation between sessions and from the host, egress disabled, probes replacing unhealthy
sessions, `OnContainerExit`, WebSocket and streaming forwarding, the session management
routes answered by sandpool (not the container), and clear errors for a broken pool.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import websocket

import oci_images
from conftest import SandpoolServer
from e2e_support import SANDPOOL_BIN, new_id, wait_until

REGISTRY_USER = ("puller", "pull-secret-pw")
API_TOKEN = "s3cret-token-value"
JOB_MAX_ALIVE_S = 12

CONFIG = """\
[[pools]]
name = "web"
container_type = "CustomContainer"
max_concurrent_sessions = 40
ready_session_instances = 2
cooldown_period_in_seconds = 300
execution_timeout_in_seconds = 20

[pools.container]
image = "{registry}/apps/testapp:v1"
target_port = 8080
env = [
  {{ name = "POOL_SETTING", value = "web" }},
  {{ name = "API_TOKEN", secret_ref = "apitoken" }},
  {{ name = "STARTUP_DELAY_MS", value = "300" }},
]

[pools.container.registry_credentials]
username = "{user}"
password_secret_ref = "registrypassword"

[[pools.container.probes]]
type = "Startup"
http_get = {{ path = "/startup", port = 8080 }}
period_seconds = 1
failure_threshold = 10

[[pools.container.probes]]
type = "Liveness"
http_get = {{ path = "/health", port = 8080 }}
period_seconds = 1
failure_threshold = 2

[[pools.secrets]]
name = "apitoken"
value = "{api_token}"

[[pools.secrets]]
name = "registrypassword"
value = "{password}"

[pools.resources]
cpu = 0.5
memory = "256Mi"
data_dir_size = "64Mi"

[[pools]]
name = "job"
container_type = "CustomContainer"
lifecycle_type = "OnContainerExit"
max_alive_period_in_seconds = {max_alive}
max_concurrent_sessions = 4
ready_session_instances = 1

[pools.container]
image = "oci:{layout}:v1"
target_port = 8080

[pools.resources]
memory = "128Mi"
data_dir_size = "16Mi"

[[pools]]
name = "sandboxed"
container_type = "CustomContainer"
runtime = "runsc"
max_concurrent_sessions = 3
ready_session_instances = 1

[pools.container]
image = "docker-archive:{archive}"
target_port = 8080

[pools.resources]
memory = "256Mi"
data_dir_size = "16Mi"
"""


@dataclass
class Containers:
    server: SandpoolServer
    registry: oci_images.LocalRegistry
    token: str
    contributor: str
    layout: Path

    def url(self, pool: str, path: str) -> str:
        return f"{self.server.base_url}/pools/{pool}{path}"

    def get(self, pool: str, path: str, identifier: str, **kwargs) -> requests.Response:
        params = dict(kwargs.pop("params", {}), identifier=identifier)
        headers = kwargs.pop("headers", None) or self.auth()
        return requests.get(self.url(pool, path), params=params, headers=headers, timeout=60, **kwargs)

    def post(self, pool: str, path: str, identifier: str, **kwargs) -> requests.Response:
        params = dict(kwargs.pop("params", {}), identifier=identifier)
        return requests.post(self.url(pool, path), params=params, headers=self.auth(), timeout=60, **kwargs)

    def auth(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}

    def counter(self, pool: str, identifier: str) -> dict:
        resp = self.get(pool, "/counter", identifier)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def events(self, pool: str, identifier: str) -> list[dict]:
        resp = requests.get(
            self.url(pool, "/events"), params={"identifier": identifier}, headers=self.auth(self.contributor), timeout=30
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["value"]


@pytest.fixture(scope="module")
def containers():
    binary = oci_images.build_testapp()
    work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-containers-"))
    layout = work / "layout"
    oci_images.write_testapp_layout(layout, binary, tag="v1", env={"GREETING": "from-image"})
    archive = work / "testapp.tar"
    oci_images.write_docker_archive(archive, layout, "apps/testapp:v1")
    with oci_images.LocalRegistry(auth=REGISTRY_USER) as registry:
        registry.push(layout, "apps/testapp", "v1")
        config = work / "config.toml"
        config.write_text(
            CONFIG.format(
                registry=registry.host,
                user=REGISTRY_USER[0],
                password=REGISTRY_USER[1],
                api_token=API_TOKEN,
                layout=layout,
                archive=archive,
                max_alive=JOB_MAX_ALIVE_S,
            )
        )
        server = SandpoolServer(state_dir=work / "state", config_path=config, stderr_path=work / "sandpool.stderr.log")
        server.state_dir.mkdir()
        try:
            server.start()
            env = Containers(
                server=server,
                registry=registry,
                token=server.issue_token(),
                contributor=server.issue_token("contributor"),
                layout=layout,
            )
            yield env
        finally:
            code = server.stop()
        assert code == 0, f"sandpool exited with {code}\n{server.stderr_tail(100)}"


# -- routing and state ----------------------------------------------------------------------


def test_each_identifier_reaches_its_own_container_and_keeps_its_state(containers: Containers):
    alice, bob = new_id("alice"), new_id("bob")
    first = containers.counter("web", alice)
    second = containers.counter("web", alice)
    assert (first["count"], second["count"]) == (1, 2)
    assert first["instance"] == second["instance"]
    other = containers.counter("web", bob)
    assert other["count"] == 1 and other["instance"] != first["instance"]
    # The Azure-shaped endpoint reaches the same session.
    azure = f"{containers.server.base_url}/subscriptions/s/resourceGroups/rg/sessionPools/web/counter"
    resp = requests.get(azure, params={"identifier": alice}, headers=containers.auth(), timeout=30)
    assert resp.status_code == 200 and resp.json()["count"] == 3 and resp.json()["instance"] == first["instance"]


def test_sessions_cannot_see_each_others_files_or_processes(containers: Containers):
    alice, bob = new_id("alice"), new_id("bob")
    resp = requests.put(
        containers.url("web", "/files/note.txt"), params={"identifier": alice}, data=b"alice's secret",
        headers=containers.auth(), timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert containers.get("web", "/files/note.txt", alice).content == b"alice's secret"
    assert containers.get("web", "/files/note.txt", bob).status_code == 404
    assert "note.txt" not in containers.get("web", "/ls", bob, params={"dir": "/data"}).json()
    # Each container sees only its own processes (its own PID namespace).
    whoami = containers.get("web", "/whoami", bob).json()
    assert whoami["pids"] == [1], whoami
    # Another container's root filesystem is not reachable through /proc.
    peer = containers.get("web", "/read", bob, params={"path": "/proc/1/root/data/note.txt"})
    assert peer.status_code == 404


def test_nothing_a_session_writes_reaches_the_image_or_the_next_session(containers: Containers):
    alice = new_id("alice")
    assert containers.post("web", "/write", alice, params={"path": "/app/planted"}, data=b"x").status_code == 200
    assert containers.get("web", "/read", alice, params={"path": "/app/planted"}).content == b"x"
    assert requests.delete(containers.url("web", "/session"), params={"identifier": alice}, headers=containers.auth(), timeout=30).status_code in (200, 204)
    assert containers.get("web", "/read", alice, params={"path": "/app/planted"}).status_code == 404
    other = new_id("other")
    assert containers.get("web", "/read", other, params={"path": "/app/planted"}).status_code == 404
    planted = list((containers.server.state_dir / "images").rglob("planted"))
    assert planted == [], f"a session's write reached the unpacked image: {planted}"


def test_the_environment_comes_from_the_image_the_pool_and_its_secrets(containers: Containers):
    env = containers.get("web", "/env", new_id()).json()
    assert env["GREETING"] == "from-image"
    assert env["POOL_SETTING"] == "web"
    assert env["API_TOKEN"] == API_TOKEN
    # The secret is never shown by the server.
    assert API_TOKEN not in containers.server.stderr_tail(10_000)


# -- forwarding -----------------------------------------------------------------------------


def test_methods_headers_query_and_streaming_bodies_pass_through(containers: Containers):
    identifier = new_id()

    def chunks():
        for index in range(50):
            yield f"chunk-{index:03d};".encode() * 100

    resp = requests.post(
        containers.url("web", "/echo"),
        params={"identifier": identifier, "api-version": "2025-02-02-preview", "q": "a b&c"},
        data=chunks(),
        headers={**containers.auth(), "X-Test-Thing": "hello", "Content-Type": "text/plain"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert resp.content == b"".join(chunks())
    assert resp.headers["x-test-thing"] == "hello"
    # The caller's sandpool token is not handed to the container.
    assert resp.headers["x-saw-authorization"] == "no"
    query = resp.headers["x-query"]
    assert f"identifier={identifier}" in query and "api-version=2025-02-02-preview" in query and "q=a+b%26c" in query


def test_a_large_body_streams_both_ways(containers: Containers):
    payload = os.urandom(8 << 20)
    resp = containers.post("web", "/echo", new_id(), params={"buffer": "1"}, data=payload)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.content == payload


def test_websocket_upgrades_pass_through(containers: Containers):
    identifier = new_id()
    url = containers.url("web", f"/ws?identifier={identifier}").replace("http://", "ws://")
    ws = websocket.create_connection(url, header=[f"Authorization: Bearer {containers.token}"], timeout=30)
    try:
        ws.send("hello over the proxy")
        assert ws.recv() == "hello over the proxy"
        ws.send_binary(b"\x00\x01binary\xff")
        assert ws.recv() == b"\x00\x01binary\xff"
    finally:
        ws.close()
    # The WebSocket reached the identifier's own container: its counter is untouched but alive.
    assert containers.counter("web", identifier)["count"] == 1


def test_session_management_routes_are_answered_by_sandpool_not_the_container(containers: Containers):
    identifier = new_id()
    containers.counter("web", identifier)
    session = containers.get("web", "/session", identifier)
    assert session.status_code == 200, session.text
    assert session.json()["identifier"] == identifier
    listed = requests.get(containers.url("web", "/listSessions"), headers=containers.auth(containers.contributor), timeout=30)
    assert listed.status_code == 200 and identifier in json.dumps(listed.json())
    metadata = requests.get(containers.url("web", "/metadata"), headers=containers.auth(), timeout=30)
    assert metadata.status_code == 200, metadata.text
    stopped = containers.post("web", "/.management/stopSession", identifier)
    assert stopped.status_code in (200, 204), stopped.text
    assert containers.get("web", "/session", identifier).status_code == 404


def test_tokens_and_roles_apply_to_forwarded_requests(containers: Containers):
    identifier = new_id()
    no_token = requests.get(containers.url("web", "/counter"), params={"identifier": identifier}, timeout=30)
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "Unauthorized"
    reader = containers.server.issue_token("reader")
    assert containers.get("web", "/counter", identifier, headers=containers.auth(reader)).status_code == 403
    scoped = subprocess.run(
        [SANDPOOL_BIN, "token", "issue", "--state-dir", str(containers.server.state_dir), "--identifier", identifier],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    ok = requests.get(containers.url("web", "/counter"), params={"identifier": identifier}, headers=containers.auth(scoped), timeout=30)
    assert ok.status_code == 200
    other = requests.get(containers.url("web", "/counter"), params={"identifier": new_id()}, headers=containers.auth(scoped), timeout=30)
    assert other.status_code == 403
    missing = requests.get(containers.url("web", "/counter"), headers=containers.auth(), timeout=30)
    assert missing.status_code == 400 and "identifier" in missing.json()["error"]["message"]


# -- isolation --------------------------------------------------------------------------------


def host_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if ":" not in a] or []


@pytest.mark.parametrize("pool", ["web", "sandboxed"])
def test_egress_is_disabled_even_to_the_server_and_the_registry(containers: Containers, pool: str):
    identifier = new_id()
    server_port = containers.server.base_url.rsplit(":", 1)[1]
    registry_port = containers.registry.host.rsplit(":", 1)[1]
    targets = [f"127.0.0.1:{server_port}", f"127.0.0.1:{registry_port}", "10.0.0.1:80", "1.1.1.1:53"]
    targets += [f"{address}:{server_port}" for address in host_addresses()]
    for target in targets:
        result = containers.get(pool, "/connect", identifier, params={"addr": target, "timeout_ms": "1000"}).json()
        assert result["connected"] is False, f"{pool} reached {target}: {result}"


def test_container_root_is_an_unprivileged_host_user_under_crun(containers: Containers):
    identifier = new_id()
    assert containers.get("web", "/whoami", identifier).json()["uid"] == 0
    mapping = containers.get("web", "/read", identifier, params={"path": "/proc/self/uid_map"}).text.split()
    inside, host, count = (int(field) for field in mapping[:3])
    assert (inside, count) == (0, 65536), mapping
    assert host >= 1_000_000, f"container root is host uid {host}"
    # The image's files still belong to the container's root, so it can write them.
    assert containers.post("web", "/write", identifier, params={"path": "/app/mine"}, data=b"ok").status_code == 200


def test_host_files_and_kernel_interfaces_are_out_of_reach(containers: Containers):
    identifier = new_id()
    assert containers.get("web", "/read", identifier, params={"path": "/etc/shadow"}).status_code == 404
    keys = containers.server.state_dir / "keys"
    assert containers.get("web", "/read", identifier, params={"path": str(keys)}).status_code == 404
    # /proc/sys is read-only; /proc/timer_list (which exists on the host) is masked.
    assert containers.post("web", "/write", identifier, params={"path": "/proc/sys/kernel/hostname"}, data=b"x").status_code == 403
    assert Path("/proc/timer_list").read_bytes() != b""
    assert containers.get("web", "/read", identifier, params={"path": "/proc/timer_list"}).content == b""


# -- lifecycle and probes ---------------------------------------------------------------------


def test_a_session_failing_its_liveness_probe_is_replaced_and_the_reason_recorded(containers: Containers):
    identifier = new_id()
    before = containers.counter("web", identifier)["instance"]
    assert containers.post("web", "/unhealthy", identifier).status_code == 200

    def replaced():
        events = containers.events("web", identifier)
        return any(e["kind"] == "deleted" and e["details"].get("reason") == "unhealthy" for e in events)

    wait_until(replaced, 30, "the unhealthy session to be deleted")
    after = containers.counter("web", identifier)
    assert after["instance"] != before and after["count"] == 1


def test_a_timed_session_whose_container_exits_is_replaced_on_the_next_request(containers: Containers):
    identifier = new_id()
    before = containers.counter("web", identifier)["instance"]
    assert containers.post("web", "/exit", identifier, params={"code": "3"}).status_code == 200
    wait_until(
        lambda: any(e["details"].get("reason") == "exited" for e in containers.events("web", identifier)), 30, "the exit to be recorded"
    )
    assert containers.counter("web", identifier)["instance"] != before


def test_on_container_exit_sessions_live_until_exit_or_max_alive(containers: Containers):
    stays, leaves = new_id("stays"), new_id("leaves")
    containers.counter("job", stays)
    containers.counter("job", leaves)
    info = containers.get("job", "/session", stays).json()
    assert info["identifier"] == stays
    assert containers.post("job", "/exit", leaves, params={"code": "0"}).status_code == 200
    wait_until(lambda: containers.get("job", "/session", leaves).status_code == 404, 30, "the exited session to end")
    # Idle time does not end it (there is no cooldown)...
    time.sleep(3)
    assert containers.counter("job", stays)["count"] == 2
    # ...the maximum alive period does.
    wait_until(lambda: containers.get("job", "/session", stays).status_code == 404, JOB_MAX_ALIVE_S + 15, "max alive")
    reasons = [e["details"].get("reason") for e in containers.events("job", stays) if e["kind"] == "deleted"]
    assert reasons == ["max_alive"], reasons


def test_deleting_a_session_removes_its_container_and_mounts(containers: Containers):
    identifier = new_id()
    containers.counter("web", identifier)
    session_dirs = lambda: {p.name for p in (containers.server.state_dir / "run" / "web" / "containers").iterdir()}
    before = session_dirs()
    resp = requests.delete(containers.url("web", "/session"), params={"identifier": identifier}, headers=containers.auth(), timeout=60)
    assert resp.status_code in (200, 204)
    gone = before - session_dirs()
    assert len(gone) >= 1, "the session's directory is still there"
    mounts = Path("/proc/mounts").read_text()
    for name in gone:
        assert name not in mounts, f"a mount of {name} is left"


# -- gVisor -----------------------------------------------------------------------------------


def test_the_runsc_pool_runs_its_sessions_under_gvisor(containers: Containers):
    identifier = new_id()
    assert containers.counter("sandboxed", identifier)["count"] == 1
    version = containers.get("sandboxed", "/read", identifier, params={"path": "/proc/version"}).text
    host_version = Path("/proc/version").read_text()
    assert version != host_version, "the session sees the host kernel, not gVisor's"
    crun_version = containers.get("web", "/read", identifier, params={"path": "/proc/version"}).text
    assert crun_version == host_version, "crun sessions share the host kernel"
    assert containers.counter("sandboxed", identifier)["count"] == 2


# -- errors -----------------------------------------------------------------------------------


def test_a_pool_with_a_missing_image_fails_at_start_with_a_clear_error(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[[pools]]\nname = "broken"\ncontainer_type = "CustomContainer"\n'
        f'[pools.container]\nimage = "oci:{tmp_path / "no-such-layout"}:v1"\ntarget_port = 8080\n'
    )
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.run(
        [SANDPOOL_BIN, "serve", "--config", str(config), "--state-dir", str(state), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "broken" in proc.stderr and "no-such-layout" in proc.stderr, proc.stderr[-2000:]


def test_a_config_with_an_unknown_secret_is_refused(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[[pools]]\nname = "broken"\ncontainer_type = "CustomContainer"\n'
        '[pools.container]\nimage = "127.0.0.1:1/x:y"\ntarget_port = 8080\n'
        'env = [{ name = "K", secret_ref = "nope" }]\n'
    )
    proc = subprocess.run(
        [SANDPOOL_BIN, "serve", "--config", str(config), "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "secret" in proc.stderr and "nope" in proc.stderr, proc.stderr


# -- attacks from inside a container ------------------------------------------------------------

ATTACKER = {"web": new_id("attacker"), "sandboxed": new_id("attacker")}
KERNEL_ATTACKS = ["unshare_user", "unshare_net", "mount_tmpfs", "ptrace_init", "bpf", "keyctl", "io_uring", "init_module", "clone_newpid"]


@pytest.mark.parametrize("pool", ["web", "sandboxed"])
@pytest.mark.parametrize("what", KERNEL_ATTACKS)
def test_kernel_attacks_from_a_container_are_denied(containers: Containers, pool: str, what: str):
    # One attacker session per pool: every call is refused and the session lives on.
    result = containers.post(pool, "/attack", ATTACKER[pool], params={"what": what})
    assert result.status_code == 200, result.text
    assert result.json()["ok"] is False, f"{what} succeeded inside a {pool} container: {result.json()}"


def test_a_fork_bomb_is_stopped_by_the_process_limit(containers: Containers):
    bomber, bystander = new_id("bomber"), new_id("bystander")
    containers.counter("web", bystander)
    result = containers.post("web", "/attack", bomber, params={"what": "fork_bomb"}).json()
    # The pool's max_processes (256 by default) stops it; the host and other sessions go on.
    assert 0 < result["started"] < 256, result
    assert containers.counter("web", bystander)["count"] == 2


def test_a_memory_bomb_ends_only_its_own_session_as_out_of_memory(containers: Containers):
    bomber, bystander = new_id("bomber"), new_id("bystander")
    containers.counter("web", bystander)
    first = containers.counter("web", bomber)["instance"]
    resp = containers.post("web", "/attack", bomber, params={"what": "memory_bomb"})
    assert resp.status_code == 502, f"the bomb was not stopped: {resp.status_code} {resp.text[:300]}"
    wait_until(
        lambda: any(e["details"].get("reason") == "out_of_memory" for e in containers.events("web", bomber)),
        30,
        "the session to be deleted as out of memory",
    )
    assert containers.counter("web", bomber)["instance"] != first
    assert containers.counter("web", bystander)["count"] == 2
