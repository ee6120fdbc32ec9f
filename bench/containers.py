#!/usr/bin/env python3
"""Cold start and warm allocation of custom-container sessions, under crun and under runsc.

One `sandpool serve` with four custom-container pools, all running the project's test app
(crates/testapp, static, built by tests/e2e/oci_images.py) from an OCI image layout on disk
(`image = "oci:DIR:TAG"`: no registry, so the figures are about starting containers, not
about pulling images):

    crunwarm   runtime = "crun",  ready_session_instances = --ready (4)
    cruncold   runtime = "crun",  ready_session_instances = 0
    runscwarm  runtime = "runsc", ready_session_instances = --ready (4)
    runsccold  runtime = "runsc", ready_session_instances = 0

Measured at the client, over HTTP/1.1 keep-alive with a bearer token, for each runtime:

* warm allocation: `GET /pools/<warm>/counter?identifier=<new>` while the pool's ready
  queue is full (the benchmark waits until the refill after the previous sample is done);
* cold start: the same on the pool with no ready session (creating the session's overlay,
  network namespace and container, and waiting until the app accepts connections);
* repeat request: `GET /counter` again in a live session;
* memory of idle sessions: cgroup v1 `memory.usage_in_bytes` of each session's cgroup.

Samples of both runtimes are interleaved; before each one every pool is back to its resting
state (warm pools full, no session being torn down) and the CPUs are given a moment to be
quiet. Writes `<out-dir>/containers.json` and `<out-dir>/containers.md`, and prints the
Markdown. Run as root (sandpool starts containers): `sudo ./scripts/bench-containers`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))
import oci_images  # noqa: E402  (the e2e suite's image builder: standard library only here)

RUNTIMES = ("crun", "runsc")
POOLS = {  # pool name -> (runtime, warm?)
    "crunwarm": ("crun", True),
    "cruncold": ("crun", False),
    "runscwarm": ("runsc", True),
    "runsccold": ("runsc", False),
}
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
LISTENING_RE = re.compile(r"listening on http://(\S+)")

CONFIG = """\
[[pools]]
name = "{name}"
container_type = "CustomContainer"
runtime = "{runtime}"
max_concurrent_sessions = {max_sessions}
ready_session_instances = {ready}
cooldown_period_in_seconds = 3600

[pools.container]
image = "oci:{layout}:v1"
target_port = 8080

[pools.resources]
cpu = 1.0
memory = "256Mi"
data_dir_size = "16Mi"

"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the server ---------------------------------------------------------------------------


class Server:
    def __init__(self, binary: str, config: Path, state_dir: Path, log_path: Path):
        self.binary, self.config, self.state_dir, self.log_path = binary, config, state_dir, log_path
        self.proc: subprocess.Popen | None = None
        self.host = ""
        self._listening = threading.Event()

    def start(self, timeout: float = 600) -> None:
        env = dict(os.environ)
        env.setdefault("SANDPOOL_LOG", "info")
        with open(self.log_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--config", str(self.config), "--state-dir", str(self.state_dir),
                 "--listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
            )
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"sandpool did not print 'listening on' within {timeout} s; see {self.log_path}")
        while True:
            self._check_alive()
            try:
                status, body = self.get("/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"/readyz did not answer 200 within {timeout} s; see {self.log_path}")
            time.sleep(0.25)

    def _drain(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            match = LISTENING_RE.search(line)
            if match and not self._listening.is_set():
                self.host = match.group(1).rstrip("/")
                self._listening.set()

    def _check_alive(self) -> None:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"sandpool exited with code {self.proc.returncode}; see {self.log_path}:\n{tail(self.log_path)}")

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def issue_token(self, *roles: str) -> str:
        args = [arg for role in roles for arg in ("--role", role)]
        out = subprocess.run([self.binary, "token", "issue", "--state-dir", str(self.state_dir), *args],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    def stop(self, timeout: float = 120) -> float | None:
        """SIGTERM; returns how long the server took to exit (None if it had to be killed)."""
        if not self.proc or self.proc.poll() is not None:
            return None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
            return time.monotonic() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


class Client:
    """One keep-alive HTTP/1.1 connection, opened before any clock starts."""

    def __init__(self, host: str, token: str):
        self.host, self.headers = host, {"Authorization": f"Bearer {token}"}
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, timeout=120)
        conn.connect()
        return conn

    def request(self, method: str, path: str) -> tuple[int, bytes, float]:
        """(status, body, milliseconds from sending the request to the last byte of the body)."""
        for attempt in (1, 2):
            try:
                start = time.perf_counter_ns()
                self.conn.request(method, path, headers=self.headers)
                resp = self.conn.getresponse()
                body = resp.read()
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = self._connect()
                return resp.status, body, elapsed
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection; only safe to retry once
                # because nothing was received (a new identifier stays new).
                self.conn.close()
                self.conn = self._connect()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


# -- the machine ------------------------------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]), idle


def cpu_busy(interval: float) -> float:
    """Fraction of all CPUs busy over `interval` seconds."""
    total0, idle0 = cpu_times()
    time.sleep(interval)
    total1, idle1 = cpu_times()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text()
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "cgroup": "v1 memory controller" if (CGROUP_MEMORY / "memory.usage_in_bytes").exists() else "no cgroup v1 memory controller",
    }


def command_output(*argv: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        return (out.stdout or out.stderr).strip()
    except OSError as exc:
        return f"unavailable ({exc})"


def versions(binary: str) -> dict:
    commit = command_output("git", "rev-parse", "HEAD")
    dirty = command_output("git", "status", "--porcelain", "--untracked-files=no", "--", "crates", "Cargo.lock")
    sandpool_dirty = command_output("git", "status", "--porcelain", "--untracked-files=no", "--", "crates/sandpool", "crates/container",
                                    "crates/engine", "crates/api")
    profile = "release" if "/release/" in str(Path(binary).resolve()) else "debug" if "/debug/" in str(Path(binary).resolve()) else "?"
    return {
        "crun": command_output("crun", "--version").splitlines()[0],
        "runsc": command_output("runsc", "--version").splitlines()[0],
        "sandpool binary": f"{command_output(binary, '--version')} ({profile} build, {binary})",
        "sandpool binary built": datetime.datetime.fromtimestamp(os.stat(binary).st_mtime, datetime.timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sandpool git commit (HEAD when the run started)": commit + (" (working tree of crates/ differs from it)" if dirty else ""),
        "sandpool crates changed in the working tree": sandpool_dirty.replace("\n", "; ") or "none",
        "rustc": command_output("rustc", "--version"),
        "python (client)": platform.python_version(),
    }


# -- helpers -----------------------------------------------------------------------------------


def instance_name(state_dir: Path) -> str:
    """The server's cgroup subtree name (crates/sandpool/src/serve.rs: instance_name)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(state_dir))).digest()
    return f"sandpool-{digest[:4].hex()}"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, server: Server, token: str, reader: str):
        self.args, self.server, self.reader = args, server, reader
        self.client = Client(server.host, token)
        self.notes: list[str] = []
        self.busy_before: list[float] = []
        self.quiet_waits = 0
        self.still_busy = 0

    # -- pool state ------------------------------------------------------------------------

    def ready_counts(self) -> dict[str, int]:
        """Ready sessions per pool, from the `sandpool_sessions{pool,state="ready"}` gauge."""
        status, body = self.server.get("/metrics", self.reader)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {body[:300]!r}")
        counts = {}
        for match in re.finditer(r'^sandpool_sessions\{pool="([a-z0-9]+)",state="ready"\} (\d+)', body.decode(), re.M):
            counts[match.group(1)] = int(match.group(2))
        return counts

    def allocations(self) -> dict[str, dict[str, dict[str, float]]]:
        """The server's own view: allocations per pool and source (ready_queue or created), with
        the mean time a request waited for its session (ms), from
        `sandpool_session_allocation_seconds_{count,sum}`."""
        _, body = self.server.get("/metrics", self.reader)
        found: dict[str, dict[str, dict[str, float]]] = {}
        for match in re.finditer(r'^sandpool_session_allocation_seconds_(count|sum)\{pool="([a-z0-9]+)",source="([a-z_]+)"\} (\S+)',
                                 body.decode(), re.M):
            kind, pool, source, value = match.groups()
            found.setdefault(pool, {}).setdefault(source, {})[kind] = float(value)
        return {pool: {source: {"count": int(v.get("count", 0)), "mean_wait_ms": 1000 * v.get("sum", 0) / max(1, v.get("count", 0))}
                       for source, v in sources.items()} for pool, sources in found.items()}

    def container_dirs(self, pool: str) -> int:
        directory = self.server.state_dir / "run" / pool / "containers"
        try:
            return sum(1 for entry in directory.iterdir() if entry.is_dir())
        except FileNotFoundError:
            return 0

    def resting(self, used: int = 0) -> bool:
        """Every warm pool has its ready queue full, no pool is creating or tearing down a
        session, and each cold pool holds exactly `used` sessions."""
        counts = self.ready_counts()
        for pool, (_, warm) in POOLS.items():
            ready = self.args.ready if warm else 0
            if counts.get(pool) != ready or self.container_dirs(pool) != (ready if warm else used):
                return False
        return True

    def wait_resting(self, used: int = 0, timeout: float = 120) -> float:
        start = time.monotonic()
        while not self.resting(used):
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the pools did not come back to rest within {timeout} s: ready {self.ready_counts()}, "
                                   f"session dirs { {p: self.container_dirs(p) for p in POOLS} }")
            time.sleep(0.02)
        return time.monotonic() - start

    def wait_quiet(self) -> None:
        """Up to --quiet-wait seconds for the CPUs to be less than --quiet-busy busy (the
        machine is shared); records how busy they were just before the sample."""
        deadline = time.monotonic() + self.args.quiet_wait
        busy = cpu_busy(0.25)
        waited = False
        while busy > self.args.quiet_busy and time.monotonic() < deadline:
            waited = True
            busy = cpu_busy(0.25)
        self.quiet_waits += waited
        self.still_busy += busy > self.args.quiet_busy
        self.busy_before.append(busy)

    # -- samples -----------------------------------------------------------------------------

    def first_request(self, pool: str) -> tuple[str, float]:
        identifier = f"bench-{uuid.uuid4().hex[:16]}"
        status, body, ms = self.client.request("GET", f"/pools/{pool}/counter?identifier={identifier}")
        if status != 200:
            raise RuntimeError(f"GET /pools/{pool}/counter for a new identifier answered {status}: {body[:500]!r}\n{tail(self.server.log_path)}")
        count = json.loads(body)["count"]
        if count != 1:
            raise RuntimeError(f"a new identifier on {pool} reached a used container (count {count})")
        return identifier, ms

    def delete(self, pool: str, identifier: str) -> None:
        status, body, _ = self.client.request("DELETE", f"/pools/{pool}/session?identifier={identifier}")
        if status not in (200, 204):
            raise RuntimeError(f"DELETE session on {pool} answered {status}: {body[:300]!r}")

    def refill_time(self, pool: str, since: float) -> float:
        """Seconds from `since` until `pool`'s ready queue is full again (polled every 20 ms)."""
        while self.ready_counts().get(pool, 0) < self.args.ready:
            if time.monotonic() - since > 120:
                raise RuntimeError(f"{pool} did not refill within 120 s")
            time.sleep(0.02)
        return time.monotonic() - since

    # What is compared (a subclass compares other things the same way): the kinds, their
    # names in the progress log, and each kind's warm and cold pool.
    KINDS = RUNTIMES
    LABELS = {"crun": "crun", "runsc": "runsc"}

    def pool_for(self, kind: str, warm: bool) -> str:
        return f"{kind}{'warm' if warm else 'cold'}"

    def latency(self) -> dict:
        warm = {k: [] for k in self.KINDS}
        cold = {k: [] for k in self.KINDS}
        refill = {k: [] for k in self.KINDS}
        kinds = [(k, w) for w in (True, False) for k in self.KINDS]
        total = self.args.warmup + self.args.samples
        for round_index in range(total):
            measured = round_index >= self.args.warmup
            # Rotate the order so that no kind always follows the other.
            shift = round_index % len(kinds)
            for kind, is_warm in kinds[shift:] + kinds[:shift]:
                pool = self.pool_for(kind, is_warm)
                self.wait_resting()
                time.sleep(self.args.settle)
                self.wait_quiet()
                identifier, ms = self.first_request(pool)
                allocated = time.monotonic()
                if measured:
                    (warm if is_warm else cold)[kind].append(ms)
                if is_warm:
                    seconds = self.refill_time(pool, allocated)
                    if measured:
                        refill[kind].append(seconds)
                self.delete(pool, identifier)
            if measured:
                done = round_index - self.args.warmup + 1
                if done % 5 == 0 or done == self.args.samples:
                    p50 = lambda samples, k: f"{self.LABELS[k]} {percentile(samples[k], 50):.1f} ms"  # noqa: E731
                    log(f"  {done}/{self.args.samples} rounds: warm p50 " + ", ".join(p50(warm, k) for k in self.KINDS)
                        + "; cold p50 " + ", ".join(p50(cold, k) for k in self.KINDS))
        return {"warm": warm, "cold": cold, "refill": refill}

    def repeat(self) -> dict:
        """`--repeat` requests in one live session per runtime, in blocks of 20 alternating
        between the runtimes."""
        self.wait_resting()
        sessions = {r: self.first_request(f"{r}cold")[0] for r in RUNTIMES}
        self.wait_resting(used=1)  # nothing refills: the sessions came from the cold pools
        times = {r: [] for r in RUNTIMES}
        block = 20
        while any(len(v) < self.args.repeat for v in times.values()):
            for runtime in RUNTIMES:
                time.sleep(self.args.settle)
                for _ in range(min(block, self.args.repeat - len(times[runtime]))):
                    status, body, ms = self.client.request("GET", f"/pools/{runtime}cold/counter?identifier={sessions[runtime]}")
                    if status != 200:
                        raise RuntimeError(f"repeat request on {runtime} answered {status}: {body[:300]!r}")
                    times[runtime].append(ms)
        for runtime, identifier in sessions.items():
            self.delete(f"{runtime}cold", identifier)
        return times

    # -- memory --------------------------------------------------------------------------------

    def memory(self) -> dict:
        """Idle sessions' cgroups: the warm pools' ready sessions (never used) and
        --memory-sessions sessions in each cold pool after one GET /counter."""
        self.wait_resting()
        used = {r: [self.first_request(f"{r}cold")[0] for _ in range(self.args.memory_sessions)] for r in RUNTIMES}
        self.wait_resting(used=self.args.memory_sessions)
        time.sleep(2)  # let the apps and runtimes go idle
        root = CGROUP_MEMORY / f"{instance_name(self.server.state_dir)}-containers"
        result = {}
        for pool, (runtime, warm) in POOLS.items():
            sessions = []
            for cgroup in sorted((root / pool).glob("sp*")):
                if not (cgroup / "memory.usage_in_bytes").exists():
                    continue
                stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
                procs = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
                inside = sorted(comm(p) for p in procs)
                outside = outside_processes(cgroup.name, set(procs))
                sessions.append({
                    "id": cgroup.name,
                    "usage_bytes": int((cgroup / "memory.usage_in_bytes").read_text()),
                    "rss_bytes": int(stat.get("rss", 0)),
                    "cache_bytes": int(stat.get("cache", 0)),
                    "kmem_bytes": read_int(cgroup / "memory.kmem.usage_in_bytes"),
                    "processes_in_cgroup": inside,
                    "processes_outside_cgroup": [name for name, _ in outside],
                    "outside_pss_bytes": sum(pss for _, pss in outside),
                })
            result[pool] = {"runtime": runtime, "state": "ready, never used" if warm else "after one GET /counter", "sessions": sessions}
        for runtime, identifiers in used.items():
            for identifier in identifiers:
                self.delete(f"{runtime}cold", identifier)
        return result


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def comm(pid: int) -> str:
    """The process's program name as started (argv[0]'s base name: runsc's processes all have
    the comm `exe` but argv[0] `runsc-sandbox`, `runsc-gofer`...)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        return os.path.basename(argv0) or Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def counted(names: list[str]) -> str:
    return ", ".join(f"{name} × {names.count(name)}" if names.count(name) > 1 else name for name in sorted(set(names)))


def outside_processes(container_id: str, inside: set[int]) -> list[tuple[str, int]]:
    """Processes of this container (its id is on their command line: runsc's gofer and
    sandbox, crun's container monitor if any) that are not in its cgroup, with their PSS."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in inside:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if container_id.encode() not in cmdline:
                continue
            rollup = (entry / "smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        found.append((comm(int(entry.name)), int(match.group(1)) * 1024 if match else 0))
    return found


# -- report ------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}"


def build_table(stats: dict, mem: dict) -> list[dict]:
    rows = []

    def add(figure: str, key: str, field: str, digits: int = 1) -> None:
        crun = stats[key]["crun"].get(field)
        runsc = stats[key]["runsc"].get(field)
        rows.append({"figure": figure, "crun": crun, "runsc": runsc, "digits": digits,
                     "ratio": None if field == "n" or crun in (None, 0) or runsc is None else runsc / crun})

    labels = {
        "warm": "Warm allocation: first request, new identifier, ready queue full",
        "cold": "Cold start: first request, new identifier, no ready session",
        "repeat": "Repeat request in a live session",
    }
    for key in ("warm", "cold", "repeat"):
        digits = 2 if key == "repeat" or key == "warm" else 1
        for field in ("p50", "p90", "p99", "mean"):
            add(f"{labels[key]}: {field} (ms)", key, field, digits)
        add("… samples", key, "n", 0)
    add("Refill after a warm allocation: time until the ready queue is full again, p50 (s)", "refill", "p50", 2)
    for label, key in (("ready session, never used", "ready"), ("session after one GET /counter", "used")):
        crun, runsc = mem[key]["crun"].get("p50"), mem[key]["runsc"].get("p50")
        rows.append({"figure": f"Memory of an idle {label}: session cgroup, median (MiB)", "crun": crun, "runsc": runsc, "digits": 2,
                     "ratio": None if not crun or runsc is None else runsc / crun})
    crun, runsc = mem["outside"]["crun"].get("p50"), mem["outside"]["runsc"].get("p50")
    rows.append({"figure": "… plus the session's processes outside its cgroup: PSS, median (MiB)", "crun": crun, "runsc": runsc,
                 "digits": 2, "ratio": None})
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# sandpool container benchmark",
        "",
        f"Cold start and warm allocation of custom-container sessions under crun and runsc (gVisor); "
        f"generated {report['generated_at']} in {report['duration_seconds']:.0f} s by `{report['command']}`.",
        "",
        "| Figure | crun | runsc | runsc ÷ crun |",
        "|---|---:|---:|---:|",
    ]
    for row in report["table"]:
        d = row["digits"]
        r = "—" if row["ratio"] is None else (f"{row['ratio']:.2f}×" if row["ratio"] < 10 else f"{row['ratio']:.0f}×")
        lines.append(f"| {row['figure']} | {fmt(row['crun'], d)} | {fmt(row['runsc'], d)} | {r} |")
    lines += [
        "",
        "Times are at the client, from sending the request to the last byte of the answer, over a keep-alive "
        "HTTP/1.1 connection to sandpool (which forwards to the session's container). p99 of a few dozen samples is "
        "close to their maximum; every sample is in `containers.json`.",
        "",
        "## Details",
        "",
        "| Figure | crun | runsc |",
        "|---|---:|---:|",
    ]
    s = report["summary"]
    for key, label in (("warm", "warm allocation"), ("cold", "cold start"), ("repeat", "repeat request")):
        lines.append(f"| {label}: min / max (ms) | {fmt(s[key]['crun'].get('min'), 2)} / {fmt(s[key]['crun'].get('max'), 2)} | "
                     f"{fmt(s[key]['runsc'].get('min'), 2)} / {fmt(s[key]['runsc'].get('max'), 2)} |")
    for field in ("p90", "max"):
        lines.append(f"| refill after a warm allocation: {field} (s) | {fmt(s['refill']['crun'].get(field), 2)} | "
                     f"{fmt(s['refill']['runsc'].get(field), 2)} |")
    mem = report["memory"]
    for pool_kind, label in (("warm", "ready, never used"), ("cold", "after one GET /counter")):
        per = {}
        for runtime in RUNTIMES:
            sessions = mem[f"{runtime}{pool_kind}"]["sessions"]
            per[runtime] = sessions
        lines.append(f"| memory, {label}: sessions measured | {len(per['crun'])} | {len(per['runsc'])} |")
        for field, what in (("usage_bytes", "usage_in_bytes"), ("rss_bytes", "rss"), ("cache_bytes", "cache"), ("kmem_bytes", "kmem usage")):
            values = {r: [x[field] / 2**20 for x in per[r] if x[field] is not None] for r in RUNTIMES}
            lines.append(f"| memory, {label}: {what}, median (MiB) | "
                         f"{fmt(statistics.median(values['crun']), 2) if values['crun'] else '—'} | "
                         f"{fmt(statistics.median(values['runsc']), 2) if values['runsc'] else '—'} |")
        procs = {r: " / ".join(sorted({counted(x["processes_in_cgroup"]) for x in per[r]})) or "—" for r in RUNTIMES}
        lines.append(f"| memory, {label}: processes in each session cgroup | {procs['crun']} | {procs['runsc']} |")
        outside = {r: " / ".join(sorted({counted(x["processes_outside_cgroup"]) for x in per[r]} - {""})) or "none" for r in RUNTIMES}
        lines.append(f"| memory, {label}: the session's processes outside it | {outside['crun']} | {outside['runsc']} |")
    lines += ["", "## Run", ""] + [f"- {key}: {value}" for key, value in report["run"].items()]
    m = report["machine"]
    lines += [
        "",
        "## Machine and load",
        "",
        f"- CPU: {m['cpu_model']} × {m['cores']} cores; memory {m['memory_gib']} GiB; kernel {m['kernel']}; cgroups: {m['cgroup']}",
        f"- load average before: {' '.join(map(str, report['load_before']))}; after: {' '.join(map(str, report['load_after']))}",
        f"- CPUs busy in the 0.25 s before each sample (whole machine: other work on it, and the idle sessions): "
        f"median {report['busy_before_samples']['p50'] * 100:.0f} %, p90 {report['busy_before_samples']['p90'] * 100:.0f} %",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30, help="warm and cold samples per runtime (default 30)")
    parser.add_argument("--repeat", type=int, default=200, help="repeat requests per runtime (default 200)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--ready", type=int, default=4, help="ready_session_instances of the warm pools (default 4)")
    parser.add_argument("--memory-sessions", type=int, default=4, help="used sessions per cold pool for the memory figures (default 4)")
    parser.add_argument("--settle", type=float, default=0.2, help="pause after the pools are at rest, before a sample (s)")
    parser.add_argument("--quiet-busy", type=float, default=0.5, help="wait for the CPUs to be less busy than this (fraction)")
    parser.add_argument("--quiet-wait", type=float, default=10, help="... for at most this long before each sample (s)")
    parser.add_argument("--quick", action="store_true", help="5 samples, 50 repeats, 1 warm-up round (for development)")
    parser.add_argument("--sandpool-bin", default=os.environ.get("SANDPOOL_BIN") or str(REPO_ROOT / "target" / "debug" / "sandpool"))
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "target" / "bench" / "containers"),
                        help="image layout and server log (the state dir is a temporary dir under /tmp)")
    parser.add_argument("--keep-state", action="store_true", help="keep the server's state dir")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeat, args.warmup = 5, 50, 1
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("sandpool starts containers: run as root (sudo ./scripts/bench-containers)", file=sys.stderr)
        return 1
    started = time.monotonic()
    generated_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = os.environ.get("SANDPOOL_BENCH_COMMAND") or " ".join(["bench/containers.py", *sys.argv[1:]])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    log("building the test app (static) and its OCI image layout")
    binary = oci_images.build_testapp()
    layout = work / "layout"
    shutil.rmtree(layout, ignore_errors=True)
    digest = oci_images.write_testapp_layout(layout, binary, tag="v1")
    image_bytes = sum(p.stat().st_size for p in layout.rglob("*") if p.is_file())

    # A short state dir: runsc keeps unix sockets under it (108-byte path limit).
    state = Path(tempfile.mkdtemp(prefix="sandpool-bench-ct-"))
    config = work / "config.toml"
    config.write_text("".join(
        CONFIG.format(name=pool, runtime=runtime, ready=args.ready if warm else 0,
                      max_sessions=args.ready + args.memory_sessions + 8, layout=layout)
        for pool, (runtime, warm) in POOLS.items()
    ))
    server = Server(args.sandpool_bin, config, state, work / "sandpool.log")
    # Before the server starts: the commit and working tree the binary was (most likely) built from.
    version_info = versions(args.sandpool_bin)
    load_before = loadavg()
    log(f"starting {args.sandpool_bin} (state {state}, log {server.log_path})")
    t0 = time.monotonic()
    exit_code = None
    try:
        server.start()
        ready_after = time.monotonic() - t0
        token, reader = server.issue_token(), server.issue_token("reader")
        bench = Bench(args, server, token, reader)
        bench.wait_resting()
        fill_after = time.monotonic() - t0
        log(f"/readyz 200 after {ready_after:.1f} s, every warm pool full after {fill_after:.1f} s")

        log(f"latency: {args.warmup} warm-up + {args.samples} rounds, each a warm and a cold sample per runtime")
        lat = bench.latency()
        log(f"repeat requests: {args.repeat} per runtime")
        rep = bench.repeat()
        log("memory of idle sessions")
        mem = bench.memory()
        allocations = bench.allocations()
        load_after = loadavg()
        stop_seconds = server.stop()
        exit_code = server.proc.returncode if server.proc else None
    finally:
        if server.proc and server.proc.poll() is None:
            server.stop()
        if not args.keep_state:
            shutil.rmtree(state, ignore_errors=True)

    stats = {
        "warm": {r: summary(lat["warm"][r]) for r in RUNTIMES},
        "cold": {r: summary(lat["cold"][r]) for r in RUNTIMES},
        "refill": {r: summary(lat["refill"][r]) for r in RUNTIMES},
        "repeat": {r: summary(rep[r]) for r in RUNTIMES},
    }
    mib = lambda v: v / 2**20  # noqa: E731
    mem_stats = {
        "ready": {r: summary([mib(s["usage_bytes"]) for s in mem[f"{r}warm"]["sessions"]]) for r in RUNTIMES},
        "used": {r: summary([mib(s["usage_bytes"]) for s in mem[f"{r}cold"]["sessions"]]) for r in RUNTIMES},
        "outside": {r: summary([mib(s["outside_pss_bytes"]) for p in (f"{r}warm", f"{r}cold") for s in mem[p]["sessions"]])
                    for r in RUNTIMES},
    }
    warn_lines = [line for line in server.log_path.read_text(errors="replace").splitlines() if " WARN " in line or " ERROR " in line]
    busy = summary(bench.busy_before)
    report = {
        "generated_at": generated_at,
        "command": command,
        "duration_seconds": time.monotonic() - started,
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "busy_before_samples": busy,
        "versions": version_info,
        "settings": {k: v for k, v in vars(args).items()},
        "image": {"reference": "oci:<work-dir>/layout:v1", "digest": digest, "bytes": image_bytes,
                  "content": "the static sandpool-testapp binary, /etc/passwd, /etc/group"},
        "config": config.read_text(),
        "summary": {**stats, "memory_mib": mem_stats},
        "table": build_table(stats, mem_stats),
        "run": {
            "server: /readyz 200 after start (s)": f"{ready_after:.2f}",
            "server: every warm pool full after start (s)": f"{fill_after:.2f}",
            "server: shutdown with every pool's sessions (s)": fmt(stop_seconds, 2),
            "server: exit code": exit_code,
            "server: WARN/ERROR lines in its log": len(warn_lines),
            "samples (of all) that waited for busy CPUs / that were taken with the CPUs still busy after the wait": (
                f"{bench.quiet_waits} / {bench.still_busy} of {len(bench.busy_before)}"),
            "allocations by source, server's metrics (count, mean wait for the session in ms)": "; ".join(
                f"{pool}: " + ", ".join(f"{source} {v['count']} ({v['mean_wait_ms']:.1f} ms)" for source, v in sorted(sources.items()))
                for pool, sources in sorted(allocations.items())),
        },
        "allocations": allocations,
        "samples_ms": {"warm": lat["warm"], "cold": lat["cold"], "repeat": rep},
        "refill_seconds": lat["refill"],
        "memory": mem,
        "warn_lines": warn_lines[:50],
        "notes": [],
    }
    report["notes"] = notes(args, report)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "containers.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "containers.md").write_text(text)
    print(text)
    log(f"wrote {out / 'containers.json'} and {out / 'containers.md'}")
    return 0


def notes(args: argparse.Namespace, report: dict) -> list[str]:
    image = report["image"]
    notes = [
        f"One sandpool server, four custom-container pools with the same image and resources (cpu 1.0, memory 256Mi, "
        f"data_dir_size 16Mi, no probes: a session is ready when its target port accepts a connection, polled every 20 ms): "
        f"crunwarm and runscwarm with ready_session_instances = {args.ready}, cruncold and runsccold with none. "
        f"The exact configuration is in containers.json (`config`).",
        f"Image: the project's test app (crates/testapp, static, std only) in an OCI image layout on local disk, "
        f"`image = \"oci:DIR:v1\"` ({image['bytes'] / 2**20:.1f} MiB on disk, one layer). No registry: the image is read and "
        f"unpacked once when the pool starts, so no figure includes pulling or unpacking it.",
        f"Warm allocation: `GET /pools/<pool>/counter?identifier=<new>` on a warm pool whose ready queue is full; the "
        f"answer must be count 1 (a fresh container). After each sample the benchmark waits until the refill is done "
        f"(the refill time is recorded) and deletes the session (`DELETE /pools/<pool>/session`).",
        f"Cold start: the same request on a pool with no ready session, so it includes creating the session (scratch "
        f"tmpfs and overlay over the unpacked image, network namespace, OCI bundle, `crun`/`runsc` create and start) and "
        f"waiting until the app accepts connections on its port, then forwarding the request.",
        f"Before every sample all four pools are at rest (warm pools full, no session directory being torn down), "
        f"then {args.settle} s of pause, then up to {args.quiet_wait} s of waiting for the CPUs to be less than "
        f"{args.quiet_busy * 100:.0f} % busy (the machine is shared with other work). {args.warmup} unmeasured warm-up "
        f"round(s) first. Within each round the order of (runtime, warm/cold) rotates.",
        f"Repeat request: `GET /counter` again in one live session per runtime, {args.repeat} times each, in blocks of "
        f"20 alternating between runtimes, nothing else running in the pools.",
        f"Memory: cgroup v1 `memory.usage_in_bytes` (user pages, page cache, kernel memory) of each session's own cgroup "
        f"(`/sys/fs/cgroup/memory/sandpool-<instance>-containers/<pool>/<session>`), 2 s after the pools went idle: the "
        f"warm pools' {args.ready} ready sessions (never used) and {args.memory_sessions} sessions per cold pool that answered "
        f"one `GET /counter`. Page cache of the image's files is charged to whichever cgroup read them first, so it "
        f"can sit in one session only. Processes of a session outside its cgroup (found by the container id on their "
        f"command line) are reported with their PSS; the sandpool server itself is not counted.",
        "Client: Python's http.client over one keep-alive connection opened before the clock starts; percentiles "
        "by linear interpolation between closest ranks.",
    ]
    profile = report["versions"]["sandpool binary"]
    if "debug build" in profile:
        notes.append("The sandpool server is a debug build (`cargo build -p sandpool`): its own share (HTTP, auth, "
                     "proxying) is slower than in a release build; the container runtimes are not affected.")
    load = report["load_before"] + report["load_after"]
    if max(load) > 0.5 * (report["machine"]["cores"] or 1):
        notes.append(f"The machine was not idle: load average {report['load_before']} before and {report['load_after']} after.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
