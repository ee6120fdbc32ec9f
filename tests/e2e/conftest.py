"""Fixtures for the sandpool end-to-end suite.

One real `sandpool serve` process is started for the whole test session (temporary state
directory under /tmp, shared Python runtime directory so the sessions' venv is built only
once), a bearer token is minted with `sandpool token issue`, and every test talks to it
through the real client libraries. Each test gets its own session identifier (uuid4), so
tests do not see each other's interpreter state or files.

Environment:
  SANDPOOL_BIN               the sandpool binary (default target/debug/sandpool in this repository)
  SANDPOOL_TEST_RUNTIME_DIR  the shared runtime dir (default target/sandpool-test-runtime in this repository)
  SANDPOOL_TEST_KEEP_STATE   if set, keep the server's temporary state dir after the run
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from e2e_support import (
    AZURE_PREFIX,
    EXECUTION_TIMEOUT_S,
    POOL_NAME,
    RUNTIME_DIR,
    SANDPOOL_BIN,
    binary_payload as _binary_payload,
)

# The first start of a server on a fresh runtime dir builds the sessions' Python venv.
STARTUP_TIMEOUT_S = 60
READY_TIMEOUT_S = 900
STOP_TIMEOUT_S = 60

LISTENING_RE = re.compile(r"listening on (http://\S+)")

CONFIG_TEMPLATE = """\
[runtime]
dir = "{runtime_dir}"

[[pools]]
name = "{pool}"
max_concurrent_sessions = 20
ready_session_instances = 2
cooldown_period_in_seconds = 300
execution_timeout_in_seconds = {timeout}
"""


@dataclass
class SandpoolServer:
    """A running `sandpool serve` process."""

    state_dir: Path
    config_path: Path
    stderr_path: Path
    proc: subprocess.Popen | None = None
    base_url: str = ""
    stdout_lines: list[str] = field(default_factory=list)
    _listening: threading.Event = field(default_factory=threading.Event)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        env = dict(os.environ)
        # Request-level decisions (refusals, errors) are logged at debug by the API crate.
        env.setdefault("SANDPOOL_LOG", "info,sandpool_api=debug")
        stderr = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [
                    SANDPOOL_BIN,
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--state-dir",
                    str(self.state_dir),
                    "--listen",
                    "127.0.0.1:0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        finally:
            stderr.close()
        threading.Thread(target=self._drain_stdout, name="sandpool-stdout", daemon=True).start()

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None:
                self._fail(f"sandpool exited with code {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                self._fail(f"sandpool printed no 'listening on' line within {STARTUP_TIMEOUT_S} s")

        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                self._fail(f"sandpool exited with code {self.proc.returncode} while starting; last /readyz: {last}")
            try:
                resp = requests.get(f"{self.base_url}/readyz", timeout=5)
                if resp.status_code == 200:
                    return
                last = f"{resp.status_code} {resp.text[:300]}"
            except requests.RequestException as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                self._fail(f"/readyz did not return 200 within {READY_TIMEOUT_S} s; last: {last}")
            time.sleep(0.25)

    def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if not self._listening.is_set():
                match = LISTENING_RE.search(line)
                if match:
                    self.base_url = match.group(1).rstrip("/")
                    self._listening.set()

    def stop(self) -> int | None:
        """SIGTERM and wait. Returns the exit code, or None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    # -- helpers ---------------------------------------------------------------------------

    def issue_token(self, *roles: str) -> str:
        """A token from the server's own issuer; role executor unless `roles` are given."""
        role_args = [arg for role in roles for arg in ("--role", role)]
        out = subprocess.run(
            [SANDPOOL_BIN, "token", "issue", "--state-dir", str(self.state_dir), *role_args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            self._fail(f"`sandpool token issue` failed ({out.returncode}): {out.stderr}")
        token = out.stdout.strip()
        if token.count(".") != 2 or "\n" in token:
            self._fail(f"`sandpool token issue` printed something that is not a JWT: {out.stdout!r}")
        return token

    def stderr_size(self) -> int:
        try:
            return self.stderr_path.stat().st_size
        except OSError:
            return 0

    def stderr_tail(self, lines: int = 80, since: int = 0) -> str:
        """The last `lines` lines of the server's stderr, from byte offset `since` on."""
        try:
            with open(self.stderr_path, "rb") as fh:
                fh.seek(since)
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.stderr_path}: {exc})"
        return "".join(collections.deque(text.splitlines(keepends=True), maxlen=lines)) or "(nothing logged)\n"

    def _fail(self, message: str) -> None:
        self.stop()
        pytest.fail(
            f"{message}\n--- sandpool stdout ---\n" + "\n".join(self.stdout_lines)
            + f"\n--- sandpool stderr (last lines of {self.stderr_path}) ---\n{self.stderr_tail(200)}",
            pytrace=False,
        )


_SERVER: SandpoolServer | None = None
_FAILED_TESTS: list[str] = []


@pytest.fixture(scope="session")
def sandpool_server():
    global _SERVER
    if not os.path.exists(SANDPOOL_BIN):
        pytest.fail(f"sandpool binary not found at {SANDPOOL_BIN}; build it (cargo build) or set SANDPOOL_BIN", pytrace=False)
    Path(RUNTIME_DIR).mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix="sandpool-e2e-"))
    config_path = state_dir / "config.toml"
    config_path.write_text(
        CONFIG_TEMPLATE.format(runtime_dir=RUNTIME_DIR, pool=POOL_NAME, timeout=EXECUTION_TIMEOUT_S)
    )
    # The server owns the state dir; keep our own files (config, log) beside it.
    server = SandpoolServer(
        state_dir=state_dir / "state",
        config_path=config_path,
        stderr_path=state_dir / "sandpool.stderr.log",
    )
    server.state_dir.mkdir()
    _SERVER = server
    try:
        server.start()
    except BaseException:
        server.stop()  # also on Ctrl-C while waiting for readiness
        raise
    yield server
    code = server.stop()
    _SERVER = None
    clean = code == 0
    if clean and not _FAILED_TESTS and not os.environ.get("SANDPOOL_TEST_KEEP_STATE"):
        shutil.rmtree(state_dir, ignore_errors=True)
    else:
        print(f"\nsandpool state and log kept in {state_dir}")
    if not clean:
        how = "did not exit within %d s of SIGTERM and was killed" % STOP_TIMEOUT_S if code is None else f"exited with code {code} after SIGTERM"
        pytest.fail(
            f"sandpool {how}\n--- sandpool stderr (tail) ---\n{server.stderr_tail(200)}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def base_url(sandpool_server: SandpoolServer) -> str:
    """http://127.0.0.1:PORT"""
    return sandpool_server.base_url


@pytest.fixture(scope="session")
def azure_endpoint(base_url: str) -> str:
    """The pool in the Azure shape, as a user would paste it from the portal."""
    return f"{base_url}{AZURE_PREFIX}"


@pytest.fixture(scope="session")
def pool_endpoint(base_url: str) -> str:
    """The pool under sandpool's own /pools/{name} prefix."""
    return f"{base_url}/pools/{POOL_NAME}"


@pytest.fixture(scope="session")
def token(sandpool_server: SandpoolServer) -> str:
    return sandpool_server.issue_token()


@pytest.fixture(scope="session")
def delete_session(pool_endpoint: str, token: str):
    """Deletes a session by identifier (cleanup; a missing session is fine)."""

    def delete(identifier: str) -> None:
        resp = requests.delete(
            f"{pool_endpoint}/session",
            params={"api-version": "2025-10-02-preview", "identifier": identifier},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert resp.status_code in (200, 204, 404), f"DELETE session {identifier}: {resp.status_code} {resp.text}"

    return delete


@pytest.fixture
def session_id(request, delete_session) -> str:
    """A fresh identifier per test. The session is deleted afterwards so the pool's
    max_concurrent_sessions is never the limit of how many tests can run."""
    sid = str(uuid.uuid4())
    request.node.user_properties.append(("session_id", sid))
    yield sid
    delete_session(sid)


@pytest.fixture
def binary_payload() -> bytes:
    return _binary_payload()


_LOG_OFFSET = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_LOG_OFFSET] = _SERVER.stderr_size() if _SERVER is not None else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _FAILED_TESTS.append(item.nodeid)
        if _SERVER is not None:
            since = item.stash.get(_LOG_OFFSET, 0)
            report.sections.append(
                ("sandpool server stderr during this test (last 80 lines)", _SERVER.stderr_tail(80, since=since))
            )
