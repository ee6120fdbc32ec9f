"""Sessions that are containers survive a server crash, end to end.

One server runs a gVisor Python pool (`runtime = "runsc"`) and a custom container pool under
crun (the project's test app from an OCI layout). Both get sessions with state; the server
is killed with SIGKILL and started again on the same state directory; each identifier must
find its own session again (interpreter variables, files, the app's in-memory counter), and
a SIGTERM afterwards must leave no container behind.
"""

from __future__ import annotations

import os
import signal
import tempfile
import uuid
from pathlib import Path

import requests

import oci_images
from conftest import SandpoolServer
from e2e_support import RUNTIME_DIR

API = "2025-10-02-preview"

CONFIG = """\
[runtime]
dir = "{runtime}"

[[pools]]
name = "strong"
runtime = "runsc"
max_concurrent_sessions = 6
ready_session_instances = 0
cooldown_period_in_seconds = 300
preload_modules = []

[pools.resources]
memory = "1Gi"

[[pools]]
name = "web"
container_type = "CustomContainer"
max_concurrent_sessions = 6
ready_session_instances = 1
cooldown_period_in_seconds = 300

[pools.container]
image = "oci:{layout}:v1"
target_port = 8080
"""


def execute(server: SandpoolServer, token: str, identifier: str, code: str) -> dict:
    resp = requests.post(
        f"{server.base_url}/pools/strong/executions",
        params={"api-version": API, "identifier": identifier},
        headers={"Authorization": f"Bearer {token}"},
        json={"codeInputType": "Inline", "executionType": "Synchronous", "code": code, "timeoutInSeconds": 60},
        timeout=240,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "Succeeded", body
    return body["result"]


def counter(server: SandpoolServer, token: str, identifier: str) -> dict:
    resp = requests.get(f"{server.base_url}/pools/web/counter", params={"identifier": identifier},
                        headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def running_containers(state: Path) -> list[str]:
    found = []
    for pool in ("strong", "web"):
        runtime = state / "run" / pool / "runtime"
        if runtime.is_dir():
            found += [entry.name for entry in runtime.iterdir()]
    return found


def test_container_sessions_come_back_after_a_kill_9():
    work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-restart-containers-"))
    layout = work / "layout"
    oci_images.write_testapp_layout(layout, oci_images.build_testapp(), tag="v1")
    config = work / "config.toml"
    config.write_text(CONFIG.format(runtime=RUNTIME_DIR, layout=layout))
    state = work / "state"
    state.mkdir()

    def start() -> SandpoolServer:
        server = SandpoolServer(state_dir=state, config_path=config, stderr_path=work / f"sandpool-{uuid.uuid4().hex[:6]}.log")
        server.start()
        return server

    server = start()
    try:
        token = server.issue_token()
        python_ids = [f"gv-{uuid.uuid4().hex[:8]}" for _ in range(2)]
        for n, identifier in enumerate(python_ids):
            execute(server, token, identifier, f"mine = {n * 11 + 5}\nopen('/mnt/data/owner.txt', 'w').write({identifier!r})")
        app_ids = [f"app-{uuid.uuid4().hex[:8]}" for _ in range(2)]
        instances = {}
        for n, identifier in enumerate(app_ids):
            for _ in range(n + 2):
                reply = counter(server, token, identifier)
            instances[identifier] = (reply["instance"], reply["count"])
        # No pause first: the session table's journal is written with every allocation.
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)

        server = start()
        token = server.issue_token()
        log = server.stderr_tail(200)
        assert "adopted the gVisor sessions a previous server left running" in log, log
        assert "adopted the containers a previous server left running" in log, log
        for n, identifier in enumerate(python_ids):
            result = execute(server, token, identifier, "print(mine, open('/mnt/data/owner.txt').read())")
            assert result["stdout"] == f"{n * 11 + 5} {identifier}\n", result
        for identifier, (instance, count) in instances.items():
            reply = counter(server, token, identifier)
            assert (reply["instance"], reply["count"]) == (instance, count + 1), (identifier, reply)
        # A new identifier gets a fresh session in both pools.
        assert "mine" not in execute(server, token, f"gv-{uuid.uuid4().hex[:8]}", "print(sorted(globals()))")["stdout"]
        assert counter(server, token, f"app-{uuid.uuid4().hex[:8]}")["count"] == 1
    finally:
        code = server.stop()
    assert code == 0, server.stderr_tail(100)
    assert running_containers(state) == [], "SIGTERM must remove every container"
