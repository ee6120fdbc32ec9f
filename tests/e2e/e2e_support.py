"""Constants and small checks shared by the end-to-end tests (no fixtures here)."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
import uuid
import zlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SANDPOOL_BIN = os.environ.get("SANDPOOL_BIN") or str(REPO_ROOT / "target" / "debug" / "sandpool")
RUNTIME_DIR = os.environ.get("SANDPOOL_TEST_RUNTIME_DIR") or str(REPO_ROOT / "target" / "sandpool-test-runtime")

POOL_NAME = "default"
# What a user copies from the Azure portal: any subscription/resource group, then the pool.
AZURE_PREFIX = f"/subscriptions/sub/resourceGroups/rg/sessionPools/{POOL_NAME}"
# The pool's per-execution timeout in the test config (seconds). Code that sleeps far
# longer than this must be interrupted by the server.
EXECUTION_TIMEOUT_S = 5
# How long the "too slow" cells sleep: well past the pool timeout, but short enough that a
# server that does not enforce it fails the test (it returns Success) instead of hanging.
SLOW_CELL_SLEEP_S = 30

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A wide, short figure: the rendered PNG must come out clearly wider than tall, which a
# canned or wrong image would not.
CHART_CODE = """\
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 2))
ax.plot([0, 1, 2, 3, 4], [3, 1, 4, 1, 5], marker="o")
ax.set_title("e2e chart")
"""


def binary_payload() -> bytes:
    """Every byte value (in both orders), bytes that look like text-encoding traps, and
    random bytes. Different on each call."""
    return (
        bytes(range(256))
        + b"\r\n\n\r\x00\x00\xff\xfe\xef\xbb\xbf--boundary\r\n"
        + os.urandom(64 * 1024)
        + bytes(range(255, -1, -1))
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unique_name(stem: str, suffix: str = ".bin") -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}{suffix}"


def png_size(data: bytes) -> tuple[int, int]:
    """Checks that `data` is a complete, well-formed PNG (signature, chunk CRCs, IHDR
    first, IEND last, image data present) and returns (width, height)."""
    assert data[:8] == PNG_SIGNATURE, f"not a PNG signature: {data[:8]!r}"
    pos = 8
    chunks = []
    while pos < len(data):
        assert pos + 8 <= len(data), "truncated PNG chunk header"
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        assert len(body) == length, f"truncated PNG chunk {ctype!r}"
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(ctype + body) & 0xFFFFFFFF, f"bad CRC in PNG chunk {ctype!r}"
        chunks.append((ctype, body))
        pos += 12 + length
    types = [c for c, _ in chunks]
    assert types[0] == b"IHDR", f"first PNG chunk is {types[0]!r}"
    assert types[-1] == b"IEND", f"last PNG chunk is {types[-1]!r}"
    assert b"IDAT" in types, "PNG has no image data"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 0 and height > 0
    return width, height


def assert_chart_png(data: bytes) -> None:
    """The PNG rendered from CHART_CODE: valid, and shaped like the 8x2 figure."""
    width, height = png_size(data)
    assert width > 2 * height, f"chart PNG is {width}x{height}; expected a wide 8x2-inch figure"
    assert height >= 50, f"chart PNG is {width}x{height}; too small to be the figure"


def decode_image_result(result: dict) -> bytes:
    assert result.get("type") == "image", result
    assert result.get("format") == "png", result
    return base64.b64decode(result["base64_data"], validate=True)


def new_id(prefix: str = "user") -> str:
    """A fresh session identifier."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(condition, timeout: float, what: str, interval: float = 0.25):
    """Polls `condition` until it returns something truthy (returned), failing the test after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
