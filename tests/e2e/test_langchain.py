"""LangChain: langchain-azure-dynamic-sessions 1.0.4, `SessionsPythonREPLTool`.

The tool is built exactly as a user would (contract section 7.1); the only test double is
the access-token provider, which returns a token minted by the server under test.
"""

from __future__ import annotations

import io
import json
import time
import uuid
import warnings

import pytest
import requests

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the package warns on import
    from langchain_azure_dynamic_sessions import SessionsPythonREPLTool
from langchain_core.messages import ToolMessage

from e2e_support import (
    CHART_CODE,
    SLOW_CELL_SLEEP_S,
    assert_chart_png,
    decode_image_result,
    sha256,
    unique_name,
)


@pytest.fixture
def make_tool(azure_endpoint, token):
    def make(session_id: str) -> SessionsPythonREPLTool:
        return SessionsPythonREPLTool(
            pool_management_endpoint=azure_endpoint,
            access_token_provider=lambda: token,
            session_id=session_id,
        )

    return make


@pytest.fixture
def tool(make_tool, session_id) -> SessionsPythonREPLTool:
    return make_tool(session_id)


def run(tool: SessionsPythonREPLTool, code: str) -> dict:
    """`tool.run` as an agent would call it: returns the JSON text the LLM sees."""
    content = tool.run(code)
    assert isinstance(content, str)
    return json.loads(content)


def call(tool: SessionsPythonREPLTool, code: str) -> ToolMessage:
    """A tool call as emitted by a chat model: the ToolMessage carries the raw execution
    properties (status, untruncated result) as its artifact."""
    msg = tool.invoke(
        {"args": {"python_code": code}, "id": f"call-{uuid.uuid4().hex[:8]}", "name": tool.name, "type": "tool_call"}
    )
    assert isinstance(msg, ToolMessage)
    return msg


def test_state_is_kept_across_calls(tool):
    first = run(tool, "import math\nvalue = 6 * 7\ndef double(x):\n    return 2 * x\nprint('defined')")
    assert first["stderr"] == ""
    assert first["stdout"] == "defined\n"

    second = run(tool, "print(math.sqrt(16))\ndouble(value)")
    assert second == {"result": 84, "stdout": "4.0\n", "stderr": ""}

    # The same session through a model-style tool call, mutating the earlier state.
    msg = call(tool, "value += 1\nf'{value} doubled is {double(value)}'")
    assert msg.artifact["status"] == "Success"
    assert json.loads(msg.content)["result"] == "43 doubled is 86"


def test_sessions_with_different_identifiers_are_isolated(make_tool, session_id, delete_session):
    owner = make_tool(session_id)
    run(owner, f"secret = {session_id!r}")
    other_id = str(uuid.uuid4())
    other = make_tool(other_id)
    try:
        msg = call(other, "secret")
        assert msg.artifact["status"] == "Failure"
        assert "NameError" in msg.artifact["stderr"]
        # The owner still has it.
        assert run(owner, "secret")["result"] == session_id
    finally:
        delete_session(other_id)


def test_matplotlib_chart_comes_back_as_an_image(tool):
    msg = call(tool, CHART_CODE)
    assert msg.artifact["status"] == "Success", msg.artifact.get("stderr")
    # What the LLM sees: the client strips the base64 data but keeps type/format.
    assert json.loads(msg.content)["result"] == {"type": "image", "format": "png"}
    # The artifact keeps the full image.
    assert_chart_png(decode_image_result(msg.artifact["result"]))

    # The figure was consumed: the next cell's value is its own, not the chart again.
    assert run(tool, "1 + 1")["result"] == 2


def test_binary_file_upload_list_download_round_trip(tool, binary_payload, tmp_path):
    name = unique_name("lc-blob")
    meta = tool.upload_file(data=io.BytesIO(binary_payload), remote_file_path=name)
    assert meta.filename == name
    assert meta.size_in_bytes == len(binary_payload)

    listed = {f.filename: f.size_in_bytes for f in tool.list_files()}
    assert listed.get(name) == len(binary_payload), listed

    assert tool.download_file(remote_file_path=name).read() == binary_payload
    local = tmp_path / "downloaded.bin"
    tool.download_file(remote_file_path=name, local_file_path=str(local))
    assert local.read_bytes() == binary_payload

    # The interpreter sees the same bytes under /mnt/data (and in its working dir).
    seen = run(tool, f"import hashlib, os\nos.getcwd() + ' ' + hashlib.sha256(open({name!r}, 'rb').read()).hexdigest()")
    assert seen["result"] == f"/mnt/data {sha256(binary_payload)}", seen


def test_upload_from_a_local_path_and_download_a_file_written_by_code(tool, binary_payload, tmp_path):
    local = tmp_path / unique_name("lc-local")
    local.write_bytes(binary_payload)
    meta = tool.upload_file(local_file_path=str(local))
    assert (meta.filename, meta.size_in_bytes) == (local.name, len(binary_payload))

    out_name = unique_name("lc-generated")
    res = run(
        tool,
        f"data = open({local.name!r}, 'rb').read()\n"
        f"with open('/mnt/data/{out_name}', 'wb') as fh:\n"
        f"    fh.write(data[::-1])\n"
        f"len(data)",
    )
    assert res["result"] == len(binary_payload), res
    listed = {f.filename: f.size_in_bytes for f in tool.list_files()}
    assert listed.get(out_name) == len(binary_payload), listed
    assert tool.download_file(remote_file_path=out_name).read() == binary_payload[::-1]


def test_exception_is_reported_as_failure_with_traceback(tool):
    marker = f"boom-{uuid.uuid4().hex[:8]}"
    msg = call(tool, f"print('before the error')\nraise ValueError({marker!r})")
    assert msg.artifact["status"] == "Failure"
    shown = json.loads(msg.content)
    assert shown["result"] is None
    assert shown["stdout"] == "before the error\n"
    assert "Traceback" in shown["stderr"]
    assert f"ValueError: {marker}" in shown["stderr"]

    # The session is still usable.
    assert run(tool, "21 * 2")["result"] == 42


def test_execution_timeout_interrupts_and_the_session_keeps_its_state(tool):
    run(tool, "counter = 41")
    msg = call(
        tool,
        "print('started', flush=True)\n"
        "marker = 'set before the sleep'\n"
        "import time\n"
        f"time.sleep({SLOW_CELL_SLEEP_S})\n"
        "counter = 0\n",
    )
    assert msg.artifact["status"] == "Failure"
    shown = json.loads(msg.content)
    assert "ExecutionTimeout" in shown["stderr"], shown
    assert shown["stdout"] == "started\n"

    # Same session, later call: works, and sees the state from before and up to the interrupt.
    after = run(tool, "f'{counter + 1}, {marker}'")
    assert after == {"result": "42, set before the sleep", "stdout": "", "stderr": ""}


def test_closing_the_tool_deletes_its_session(make_tool, session_id, pool_endpoint, token, delete_session):
    with make_tool(session_id) as tool:
        run(tool, "kept = 'until close'")
        assert run(tool, "kept")["result"] == "until close"
    # close() deleted the session (in a background thread) and rotated the tool's id.
    assert tool.session_id != session_id

    # Wait until the server no longer knows the old identifier.
    status = None
    for _ in range(240):
        status = requests.get(
            f"{pool_endpoint}/session",
            params={"api-version": "2025-02-02-preview", "identifier": session_id},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ).status_code
        if status == 404:
            break
        time.sleep(0.25)
    assert status == 404, f"GET session after close(): {status}"

    # Reusing the identifier gives a fresh interpreter.
    msg = call(make_tool(session_id), "kept")
    assert msg.artifact["status"] == "Failure"
    assert "NameError" in msg.artifact["stderr"]
    # The rotated id is a new, empty session too.
    try:
        assert call(tool, "kept").artifact["status"] == "Failure"
    finally:
        delete_session(tool.session_id)


def test_file_names_with_spaces_and_unicode_round_trip(tool):
    name = f"Quarterly report {uuid.uuid4().hex[:6]} – données.bin"
    payload = "héllo wörld ✓\n".encode() * 100
    meta = tool.upload_file(data=io.BytesIO(payload), remote_file_path=name)
    assert (meta.filename, meta.size_in_bytes) == (name, len(payload))
    assert name in {f.filename for f in tool.list_files()}
    assert tool.download_file(remote_file_path=name).read() == payload
    assert run(tool, f"open({name!r}, 'rb').read() == {payload!r}")["result"] is True


def test_file_written_by_code_in_a_subdirectory_can_be_downloaded(tool):
    run(
        tool,
        "import os\n"
        "os.makedirs('/mnt/data/out/charts', exist_ok=True)\n"
        "with open('/mnt/data/out/charts/data.bin', 'wb') as fh:\n"
        "    fh.write(bytes(range(256)))",
    )
    assert tool.download_file(remote_file_path="out/charts/data.bin").read() == bytes(range(256))


def test_large_binary_file_round_trip(tool, binary_payload):
    payload = binary_payload * 256  # ~16 MiB
    name = unique_name("lc-large")
    meta = tool.upload_file(data=io.BytesIO(payload), remote_file_path=name)
    assert meta.size_in_bytes == len(payload)
    assert tool.download_file(remote_file_path=name).read() == payload
