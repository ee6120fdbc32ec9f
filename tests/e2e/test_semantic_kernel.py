"""Semantic Kernel: semantic-kernel 1.45.0, `SessionsPythonTool`.

Built as in contract section 7.3. Test doubles: the auth callback (returns the server's
token) and the httpx transport. SK validates the endpoint as an https URL, so the tool is
given `https://...` and the transport rewrites the scheme to http on the wire; everything
else (URL building, headers, the multipart upload with its sticky
`Content-Type: application/json`) is the client's own.
"""

from __future__ import annotations

import ast
import asyncio
import re
import uuid
from contextlib import asynccontextmanager

import httpx
import pytest
from semantic_kernel import Kernel
from semantic_kernel.core_plugins.sessions_python_tool import SessionsPythonSettings, SessionsPythonTool

from e2e_support import (
    CHART_CODE,
    SLOW_CELL_SLEEP_S,
    assert_chart_png,
    decode_image_result,
    sha256,
    unique_name,
)

SK_OUTPUT_RE = re.compile(r"\AStatus:\n(.*?)\nResult:\n(.*?)\nStdout:\n(.*?)\nStderr:\n(.*)\Z", re.DOTALL)


class ToPlainHttp(httpx.AsyncHTTPTransport):
    """SK insists on an https endpoint; send the requests as plain http instead."""

    async def handle_async_request(self, request):
        request.url = request.url.copy_with(scheme="http")
        return await super().handle_async_request(request)


@pytest.fixture
def sk_endpoint(azure_endpoint: str) -> str:
    assert azure_endpoint.startswith("http://")
    return "https://" + azure_endpoint[len("http://") :]


@pytest.fixture
def open_tool(sk_endpoint, token, session_id, tmp_path):
    """Async context manager yielding a SessionsPythonTool bound to this test's session.
    (The httpx client belongs to one event loop, so each test builds its own.)"""

    @asynccontextmanager
    async def opener(sid: str = session_id):
        client = httpx.AsyncClient(transport=ToPlainHttp(), timeout=60)
        try:
            yield SessionsPythonTool(
                pool_management_endpoint=sk_endpoint,
                auth_callback=lambda: token,
                http_client=client,
                settings=SessionsPythonSettings(session_id=sid),
                enable_dangerous_file_uploads=True,
                allowed_upload_directories=[str(tmp_path)],
            )
        finally:
            await client.aclose()

    return opener


def parse(output: str) -> dict:
    """SK's execute_code returns 'Status:\\n..\\nResult:\\n..\\nStdout:\\n..\\nStderr:\\n..'."""
    match = SK_OUTPUT_RE.match(str(output))
    assert match, f"unexpected execute_code output: {output!r}"
    status, result, stdout, stderr = match.groups()
    return {"status": status, "result": result, "stdout": stdout, "stderr": stderr}


def test_state_is_kept_across_calls_through_a_kernel(open_tool):
    async def scenario():
        async with open_tool() as tool:
            kernel = Kernel()
            kernel.add_plugin(tool, plugin_name="python")

            first = await kernel.invoke(
                plugin_name="python", function_name="execute_code", code="greeting = 'hello'\nprint(greeting)"
            )
            second = await kernel.invoke(
                plugin_name="python", function_name="execute_code", code="greeting.upper() + ' ' + str(len(greeting))"
            )
            third = await tool.execute_code("greeting = greeting * 2\ngreeting")
            return parse(str(first)), parse(str(second)), parse(third)

    first, second, third = asyncio.run(scenario())
    assert first == {"status": "Success", "result": "", "stdout": "hello\n", "stderr": ""}
    assert second == {"status": "Success", "result": "HELLO 5", "stdout": "", "stderr": ""}
    assert third["result"] == "hellohello"


def test_matplotlib_chart_comes_back_as_an_image(open_tool):
    async def scenario():
        async with open_tool() as tool:
            return parse(await tool.execute_code(CHART_CODE)), parse(await tool.execute_code("40 + 2"))

    chart, after = asyncio.run(scenario())
    assert chart["status"] == "Success", chart["stderr"]
    # SK prints the result dict with str(); the PNG is in base64_data.
    result = ast.literal_eval(chart["result"])
    assert_chart_png(decode_image_result(result))
    assert after["result"] == "42"


def test_binary_file_upload_list_download_round_trip(open_tool, binary_payload, tmp_path):
    name = unique_name("sk-blob")
    local = tmp_path / name
    local.write_bytes(binary_payload)
    target = tmp_path / "downloaded.bin"

    async def scenario():
        async with open_tool() as tool:
            uploaded = await tool.upload_file(local_file_path=str(local))
            listed = await tool.list_files()
            downloaded = (await tool.download_file(remote_file_name=name)).read()
            assert await tool.download_file(remote_file_name=name, local_file_path=str(target)) is None
            seen = parse(
                await tool.execute_code(
                    f"import hashlib\nhashlib.sha256(open('/mnt/data/{name}', 'rb').read()).hexdigest()"
                )
            )
            return uploaded, listed, downloaded, seen

    uploaded, listed, downloaded, seen = asyncio.run(scenario())
    assert uploaded.full_path == f"/mnt/data/{name}"
    assert uploaded.size_in_bytes == len(binary_payload)
    assert {m.full_path: m.size_in_bytes for m in listed}.get(f"/mnt/data/{name}") == len(binary_payload)
    assert downloaded == binary_payload
    assert target.read_bytes() == binary_payload
    assert seen["result"] == sha256(binary_payload)


def test_upload_into_a_subdirectory(open_tool, tmp_path):
    local = tmp_path / unique_name("sk-local")
    local.write_bytes(bytes(range(256)) * 8)
    remote = f"inputs/{unique_name('sk-nested')}"

    async def scenario():
        async with open_tool() as tool:
            uploaded = await tool.upload_file(local_file_path=str(local), remote_file_path=remote)
            downloaded = (await tool.download_file(remote_file_name=remote)).read()
            seen = parse(await tool.execute_code(f"len(open('/mnt/data/{remote}', 'rb').read())"))
            return uploaded, downloaded, seen

    uploaded, downloaded, seen = asyncio.run(scenario())
    # SK finds the uploaded file again by listing and matching "/mnt/data/<remote>".
    assert (uploaded.full_path, uploaded.size_in_bytes) == (f"/mnt/data/{remote}", 2048)
    assert downloaded == bytes(range(256)) * 8
    assert seen["result"] == "2048"


def test_exception_is_reported_as_failure_with_traceback(open_tool):
    marker = f"oops-{uuid.uuid4().hex[:8]}"

    async def scenario():
        async with open_tool() as tool:
            failed = parse(await tool.execute_code(f"import os\nprint('about to fail')\nos.stat({marker!r})"))
            again = parse(await tool.execute_code("'recovered'"))
            return failed, again

    failed, again = asyncio.run(scenario())
    assert failed["status"] == "Failure"
    assert failed["result"] == "None"
    assert failed["stdout"] == "about to fail\n"
    assert "Traceback" in failed["stderr"]
    assert "FileNotFoundError" in failed["stderr"] and marker in failed["stderr"]
    assert (again["status"], again["result"]) == ("Success", "recovered")


def test_execution_timeout_interrupts_and_the_session_keeps_its_state(open_tool):
    # SK asks for timeoutInSeconds=100; the pool's own limit (5 s) must still apply.
    async def scenario():
        async with open_tool() as tool:
            await tool.execute_code("words = ['state', 'survives']")
            slow = parse(await tool.execute_code(f"import time\ntime.sleep({SLOW_CELL_SLEEP_S})"))
            after = parse(await tool.execute_code("' '.join(words)"))
            return slow, after

    slow, after = asyncio.run(scenario())
    assert slow["status"] == "Failure"
    assert "ExecutionTimeout" in slow["stderr"], slow
    assert (after["status"], after["result"]) == ("Success", "state survives")
