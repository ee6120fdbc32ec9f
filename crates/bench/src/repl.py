"""A minimal REPL server for the bubblewrap comparison of sandpool-bench.

It runs inside `bwrap ... python -u -c <this file>`, imports what sandpool's zygote imports,
then serves cells over stdin/stdout: frames of a 4-byte big-endian length and UTF-8 bytes.
The first frame it writes is {"ready": true}; then one reply per request: {"ok": bool,
"stdout": str, "result": str, "error": str}. Like sandpool's runner it keeps one namespace,
captures stdout/stderr, evaluates a trailing expression and closes open matplotlib figures.
"""

import ast
import io
import json
import struct
import sys
import traceback

import numpy  # noqa: F401
import pandas  # noqa: F401
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_in = sys.stdin.buffer
_out = sys.stdout.buffer
_namespace = {"__name__": "__main__"}


def _read_exact(n):
    data = b""
    while len(data) < n:
        chunk = _in.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data


def _send(obj):
    data = json.dumps(obj).encode()
    _out.write(struct.pack(">I", len(data)) + data)
    _out.flush()


def _run(code):
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    result, ok, error = "", True, ""
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), _namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), _namespace)
            if value is not None:
                result = repr(value)
        if plt.get_fignums():
            plt.close("all")
    except BaseException:  # noqa: BLE001 - report everything, as a REPL does
        ok, error = False, traceback.format_exc()
    finally:
        sys.stdout, sys.stderr = saved
    return {"ok": ok, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "result": result, "error": error}


def main():
    _send({"ready": True})
    while True:
        (length,) = struct.unpack(">I", _read_exact(4))
        _send(_run(_read_exact(length).decode()))


main()
