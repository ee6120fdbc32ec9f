"""Faults of the state directory and the config file, end to end.

* **A full disk under the state directory**: the server's state directory is a small tmpfs
  that the test fills up. A pool change is refused with a clear error (507, nothing
  changed), sessions keep working, and once space is freed everything works again; after a
  restart the database holds exactly what was committed.
* **A broken config file** sent with SIGHUP: the error in the log names the problem and the
  running pools stay as they are; a fixed file is then applied (pools created and deleted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import SandpoolServer
from e2e_support import RUNTIME_DIR

API = "2025-10-02-preview"

CONFIG = """\
[runtime]
dir = "{runtime}"

[[pools]]
name = "main"
max_concurrent_sessions = 10
ready_session_instances = 1
cooldown_period_in_seconds = 300
{extra}
"""

EXTRA_POOL = """
[[pools]]
name = "{name}"
max_concurrent_sessions = 3
ready_session_instances = 0
"""


def write_config(path: Path, extra: str = "") -> None:
    path.write_text(CONFIG.format(runtime=RUNTIME_DIR, extra=extra))


def start(work: Path, config: Path, state: Path) -> SandpoolServer:
    server = SandpoolServer(state_dir=state, config_path=config, stderr_path=work / f"sandpool-{uuid.uuid4().hex[:6]}.log")
    server.start()
    return server


def execute(server: SandpoolServer, token: str, identifier: str, code: str) -> dict:
    resp = requests.post(
        f"{server.base_url}/pools/main/executions",
        params={"api-version": API, "identifier": identifier},
        headers={"Authorization": f"Bearer {token}"},
        json={"codeInputType": "Inline", "executionType": "Synchronous", "code": code, "timeoutInSeconds": 30},
        timeout=60,
    )
    assert resp.status_code in (200, 202), resp.text
    return resp.json()


def python_pool(name: str) -> dict:
    return {"properties": {"containerType": "PythonLTS", "scaleConfiguration": {"maxConcurrentSessions": 2, "readySessionInstances": 0}}}


def pool_names(server: SandpoolServer, contributor: str) -> list[str]:
    resp = requests.get(f"{server.base_url}/pools", headers={"Authorization": f"Bearer {contributor}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return sorted(pool["name"] for pool in resp.json()["value"])


@pytest.fixture
def workdir():
    work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-faults-"))
    yield work
    subprocess.run(["umount", "-l", str(work / "state")], capture_output=True)


def test_a_full_state_disk_refuses_changes_clearly_and_loses_nothing(workdir: Path):
    state = workdir / "state"
    state.mkdir(mode=0o700)
    # Room for the database, keys and run-time files, not much more.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(state)], check=True)
    config = workdir / "config.toml"
    write_config(config)
    server = start(workdir, config, state)
    try:
        token, contributor = server.issue_token(), server.issue_token("contributor")
        headers = {"Authorization": f"Bearer {contributor}"}
        identifier = f"disk-{uuid.uuid4().hex[:8]}"
        assert execute(server, token, identifier, "kept = 'before the disk filled'; kept")["status"] == "Succeeded"
        assert requests.put(f"{server.base_url}/pools/before", json=python_pool("before"), headers=headers, timeout=300).status_code == 201

        filler = state / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
        resp = requests.put(f"{server.base_url}/pools/during", json=python_pool("during"), headers=headers, timeout=300)
        assert resp.status_code == 507, resp.text
        error = resp.json()["error"]
        assert "full" in error["message"] and "nothing was changed" in error["message"], error
        assert pool_names(server, contributor) == ["before", "main"]
        resp = requests.get(f"{server.base_url}/pools/during", headers=headers, timeout=30)
        assert resp.status_code == 404, "a refused pool must not half-exist"
        # Sessions do not need the disk: they keep working.
        assert execute(server, token, identifier, "kept")["result"]["executionResult"] == "before the disk filled"

        filler.unlink()
        resp = requests.put(f"{server.base_url}/pools/after", json=python_pool("after"), headers=headers, timeout=300)
        assert resp.status_code == 201, resp.text
    finally:
        assert server.stop() == 0, server.stderr_tail(80)
    # The database holds exactly what was committed.
    server = start(workdir, config, state)
    try:
        assert pool_names(server, server.issue_token("contributor")) == ["after", "before", "main"]
    finally:
        assert server.stop() == 0, server.stderr_tail(80)


def test_a_broken_config_file_on_sighup_keeps_the_running_pools(workdir: Path):
    state = workdir / "state"
    state.mkdir(mode=0o700)
    config = workdir / "config.toml"
    write_config(config, EXTRA_POOL.format(name="extra"))
    server = start(workdir, config, state)
    try:
        contributor = server.issue_token("contributor")
        assert pool_names(server, contributor) == ["extra", "main"]
        since = server.stderr_size()
        config.write_text(config.read_text() + '\n[[pools]]\nname = "broken"\nmax_sesions = 3\n')
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "SIGHUP" not in server.stderr_tail(40, since) and time.monotonic() < deadline:
            time.sleep(0.2)
        log = server.stderr_tail(40, since)
        assert "the config file is not valid, so nothing changed" in log, log
        assert "max_sesions" in log, f"the error must name the bad key:\n{log}"
        assert pool_names(server, contributor) == ["extra", "main"]
        assert server.proc.poll() is None, "a broken file must not stop the server"

        # Fixed: `extra` leaves the file and `added` joins it.
        since = server.stderr_size()
        write_config(config, EXTRA_POOL.format(name="added"))
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 120
        while pool_names(server, contributor) != ["added", "main"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool_names(server, contributor) == ["added", "main"], server.stderr_tail(40, since)
        log = server.stderr_tail(40, since)
        assert "pool 'added' created" in log and "pool 'extra' deleted" in log, log
    finally:
        assert server.stop() == 0, server.stderr_tail(80)
