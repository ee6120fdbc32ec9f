"""LlamaIndex: llama-index-tools-azure-code-interpreter 0.7.0, `AzureCodeInterpreterToolSpec`.

Built as in contract section 7.2. The spec has no constructor argument for the token, so,
as its docs suggest, the instance attribute `access_token_provider` is replaced: that is the
only test double.
"""

from __future__ import annotations

import uuid

import pytest
from llama_index.tools.azure_code_interpreter import AzureCodeInterpreterToolSpec

from e2e_support import (
    CHART_CODE,
    SLOW_CELL_SLEEP_S,
    assert_chart_png,
    sha256,
    unique_name,
)


@pytest.fixture
def make_spec(azure_endpoint, token):
    def make(session_id: str, local_save_path: str | None = None) -> AzureCodeInterpreterToolSpec:
        spec = AzureCodeInterpreterToolSpec(
            pool_management_endpoint=azure_endpoint,
            session_id=session_id,
            local_save_path=local_save_path,
        )
        spec.access_token_provider = lambda: token
        return spec

    return make


@pytest.fixture
def spec(make_spec, session_id) -> AzureCodeInterpreterToolSpec:
    return make_spec(session_id)


def execute(spec: AzureCodeInterpreterToolSpec, code: str) -> dict:
    """`code_interpreter` returns the whole response; the execution is in `properties`."""
    return spec.code_interpreter(code)["properties"]


def test_state_is_kept_across_calls_through_the_agent_tools(spec):
    # The way an agent uses the spec: the FunctionTools from to_tool_list().
    tools = {t.metadata.name: t for t in spec.to_tool_list()}
    assert set(tools) == {"code_interpreter", "list_files"}
    interpreter = tools["code_interpreter"]

    first = interpreter.call(python_code="rows = [{'x': i, 'y': i * i} for i in range(5)]\nprint(len(rows))")
    assert first.raw_output["properties"]["status"] == "Success"
    assert first.raw_output["properties"]["stdout"] == "5\n"

    second = interpreter.call(python_code="import pandas as pd\nframe = pd.DataFrame(rows)\nint(frame['y'].sum())")
    assert second.raw_output["properties"]["status"] == "Success", second.raw_output
    assert second.raw_output["properties"]["result"] == 30
    assert not second.is_error

    # And the spec's method directly, same session.
    third = execute(spec, "'%d rows, %d columns' % frame.shape")
    assert (third["status"], third["result"]) == ("Success", "5 rows, 2 columns")


def test_matplotlib_chart_is_saved_to_local_save_path(make_spec, session_id, tmp_path):
    spec = make_spec(session_id, local_save_path=str(tmp_path))
    props = execute(spec, CHART_CODE)
    assert props["status"] == "Success", props.get("stderr")
    # The client decoded base64_data into a file and says so.
    assert props["result"] == {"type": "image", "format": "png", "saved_to_local_path": True}

    saved = sorted(tmp_path.glob(f"{session_id}_*.png"))
    assert len(saved) == 1, list(tmp_path.iterdir())
    assert_chart_png(saved[0].read_bytes())

    # The figure was consumed: the next cell's value is its own.
    assert execute(spec, "'no figure here'")["result"] == "no figure here"
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_binary_file_upload_list_download_round_trip(spec, binary_payload, tmp_path):
    name = unique_name("li-blob")
    local = tmp_path / name
    local.write_bytes(binary_payload)

    # The client sends the multipart filename as "/mnt/data/<name>".
    uploaded = spec.upload_file(local_file_path=str(local))
    assert [(m.file_full_path, m.size_in_bytes) for m in uploaded] == [(f"/mnt/data/{name}", len(binary_payload))]

    listed = {m.file_full_path: m.size_in_bytes for m in spec.list_files()}
    assert listed.get(f"/mnt/data/{name}") == len(binary_payload), listed

    # Download by absolute path (the client strips /mnt/data/) and by relative name.
    assert spec.download_file_to_local(remote_file_path=f"/mnt/data/{name}").read() == binary_payload
    target = tmp_path / "downloaded.bin"
    assert spec.download_file_to_local(remote_file_path=name, local_file_path=str(target)) is None
    assert target.read_bytes() == binary_payload

    seen = execute(spec, f"import hashlib\nhashlib.sha256(open('/mnt/data/{name}', 'rb').read()).hexdigest()")
    assert seen["result"] == sha256(binary_payload)


def test_exception_is_reported_as_failure_with_traceback(spec):
    marker = f"missing-{uuid.uuid4().hex[:8]}"
    props = execute(spec, f"print('looking up')\n{{'present': 1}}[{marker!r}]")
    assert props["status"] == "Failure"
    assert props["result"] is None
    assert props["stdout"] == "looking up\n"
    assert "Traceback" in props["stderr"]
    assert "KeyError" in props["stderr"] and marker in props["stderr"]

    syntax = execute(spec, "def broken(:\n    pass")
    assert syntax["status"] == "Failure"
    assert "SyntaxError" in syntax["stderr"]

    assert execute(spec, "'still alive'")["result"] == "still alive"


def test_execution_timeout_interrupts_and_the_session_keeps_its_state(spec):
    assert execute(spec, "total = sum(range(10))")["status"] == "Success"
    slow = execute(spec, f"import time\ntime.sleep({SLOW_CELL_SLEEP_S})\ntotal = -1")
    assert slow["status"] == "Failure"
    assert "ExecutionTimeout" in slow["stderr"], slow

    after = execute(spec, "total")
    assert (after["status"], after["result"]) == ("Success", 45)
