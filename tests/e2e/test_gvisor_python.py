"""Python code-interpreter sessions under gVisor, end to end: a real sandpool server of its own
runs one PythonLTS pool with `runtime = "runsc"`, where every session is a gVisor sandbox (the
`runsc` OCI runtime, ptrace platform) instead of a process forked from sandpool's zygote.

The pool is driven through the same REST API as any Python pool (plain `requests`, both API
generations) and through an unmodified client library (LangChain's `SessionsPythonREPLTool`),
and what a user would notice is checked: interpreter state per identifier, the code really
running on gVisor's kernel, the files API on the session's `/mnt/data`, execution timeouts,
`os._exit` and out-of-memory ending only the session (the next request gets a fresh one),
subprocesses. Then the code attacks its sandbox from inside: the server's port, the host's
addresses and sockets, the internet, the read-only root, privileges and capabilities, kernel
calls, host processes and files, another session's files (also through symlinks handed to the
files API).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the package warns on import
    from langchain_azure_dynamic_sessions import SessionsPythonREPLTool
from langchain_core.messages import ToolMessage

from conftest import SandpoolServer
from e2e_support import CHART_CODE, RUNTIME_DIR, SANDPOOL_BIN, assert_chart_png, decode_image_result, sha256, wait_until

POOL = "strong"
NEW = "2025-10-02-preview"
LEGACY = "2024-02-02-preview"
MEMORY_LIMIT_MIB = 1024
# In the server's environment only: must never reach a session.
CANARY_NAME = "SANDPOOL_E2E_GVISOR_CANARY"
CANARY_VALUE = f"host-secret-{uuid.uuid4().hex}"

CONFIG = """\
[runtime]
dir = "{runtime_dir}"

[[pools]]
name = "{pool}"
runtime = "runsc"
max_concurrent_sessions = 20
ready_session_instances = 1
cooldown_period_in_seconds = 300
execution_timeout_in_seconds = 30

[pools.resources]
memory = "1Gi"
"""


@dataclass
class Gvisor:
    server: SandpoolServer
    token: str
    contributor: str

    @property
    def endpoint(self) -> str:
        return f"{self.server.base_url}/pools/{POOL}"

    @property
    def azure_endpoint(self) -> str:
        return f"{self.server.base_url}/subscriptions/sub/resourceGroups/rg/sessionPools/{POOL}"

    def auth(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}

    def request(self, method: str, path: str, identifier: str | None = None, api_version: str = NEW, **kwargs) -> requests.Response:
        params = dict(kwargs.pop("params", {}), **{"api-version": api_version})
        if identifier is not None:
            params["identifier"] = identifier
        headers = kwargs.pop("headers", None) or self.auth()
        return requests.request(method, f"{self.endpoint}{path}", params=params, headers=headers, timeout=120, **kwargs)

    def _ok(self, resp: requests.Response, *statuses: int) -> requests.Response:
        assert resp.status_code in (statuses or (200,)), (
            f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text[:500]}\n"
            f"--- sandpool stderr (tail) ---\n{self.server.stderr_tail(30)}"
        )
        return resp

    # -- executions ------------------------------------------------------------------------

    def execute(self, identifier: str, code: str, timeout_s: int | None = None) -> dict:
        """New generation `POST executions`: the whole execution resource."""
        body: dict = {"codeInputType": "Inline", "executionType": "Synchronous", "code": code}
        if timeout_s is not None:
            body["timeoutInSeconds"] = timeout_s
        return self._ok(self.request("POST", "/executions", identifier, json=body)).json()

    def run(self, identifier: str, code: str, timeout_s: int | None = None) -> dict:
        """Executes code that must succeed; returns its `result` (stdout, stderr, executionResult)."""
        body = self.execute(identifier, code, timeout_s)
        assert body["status"] == "Succeeded", f"the cell failed: {json.dumps(body, indent=1)}"
        return body["result"]

    def value(self, identifier: str, code: str):
        """The value of the cell's last expression; a JSON-encoded value is decoded."""
        result = self.run(identifier, code)
        assert result["stderr"] == "", result
        return result["executionResult"]

    def probe(self, identifier: str, code: str):
        """Runs code that prints one JSON document as its last line and returns it decoded."""
        result = self.run(identifier, code, timeout_s=25)
        lines = result["stdout"].strip().splitlines()
        assert lines, result
        return json.loads(lines[-1])

    def legacy_execute(self, identifier: str, code: str) -> dict:
        body = {"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}
        return self._ok(self.request("POST", "/code/execute", identifier, api_version=LEGACY, json=body)).json()["properties"]

    # -- files -----------------------------------------------------------------------------

    def upload(self, identifier: str, name: str, data: bytes) -> dict:
        resp = self.request("POST", "/files", identifier, files={"file": (name, data, "application/octet-stream")})
        return self._ok(resp).json()

    def files(self, identifier: str) -> dict[str, int]:
        resp = self._ok(self.request("GET", "/files", identifier, params={"recursive": "true"}))
        return {
            "/".join(filter(None, [f["directory"], f["name"]])): f["sizeInBytes"]
            for f in resp.json()["value"]
            if f["type"] == "File"
        }

    def download(self, identifier: str, name: str) -> requests.Response:
        return self.request("GET", f"/files/{name}/content", identifier)

    # -- sessions --------------------------------------------------------------------------

    def session(self, identifier: str) -> dict | None:
        resp = self._ok(self.request("GET", "/session", identifier), 200, 404)
        return resp.json() if resp.status_code == 200 else None

    def delete_session(self, identifier: str) -> None:
        self._ok(self.request("DELETE", "/session", identifier), 200, 204, 404)

    def events(self, identifier: str) -> list[dict]:
        resp = self.request("GET", "/events", headers=self.auth(self.contributor), params={"identifier": identifier})
        return self._ok(resp).json()["value"]

    def deletion_reasons(self, identifier: str) -> list[str]:
        return [e["details"].get("reason") for e in self.events(identifier) if e["kind"] == "deleted"]


@pytest.fixture(scope="module")
def gvisor(request):
    if not os.path.exists(SANDPOOL_BIN):
        pytest.fail(f"sandpool binary not found at {SANDPOOL_BIN}; build it (cargo build) or set SANDPOOL_BIN", pytrace=False)
    if shutil.which("runsc") is None:
        pytest.fail("runsc (gVisor) is not installed", pytrace=False)
    Path(RUNTIME_DIR).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-gvisor-"))
    config = work / "config.toml"
    config.write_text(CONFIG.format(runtime_dir=RUNTIME_DIR, pool=POOL))
    server = SandpoolServer(state_dir=work / "state", config_path=config, stderr_path=work / "sandpool.stderr.log")
    server.state_dir.mkdir()
    failed_before = request.session.testsfailed
    # The server inherits the test's environment; the canary checks that sessions do not.
    os.environ[CANARY_NAME] = CANARY_VALUE
    try:
        try:
            server.start()
        finally:
            del os.environ[CANARY_NAME]
        yield Gvisor(server=server, token=server.issue_token(), contributor=server.issue_token("contributor"))
    finally:
        code = server.stop()
    # Every session's host-side mount (its /mnt/data tmpfs) is gone after the shutdown.
    left = [line for line in Path("/proc/mounts").read_text().splitlines() if str(work) in line]
    if code == 0 and not left and request.session.testsfailed == failed_before and not os.environ.get("SANDPOOL_TEST_KEEP_STATE"):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nsandpool (gVisor) state and log kept in {work}")
    assert code == 0, f"sandpool exited with {code}\n{server.stderr_tail(100)}"
    assert not left, f"mounts left after shutdown: {left}"


@pytest.fixture
def new_id(gvisor: Gvisor):
    """Makes fresh identifiers; their sessions are deleted after the test."""
    made: list[str] = []

    def make(prefix: str = "user") -> str:
        identifier = f"{prefix}-{uuid.uuid4().hex[:12]}"
        made.append(identifier)
        return identifier

    yield make
    for identifier in made:
        gvisor.delete_session(identifier)


@pytest.fixture(scope="module")
def attacker(gvisor: Gvisor):
    """One session shared by the attacks: each is refused and the session lives on."""
    identifier = f"attacker-{uuid.uuid4().hex[:12]}"
    yield identifier
    gvisor.delete_session(identifier)


def host_addresses() -> list[str]:
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()


# -- state ------------------------------------------------------------------------------------


def test_state_persists_per_identifier_and_identifiers_do_not_share_it(gvisor: Gvisor, new_id):
    alice, bob = new_id("alice"), new_id("bob")
    first = gvisor.execute(alice, "import math\nsecret = 'alice-' + str(6 * 7)\ndef twice(x):\n    return 2 * x\nprint('defined')")
    assert first["status"] == "Succeeded", first
    assert first["identifier"] == alice
    assert first["result"]["stdout"] == "defined\n"
    assert gvisor.value(alice, "twice(len(secret)) + math.isqrt(16)") == 20

    # The same interpreter through the legacy generation.
    legacy = gvisor.legacy_execute(alice, "secret += '!'\nsecret")
    assert (legacy["status"], legacy["result"]) == ("Success", "alice-42!")

    # Bob's interpreter is another one: no variables, functions or modules of Alice's.
    other = gvisor.execute(bob, "secret")
    assert other["status"] == "Failed", other
    assert other["error"]["code"] == "ExecutionFailed"
    assert "NameError" in other["result"]["stderr"]
    assert gvisor.value(bob, "'math' in dir(), 'twice' in dir()") == "(False, False)"
    gvisor.run(bob, "secret = 'bob'")
    assert gvisor.value(alice, "secret") == "alice-42!"
    assert gvisor.value(bob, "secret") == "bob"

    # Two sessions, two gVisor sandboxes.
    assert gvisor.session(alice)["etag"] != gvisor.session(bob)["etag"]


def test_the_code_runs_on_gvisors_kernel_and_the_pool_reports_python(gvisor: Gvisor, new_id):
    identifier = new_id()
    seen = gvisor.probe(
        identifier,
        "import json, os, platform, sys\n"
        "print(json.dumps({'version': open('/proc/version').read(), 'release': platform.release(),\n"
        "                  'python': platform.python_version(), 'executable': sys.executable}))",
    )
    assert seen["release"] != os.uname().release, f"the session sees the host's kernel {seen['release']}"
    assert seen["version"] != Path("/proc/version").read_text(), "the session reads the host's /proc/version"
    assert seen["version"].startswith("Linux version "), seen

    metadata = gvisor._ok(requests.get(f"{gvisor.endpoint}/metadata", params={"api-version": NEW}, headers=gvisor.auth(), timeout=30))
    runtimes = metadata.json()["runtimes"]
    assert runtimes == [{"name": "python", "version": seen["python"]}], runtimes
    packages = {p["name"].lower() for p in metadata.json()["preInstalledPackages"]}
    assert {"numpy", "pandas", "matplotlib"} <= packages, packages
    # And the packages really import inside the sandbox.
    assert gvisor.value(identifier, "import numpy as np, pandas as pd\nint(pd.Series(np.arange(10)).sum())") == 45


# -- files ------------------------------------------------------------------------------------


def test_files_api_and_code_share_mnt_data_per_session(gvisor: Gvisor, new_id, binary_payload):
    owner, other = new_id("files"), new_id("other")

    # Uploaded through the API, read by the code.
    uploaded = gvisor.upload(owner, "input.bin", binary_payload)
    assert (uploaded["name"], uploaded["sizeInBytes"]) == ("input.bin", len(binary_payload))
    seen = gvisor.value(owner, "import hashlib, os\nos.getcwd() + ' ' + hashlib.sha256(open('input.bin', 'rb').read()).hexdigest()")
    assert seen == f"/mnt/data {sha256(binary_payload)}"

    # Written by the code, listed and downloaded through the API.
    gvisor.run(
        owner,
        "import os\n"
        "data = open('/mnt/data/input.bin', 'rb').read()\n"
        "open('/mnt/data/reversed.bin', 'wb').write(data[::-1])\n"
        "os.makedirs('/mnt/data/reports', exist_ok=True)\n"
        "open('/mnt/data/reports/summary.txt', 'w').write('rows: 3\\n')",
    )
    assert gvisor.files(owner) == {
        "input.bin": len(binary_payload),
        "reversed.bin": len(binary_payload),
        "reports/summary.txt": 8,
    }
    assert gvisor.download(owner, "reversed.bin").content == binary_payload[::-1]
    legacy = gvisor.request("GET", "/files/content/reports/summary.txt", owner, api_version=LEGACY)
    assert (legacy.status_code, legacy.content) == (200, b"rows: 3\n")

    # Another session has a /mnt/data of its own.
    assert gvisor.files(other) == {}
    assert gvisor.download(other, "input.bin").status_code == 404
    assert gvisor.value(other, "import os\nsorted(os.listdir('/mnt/data'))") == "[]"

    # Delete: gone for the API and for the code.
    assert gvisor.request("DELETE", "/files/input.bin", owner).status_code == 204
    assert "input.bin" not in gvisor.files(owner)
    assert gvisor.download(owner, "input.bin").status_code == 404
    assert gvisor.value(owner, "os.path.exists('/mnt/data/input.bin'), os.path.exists('/mnt/data/reversed.bin')") == "(False, True)"

    # Deleting the session unmounts its /mnt/data on the host: the files are gone.
    sandbox = gvisor.session(owner)["etag"]
    assert sandbox and sandbox in Path("/proc/mounts").read_text()
    gvisor.delete_session(owner)
    wait_until(lambda: sandbox not in Path("/proc/mounts").read_text(), 30, "the session's /mnt/data to be unmounted")
    assert gvisor.files(owner) == {}, "a new session for the same identifier sees the old files"


# -- timeouts and dying sessions --------------------------------------------------------------


def test_a_busy_loop_times_out_and_the_session_keeps_its_state(gvisor: Gvisor, new_id):
    identifier = new_id()
    gvisor.run(identifier, "counter = 41")
    sandbox = gvisor.session(identifier)["etag"]
    body = gvisor.execute(identifier, "print('spinning', flush=True)\nmarker = 'set before the loop'\nwhile True:\n    pass", timeout_s=3)
    assert body["status"] == "Failed", body
    assert body["error"]["code"] == "ExecutionTimeout", body
    assert "ExecutionTimeout" in body["result"]["stderr"]
    assert body["result"]["stdout"] == "spinning\n"

    # The same interpreter goes on, with everything set before and up to the interrupt.
    assert gvisor.value(identifier, "counter += 1\nf'{counter}, {marker}'") == "42, set before the loop"
    assert gvisor.session(identifier)["etag"] == sandbox


def test_os_exit_ends_the_session_and_the_next_request_gets_a_fresh_one(gvisor: Gvisor, new_id):
    identifier = new_id()
    gvisor.run(identifier, "kept = 'before the exit'")
    sandbox = gvisor.session(identifier)["etag"]
    body = gvisor.execute(identifier, "import os\nos._exit(3)")
    assert body["status"] == "Failed", body
    assert body["error"]["code"] == "SessionTerminated", body
    assert "the session's Python process exited" in body["error"]["message"], body
    assert "next request with this identifier starts a new session" in body["error"]["message"], body
    assert "exited" in wait_until(lambda: gvisor.deletion_reasons(identifier), 30, "the session's deletion to be recorded")

    again = gvisor.execute(identifier, "kept")
    assert again["status"] == "Failed" and "NameError" in again["result"]["stderr"], again
    assert gvisor.value(identifier, "6 * 7") == 42
    assert gvisor.session(identifier)["etag"] != sandbox


def test_going_over_the_memory_limit_stops_only_that_session_as_out_of_memory(gvisor: Gvisor, new_id):
    bomber, bystander = new_id("bomber"), new_id("bystander")
    gvisor.run(bystander, "survivor = 'still here'")
    # Well under the limit is fine.
    assert gvisor.value(bomber, "kept = b'\\x01' * (256 << 20)\nlen(kept) >> 20") == 256
    sandbox = gvisor.session(bomber)["etag"]

    # ~1.5 GiB of touched pages in a 1 GiB session.
    body = gvisor.execute(bomber, "chunks = []\nfor _ in range(24):\n    chunks.append(b'\\x01' * (64 << 20))\nlen(chunks)")
    assert body["status"] == "Failed", f"1.5 GiB fit into a {MEMORY_LIMIT_MIB} MiB session: {body}"
    assert body["error"]["code"] == "SessionTerminated", body
    assert f"the session ran out of memory (limit {MEMORY_LIMIT_MIB} MiB)" in body["error"]["message"], body
    assert "out_of_memory" in wait_until(lambda: gvisor.deletion_reasons(bomber), 30, "the out-of-memory deletion to be recorded")

    # A fresh session for the same identifier; the neighbour did not notice.
    again = gvisor.execute(bomber, "kept")
    assert again["status"] == "Failed" and "NameError" in again["result"]["stderr"], again
    assert gvisor.session(bomber)["etag"] != sandbox
    assert gvisor.value(bystander, "survivor") == "still here"


def test_subprocesses_fork_and_exec_under_gvisor(gvisor: Gvisor, new_id):
    identifier = new_id()
    out = gvisor.probe(
        identifier,
        "import json, subprocess, sys\n"
        "py = subprocess.run([sys.executable, '-c', 'print(6*7)'], capture_output=True, text=True)\n"
        "sh = subprocess.run(['sh', '-c', 'echo $((6 * 7))'], capture_output=True, text=True)\n"
        "print(json.dumps([py.returncode, py.stdout, py.stderr, sh.returncode, sh.stdout]))",
    )
    assert out == [0, "42\n", "", 0, "42\n"]
    # IPython-style shell lines work too.
    assert "from the shell" in gvisor.run(identifier, "!echo from the shell")["stdout"]


# -- a client library, unmodified ---------------------------------------------------------------


def test_langchain_sessions_tool_works_unmodified_against_the_gvisor_pool(gvisor: Gvisor, new_id, binary_payload):
    identifier = new_id("langchain")
    tool = SessionsPythonREPLTool(
        pool_management_endpoint=gvisor.azure_endpoint, access_token_provider=lambda: gvisor.token, session_id=identifier
    )
    first = json.loads(tool.run("import platform\nrelease = platform.release()\nprint('ready')"))
    assert (first["stdout"], first["stderr"]) == ("ready\n", ""), first
    assert json.loads(tool.run("release"))["result"] != os.uname().release

    # A chart comes back as a PNG (matplotlib is preloaded by each gVisor session).
    msg = tool.invoke({"args": {"python_code": CHART_CODE}, "id": "call-chart", "name": tool.name, "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    assert msg.artifact["status"] == "Success", msg.artifact.get("stderr")
    assert_chart_png(decode_image_result(msg.artifact["result"]))

    # Files through the client, seen by the code, and back.
    meta = tool.upload_file(data=io.BytesIO(binary_payload), remote_file_path="blob.bin")
    assert (meta.filename, meta.size_in_bytes) == ("blob.bin", len(binary_payload))
    code = "import hashlib\nopen('doubled.bin', 'wb').write(open('blob.bin', 'rb').read() * 2)\nhashlib.sha256(open('blob.bin', 'rb').read()).hexdigest()"
    assert json.loads(tool.run(code))["result"] == sha256(binary_payload)
    assert {f.filename: f.size_in_bytes for f in tool.list_files()} == {"blob.bin": len(binary_payload), "doubled.bin": 2 * len(binary_payload)}
    assert tool.download_file(remote_file_path="doubled.bin").read() == binary_payload * 2

    # close() deletes the session (in a background thread).
    tool.close()
    wait_until(lambda: gvisor.session(identifier) is None, 60, "close() to delete the session")


# -- attacks from inside ----------------------------------------------------------------------

CONNECT = """\
import json, socket
def attempt(family, address, timeout=2.0):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
        return 'connected'
    except OSError as exc:
        return f'{type(exc).__name__}: {exc}'
    finally:
        s.close()
"""


class HostListeners:
    """TCP listeners on all host addresses (IPv4 and IPv6), a UDP socket and an abstract Unix
    socket, run by the test process; they count what reaches them."""

    def __init__(self):
        self.hits: list[str] = []
        self.tcp4 = socket.create_server(("0.0.0.0", 0))
        self.port = self.tcp4.getsockname()[1]
        self.sockets = [self.tcp4]
        try:
            self.tcp6 = socket.create_server(("::", self.port), family=socket.AF_INET6, dualstack_ipv6=False)
            self.sockets.append(self.tcp6)
        except OSError:
            self.tcp6 = None
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", self.port))
        self.unix_name = f"\0sandpool-e2e-{uuid.uuid4().hex}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_name.encode())
        self.unix.listen()
        self.sockets += [self.udp, self.unix]
        for sock in self.sockets:
            sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            for sock in self.sockets:
                try:
                    if sock is self.udp:
                        data, peer = sock.recvfrom(100)
                        self.hits.append(f"udp from {peer}: {data!r}")
                    else:
                        conn, peer = sock.accept()
                        conn.close()
                        self.hits.append(f"{sock.family.name} connection from {peer!r}")
                except (TimeoutError, OSError):
                    pass

    def close(self):
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def host_listeners():
    listeners = HostListeners()
    yield listeners
    listeners.close()


def test_no_connection_reaches_the_server_or_the_host(gvisor: Gvisor, attacker: str, host_listeners: HostListeners):
    server_port = int(gvisor.server.base_url.rsplit(":", 1)[1])
    port = host_listeners.port
    addresses = ["127.0.0.1", *(a for a in host_addresses() if host_listeners.tcp6 is not None or ":" not in a)]
    # The server's port. (The runner's own port, 49999, is on the session's own loopback:
    # connecting to it reaches only the session itself; see the test below.)
    targets = [("127.0.0.1", server_port)]
    targets += [(address, port) for address in addresses] + [(address, server_port) for address in addresses]
    if host_listeners.tcp6 is not None:
        targets.append(("::1", port))
    # Sanity: from the host, every listener target is reachable.
    for address, target_port in targets:
        if target_port == port:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(5)
                probe.connect((address, target_port))
    wait_until(lambda: len(host_listeners.hits) >= len([t for t in targets if t[1] == port]), 10, "the host's own probes")
    host_listeners.hits.clear()

    results = gvisor.probe(
        attacker,
        CONNECT
        + f"targets = {targets!r}\n"
        "out = {f'{a} {p}': attempt(socket.AF_INET6 if ':' in a else socket.AF_INET, (a, p)) for a, p in targets}\n"
        f"out['unix'] = attempt(socket.AF_UNIX, {host_listeners.unix_name.encode()!r})\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "sent = []\n"
        f"for a in {addresses!r}:\n"
        "    try:\n"
        f"        u.sendto(b'hello from the session', (a, {port}))\n"
        "        sent.append(a)\n"
        "    except OSError as exc:\n"
        "        pass\n"
        "out['udp sent'] = sent\n"
        "print(json.dumps(out))",
    )
    connected = {target: outcome for target, outcome in results.items() if outcome == "connected"}
    assert not connected, f"the session reached: {connected}\nall: {results}"
    time.sleep(0.5)  # a datagram that got out would have arrived by now
    assert host_listeners.hits == [], f"the host's listeners heard from the session: {host_listeners.hits}"


def test_the_runners_port_leads_only_to_the_session_itself(gvisor: Gvisor, new_id):
    # The runner listens on the session's own loopback (so a restarted server can reconnect).
    # Code in the session can connect to it, but that connection only waits behind the
    # server's: the session goes on answering the server, and other sessions never see it.
    identifier = new_id()
    assert gvisor.value(identifier, "mine = 'still mine'\nmine") == "still mine"
    code = (
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', 49999), timeout=2)\n"
        "s.settimeout(1)\n"
        "try:\n    got = s.recv(100)\nexcept OSError as e:\n    got = repr(e)\n"
        "kept_open = s\n"
        "print('connected, got', got)"
    )
    result = gvisor.run(identifier, code)
    assert "connected" in result["stdout"], result
    assert "ready" not in result["stdout"], f"the session's own connection must not be served while the server's is: {result}"
    assert gvisor.value(identifier, "mine") == "still mine"
    assert gvisor.value(new_id(), "'mine' in globals()") is False


def test_no_egress_to_the_internet_and_no_name_resolution(gvisor: Gvisor, attacker: str):
    # The cell's own socket timeouts bound each attempt; the execution timeout would report a hang.
    results = gvisor.probe(
        attacker,
        CONNECT
        + "out = {t: attempt(socket.AF_INET, (t, 80)) for t in ['1.1.1.1', '8.8.8.8', '10.0.0.1', '169.254.169.254']}\n"
        "try:\n"
        "    out['dns'] = repr(socket.getaddrinfo('example.com', 80))\n"
        "except OSError as exc:\n"
        "    out['dns'] = f'{type(exc).__name__}: {exc}'\n"
        "out['interfaces'] = [name for _, name in socket.if_nameindex()]\n"
        "print(json.dumps(out))",
    )
    for target in ["1.1.1.1", "8.8.8.8", "10.0.0.1", "169.254.169.254"]:
        assert results[target] != "connected" and ("Error" in results[target]), f"{target}: {results[target]}"
    assert results["dns"].startswith(("gaierror", "OSError")), results["dns"]
    assert results["interfaces"] == ["lo"], results["interfaces"]


def test_the_root_filesystem_is_read_only(gvisor: Gvisor, attacker: str):
    name = f"x-{uuid.uuid4().hex[:8]}"
    targets = [f"/usr/{name}", f"/etc/{name}", f"/{name}", f"/opt/sandpool/{name}", "/opt/sandpool/runner.py", "/opt/sandpool/venv/bin/python"]
    results = gvisor.probe(
        attacker,
        "import json, os\n"
        "out = {}\n"
        f"for path in {targets!r} + ['/tmp/{name}', '/mnt/data/{name}']:\n"
        "    try:\n"
        "        # Opened for writing, never written: a file that opens is proof enough.\n"
        "        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))\n"
        "        out[path] = 'written'\n"
        "    except OSError as exc:\n"
        "        out[path] = type(exc).__name__\n"
        "mounts = {line.split()[1]: line.split()[3].split(',')[0] for line in open('/proc/mounts')}\n"
        "print(json.dumps([out, mounts]))",
    )
    writes, mounts = results
    for path in targets:
        assert writes[path] != "written", f"the session wrote {path}"
    # Scratch space is where it should be.
    assert writes[f"/tmp/{name}"] == writes[f"/mnt/data/{name}"] == "written", writes
    # Not only permissions: the root, /usr and the runtime are mounted read-only.
    for point in ["/", "/usr", "/opt/sandpool/venv"]:
        assert mounts.get(point) == "ro", f"{point} is mounted {mounts.get(point)}: {mounts}"
    assert mounts.get("/mnt/data") == mounts.get("/tmp") == "rw", mounts
    # Nothing reached the host.
    assert not Path(f"/usr/{name}").exists() and not Path(f"/etc/{name}").exists()
    skeleton = gvisor.server.state_dir / "run" / POOL / "gvisor-root"
    assert not list(skeleton.rglob(name)), "a write reached the pool's shared root"


def test_the_code_runs_unprivileged_without_capabilities(gvisor: Gvisor, attacker: str):
    status = gvisor.probe(
        attacker,
        "import ctypes, json, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)\n"
        "os.makedirs('/tmp/mnt', exist_ok=True)\n"
        "calls = {\n"
        "    'unshare_user': libc.unshare(0x10000000),\n"
        "    'unshare_net_mount': libc.unshare(0x40000000 | 0x00020000),\n"
        "    'mount_tmpfs': libc.mount(b'none', b'/tmp/mnt', b'tmpfs', 0, None),\n"
        "    'setuid_root': libc.setuid(0),\n"
        "    'chroot': libc.chroot(b'/tmp'),\n"
        "}\n"
        "print(json.dumps({'uid': [os.getuid(), os.geteuid(), os.getgid(), os.getegid()], 'groups': os.getgroups(),\n"
        "                  'status': status, 'calls': calls, 'no_new_privs': libc.prctl(39, 0, 0, 0, 0)}))",
    )
    assert 0 not in status["uid"], status["uid"]
    assert 0 not in status["groups"], status["groups"]
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd"]:
        assert int(status["status"][cap], 16) == 0, f"{cap}: {status['status'][cap]}"
    assert status["status"]["Seccomp"].strip() == "2", "no seccomp filter"
    assert status["no_new_privs"] == 1
    assert all(result == -1 for result in status["calls"].values()), status["calls"]


def test_proc_shows_only_the_sessions_own_processes(gvisor: Gvisor, attacker: str):
    server_pid = gvisor.server.proc.pid
    seen = gvisor.probe(
        attacker,
        "import json, os, signal, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "procs = {p: open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace') for p in os.listdir('/proc') if p.isdigit()}\n"
        "child.kill(); child.wait()\n"
        "signals = {}\n"
        f"for pid in [{server_pid}, {os.getpid()}]:\n"
        "    try:\n"
        "        os.kill(pid, 0)\n"
        "        signals[pid] = 'exists'\n"
        "    except OSError as exc:\n"
        "        signals[pid] = type(exc).__name__\n"
        "print(json.dumps({'procs': procs, 'signals': signals, 'me': os.getpid()}))",
    )
    procs = seen["procs"]
    # The runner (pid 1 of the sandbox) and its child; nothing of the host.
    assert 1 <= len(procs) <= 4, procs
    assert all("/opt/sandpool/venv/bin/python" in cmdline for cmdline in procs.values()), procs
    assert str(server_pid) not in procs and str(os.getpid()) not in procs, procs
    assert procs.get("1") != Path("/proc/1/cmdline").read_bytes().decode(errors="replace"), "pid 1 is the host's init"
    assert set(seen["signals"].values()) == {"ProcessLookupError"}, seen["signals"]
    assert not any(SANDPOOL_BIN in cmdline or "--state-dir" in cmdline for cmdline in procs.values()), procs


def test_host_files_secrets_and_environment_are_out_of_reach(gvisor: Gvisor, attacker: str):
    state = gvisor.server.state_dir
    paths = [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/home",
        str(state),
        str(state / "keys"),
        str(state / "run" / POOL / "containers"),
        str(gvisor.server.stderr_path),
        SANDPOOL_BIN,
        RUNTIME_DIR,
        str(Path(__file__).resolve()),
    ]
    seen = gvisor.probe(
        attacker,
        "import json, os\n"
        f"exists = {{p: os.path.lexists(p) for p in {paths!r}}}\n"
        "environ = open('/proc/1/environ', 'rb').read().decode(errors='replace')\n"
        "print(json.dumps({'exists': exists, 'env': dict(os.environ), 'environ1': environ}))",
    )
    visible = [path for path, there in seen["exists"].items() if there]
    assert not visible, f"visible inside the session: {visible}"
    assert CANARY_NAME not in seen["env"] and CANARY_VALUE not in seen["environ1"], "the server's environment leaked in"
    assert not any("SANDPOOL" in name for name in seen["env"]), seen["env"]


def test_another_sessions_files_are_out_of_reach_even_through_the_files_api(gvisor: Gvisor, attacker: str, new_id):
    victim = new_id("victim")
    secret_name = f"secret-{uuid.uuid4().hex[:8]}.txt"
    gvisor.run(victim, f"open('/mnt/data/{secret_name}', 'w').write('the victim only')")
    # Where the victim's file lives on the host (the test runs as root there).
    host_paths = list((gvisor.server.state_dir / "run" / POOL / "containers").glob(f"*/**/{secret_name}"))
    assert len(host_paths) == 1, host_paths
    host_path = host_paths[0]

    seen = gvisor.probe(
        attacker,
        "import glob, json, os\n"
        "out = {'listing': sorted(os.listdir('/mnt/data')),\n"
        f"       'via_proc': glob.glob('/proc/*/root/mnt/data/{secret_name}') + glob.glob('/proc/*/cwd/{secret_name}')}}\n"
        "try:\n"
        f"    out['direct'] = open({str(host_path)!r}).read()\n"
        "except OSError as exc:\n"
        "    out['direct'] = type(exc).__name__\n"
        "# Links for the host-side files API to follow.\n"
        f"for name, target in [('peer', {str(host_path)!r}), ('peerdir', {str(host_path.parent)!r}), ('shadow', '/etc/shadow')]:\n"
        "    if not os.path.lexists('/mnt/data/' + name):\n"
        "        os.symlink(target, '/mnt/data/' + name)\n"
        "print(json.dumps(out))",
    )
    assert secret_name not in seen["listing"], seen
    assert seen["via_proc"] == [], seen
    assert seen["direct"] in ("FileNotFoundError", "PermissionError"), seen

    # The files API works on the host side of /mnt/data; it must not follow the attacker's links.
    for name in ["peer", f"peerdir/{secret_name}", "shadow"]:
        resp = gvisor.download(attacker, name)
        assert resp.status_code in (403, 404), f"{name}: {resp.status_code} {resp.text[:200]}"
        assert b"the victim only" not in resp.content and b"root:" not in resp.content
    upload = gvisor.request("POST", "/files", attacker, params={"path": "peerdir"}, files={"file": ("planted.txt", b"x", "text/plain")})
    assert upload.status_code in (403, 404), f"upload through a link: {upload.status_code} {upload.text[:200]}"
    assert not (host_path.parent / "planted.txt").exists()
    # Uploading over the link may replace the link or be refused; never write through it.
    gvisor.request("POST", "/files", attacker, files={"file": ("peer", b"overwritten", "text/plain")})
    assert host_path.read_text() == "the victim only"
    assert gvisor.value(victim, f"open('/mnt/data/{secret_name}').read()") == "the victim only"
    # The attacker's session survived all of it.
    assert gvisor.value(attacker, "1 + 1") == 2
