"""Sessions surviving a crash or a restart of the server, and a pool's zygote dying, end to end.

Every test starts its own servers (one PythonLTS pool `main`) on a state directory of its own,
and restarts them on the same state directory and config:

* **`kill -9` under load**: a dozen identifiers with their own variables and `/mnt/data`
  files (some uploaded through the files API) while worker threads keep running cells in them
  and allocating new identifiers; the server is killed with SIGKILL mid-flight and started
  again. Every identifier that had completed a request gets its own sandbox back with its
  variables and files (checked by code and through the files API), none gets another one's
  state, every reply received before the crash was the right one for its own request, the
  requests in flight failed with a connection error (never a wrong answer), and retrying them
  on the restarted server works. The restarted server's log says it adopted the zygote and
  restored the sessions.
* **A long cell in flight** when the server is killed: after the restart the session's next
  request gets its own reply (not the stale one of the old request) and sees what the cell did
  once it finished.
* **Cooldown across a restart**: creation time and last access are kept, so a session is
  deleted `cooldown` after its last access before the crash, not after the restart.
* **SIGQUIT** finishes the request in flight and leaves the sessions running for the next
  start; **SIGTERM** deletes them (no zygote or session process is left, the next start
  restores nothing).
* **Killing a pool's zygote** (SIGKILL): the cell running in one of its sessions fails with
  `SessionTerminated` naming the zygote, the sessions' processes are gone, the event log says
  `backend_lost`, the identifiers get fresh sessions, new identifiers work, a new zygote starts
  and `/readyz` is 200 again.
* **The zygote dying while no server runs**: the next start adopts nothing, reports the
  sessions `lost_in_restart`, and the identifiers get fresh sessions.

Three more tests pin down what was once wrong: an idle session of a killed zygote is recorded
as `backend_lost` (not `crash`); reads (GET session, the files API) move a session's last
access and a crash a second later keeps it; a session whose cooldown ran out while the server
was down is not served after the restart.

The zygote is found through its adoption socket, `<state>/run/main/zygote-<id>.sock`: the process
holding the listening socket whose parent does not hold it. Only processes these tests started
are ever signalled, by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import requests

from conftest import SandpoolServer
from e2e_support import RUNTIME_DIR, SANDPOOL_BIN, binary_payload, new_id, sha256, wait_until

API = "2025-10-02-preview"
POOL = "main"

CONFIG = """\
[runtime]
dir = "{runtime}"

[[pools]]
name = "{pool}"
max_concurrent_sessions = 30
ready_session_instances = 2
cooldown_period_in_seconds = {cooldown}
execution_timeout_in_seconds = 30
"""

ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
ZYGOTE_GONE = "the pool's zygote exited and took the session with it"


# -- the server's API ----------------------------------------------------------------------


@dataclass
class Client:
    """Talks to whichever server of a `Restartable` is current."""

    env: "Restartable"
    token: str
    contributor: str

    @property
    def endpoint(self) -> str:
        return f"{self.env.server.base_url}/pools/{POOL}"

    def auth(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}

    def request(self, method: str, path: str, identifier: str | None = None, *, endpoint: str | None = None, **kwargs) -> requests.Response:
        params = dict(kwargs.pop("params", {}), **{"api-version": API})
        if identifier is not None:
            params["identifier"] = identifier
        headers = kwargs.pop("headers", None) or self.auth()
        timeout = kwargs.pop("timeout", 120)
        return requests.request(method, f"{endpoint or self.endpoint}{path}", params=params, headers=headers, timeout=timeout, **kwargs)

    def ok(self, resp: requests.Response, *statuses: int) -> requests.Response:
        assert resp.status_code in (statuses or (200,)), (
            f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text[:800]}\n"
            f"--- sandpool stderr (tail) ---\n{self.env.server.stderr_tail(40)}"
        )
        return resp

    # executions

    def execute(self, identifier: str, code: str, *, endpoint: str | None = None, timeout: float = 120) -> dict:
        body = {"codeInputType": "Inline", "executionType": "Synchronous", "code": code, "timeoutInSeconds": 30}
        return self.ok(self.request("POST", "/executions", identifier, endpoint=endpoint, json=body, timeout=timeout)).json()

    def value(self, identifier: str, code: str, **kwargs):
        """The value of the cell's last expression; the cell must succeed."""
        body = self.execute(identifier, code, **kwargs)
        assert body["status"] == "Succeeded", f"the cell failed: {json.dumps(body, indent=1)}"
        return body["result"]["executionResult"]

    # files

    def upload(self, identifier: str, name: str, data: bytes) -> None:
        self.ok(self.request("POST", "/files", identifier, files={"file": (name, data, "application/octet-stream")}))

    def files(self, identifier: str) -> dict[str, int]:
        resp = self.ok(self.request("GET", "/files", identifier, params={"recursive": "true"}))
        return {
            "/".join(filter(None, [f["directory"], f["name"]])): f["sizeInBytes"]
            for f in resp.json()["value"]
            if f["type"] == "File"
        }

    def download(self, identifier: str, name: str) -> bytes:
        return self.ok(self.request("GET", f"/files/{name}/content", identifier)).content

    # sessions and events

    def etag(self, identifier: str) -> str:
        """The sandbox serving the identifier (GET session; counts as an access)."""
        return self.ok(self.request("GET", "/session", identifier)).json()["etag"]

    def sessions(self) -> dict[str, dict]:
        """Every session by identifier (contributor list; does not touch them)."""
        resp = self.ok(self.request("GET", "/listSessions", headers=self.auth(self.contributor)))
        assert resp.json()["nextLink"] is None, "more sessions than one page"
        return {s["identifier"]: s for s in resp.json()["value"]}

    def events(self, identifier: str) -> list[dict]:
        resp = self.request("GET", "/events", headers=self.auth(self.contributor), params={"identifier": identifier, "limit": 1000})
        return self.ok(resp).json()["value"]

    def deletions(self, identifier: str) -> list[dict]:
        return [e for e in self.events(identifier) if e["kind"] == "deleted"]

    def readyz(self) -> requests.Response:
        return requests.get(f"{self.env.server.base_url}/readyz", timeout=30)


# -- servers on one state directory ---------------------------------------------------------


@dataclass
class Restartable:
    """One state directory and config, and the servers started on them one after another."""

    work: Path
    config: Path
    servers: list[SandpoolServer] = field(default_factory=list)
    client: Client | None = None

    @property
    def state(self) -> Path:
        return self.work / "state"

    @property
    def server(self) -> SandpoolServer:
        return self.servers[-1]

    @property
    def adopt_socket(self) -> Path:
        """The socket of the pool's zygote: `<state>/run/<pool>/zygote-<id>.sock`, one per
        zygote; the one something listens on, else the newest file."""
        run = self.state / "run" / POOL
        sockets = sorted(run.glob("zygote-*.sock"), key=lambda p: p.stat().st_mtime) if run.is_dir() else []
        listening = [path for path in sockets if zygote_pid(path) is not None]
        if listening:
            return listening[-1]
        return sockets[-1] if sockets else run / "zygote-none.sock"

    def start(self) -> SandpoolServer:
        assert not self.servers or self.server.proc.poll() is not None, "the previous server still runs"
        server = SandpoolServer(
            state_dir=self.state, config_path=self.config, stderr_path=self.work / f"sandpool-{len(self.servers) + 1}.stderr.log"
        )
        self.servers.append(server)
        server.start()
        if self.client is None:
            # Issued once: the signing key is in the state directory, so the tokens stay
            # valid for every later server.
            self.client = Client(self, server.issue_token(), server.issue_token("contributor"))
        return server

    def crash(self) -> None:
        """SIGKILL the current server: no handler runs, nothing is cleaned up."""
        proc = self.server.proc
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL

    def stop_with(self, sig: signal.Signals) -> int:
        proc = self.server.proc
        os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"sandpool did not stop within 90 s of {sig.name}\n{self.server.stderr_tail(60)}")

    def log(self) -> str:
        """The current server's log, without colours."""
        return ANSI_RE.sub("", self.server.stderr_path.read_text(errors="replace"))

    def zygote(self) -> int | None:
        return zygote_pid(self.adopt_socket)


@pytest.fixture
def restartable(request):
    """Makes `Restartable`s (`cooldown` in seconds). At the end every server still running is
    stopped with SIGTERM, which must leave no zygote behind."""
    if not os.path.exists(SANDPOOL_BIN):
        pytest.fail(f"sandpool binary not found at {SANDPOOL_BIN}; build it (cargo build) or set SANDPOOL_BIN", pytrace=False)
    Path(RUNTIME_DIR).mkdir(parents=True, exist_ok=True)
    made: list[Restartable] = []
    failed_before = request.session.testsfailed

    def make(cooldown: int = 300) -> Restartable:
        work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-restart-"))
        config = work / "config.toml"
        config.write_text(CONFIG.format(runtime=RUNTIME_DIR, pool=POOL, cooldown=cooldown))
        (work / "state").mkdir(mode=0o700)
        env = Restartable(work=work, config=config)
        made.append(env)
        return env

    yield make

    problems = []
    for env in made:
        if env.servers and env.server.proc is not None and env.server.proc.poll() is None:
            code = env.server.stop()
            if code != 0:
                problems.append(f"{env.work}: sandpool exited with {code} after SIGTERM\n{env.server.stderr_tail(40)}")
        # A crashed server whose successor never came up leaves its zygote: end it (it and
        # its sessions are this test's), but say so.
        left = env.zygote()
        if left is not None:
            os.kill(left, signal.SIGKILL)
            problems.append(f"{env.work}: zygote {left} still running after the last server stopped; killed it")
    clean = not problems and request.session.testsfailed == failed_before
    for env in made:
        if clean and not os.environ.get("SANDPOOL_TEST_KEEP_STATE"):
            shutil.rmtree(env.work, ignore_errors=True)
        else:
            print(f"\nsandpool state and logs kept in {env.work}")
    assert not problems, "\n".join(problems)


# -- processes ---------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def zygote_pid(adopt_socket: Path) -> int | None:
    """The zygote listening on `adopt_socket`, if any: the `sandpool __zygote` process that
    holds the listening socket and whose parent does not (its sessions' PID 1s inherit it)."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is "listening".
        if len(parts) >= 8 and parts[7] == str(adopt_socket) and int(parts[3], 16) & 0x10000:
            inodes.add(f"socket:[{parts[6]}]")
    if not inodes:
        return None
    holders = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    holders.add(int(entry))
                    break
            except OSError:
                continue
    roots = [pid for pid in holders if (_stat(pid) or ("", 0))[1] not in holders and cmdline(pid)[1:2] == ["__zygote"]]
    assert len(roots) <= 1, f"more than one zygote listens on {adopt_socket}: {roots}"
    return roots[0] if roots else None


def nobody_listens(path: Path) -> bool:
    """Connecting to the adoption socket fails (only called when no zygote should be there:
    a live zygote waits for a command from whoever connects)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return True
    return False


# -- small helpers ------------------------------------------------------------------------------


def when(text: str) -> float:
    """An RFC 3339 time from the server as seconds since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def log_fields(log: str, message: str) -> dict[str, str]:
    """The key=value fields of the (last) log line that contains `message`."""
    lines = [line for line in log.splitlines() if message in line]
    assert lines, f"the log has no line with {message!r}:\n{log[-4000:]}"
    return dict(re.findall(r"(\w+)=(\S+)", lines[-1].split(message, 1)[1]))


def deletion_reasons(api: Client, identifier: str) -> list[str]:
    return [e["details"].get("reason") for e in api.deletions(identifier)]


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.Timeout)


# -- 1. kill -9 under load ----------------------------------------------------------------------


@dataclass
class Outcome:
    identifier: str
    nonce: str
    code: str
    expected: str
    started: float
    ended: float = 0.0
    # "ok", "connection error" or the unexpected result/exception
    result: str = ""
    detail: str = ""


def setup_code(identifier: str) -> str:
    """Gives a session its state: `owner` (the same name everywhere), a variable with a name
    of its own, and a file of its own in /mnt/data."""
    var = "v_" + identifier.replace("-", "_")
    return (
        f"owner = {identifier!r}\n"
        f"{var} = 'value of ' + owner\n"
        f"with open('/mnt/data/{identifier}.txt', 'w') as f:\n"
        f"    f.write('file of ' + owner)\n"
        f"{var}"
    )


def state_code(identifier: str) -> str:
    """A JSON summary of what a session holds."""
    var = "v_" + identifier.replace("-", "_")
    return (
        "import json, os\n"
        f"json.dumps([globals().get('owner'), globals().get({var!r}),"
        f" open('/mnt/data/{identifier}.txt').read() if os.path.exists('/mnt/data/{identifier}.txt') else None,"
        " sorted(os.listdir('/mnt/data'))])"
    )


def test_kill_9_under_load_every_identifier_gets_its_own_session_back(restartable):
    env = restartable()
    env.start()
    api = env.client

    # A dozen sessions with state of their own; two also get an uploaded file.
    identifiers = [new_id("load") for _ in range(12)]
    uploads: dict[str, tuple[str, bytes]] = {}
    for identifier in identifiers:
        assert api.value(identifier, setup_code(identifier)) == f"value of {identifier}"
    for identifier in identifiers[:2]:
        uploads[identifier] = (f"upload-{identifier}.bin", binary_payload())
        api.upload(identifier, *uploads[identifier])
    etags = {identifier: api.etag(identifier) for identifier in identifiers}
    assert len(set(etags.values())) == len(identifiers), f"sandboxes shared between identifiers: {etags}"
    # One more, deleted before the crash: it must not come back.
    deleted = new_id("deleted")
    assert api.value(deleted, setup_code(deleted)) == f"value of {deleted}"
    api.ok(api.request("DELETE", "/session", deleted), 204)
    before = api.sessions()

    # Workers keep cells running (each a fraction of a second) in those sessions and in new
    # identifiers, always on the first server's address.
    endpoint = api.endpoint
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    in_flight = [0]

    def work(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            nonce = uuid.uuid4().hex[:8]
            if n % 6 == 0:
                identifier = new_id(f"fresh{worker}")
                code = setup_code(identifier) + f"\nimport time; time.sleep(0.3)\nf'{{owner}}|{nonce}'"
            else:
                identifier = identifiers[(worker * 5 + n) % len(identifiers)]
                code = f"import time; time.sleep(0.{3 + n % 5})\nf'{{owner}}|{nonce}'"
            outcome = Outcome(identifier, nonce, code, f"{identifier}|{nonce}", time.monotonic())
            with lock:
                outcomes.append(outcome)
                in_flight[0] += 1
            try:
                body = api.execute(identifier, code, endpoint=endpoint, timeout=60)
                got = body.get("result", {}).get("executionResult") if body.get("status") == "Succeeded" else body
                outcome.result = "ok" if got == outcome.expected else "wrong"
                outcome.detail = json.dumps(got)
            except BaseException as exc:  # noqa: BLE001 - recorded and judged below
                outcome.result = "connection error" if is_connection_error(exc) else "error"
                outcome.detail = repr(exc)
                if outcome.result == "connection error":
                    time.sleep(0.05)
            finally:
                outcome.ended = time.monotonic()
                with lock:
                    in_flight[0] -= 1

    workers = [threading.Thread(target=work, args=(i,), name=f"load-{i}", daemon=True) for i in range(4)]
    for thread in workers:
        thread.start()
    try:
        wait_until(lambda: sum(o.result == "ok" for o in outcomes) >= 40, 180, "the load to get going")
        wait_until(lambda: in_flight[0] >= 3, 30, "several requests in flight", interval=0.01)
        killing_at = time.monotonic()
        env.crash()
        killed_at, killed_wall = time.monotonic(), time.time()
        time.sleep(0.5)  # requests sent now find nobody listening
    finally:
        stop.set()
        for thread in workers:
            thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in workers), "a load thread hangs"

    # Before the crash every reply was the right one for its own request; afterwards nothing
    # answered, and nothing answered wrongly.
    wrong = [o for o in outcomes if o.result not in ("ok", "connection error")]
    assert not wrong, "replies that were not the request's own result:\n" + "\n".join(f"{o}" for o in wrong)
    succeeded = [o for o in outcomes if o.result == "ok"]
    failed = [o for o in outcomes if o.result == "connection error"]
    interrupted = [o for o in failed if o.started < killed_at]
    assert interrupted, "no request was in flight when the server was killed"
    early = [o for o in failed if o.ended < killing_at]
    assert not early, "requests failed before the server was killed:\n" + "\n".join(str(o) for o in early)
    completed = set(identifiers) | {o.identifier for o in succeeded}
    assert completed - set(identifiers), "no new identifier was allocated under load"

    env.start()
    log = env.log()
    adopted = log_fields(log, "adopted the zygote a previous server left, with its sessions")
    restored = log_fields(log, "sessions restored after a restart")
    assert adopted["pool"] == POOL and restored["pool"] == POOL, (adopted, restored)
    assert restored["lost"] == "0", restored
    assert int(restored["restored"]) >= len(completed), (restored, len(completed))
    assert int(adopted["sessions"]) >= int(restored["restored"]), (adopted, restored)

    # Creation times and last accesses come back as they were (before any request touches them).
    after = api.sessions()
    for identifier in identifiers:
        assert identifier in after, f"{identifier} was not restored: {sorted(after)}"
        assert abs(when(after[identifier]["createdAt"]) - when(before[identifier]["createdAt"])) < 2, (before[identifier], after[identifier])
        # The last access before the crash, not the restart.
        assert when(before[identifier]["lastAccessedAt"]) <= when(after[identifier]["lastAccessedAt"]) <= killed_wall, (
            before[identifier],
            after[identifier],
        )

    # Every identifier that completed a request has its own state, files and sandbox back.
    for identifier in sorted(completed):
        owner, var, text, listing = json.loads(api.value(identifier, state_code(identifier)))
        assert (owner, var, text) == (identifier, f"value of {identifier}", f"file of {identifier}"), (identifier, owner, var, text)
        expected_files = {f"{identifier}.txt"} | ({uploads[identifier][0]} if identifier in uploads else set())
        assert set(listing) == expected_files, f"{identifier} sees {listing}"
        assert set(api.files(identifier)) == expected_files
        assert api.download(identifier, f"{identifier}.txt") == f"file of {identifier}".encode()
        if identifier in uploads:
            name, data = uploads[identifier]
            assert sha256(api.download(identifier, name)) == sha256(data)
            assert api.files(identifier)[name] == len(data)
        if identifier in etags:
            assert api.etag(identifier) == etags[identifier], f"{identifier} got another sandbox"

    # The session deleted before the crash stayed deleted: a fresh one, without its state.
    assert deleted not in after
    assert json.loads(api.value(deleted, state_code(deleted))) == [None, None, None, []]

    # The interrupted work, retried on the restarted server, works (fresh identifiers whose
    # first request was cut off get their state now).
    for outcome in interrupted:
        assert api.value(outcome.identifier, outcome.code) == outcome.expected, outcome
    for identifier in {o.identifier for o in interrupted}:
        owner, var, text, _ = json.loads(api.value(identifier, state_code(identifier)))
        assert (owner, var, text) == (identifier, f"value of {identifier}", f"file of {identifier}")

    # No sandbox serves two identifiers.
    everything = sorted(completed | {o.identifier for o in interrupted})
    sandboxes = {identifier: api.etag(identifier) for identifier in everything}
    assert len(set(sandboxes.values())) == len(sandboxes), sandboxes


# -- 2. a long cell in flight -----------------------------------------------------------------------


def test_a_cell_in_flight_during_a_crash_finishes_and_the_next_request_gets_its_own_reply(restartable):
    env = restartable()
    env.start()
    api = env.client
    identifier = new_id("long")
    assert api.value(identifier, "x = 1\nx") == 1
    sandbox = api.etag(identifier)

    cut_off: list[BaseException | dict] = []

    def long_cell() -> None:
        try:
            cut_off.append(
                api.execute(
                    identifier,
                    "import time\ntime.sleep(10)\nx = 2\nopen('/mnt/data/cell-finished', 'w').write(repr(time.time()))\n"
                    "'reply of the old request'",
                )
            )
        except BaseException as exc:  # noqa: BLE001
            cut_off.append(exc)

    thread = threading.Thread(target=long_cell, daemon=True)
    thread.start()
    time.sleep(1.5)
    env.crash()
    thread.join(timeout=30)
    assert len(cut_off) == 1 and isinstance(cut_off[0], BaseException) and is_connection_error(cut_off[0]), cut_off

    env.start()
    # Sent while the old cell still runs: its reply comes first on the session's socket and
    # must not be taken for this one's; this one runs once the cell is done.
    nonce = uuid.uuid4().hex[:8]
    sent_at = time.time()
    body = api.execute(identifier, f"f'fresh-{nonce}-{{x}}'")
    assert body["status"] == "Succeeded", body
    assert body["result"]["executionResult"] == f"fresh-{nonce}-2", body
    finished_at = float(api.download(identifier, "cell-finished"))
    assert sent_at < finished_at, (
        f"the restart took so long that the old cell had finished {sent_at - finished_at:.1f} s before the next request; "
        "this test did not overlap them"
    )
    assert api.value(identifier, "x") == 2
    assert api.etag(identifier) == sandbox

    # A second crash: the zygote, now adopted (its parent is no server), is adopted again.
    zygote = env.zygote()
    assert zygote is not None and _stat(zygote)[1] != env.server.proc.pid
    env.crash()
    env.start()
    assert env.zygote() == zygote
    assert api.value(identifier, "x += 1\nx") == 3
    assert api.etag(identifier) == sandbox


# -- 3. cooldown across a restart --------------------------------------------------------------------

COOLDOWN_S = 24


def test_the_cooldown_keeps_counting_from_the_last_access_before_a_crash(restartable):
    env = restartable(cooldown=COOLDOWN_S)
    env.start()
    api = env.client
    identifier = new_id("cool")
    assert api.value(identifier, "y = 'set'\ny") == "set"
    session = api.sessions()[identifier]
    last_access = when(session["lastAccessedAt"])
    assert abs(when(session["expiresAt"]) - (last_access + COOLDOWN_S)) < 0.01, session

    # Crash well into the cooldown, and start again.
    time.sleep(max(0.0, last_access + 10 - time.time()))
    env.crash()
    env.start()
    restarted_at = time.time()
    assert restarted_at < last_access + COOLDOWN_S - 4, (
        f"the restart took {restarted_at - last_access:.1f} s after the last access; too slow for this test to tell anything"
    )
    # Right after the restart: still there, with its times as they were.
    restored = api.sessions().get(identifier)
    assert restored is not None, f"the session was not restored\n{env.log()[-3000:]}"
    assert abs(when(restored["lastAccessedAt"]) - last_access) < 1, (session, restored)
    assert abs(when(restored["createdAt"]) - when(session["createdAt"])) < 1, (session, restored)
    assert abs(when(restored["expiresAt"]) - (last_access + COOLDOWN_S)) < 1, (session, restored)

    # Deleted by the cooldown about COOLDOWN_S after the last access before the crash; a clock
    # restarted by the restart would only fire at restarted_at + COOLDOWN_S (>= last access + 34 s).
    def deleted():
        events = [e for e in api.deletions(identifier) if e["details"].get("reason") == "cooldown"]
        return events[-1] if events else None

    event = wait_until(deleted, last_access + COOLDOWN_S + 30 - time.time(), "the cooldown deletion")
    deleted_after = when(event["time"]) - last_access
    assert COOLDOWN_S - 1 <= deleted_after <= COOLDOWN_S + 4, (
        f"deleted {deleted_after:.1f} s after the last access (cooldown {COOLDOWN_S} s, restart at +{restarted_at - last_access:.1f} s)"
    )
    assert identifier not in api.sessions()
    # The identifier gets a fresh session.
    body = api.execute(identifier, "y")
    assert body["status"] == "Failed" and "NameError" in body["result"]["stderr"], body


# -- 4. SIGQUIT and SIGTERM -------------------------------------------------------------------------


def test_sigquit_leaves_the_sessions_for_the_next_start_and_sigterm_deletes_them(restartable):
    env = restartable()
    env.start()
    api = env.client
    identifier = new_id("quit")
    assert api.value(identifier, setup_code(identifier)) == f"value of {identifier}"
    sandbox = api.etag(identifier)
    zygote = env.zygote()
    assert zygote is not None and _stat(zygote)[1] == env.server.proc.pid, "the zygote is not the server's child"

    # SIGQUIT while a cell runs: the request finishes, then the server exits 0.
    slow = new_id("slow")
    replies: list = []
    thread = threading.Thread(
        target=lambda: replies.append(api.execute(slow, "import time\ntime.sleep(3)\n'finished during the stop'")), daemon=True
    )
    thread.start()
    time.sleep(1.5)
    assert env.stop_with(signal.SIGQUIT) == 0, env.server.stderr_tail(40)
    thread.join(timeout=60)
    assert replies and replies[0]["status"] == "Succeeded", replies
    assert replies[0]["result"]["executionResult"] == "finished during the stop", replies
    assert "stopped; sessions keep running and the next start adopts them" in env.log()
    assert alive(zygote) and env.zygote() == zygote, "SIGQUIT stopped the zygote"

    env.start()
    assert env.zygote() == zygote, "the restarted server did not adopt the zygote"
    restored = log_fields(env.log(), "sessions restored after a restart")
    assert restored["lost"] == "0" and int(restored["restored"]) >= 2, restored
    owner, var, text, listing = json.loads(api.value(identifier, state_code(identifier)))
    assert (owner, var, text, listing) == (identifier, f"value of {identifier}", f"file of {identifier}", [f"{identifier}.txt"])
    assert api.etag(identifier) == sandbox
    sessions = children(zygote)
    assert sessions, "the zygote has no session processes"

    # SIGTERM: every session and the zygote end.
    assert env.stop_with(signal.SIGTERM) == 0, env.server.stderr_tail(40)
    wait_until(lambda: not alive(zygote), 30, "the zygote to exit after SIGTERM")
    wait_until(lambda: not any(alive(pid) for pid in sessions), 30, "the session processes to exit after SIGTERM")
    assert env.zygote() is None
    assert nobody_listens(env.adopt_socket)

    env.start()
    log = env.log()
    assert "adopted the zygote" not in log, log[-3000:]
    assert identifier not in api.sessions()
    body = api.execute(identifier, "owner")
    assert body["status"] == "Failed" and "NameError" in body["result"]["stderr"], body
    assert f"{identifier}.txt" not in api.files(identifier)
    assert api.etag(identifier) != sandbox
    assert env.zygote() not in (None, zygote)


# -- 5. the zygote dies --------------------------------------------------------------------------------


def test_killing_the_zygote_ends_its_sessions_clearly_and_the_pool_recovers(restartable):
    env = restartable()
    env.start()
    api = env.client
    idle, busy = new_id("idle"), new_id("busy")
    assert api.value(idle, "kept = 'idle state'\nkept") == "idle state"
    assert api.value(busy, "kept = 'busy state'\nkept") == "busy state"
    sandboxes = {idle: api.etag(idle), busy: api.etag(busy)}
    zygote = env.zygote()
    assert zygote is not None and _stat(zygote)[1] == env.server.proc.pid
    sessions = children(zygote)
    assert len(sessions) >= 4, f"expected the processes of 2 sessions and 2 ready ones under the zygote: {sessions}"

    replies: list = []
    thread = threading.Thread(target=lambda: replies.append(api.execute(busy, "import time\ntime.sleep(20)\n'not reached'")), daemon=True)
    thread.start()
    time.sleep(1.5)
    os.kill(zygote, signal.SIGKILL)

    # The cell in flight fails with the reason.
    thread.join(timeout=60)
    assert replies, "the execution did not return"
    body = replies[0]
    assert body["status"] == "Failed", body
    assert body["error"]["code"] == "SessionTerminated", body
    assert ZYGOTE_GONE in body["error"]["message"], body
    assert "the next request with this identifier starts a new session" in body["error"]["message"], body
    # Its sessions went with it.
    wait_until(lambda: not any(alive(pid) for pid in sessions), 30, "the sessions' processes to end with the zygote")

    # The busy session's deletion is recorded as the backend lost; the idle one's deletion is
    # recorded too (its reason: see the next test), before any request touches it again.
    reasons = wait_until(lambda: deletion_reasons(api, busy), 30, f"the deletion of {busy} to be recorded")
    assert reasons == ["backend_lost"], reasons
    wait_until(lambda: deletion_reasons(api, idle), 30, f"the deletion of {idle} to be recorded")

    # The pool recovers: a new zygote, /readyz 200, fresh sessions for the old identifiers,
    # new identifiers work.
    wait_until(lambda: api.readyz().status_code == 200, 120, "/readyz to be 200 again")
    for identifier in (busy, idle):
        again = api.execute(identifier, "kept")
        assert again["status"] == "Failed" and "NameError" in again["result"]["stderr"], again
        assert api.value(identifier, "6 * 7") == 42
        assert api.etag(identifier) != sandboxes[identifier]
    newcomer = new_id("new")
    assert api.value(newcomer, "import os\nos.getcwd()") == "/mnt/data"
    replacement = wait_until(env.zygote, 30, "a new zygote")
    assert replacement != zygote and alive(replacement)
    log = env.log()
    assert "the zygote exited; its sessions are gone" in log, log[-3000:]


def test_an_idle_session_of_a_killed_zygote_is_recorded_as_backend_lost(restartable):
    env = restartable()
    env.start()
    api = env.client
    idle = new_id("idle")
    assert api.value(idle, "kept = 1\nkept") == 1
    zygote = env.zygote()
    assert zygote is not None
    os.kill(zygote, signal.SIGKILL)
    reasons = wait_until(lambda: deletion_reasons(api, idle), 30, f"the deletion of {idle} to be recorded")
    assert reasons == ["backend_lost"], reasons


# -- 6. the zygote dies while no server runs -----------------------------------------------------


def test_sessions_whose_zygote_died_while_the_server_was_down_are_reported_lost(restartable):
    env = restartable()
    env.start()
    api = env.client
    identifiers = [new_id("gone"), new_id("gone")]
    for identifier in identifiers:
        assert api.value(identifier, setup_code(identifier)) == f"value of {identifier}"
    zygote = env.zygote()
    assert zygote is not None
    sessions = children(zygote)
    env.crash()
    assert alive(zygote), "the zygote did not outlive the server"
    os.kill(zygote, signal.SIGKILL)
    wait_until(lambda: not alive(zygote) and not any(alive(pid) for pid in sessions), 30, "the zygote and its sessions to end")
    assert env.adopt_socket.exists(), "expected the dead zygote's socket file to be left behind"

    env.start()
    log = env.log()
    assert "adopted the zygote" not in log, log[-3000:]
    restored = log_fields(log, "sessions restored after a restart")
    assert (restored["restored"], restored["lost"]) == ("0", str(len(identifiers))), restored
    assert api.sessions() == {}
    for identifier in identifiers:
        # The loss is in the event log, and the identifier gets a fresh session.
        assert deletion_reasons(api, identifier) == ["lost_in_restart"], api.events(identifier)
        assert json.loads(api.value(identifier, state_code(identifier))) == [None, None, None, []]
    replacement = env.zygote()
    assert replacement is not None and replacement != zygote


# -- once wrong: reasons, reads, expiry during downtime ------------------------------------------


def test_the_last_access_shown_before_a_crash_is_the_one_restored(restartable):
    env = restartable()
    env.start()
    api = env.client
    identifier = new_id("read")
    assert api.value(identifier, "z = 1\nz") == 1
    time.sleep(2)
    api.files(identifier)
    api.etag(identifier)
    shown = api.sessions()[identifier]
    # Reads reach the session table with its next fold, within a second.
    time.sleep(1.5)
    env.crash()
    env.start()
    restored = api.sessions()[identifier]
    assert abs(when(restored["lastAccessedAt"]) - when(shown["lastAccessedAt"])) < 1, (shown, restored)


def test_a_session_that_expired_while_the_server_was_down_is_not_served(restartable):
    cooldown = 6
    env = restartable(cooldown=cooldown)
    env.start()
    api = env.client
    identifier = new_id("expired")
    assert api.value(identifier, "z = 'before the crash'\nz") == "before the crash"
    last_access = when(api.sessions()[identifier]["lastAccessedAt"])
    env.crash()
    time.sleep(max(0.0, last_access + cooldown + 3 - time.time()))

    # The first request is sent as soon as the restarted server listens.
    server = SandpoolServer(state_dir=env.state, config_path=env.config, stderr_path=env.work / "sandpool-late.stderr.log")
    env.servers.append(server)
    starting = threading.Thread(target=server.start, daemon=True)
    starting.start()
    assert server._listening.wait(60), "the restarted server did not listen"
    body = api.execute(identifier, "globals().get('z')")
    starting.join(timeout=120)
    assert body["status"] == "Succeeded", body
    assert body["result"]["executionResult"] in ("", None), (
        f"a session idle for {time.time() - last_access:.0f} s (cooldown {cooldown} s) served a request with its old state: {body}"
    )


def test_an_earlier_templates_zygote_is_stopped_after_a_crash_not_orphaned(restartable):
    """A template change leaves the old zygote serving its allocated sessions, on a socket of
    its own. After a crash the restarted server adopts the zygote of the pool's current
    settings and stops the other one, so no zygote is left running unowned."""
    env = restartable()
    env.start()
    api = env.client
    kept = new_id("kept")
    assert api.value(kept, "v = 'old template'\nv") == "old template"
    old_zygote = env.zygote()
    resp = requests.patch(
        f"{env.server.base_url}/pools/{POOL}",
        json={"properties": {"scaleConfiguration": {"readySessionInstances": 1}}},
        headers=api.auth(api.contributor),
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    new_zygote = env.zygote()
    assert new_zygote not in (None, old_zygote) and alive(old_zygote), "both zygotes run after the change"
    env.crash()
    env.start()
    deadline = time.monotonic() + 30
    while alive(old_zygote) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(old_zygote), "the earlier template's zygote was left running"
    listening = [p for p in (env.state / "run" / POOL).glob("zygote-*.sock") if zygote_pid(p) is not None]
    assert len(listening) == 1, listening
    # New sessions work; the earlier template's session did not survive (its zygote ran
    # other settings), and its identifier gets a fresh one.
    assert api.value(new_id("after"), "1 + 1") == 2
    assert api.value(kept, "'v' in globals()") is False
