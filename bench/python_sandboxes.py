#!/usr/bin/env python3
"""Python sessions in sandpool's own sandbox (zygote) and under gVisor (runsc), side by side.

One `sandpool serve` with four PythonLTS pools, all with the default preload modules (numpy,
pandas, matplotlib, matplotlib.pyplot), memory "1Gi" and cpu 1.0, on the shared test runtime
(`target/sandpool-test-runtime`, as the e2e tests use):

    zygwarm  runtime = "zygote", ready_session_instances = --ready (2)
    zygcold  runtime = "zygote", ready_session_instances = 0
    gvwarm   runtime = "runsc",  ready_session_instances = --ready (2)
    gvcold   runtime = "runsc",  ready_session_instances = 0

Measured at the client, over HTTP/1.1 keep-alive with a bearer token, for each sandbox:

* warm allocation: the first execution (`POST /pools/<pool>/executions`, `1 + 1`) for a new
  identifier while the pool's ready queue is full (the benchmark waits until the refill after
  the previous sample is done, and records how long the refill took);
* cold start: the same on the pool with no ready session (zygote: a fork of the pool's warm
  zygote; gVisor: a runsc container that imports numpy, pandas and matplotlib itself, then
  accepts the server);
* repeat execution of `1 + 1` in a live session;
* cells that do work, repeated in a live session: numpy, pandas, system calls and file I/O
  (gVisor's ptrace platform makes system calls and page faults expensive);
* memory of idle sessions: cgroup v1 `memory.usage_in_bytes` of each session's cgroup (the
  warm pools' ready sessions, and used sessions of the cold pools), the session's processes
  outside that cgroup, and the zygote each zygote pool shares between its sessions.

Samples of both sandboxes are interleaved; before each one every pool is back at rest and the
CPUs are given a moment to be quiet. Reuses the server, client, machine and statistics code of
bench/containers.py. Writes `<out-dir>/python-sandboxes.json` and
`<out-dir>/python-sandboxes.md`, and prints the Markdown. Run as root:
`sudo ./scripts/bench-python-sandboxes`.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
# containers.py puts tests/e2e on sys.path (for its image builder); e2e_support comes from there.
from containers import (  # noqa: E402
    CGROUP_MEMORY,
    REPO_ROOT,
    Bench,
    Client,
    Server,
    comm,
    counted,
    fmt,
    instance_name,
    loadavg,
    log,
    machine,
    percentile,
    read_int,
    summary,
    tail,
    versions,
)
from e2e_support import RUNTIME_DIR  # noqa: E402

SANDBOXES = ("zygote", "runsc")
LABELS = {"zygote": "zygote", "runsc": "gVisor"}
PREFIX = {"zygote": "zyg", "runsc": "gv"}
POOLS = {  # pool name -> (sandbox, warm?)
    "zygwarm": ("zygote", True),
    "zygcold": ("zygote", False),
    "gvwarm": ("runsc", True),
    "gvcold": ("runsc", False),
}
PRELOAD = ["numpy", "pandas", "matplotlib", "matplotlib.pyplot"]
API = "api-version=2025-10-02-preview"
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")

# Cells repeated in a live session: key -> (label, code, check of executionResult).
CELLS = {
    "numpy": (
        "numpy: inverse of a random 200×200 matrix",
        "import numpy as np\nfloat(np.linalg.inv(np.random.rand(200, 200)).sum())",
        lambda r: isinstance(r, float),
    ),
    "pandas": (
        "pandas: 200,000 rows grouped by key, mean",
        "import numpy as np, pandas as pd\n"
        "df = pd.DataFrame({'k': np.random.randint(0, 100, 200_000), 'v': np.random.rand(200_000)})\n"
        "float(df.groupby('k')['v'].mean().sum())",
        lambda r: isinstance(r, float),
    ),
    "syscalls": (
        "system calls: 1,000 × os.stat('/tmp')",
        "import os\nfor _ in range(1000):\n    os.stat('/tmp')\n1000",
        lambda r: r == 1000,
    ),
    "files": (
        "files: 1,024 unbuffered 1 KiB writes to /mnt/data, read back",
        "with open('/mnt/data/bench.bin', 'wb', buffering=0) as f:\n"
        "    for _ in range(1024):\n"
        "        f.write(b'x' * 1024)\n"
        "with open('/mnt/data/bench.bin', 'rb') as f:\n"
        "    n = len(f.read())\n"
        "n",
        lambda r: r == 1024 * 1024,
    ),
}
# Run in each session of the cold pools before its memory is measured.
MEMORY_CELLS = ("numpy", "pandas")
INFO_CODE = (
    "import sys, platform, numpy, pandas, matplotlib\n"
    "f'python {platform.python_version()}, numpy {numpy.__version__}, pandas {pandas.__version__}, "
    "matplotlib {matplotlib.__version__}; uname {platform.system()} {platform.release()}'"
)

CONFIG_HEAD = """\
[runtime]
dir = "{runtime_dir}"

"""
CONFIG_POOL = """\
[[pools]]
name = "{name}"
container_type = "PythonLTS"
runtime = "{runtime}"
max_concurrent_sessions = {max_sessions}
ready_session_instances = {ready}
cooldown_period_in_seconds = 3600
preload_modules = {preload}

[pools.resources]
cpu = 1.0
memory = "1Gi"

"""


class ExecClient(Client):
    """containers.Client, with a request body (the executions API is a POST of JSON)."""

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, float]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                start = time.perf_counter_ns()
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = self._connect()
                return resp.status, data, elapsed
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection before reading the request.
                self.conn.close()
                self.conn = self._connect()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class PyBench(Bench):
    """containers.Bench (metrics, refill, quiet CPUs, delete) for the four Python pools."""

    def __init__(self, args: argparse.Namespace, server: Server, token: str, reader: str):
        super().__init__(args, server, token, reader)
        self.client.conn.close()
        self.client = ExecClient(server.host, token)
        self.instance = instance_name(server.state_dir)

    # -- pool state ------------------------------------------------------------------------

    KINDS = SANDBOXES
    LABELS = {"zygote": "zygote", "runsc": "gVisor"}

    def pool_for(self, kind: str, warm: bool) -> str:
        return f"{PREFIX[kind]}{'warm' if warm else 'cold'}"

    def cgroup_dir(self, pool: str) -> Path:
        sandbox = POOLS[pool][0]
        return CGROUP_MEMORY / (self.instance if sandbox == "zygote" else f"{self.instance}-containers") / pool

    def session_count(self, pool: str) -> int:
        """Sessions that exist on the host: zygote sessions by their cgroups (`sb-*`), gVisor
        sessions by their container directories (as containers.py)."""
        if POOLS[pool][0] == "runsc":
            return self.container_dirs(pool)
        try:
            return sum(1 for entry in self.cgroup_dir(pool).iterdir() if entry.is_dir() and entry.name.startswith("sb-"))
        except FileNotFoundError:
            return 0

    def resting(self, used: int = 0) -> bool:
        counts = self.ready_counts()
        for pool, (_, warm) in POOLS.items():
            ready = self.args.ready if warm else 0
            if counts.get(pool) != ready or self.session_count(pool) != (ready if warm else used):
                return False
        return True

    def wait_resting(self, used: int = 0, timeout: float = 180) -> float:
        start = time.monotonic()
        while not self.resting(used):
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the pools did not come back to rest within {timeout} s: ready {self.ready_counts()}, "
                                   f"sessions on the host { {p: self.session_count(p) for p in POOLS} }")
            time.sleep(0.02)
        return time.monotonic() - start

    def use_spares(self) -> dict[str, float]:
        """A gVisor pool keeps the session it started at start-up (to check that sessions
        work) as a spare for its first create: a cold pool holds it although it keeps no ready
        session, and would serve its first request from it. Uses and deletes it (unmeasured)
        so that every cold sample starts a container; returns that first request's time."""
        times = {}
        for pool, (sandbox, warm) in POOLS.items():
            if sandbox == "runsc" and not warm and self.session_count(pool) > 0:
                identifier, times[pool] = self.first_request(pool)
                self.delete(pool, identifier)
        return times

    # -- executions ------------------------------------------------------------------------------

    def execute(self, pool: str, identifier: str, code: str) -> tuple[dict, float]:
        payload = json.dumps({"codeInputType": "Inline", "executionType": "Synchronous", "code": code,
                              "timeoutInSeconds": 60}).encode()
        status, body, ms = self.client.request("POST", f"/pools/{pool}/executions?identifier={identifier}&{API}", payload)
        if status != 200:
            raise RuntimeError(f"POST /pools/{pool}/executions answered {status}: {body[:500]!r}\n{tail(self.server.log_path)}")
        answer = json.loads(body)
        if answer.get("status") != "Succeeded":
            raise RuntimeError(f"execution on {pool} did not succeed: {answer}")
        return answer, ms

    def first_request(self, pool: str) -> tuple[str, float]:
        """The first execution (`1 + 1`) for a new identifier: (identifier, ms)."""
        identifier = f"bench-{uuid.uuid4().hex[:16]}"
        answer, ms = self.execute(pool, identifier, "1 + 1")
        if answer["result"].get("executionResult") != 2:
            raise RuntimeError(f"`1 + 1` on {pool} answered {answer}")
        return identifier, ms

    def steady(self) -> dict:
        """In one live session per sandbox (from the cold pools, so nothing refills meanwhile):
        `1 + 1` --repeat times in blocks of 20, then each cell of CELLS --work times in blocks
        of 5, alternating between the sandboxes. Client times, and the server's
        executionTimeInMilliseconds for the cells."""
        self.wait_resting()
        sessions = {s: self.first_request(f"{PREFIX[s]}cold")[0] for s in SANDBOXES}
        self.wait_resting(used=1)
        info = {s: self.execute(f"{PREFIX[s]}cold", sessions[s], INFO_CODE)[0]["result"]["executionResult"] for s in SANDBOXES}
        client: dict[str, dict[str, list[float]]] = {"repeat": {s: [] for s in SANDBOXES}}
        inside: dict[str, dict[str, list[float]]] = {}

        def run(key: str, code: str, check, count: int, block: int, warmups: int) -> None:
            client.setdefault(key, {s: [] for s in SANDBOXES})
            inside.setdefault(key, {s: [] for s in SANDBOXES})
            for sandbox in SANDBOXES:  # unmeasured: first imports and first calls
                for _ in range(warmups):
                    self.execute(f"{PREFIX[sandbox]}cold", sessions[sandbox], code)
            while any(len(v) < count for v in client[key].values()):
                for sandbox in SANDBOXES:
                    time.sleep(self.args.settle)
                    self.wait_quiet()
                    for _ in range(min(block, count - len(client[key][sandbox]))):
                        answer, ms = self.execute(f"{PREFIX[sandbox]}cold", sessions[sandbox], code)
                        result = answer["result"]
                        if not check(result.get("executionResult")):
                            raise RuntimeError(f"{key} on {sandbox} answered {answer}")
                        client[key][sandbox].append(ms)
                        inside[key][sandbox].append(float(result.get("executionTimeInMilliseconds", 0)))

        run("repeat", "1 + 1", lambda r: r == 2, self.args.repeat, 20, 1)
        for key, (label, code, check) in CELLS.items():
            log(f"  cell {key}: {label}, {self.args.work} per sandbox")
            run(key, code, check, self.args.work, 5, max(1, self.args.warmup))
        for sandbox, identifier in sessions.items():
            self.delete(f"{PREFIX[sandbox]}cold", identifier)
        return {"client_ms": client, "inside_ms": inside, "session_info": info}

    # -- memory ------------------------------------------------------------------------------------

    def memory(self) -> dict:
        """Idle sessions' cgroups: the warm pools' ready sessions (never used), and
        --memory-sessions sessions in each cold pool after `1 + 1` and the MEMORY_CELLS."""
        self.wait_resting()
        used = {}
        for sandbox in SANDBOXES:
            pool = f"{PREFIX[sandbox]}cold"
            used[sandbox] = []
            for _ in range(self.args.memory_sessions):
                identifier, _ = self.first_request(pool)
                for key in MEMORY_CELLS:
                    self.execute(pool, identifier, CELLS[key][1])
                used[sandbox].append(identifier)
        self.wait_resting(used=self.args.memory_sessions)
        time.sleep(2)  # let the sessions and runtimes go idle
        server_pid = self.server.proc.pid if self.server.proc else -1
        result: dict = {}
        zygotes: dict[str, dict] = {}
        for pool, (sandbox, warm) in POOLS.items():
            sessions = []
            pattern = "sb-*" if sandbox == "zygote" else "sp*"
            for cgroup in sorted(self.cgroup_dir(pool).glob(pattern)):
                if not (cgroup / "memory.usage_in_bytes").exists():
                    continue
                stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
                procs = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
                outside, zygote = outside_processes(cgroup.name, set(procs), server_pid, sandbox == "zygote")
                if zygote is not None and pool not in zygotes:
                    zygotes[pool] = {"pid": zygote, "name": process_name(zygote), **process_memory(zygote), "cgroup": memory_cgroup(zygote)}
                sessions.append({
                    "id": cgroup.name,
                    "usage_bytes": int((cgroup / "memory.usage_in_bytes").read_text()),
                    "rss_bytes": int(stat.get("rss", 0)),
                    "cache_bytes": int(stat.get("cache", 0)),
                    "shmem_bytes": int(stat["shmem"]) if "shmem" in stat else None,
                    "kmem_bytes": read_int(cgroup / "memory.kmem.usage_in_bytes"),
                    "processes_in_cgroup": sorted(process_name(p) for p in procs),
                    "processes_outside_cgroup": [p["name"] for p in outside],
                    "outside_uss_bytes": sum(p["uss_bytes"] for p in outside),
                    "outside_pss_bytes": sum(p["pss_bytes"] for p in outside),
                    "outside_rss_bytes": sum(p["rss_bytes"] for p in outside),
                })
            state = "ready, never used" if warm else f"after 1 + 1 and the {' and '.join(MEMORY_CELLS)} cells"
            result[pool] = {"sandbox": sandbox, "state": state, "sessions": sessions}
        for sandbox, identifiers in used.items():
            for identifier in identifiers:
                self.delete(f"{PREFIX[sandbox]}cold", identifier)
        return {"pools": result, "zygotes": zygotes}


# -- processes ---------------------------------------------------------------------------------


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_memory(pid: int) -> dict:
    """RSS, PSS and USS (private pages: only this process maps them) from smaps_rollup."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {"rss_bytes": 0, "pss_bytes": 0, "uss_bytes": 0}
    kib = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", rollup, re.M)}
    return {"rss_bytes": kib.get("Rss", 0) * 1024, "pss_bytes": kib.get("Pss", 0) * 1024,
            "uss_bytes": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) * 1024}


def memory_cgroup(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return path
    except OSError:
        pass
    return "?"


def process_name(pid: int) -> str:
    """containers.comm, plus the subcommand for sandpool's own processes (`sandpool __zygote`)."""
    name = comm(pid)
    if name == "sandpool":
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            return f"sandpool {argv[1].decode(errors='replace')}" if len(argv) > 1 and argv[1] else name
        except OSError:
            pass
    return name


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def outside_processes(session: str, inside: set[int], server_pid: int, zygote_pool: bool) -> tuple[list[dict], int | None]:
    """A session's processes that are not in its cgroup, and (zygote pools) the pool's zygote.

    gVisor: processes with the container id on their command line (runsc's gofer and sandbox,
    as containers.py looks for them). Zygote: processes in the session's PID namespace (its
    init, a sibling of the session process: both are children of the zygote) and any between
    the session's processes and the zygote, the child of the server they descend from."""
    found: dict[int, dict] = {}
    zygote = None
    if zygote_pool:
        namespaces = {pid_namespace(pid) for pid in inside} - {None, pid_namespace(server_pid)}
        for pid in inside:
            chain = []
            current = pid
            try:
                while True:
                    parent = parent_pid(current)
                    if parent <= 1:
                        chain = []
                        break
                    if parent == server_pid:
                        zygote = current
                        break
                    chain.append(parent)
                    current = parent
            except OSError:
                continue
            for ancestor in chain:
                if ancestor not in inside and ancestor != zygote:
                    found[ancestor] = {"pid": ancestor, "name": process_name(ancestor), **process_memory(ancestor)}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in inside and int(entry.name) not in found \
                    and pid_namespace(int(entry.name)) in namespaces:
                pid = int(entry.name)
                found[pid] = {"pid": pid, "name": process_name(pid), **process_memory(pid)}
    else:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in inside:
                continue
            try:
                if session.encode() not in (entry / "cmdline").read_bytes():
                    continue
            except OSError:
                continue
            pid = int(entry.name)
            found[pid] = {"pid": pid, "name": process_name(pid), **process_memory(pid)}
    return list(found.values()), zygote


# -- report ------------------------------------------------------------------------------------

TIME_LABELS = {
    "warm": "Warm allocation: first execution `1 + 1`, new identifier, ready session waiting (ms)",
    "cold": "Cold start: first execution `1 + 1`, new identifier, no ready session (ms)",
    "refill": "Refill after a warm allocation: until the ready queue is full again (s)",
    "repeat": "Repeat execution `1 + 1` in a live session (ms)",
    **{key: f"Cell in a live session: {label} (ms)" for key, (label, _, _) in CELLS.items()},
}


def ratio(zygote: float | None, gvisor: float | None) -> str:
    if not zygote or gvisor is None:
        return "—"
    r = gvisor / zygote
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def build_table(stats: dict, mem: dict) -> list[dict]:
    rows = []
    for key, label in TIME_LABELS.items():
        z, g = stats[key]["zygote"], stats[key]["runsc"]
        rows.append({"figure": label, "n": z.get("n"), "zygote": z, "runsc": g, "digits": 2 if key != "cold" else 1})
    for key, label in (
        ("ready", "Memory of an idle ready session, never used: session cgroup (MiB)"),
        ("used", f"Memory of an idle session after 1 + 1, {' and '.join(MEMORY_CELLS)} cells: session cgroup (MiB)"),
        ("outside", "… plus the session's processes outside its cgroup: private memory (USS, MiB)"),
    ):
        z, g = mem[key]["zygote"], mem[key]["runsc"]
        rows.append({"figure": label, "n": f"{z.get('n')} / {g.get('n')}", "zygote": z, "runsc": g, "digits": 2})
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# sandpool Python sandboxes benchmark",
        "",
        f"PythonLTS sessions in sandpool's own sandbox (forked from the pool's zygote) and under gVisor (runsc, ptrace "
        f"platform); generated {report['generated_at']} in {report['duration_seconds']:.0f} s by `{report['command']}`.",
        "",
        "| Figure | n | zygote p50 | zygote p99 | gVisor p50 | gVisor p99 | gVisor ÷ zygote, p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["table"]:
        d, z, g = row["digits"], row["zygote"], row["runsc"]
        lines.append(f"| {row['figure']} | {row['n']} | {fmt(z.get('p50'), d)} | {fmt(z.get('p99'), d)} | "
                     f"{fmt(g.get('p50'), d)} | {fmt(g.get('p99'), d)} | {ratio(z.get('p50'), g.get('p50'))} |")
    z = report["memory"]["zygote_process"]
    lines += [
        f"| The pool's zygote, shared by all its sessions (one per pool, in the server's cgroup): RSS / USS (MiB) | "
        f"{z['n']} | {fmt(z['rss_mib'], 1)} / {fmt(z['uss_mib'], 1)} | | — | | — |",
        "",
        "Times are at the client, from sending the request to the last byte of the answer, over a keep-alive "
        "HTTP/1.1 connection to sandpool. n is the number of samples per sandbox (memory: sessions measured, zygote / "
        "gVisor); p99 of a few dozen samples is close to their maximum, and of a few sessions it is their maximum. "
        "Every sample is in `python-sandboxes.json`.",
        "",
        "## Details",
        "",
        f"| Figure | {LABELS['zygote']} | {LABELS['runsc']} |",
        "|---|---:|---:|",
    ]
    s = report["summary"]
    for key in TIME_LABELS:
        d = 1 if key == "cold" else 2
        for field in ("p90", "mean"):
            lines.append(f"| {key}: {field} | {fmt(s[key]['zygote'].get(field), d)} | {fmt(s[key]['runsc'].get(field), d)} |")
        lines.append(f"| {key}: min / max | {fmt(s[key]['zygote'].get('min'), d)} / {fmt(s[key]['zygote'].get('max'), d)} | "
                     f"{fmt(s[key]['runsc'].get('min'), d)} / {fmt(s[key]['runsc'].get('max'), d)} |")
    inside = report["summary"]["inside_ms"]
    for key in ("repeat", *CELLS):
        lines.append(f"| {key}: time in the session (the answer's executionTimeInMilliseconds), median (ms) | "
                     f"{fmt(inside[key]['zygote'].get('p50'), 0)} | {fmt(inside[key]['runsc'].get('p50'), 0)} |")
    pools = report["memory"]["pools"]
    for kind, label in (("warm", "ready, never used"), ("cold", f"after 1 + 1, {' and '.join(MEMORY_CELLS)}")):
        per = {s: pools[f"{PREFIX[s]}{kind}"]["sessions"] for s in SANDBOXES}
        lines.append(f"| memory, {label}: sessions measured | {len(per['zygote'])} | {len(per['runsc'])} |")
        for field, what in (("usage_bytes", "usage_in_bytes"), ("rss_bytes", "rss"), ("cache_bytes", "cache"),
                            ("shmem_bytes", "… of which shmem"), ("kmem_bytes", "kmem usage"), ("outside_uss_bytes", "outside the cgroup, USS"),
                            ("outside_pss_bytes", "outside the cgroup, PSS")):
            values = {sb: [x[field] / 2**20 for x in per[sb] if x[field] is not None] for sb in SANDBOXES}
            lines.append(f"| memory, {label}: {what}, median (MiB) | "
                         + " | ".join(fmt(statistics.median(values[sb]), 2) if values[sb] else "—" for sb in SANDBOXES) + " |")
        procs = {sb: " / ".join(sorted({counted(x["processes_in_cgroup"]) for x in per[sb]})) or "—" for sb in SANDBOXES}
        lines.append(f"| memory, {label}: processes in each session cgroup | {procs['zygote']} | {procs['runsc']} |")
        outside = {sb: " / ".join(sorted({counted(x["processes_outside_cgroup"]) for x in per[sb]} - {""})) or "none"
                   for sb in SANDBOXES}
        lines.append(f"| memory, {label}: the session's processes outside it | {outside['zygote']} | {outside['runsc']} |")
    for pool, z in sorted(report["memory"]["zygotes"].items()):
        lines.append(f"| {pool}'s zygote: RSS / PSS / USS (MiB), memory cgroup | "
                     f"{z['rss_bytes'] / 2**20:.1f} / {z['pss_bytes'] / 2**20:.1f} / {z['uss_bytes'] / 2**20:.1f}, `{z['cgroup']}` | — |")
    info = report["session_info"]
    lines.append(f"| inside a session | {info.get('zygote', '?')} | {info.get('runsc', '?')} |")
    lines += ["", "## Run", ""] + [f"- {key}: {value}" for key, value in report["run"].items()]
    m = report["machine"]
    lines += [
        "",
        "## Machine and load",
        "",
        f"- CPU: {m['cpu_model']} × {m['cores']} cores; memory {m['memory_gib']} GiB; kernel {m['kernel']}; cgroups: {m['cgroup']}",
        f"- load average before: {' '.join(map(str, report['load_before']))}; after: {' '.join(map(str, report['load_after']))}",
        f"- CPUs busy in the 0.25 s before each sample or block (whole machine: other work on it, and the idle sessions): "
        f"median {report['busy_before_samples'].get('p50', 0) * 100:.0f} %, p90 {report['busy_before_samples'].get('p90', 0) * 100:.0f} %",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def notes(args: argparse.Namespace, report: dict) -> list[str]:
    cells = "; ".join(f"{key}: `{code!r}`" for key, (_, code, _) in CELLS.items())
    notes = [
        f"One sandpool server, four PythonLTS pools with the same settings (preload_modules = {PRELOAD}, cpu 1.0, "
        f"memory 1Gi, cooldown 3600 s) on the e2e tests' shared Python runtime: zygwarm and gvwarm with "
        f"ready_session_instances = {args.ready}, zygcold and gvcold with none; zyg* with runtime = \"zygote\" (the "
        f"default: forked from the pool's warm interpreter, confined by namespaces, Landlock, seccomp and cgroups), gv* "
        f"with runtime = \"runsc\" (each session a gVisor sandbox of its own, ptrace platform, importing the preload "
        f"modules itself before it is ready). The exact configuration is in python-sandboxes.json (`config`).",
        f"Warm allocation: `POST /pools/<pool>/executions?identifier=<new>&{API}` with `1 + 1` (Inline, Synchronous) on "
        f"a warm pool whose ready queue is full; the answer must be Succeeded with executionResult 2. After each sample "
        f"the benchmark waits until the refill is done (its time is recorded) and deletes the session "
        f"(`DELETE /pools/<pool>/session`).",
        "Cold start: the same on a pool with no ready session. Zygote: the zygote forks the session, which confines "
        "itself and connects; gVisor: `runsc create`/`start` of a container on the pool's read-only skeleton root, "
        "the runner imports the preload modules under gVisor, then accepts the server over loopback in the "
        "session's network namespace. A gVisor pool keeps the session it starts at start-up (to check that sessions "
        "work) as a spare for its first create, so a cold gVisor pool holds one session after start-up and serves its "
        "first request from it; the benchmark uses and deletes that session before measuring, so every cold sample "
        "starts a container.",
        f"Before every latency sample all four pools are at rest (warm pools full, no session being created or torn "
        f"down: zygote sessions counted by their cgroups, gVisor sessions by their container directories), then "
        f"{args.settle} s of pause, then up to {args.quiet_wait} s of waiting for the CPUs to be less than "
        f"{args.quiet_busy * 100:.0f} % busy (the machine is shared with other work). {args.warmup} unmeasured "
        f"warm-up round(s) first; within each round the order of (sandbox, warm/cold) rotates.",
        f"Live sessions: one per sandbox, from the cold pools (so nothing refills meanwhile): `1 + 1` {args.repeat} "
        f"times in blocks of 20, then each cell {args.work} times in blocks of 5 (after {max(1, args.warmup)} unmeasured "
        f"run(s) of it), alternating between the sandboxes, the same quiet-CPU wait before each block. Cells: {cells}. "
        f"The Details table also gives the session's own time for each (executionTimeInMilliseconds).",
        f"Memory: cgroup v1 `memory.usage_in_bytes` (user pages, page cache, kernel memory) of each session's own "
        f"cgroup (zygote: `/sys/fs/cgroup/memory/sandpool-<instance>/<pool>/sb-*`; gVisor: "
        f"`/sys/fs/cgroup/memory/sandpool-<instance>-containers/<pool>/sp*`), 2 s after the pools went idle: the warm "
        f"pools' {args.ready} ready sessions (never used) and {args.memory_sessions} sessions per cold pool that ran "
        f"`1 + 1` and the {' and '.join(MEMORY_CELLS)} cells. A zygote session's cgroup holds only what the session "
        f"allocated or copied after the fork: the interpreter and the preloaded libraries stay in the zygote's pages, "
        f"shared copy-on-write by every session of the pool (the zygote's own size is given once per pool). The "
        f"session's processes outside its cgroup (zygote: processes in the session's PID namespace, i.e. its init, a "
        f"fork of the zygote; gVisor: processes with the container id on their command line) are counted by their "
        f"private pages (USS: pages only they map; their PSS, which splits the zygote's shared pages among every "
        f"process mapping them, is in the Details). Page cache of the runtime's files is charged to whichever cgroup "
        f"read them first. Under gVisor the sandboxed processes' memory lives in the sentry's memory file (shared "
        f"memory), which cgroup v1 counts as cache (shmem in the Details), not as rss. The sandpool server itself is "
        f"not counted.",
        "Client: Python's http.client over one keep-alive connection opened before the clock starts; percentiles "
        "by linear interpolation between closest ranks.",
    ]
    if "debug build" in report["versions"]["sandpool binary"]:
        notes.append("The sandpool server is a debug build (`cargo build -p sandpool`): its own share (HTTP, auth, "
                     "the runner link) is slower than in a release build; the Python code, the zygote's fork and gVisor "
                     "are not affected (the zygote is the same binary, but it only forks).")
    load = report["load_before"] + report["load_after"]
    if max(load) > 0.5 * (report["machine"]["cores"] or 1):
        notes.append(f"The machine was not idle: load average {report['load_before']} before and {report['load_after']} after.")
    if args.quick:
        notes.append("A --quick run (few samples): for development, not for quoting.")
    return notes


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30, help="warm and cold samples per sandbox (default 30)")
    parser.add_argument("--repeat", type=int, default=200, help="repeat executions of `1 + 1` per sandbox (default 200)")
    parser.add_argument("--work", type=int, default=30, help="runs of each work cell per sandbox (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (default 2)")
    parser.add_argument("--ready", type=int, default=2, help="ready_session_instances of the warm pools (default 2)")
    parser.add_argument("--memory-sessions", type=int, default=3, help="used sessions per cold pool for the memory figures (default 3)")
    parser.add_argument("--settle", type=float, default=0.2, help="pause after the pools are at rest, before a sample (s)")
    parser.add_argument("--quiet-busy", type=float, default=0.5, help="wait for the CPUs to be less busy than this (fraction)")
    parser.add_argument("--quiet-wait", type=float, default=10, help="... for at most this long before each sample (s)")
    parser.add_argument("--quick", action="store_true", help="5 samples, 50 repeats, 10 runs of each cell, 1 warm-up round, "
                        "2 memory sessions (for development)")
    parser.add_argument("--sandpool-bin", default=os.environ.get("SANDPOOL_BIN") or str(REPO_ROOT / "target" / "debug" / "sandpool"))
    parser.add_argument("--runtime-dir", default=RUNTIME_DIR, help=f"the sessions' Python runtime dir (default {RUNTIME_DIR})")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "target" / "bench" / "python-sandboxes"),
                        help="config and server log (the state dir is a temporary dir under /tmp)")
    parser.add_argument("--keep-state", action="store_true", help="keep the server's state dir")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeat, args.work, args.warmup, args.memory_sessions = 5, 50, 10, 1, 2
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("sandpool creates sandboxes: run as root (sudo ./scripts/bench-python-sandboxes)", file=sys.stderr)
        return 1
    started = time.monotonic()
    generated_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    command = os.environ.get("SANDPOOL_BENCH_COMMAND") or " ".join(["bench/python_sandboxes.py", *sys.argv[1:]])
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    Path(args.runtime_dir).mkdir(parents=True, exist_ok=True)

    # A short state dir: runsc keeps unix sockets under it (108-byte path limit).
    state = Path(tempfile.mkdtemp(prefix="sandpool-bench-py-"))
    config = work / "config.toml"
    config.write_text(CONFIG_HEAD.format(runtime_dir=Path(args.runtime_dir).resolve()) + "".join(
        CONFIG_POOL.format(name=pool, runtime=sandbox, ready=args.ready if warm else 0,
                           max_sessions=args.ready + args.memory_sessions + 8, preload=json.dumps(PRELOAD))
        for pool, (sandbox, warm) in POOLS.items()
    ))
    server = Server(args.sandpool_bin, config, state, work / "sandpool.log")
    version_info = {k: v for k, v in versions(args.sandpool_bin).items() if k != "crun"}
    load_before = loadavg()
    log(f"starting {args.sandpool_bin} (state {state}, log {server.log_path})")
    t0 = time.monotonic()
    exit_code = None
    try:
        server.start()
        ready_after = time.monotonic() - t0
        token, reader = server.issue_token(), server.issue_token("reader")
        bench = PyBench(args, server, token, reader)
        spares = bench.use_spares()
        bench.wait_resting(timeout=600)
        fill_after = time.monotonic() - t0
        log(f"/readyz 200 after {ready_after:.1f} s, every warm pool full after {fill_after:.1f} s")

        log(f"latency: {args.warmup} warm-up + {args.samples} rounds, each a warm and a cold sample per sandbox")
        lat = bench.latency()
        log(f"live sessions: {args.repeat} × `1 + 1`, then {args.work} runs of each cell, per sandbox")
        live = bench.steady()
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
        "warm": {s: summary(lat["warm"][s]) for s in SANDBOXES},
        "cold": {s: summary(lat["cold"][s]) for s in SANDBOXES},
        "refill": {s: summary(lat["refill"][s]) for s in SANDBOXES},
        **{key: {s: summary(live["client_ms"][key][s]) for s in SANDBOXES} for key in live["client_ms"]},
        "inside_ms": {key: {s: summary(live["inside_ms"][key][s]) for s in SANDBOXES} for key in live["inside_ms"]},
    }
    mib = lambda v: v / 2**20  # noqa: E731
    pools = mem["pools"]
    mem_stats = {
        "ready": {s: summary([mib(x["usage_bytes"]) for x in pools[f"{PREFIX[s]}warm"]["sessions"]]) for s in SANDBOXES},
        "used": {s: summary([mib(x["usage_bytes"]) for x in pools[f"{PREFIX[s]}cold"]["sessions"]]) for s in SANDBOXES},
        "outside": {s: summary([mib(x["outside_uss_bytes"]) for kind in ("warm", "cold")
                                for x in pools[f"{PREFIX[s]}{kind}"]["sessions"]]) for s in SANDBOXES},
    }
    zygotes = list(mem["zygotes"].values())
    mem["zygote_process"] = {
        "n": len(zygotes),
        "rss_mib": statistics.median([mib(z["rss_bytes"]) for z in zygotes]) if zygotes else None,
        "uss_mib": statistics.median([mib(z["uss_bytes"]) for z in zygotes]) if zygotes else None,
    }
    log_text = ANSI_RE.sub("", server.log_path.read_text(errors="replace"))
    warn_lines = [line for line in log_text.splitlines() if " WARN " in line or " ERROR " in line]
    report = {
        "generated_at": generated_at,
        "command": command,
        "duration_seconds": time.monotonic() - started,
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "busy_before_samples": summary(bench.busy_before),
        "versions": version_info,
        "settings": dict(vars(args)),
        "config": config.read_text(),
        "cells": {key: {"label": label, "code": code} for key, (label, code, _) in CELLS.items()},
        "session_info": live["session_info"],
        "summary": {**stats, "memory_mib": mem_stats},
        "table": build_table(stats, mem_stats),
        "run": {
            "server: /readyz 200 after start (s)": f"{ready_after:.2f}",
            "server: every warm pool full after start (s)": f"{fill_after:.2f}",
            "server: shutdown with every pool's sessions (s)": fmt(stop_seconds, 2),
            "server: exit code": exit_code,
            "server: WARN/ERROR lines in its log": len(warn_lines),
            "gVisor cold pool: sessions held after start-up (the spare from the pool's start-up check) / its first request, "
            "served by it, unmeasured (ms)": "; ".join(f"{pool}: 1 / {ms:.1f}" for pool, ms in spares.items()) or "none",
            "samples and blocks (of all) that waited for busy CPUs / that were taken with the CPUs still busy after the wait": (
                f"{bench.quiet_waits} / {bench.still_busy} of {len(bench.busy_before)}"),
            "allocations by source, server's metrics (count, mean wait for the session in ms)": "; ".join(
                f"{pool}: " + ", ".join(f"{source} {v['count']} ({v['mean_wait_ms']:.1f} ms)" for source, v in sorted(sources.items()))
                for pool, sources in sorted(allocations.items())),
        },
        "allocations": allocations,
        "samples_ms": {"warm": lat["warm"], "cold": lat["cold"], **live["client_ms"]},
        "session_time_ms": live["inside_ms"],
        "refill_seconds": lat["refill"],
        "memory": mem,
        "warn_lines": warn_lines[:50],
        "notes": [],
    }
    report["notes"] = notes(args, report)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "python-sandboxes.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "python-sandboxes.md").write_text(text)
    print(text)
    log(f"wrote {out / 'python-sandboxes.json'} and {out / 'python-sandboxes.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
