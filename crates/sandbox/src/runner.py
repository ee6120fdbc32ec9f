"""The in-session Python runner.

This source is embedded in the sandpool binary. The zygote loads it as module
`_sandpool_runner`, calls `zygote_init` once to import the pool's libraries and warm them
up, and every forked session calls `serve` after the Rust lock-down succeeded. A session of
a gVisor pool is a container of its own instead: it calls `container_serve`, which imports
the libraries, accepts the server's one TCP connection on loopback and then calls `serve`.

Protocol (see crates/sandbox/src/protocol.rs): frames of a 4-byte big-endian length then
JSON. The runner first sends {"ready": true}; then it answers each request frame with one
reply frame, in order.

What the runner guarantees to the server: a reply for every request (unless the process
dies), output streams cut at the requested cap with a marker, and a result that is always
JSON-serialisable.
"""

import ast
import base64
import builtins
import importlib
import io
import json
import linecache
import math
import os
import pprint
import signal
import socket
import struct
import sys
import time
import traceback
import types

_TRUNCATION_MARKER = "\n[output truncated by sandpool: {} more characters]\n"
_MAX_RESULT_CHARS = 1 << 20


class ExecutionTimeout(BaseException):
    """Raised in the executing code when its time is up.

    A BaseException, so that `except Exception:` in user code does not swallow it.
    """


class _CappedStream(io.TextIOBase):
    """A write-only text stream that keeps the first `cap` characters and counts the rest."""

    def __init__(self, cap):
        self._cap = cap
        self._parts = []
        self._kept = 0
        self._dropped = 0

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        room = self._cap - self._kept
        if room > 0:
            piece = text[:room]
            self._parts.append(piece)
            self._kept += len(piece)
        self._dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False

    @property
    def encoding(self):
        return "utf-8"

    def getvalue(self):
        text = "".join(self._parts)
        if self._dropped:
            text += _TRUNCATION_MARKER.format(self._dropped)
        return text


def _send_frame(sock, obj):
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8", "replace")
    sock.sendall(struct.pack(">I", len(body)) + body)


def _recv_exact(sock, n):
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock):
    header = _recv_exact(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = _recv_exact(sock, length)
    if body is None:
        return None
    return json.loads(body)


# ---------------------------------------------------------------------------------------
# Zygote start-up
# ---------------------------------------------------------------------------------------

def zygote_init(args_json):
    """Runs once in the zygote: import and warm up the pool's libraries, write a report."""
    args = json.loads(args_json)
    sys.argv = [""]
    sys.executable = args["executable"]
    import site

    site.addsitedir(args["site_packages"])
    for name in args["preload"]:
        importlib.import_module(name)
    _preload_pkg_resources()
    _warm_up()
    os.pwrite(args["report_fd"], json.dumps(_runtime_report()).encode(), 0)
    import gc

    gc.collect()
    _plug_free_blocks()
    # Objects that exist now are shared with every session; keeping the collector away from
    # them keeps their pages shared instead of copied on the first collection in a session.
    gc.freeze()


def _runtime_report():
    """The Python version and installed distributions, for the pool's metadata."""
    from importlib import metadata

    packages = sorted(
        {(d.metadata["Name"] or "", d.version or "") for d in metadata.distributions()},
        key=lambda p: p[0].lower(),
    )
    return {
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "packages": [list(p) for p in packages if p[0]],
    }


def container_serve(args_json):
    """A gVisor session's main: import and warm up the libraries, then serve the server, one
    connection at a time, for the session's whole life. When the server goes away (a crash),
    the session waits for the restarted server to connect again. The port is on the
    session's own loopback: only the server and the session's own code can reach it, so at
    worst a session's code confuses its own session."""
    args = json.loads(args_json)
    sys.argv = [""]
    for name in args["preload"]:
        importlib.import_module(name)
    _preload_pkg_resources()
    _warm_up()
    report = _runtime_report()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args["port"]))
    listener.listen(1)
    session = _new_session()
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _serve_connection(conn, session, args["output_cap"], report)
        conn.close()


_PLUG = []


def _plug_free_blocks():
    """Fills the free slots of the small-object allocator's pools with objects kept forever.

    A session allocates its new objects in pools that already have free slots before it takes
    fresh ones; if those pools belong to the zygote, every allocation copies a shared page.
    With the slots filled here, once, in the zygote, sessions allocate in pools of their own.
    """
    import re

    for _ in range(3):
        read_end, write_end = os.pipe()
        saved = os.dup(2)
        try:
            os.dup2(write_end, 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(write_end)
        chunks = []
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        filled = 0
        for line in b"".join(chunks).decode("ascii", "replace").splitlines():
            m = re.match(r"\s+\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", line)
            if not m:
                continue
            size, free = int(m.group(1)), int(m.group(2))
            # A bytes object of length n takes 33 + n bytes, rounded up to the size class.
            length = max(size - 33 - 15, 0)
            for _ in range(free):
                _PLUG.append(bytes(length) if length else b"x" * 1)
            filled += free
        if not filled:
            break


def _preload_pkg_resources():
    """Imports pkg_resources once, quietly. AutoGen's first cell is `import pkg_resources`;
    imported here it is already in `sys.modules`, so the cell neither pays for the import nor
    prints setuptools' deprecation warning into stderr, which AutoGen would parse as output."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            pass


def _warm_up():
    """Runs a representative cell so lazily initialised state is built once, in the zygote."""
    if "numpy" in sys.modules:
        np = sys.modules["numpy"]
        a = np.arange(64.0).reshape(8, 8)
        (a @ a).sum()
    if "pandas" in sys.modules:
        pd = sys.modules["pandas"]
        df = pd.DataFrame({"a": range(10), "b": [x * 0.5 for x in range(10)]})
        df.describe()
        repr(df)
    if "matplotlib" in sys.modules or "matplotlib.pyplot" in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure()
        plt.plot([1, 2, 3], [1, 4, 9])
        plt.title("warm-up")
        fig.savefig(io.BytesIO(), format="png")
        plt.close("all")
    # The runner's own modules.
    compile("x = 1\nx", "<warm-up>", "exec", ast.PyCF_ONLY_AST)
    traceback.format_exception_only(ValueError, ValueError("warm-up"))


# ---------------------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------------------

class _Session:
    """The session's interpreter state. Only the process that started serving may answer:
    a process the user's code forked (and did not end) leaves quietly instead of writing a
    second reply into the session's socket."""

    def __init__(self):
        self.pid = os.getpid()
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        main.__dict__["display"] = _display
        sys.modules["__main__"] = main
        self.namespace = main.__dict__
        self.cell = 0
        self._install_pyplot_show()

    @staticmethod
    def _install_pyplot_show():
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            # Figures are collected after each cell, as a notebook's inline backend does;
            # `show()` must not warn that Agg is non-interactive.
            plt.show = lambda *args, **kwargs: None

    def execute(self, code, timeout_ms, output_cap):
        self.cell += 1
        filename = f"<cell {self.cell}>"
        stdout = _CappedStream(output_cap)
        stderr = _CappedStream(output_cap)
        reply = {"status": "success", "result": None, "result_kind": "none", "error_name": None, "error_message": None}
        started = time.monotonic()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = stdout, stderr
        previous_handler = signal.getsignal(signal.SIGALRM)
        try:
            tree = _parse_cell(code, filename)
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            value = None
            has_value = False
            body = tree.body
            if body and isinstance(body[-1], ast.Expr):
                last = ast.Expression(body[-1].value)
                body = body[:-1]
                has_value = True
            module = ast.Module(body=body, type_ignores=[])

            def on_alarm(signum, frame):
                raise ExecutionTimeout(f"execution exceeded its timeout of {timeout_ms / 1000:g} s")

            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(timeout_ms, 1) / 1000.0)
            try:
                exec(compile(module, filename, "exec"), self.namespace)
                if has_value:
                    value = eval(compile(last, filename, "eval"), self.namespace)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            self.namespace["_"] = value if has_value else self.namespace.get("_")
            reply["result_kind"], reply["result"] = _convert_result(value, has_value)
        except ExecutionTimeout as exc:
            reply["status"] = "timeout"
            reply["error_name"] = "ExecutionTimeout"
            reply["error_message"] = str(exc)
            stderr.write(_format_exception(exc, filename))
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            reply["status"] = "error"
            reply["error_name"] = type(exc).__name__
            reply["error_message"] = str(exc)
            stderr.write(_format_exception(exc, filename))
        finally:
            signal.signal(signal.SIGALRM, previous_handler)
            sys.stdout, sys.stderr = saved
        if os.getpid() != self.pid:
            os._exit(0)
        try:
            image = _collect_figure()
        except BaseException as exc:  # noqa: BLE001 - a broken figure must not kill the session
            image = None
            stderr.write(f"sandpool: could not render the figure: {type(exc).__name__}: {exc}\n")
        if image is not None and reply["status"] == "success":
            reply["result_kind"], reply["result"] = "image", image
        reply["stdout"] = stdout.getvalue()
        reply["stderr"] = stderr.getvalue()
        reply["duration_ms"] = int((time.monotonic() - started) * 1000)
        return reply


def _parse_cell(code, filename):
    """Parses a cell; IPython-style `!cmd` and `%magic` lines are accepted when the cell is
    not valid Python as written (valid Python is never rewritten)."""
    try:
        return ast.parse(code, filename, "exec")
    except SyntaxError as original:
        rewritten = _rewrite_shell_lines(code)
        if rewritten == code:
            raise
        try:
            return ast.parse(rewritten, filename, "exec")
        except SyntaxError:
            raise original from None


def _rewrite_shell_lines(code):
    lines = []
    for line in code.splitlines():
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("!"):
            lines.append(f"{indent}__import__('_sandpool_runner').shell({stripped[1:]!r})")
        elif stripped.startswith("%pip "):
            lines.append(f"{indent}__import__('_sandpool_runner').shell({'pip ' + stripped[5:]!r})")
        elif stripped.startswith("%matplotlib") or stripped.startswith("%config"):
            lines.append(f"{indent}pass")
        else:
            lines.append(line)
    return "\n".join(lines)


def shell(command):
    """Runs `command` with /bin/sh and prints its output, like IPython's `!command`."""
    import shlex
    import subprocess

    words = command.split(None, 1)
    if words and words[0] in ("pip", "pip3"):
        # The venv's pip script names the host path of the venv; run pip as a module instead.
        command = f"{shlex.quote(sys.executable)} -m pip " + (words[1] if len(words) > 1 else "")

    proc = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    sys.stdout.write(proc.stdout)
    return None


def _display(*objects, **kwargs):
    """A stand-in for IPython's `display`: prints each object's text representation."""
    for obj in objects:
        print(obj if isinstance(obj, str) else repr(obj))


def _convert_result(value, has_value):
    """The cell's result as the Azure code interpreter reports it: primitive values (bool,
    int, float, str) as JSON values, everything else as the text a notebook shows for it.

    Containers are text too, pretty-printed as IPython does: AutoGen parses the list that its
    first cell returns by splitting that text on ",\n".
    """
    if not has_value or value is None:
        return "none", None
    figure = _figure_png(value)
    if figure is not None:
        return "image", figure
    if isinstance(value, bool):
        return "json", value
    if type(value) is int and -(2**53) <= value <= 2**53:
        return "json", value
    if type(value) is float and math.isfinite(value):
        return "json", value
    if type(value) is str:
        if len(value) > _MAX_RESULT_CHARS:
            value = value[:_MAX_RESULT_CHARS] + _TRUNCATION_MARKER.format(len(value) - _MAX_RESULT_CHARS)
        return "json", value
    try:
        if type(value) in (list, tuple, dict, set, frozenset):
            text = pprint.pformat(value, width=79)
        else:
            text = repr(value)
    except BaseException as exc:  # noqa: BLE001 - a broken __repr__ is the user's problem
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    if len(text) > _MAX_RESULT_CHARS:
        text = text[:_MAX_RESULT_CHARS] + _TRUNCATION_MARKER.format(len(text) - _MAX_RESULT_CHARS)
    return "repr", text


def _figure_png(value):
    mpl_figure = sys.modules.get("matplotlib.figure")
    if mpl_figure is None or not isinstance(value, mpl_figure.Figure):
        return None
    buf = io.BytesIO()
    value.savefig(buf, format="png", bbox_inches="tight")
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(value)
    return {"type": "image", "format": "png", "base64_data": base64.b64encode(buf.getvalue()).decode("ascii")}


def _collect_figure():
    """Renders the most recent open pyplot figure (and closes them all), like a notebook."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return None
    numbers = plt.get_fignums()
    if not numbers:
        return None
    try:
        return _figure_png(plt.figure(numbers[-1]))
    finally:
        plt.close("all")


def _format_exception(exc, filename):
    """A traceback without the runner's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) or tb is None:
        return "".join(traceback.format_exception_only(type(exc), exc))
    return "".join(traceback.format_exception(type(exc), exc, tb))


def serve(fd, default_output_cap, hello_extra=None):
    """A zygote session's main loop. Never returns: the process ends when the server hangs up
    (the zygote keeps a duplicate of the socket for a restarted server, so that is only when
    the session is deleted). `hello_extra` is added to the ready frame."""
    sock = socket.socket(fileno=fd)
    session = _new_session()
    _serve_connection(sock, session, default_output_cap, hello_extra)
    os._exit(0)


def _new_session():
    sys.path.insert(0, "")
    session = _Session()
    # Run the request path once before reporting ready: the first execution in a freshly
    # forked process pays for copying the pages it touches, and that cost belongs here, while
    # the session waits in the ready queue, not in a user's first request.
    json.dumps(session.execute("None", 1000, 16))
    session.cell = 0
    linecache.cache.pop("<cell 1>", None)
    return session


def _serve_connection(sock, session, default_output_cap, hello_extra):
    """Sends the ready frame, then answers requests in order until the server hangs up."""
    try:
        _send_frame(sock, {"ready": True, **(hello_extra or {})})
    except OSError:
        return
    while True:
        try:
            request = _recv_frame(sock)
        except OSError:
            request = None
        if request is None:
            return
        op = request.get("op")
        if op == "execute":
            cap = int(request.get("output_cap") or default_output_cap)
            try:
                reply = session.execute(request["code"], int(request["timeout_ms"]), cap)
            except BaseException as exc:  # noqa: BLE001 - report instead of dying
                reply = {
                    "status": "error", "stdout": "", "stderr": f"sandpool runner error: {exc!r}\n",
                    "result": None, "result_kind": "none", "error_name": "RunnerError",
                    "error_message": str(exc), "duration_ms": 0,
                }
        else:
            reply = {
                "status": "error", "stdout": "", "stderr": f"unknown runner operation {op!r}\n",
                "result": None, "result_kind": "none", "error_name": "RunnerError",
                "error_message": "unknown operation", "duration_ms": 0,
            }
        # The server matches replies to requests by id (after a restart it skips replies
        # meant for its predecessor).
        reply["id"] = request.get("id", 0)
        try:
            _send_frame(sock, reply)
        except (TypeError, ValueError) as exc:
            _send_frame(sock, {
                "status": "error", "stdout": "", "stderr": f"sandpool: result could not be encoded: {exc}\n",
                "result": None, "result_kind": "none", "error_name": "RunnerError",
                "error_message": str(exc), "duration_ms": reply.get("duration_ms", 0),
                "id": request.get("id", 0),
            })
        except OSError:
            return
