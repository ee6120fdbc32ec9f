"""AutoGen: autogen-ext[azure] 0.7.5 / autogen-core 0.7.5, `ACADynamicSessionsCodeExecutor`.

Built as in contract section 7.4. The only test double is the credential (any object with
`get_token`), which hands out the server's token. Every executor's first execution also
runs AutoGen's own setup cells (`import pkg_resources` package listing, `os.chdir('/mnt/data')`),
which fail the executor hard if the server gets them wrong.
"""

from __future__ import annotations

import ast
import asyncio
import uuid

import pytest
from autogen_core import CancellationToken
from autogen_core.code_executor import CodeBlock, with_requirements
from autogen_ext.code_executors.azure import ACADynamicSessionsCodeExecutor
from autogen_ext.tools.code_execution import PythonCodeExecutionTool
from azure.core.credentials import AccessToken

from e2e_support import (
    CHART_CODE,
    SLOW_CELL_SLEEP_S,
    assert_chart_png,
    decode_image_result,
    sha256,
    unique_name,
)


class StaticCredential:
    """Stands in for azure-identity: anything with get_token(*scopes) -> AccessToken."""

    def __init__(self, token: str):
        self.token = token
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(self.token, 2**31 - 1)


@pytest.fixture
def credential(token) -> StaticCredential:
    return StaticCredential(token)


@pytest.fixture
def executor(azure_endpoint, credential, session_id, tmp_path) -> ACADynamicSessionsCodeExecutor:
    return ACADynamicSessionsCodeExecutor(
        pool_management_endpoint=azure_endpoint,
        credential=credential,
        work_dir=tmp_path,
        session_id=session_id,
    )


def py(code: str) -> CodeBlock:
    return CodeBlock(code=code, language="python")


# Functions handed to the executor: AutoGen runs their source in the session before the
# first code block, so code blocks can call them.
def add_two_numbers(a: int, b: int) -> int:
    """Add two numbers together."""
    return a + b


@with_requirements(python_packages=["numpy"], global_imports=["numpy"])
def vector_norm(values: list) -> float:
    """Euclidean norm, with a preinstalled package."""
    return float(numpy.linalg.norm(numpy.array(values)))  # noqa: F821 (imported by AutoGen)


def test_state_is_kept_across_calls(executor, credential):
    async def scenario():
        ct = CancellationToken()
        first = await executor.execute_code_blocks(
            [py("import statistics\nsamples = [2, 4, 4, 4, 5, 5, 7, 9]"), py("print(len(samples))")], ct
        )
        second = await executor.execute_code_blocks([py("statistics.pstdev(samples)")], ct)
        # The executor as an agent's tool, same session.
        tool_result = await PythonCodeExecutionTool(executor).run_json(
            {"code": "samples.append(10)\nprint(sum(samples))"}, ct
        )
        return first, second, tool_result

    first, second, tool_result = asyncio.run(scenario())
    assert (first.exit_code, first.output) == (0, "8\n")
    assert (second.exit_code, second.output) == (0, "2.0")
    assert tool_result.success, tool_result.output
    assert tool_result.output == "50\n"
    assert credential.scopes == [("https://dynamicsessions.io/.default",)]


def test_setup_cells_run_and_code_runs_in_mnt_data(executor):
    async def scenario():
        # The first execution runs AutoGen's setup cells, then this block.
        return await executor.execute_code_blocks([py("import os\nos.getcwd()")], CancellationToken())

    cwd = asyncio.run(scenario())
    assert (cwd.exit_code, cwd.output) == (0, "/mnt/data")


# AutoGen parses the package list from `stderr + stdout + str(result)` of the cell
# `import pkg_resources\n[d.project_name for d in pkg_resources.working_set]` with
# `.strip("[]").split(",\n")`: it needs the list as IPython's pretty-printed text and an empty
# stderr (no setuptools deprecation warning).
def test_available_packages_lists_the_preinstalled_packages(executor):
    async def scenario():
        ct = CancellationToken()
        await executor.execute_code_blocks([py("1")], ct)
        return await executor.get_available_packages(ct)

    packages = asyncio.run(scenario())
    # Parsed by AutoGen from `[d.project_name for d in pkg_resources.working_set]`.
    assert {"numpy", "pandas", "matplotlib"} <= packages, sorted(packages)


def test_functions_are_loaded_into_the_session(azure_endpoint, credential, session_id, tmp_path):
    executor = ACADynamicSessionsCodeExecutor(
        pool_management_endpoint=azure_endpoint,
        credential=credential,
        work_dir=tmp_path,
        session_id=session_id,
        functions=[add_two_numbers],
    )

    async def scenario():
        return await executor.execute_code_blocks([py("print(add_two_numbers(1, 2))")], CancellationToken())

    result = asyncio.run(scenario())
    assert (result.exit_code, result.output) == (0, "3\n")


# AutoGen checks a function's python_packages against the parsed package list (see above) and
# raises ValueError("Packages unavailable in environment: ...") when the parse goes wrong.
def test_functions_with_package_requirements_are_loaded(azure_endpoint, credential, session_id, tmp_path):
    executor = ACADynamicSessionsCodeExecutor(
        pool_management_endpoint=azure_endpoint,
        credential=credential,
        work_dir=tmp_path,
        session_id=session_id,
        functions=[vector_norm],
    )

    async def scenario():
        return await executor.execute_code_blocks([py("print(vector_norm([3, 4]))")], CancellationToken())

    result = asyncio.run(scenario())
    assert (result.exit_code, result.output) == (0, "5.0\n")


def test_matplotlib_chart_comes_back_as_an_image(executor):
    async def scenario():
        ct = CancellationToken()
        chart = await executor.execute_code_blocks([py(CHART_CODE)], ct)
        after = await executor.execute_code_blocks([py("6 * 7")], ct)
        return chart, after

    chart, after = asyncio.run(scenario())
    assert chart.exit_code == 0, chart.output
    # AutoGen appends str(result) to the output: here the image dict with its base64 PNG.
    result = ast.literal_eval(chart.output[chart.output.index("{") :])
    assert_chart_png(decode_image_result(result))
    assert (after.exit_code, after.output) == (0, "42")


def test_binary_file_upload_list_download_round_trip(executor, binary_payload, tmp_path):
    name = unique_name("ag-blob")
    (tmp_path / name).write_bytes(binary_payload)

    async def scenario():
        ct = CancellationToken()
        await executor.upload_files([name], ct)
        listed = await executor.get_file_list(ct)
        # Code runs in /mnt/data, so the uploaded file is right there.
        seen = await executor.execute_code_blocks(
            [py(f"import hashlib\nhashlib.sha256(open({name!r}, 'rb').read()).hexdigest()")], ct
        )
        (tmp_path / name).unlink()
        paths = await executor.download_files([name], ct)
        return listed, seen, paths

    listed, seen, paths = asyncio.run(scenario())
    assert name in listed
    assert (seen.exit_code, seen.output) == (0, sha256(binary_payload))
    assert paths == [str(tmp_path / name)]
    assert (tmp_path / name).read_bytes() == binary_payload


def test_download_a_file_written_by_code(executor, tmp_path):
    name = unique_name("ag-generated")

    async def scenario():
        ct = CancellationToken()
        wrote = await executor.execute_code_blocks(
            [py(f"with open({name!r}, 'wb') as fh:\n    fh.write(bytes(range(256)) * 4)")], ct
        )
        paths = await executor.download_files([name], ct)
        return wrote, paths

    wrote, paths = asyncio.run(scenario())
    assert wrote.exit_code == 0, wrote.output
    assert (tmp_path / name).read_bytes() == bytes(range(256)) * 4
    assert paths == [str(tmp_path / name)]


def test_exception_is_reported_as_failure_with_traceback(executor):
    marker = f"bad-{uuid.uuid4().hex[:8]}"

    async def scenario():
        ct = CancellationToken()
        failed = await executor.execute_code_blocks([py(f"print('step 1')\nint({marker!r})")], ct)
        again = await executor.execute_code_blocks([py("'fine'")], ct)
        return failed, again

    failed, again = asyncio.run(scenario())
    assert failed.exit_code == 1
    assert "Traceback" in failed.output
    assert "ValueError: invalid literal for int()" in failed.output and marker in failed.output
    assert "step 1\n" in failed.output
    assert (again.exit_code, again.output) == (0, "fine")


def test_execution_timeout_interrupts_and_the_session_keeps_its_state(executor):
    async def scenario():
        ct = CancellationToken()
        await executor.execute_code_blocks([py("checkpoint = {'step': 3}")], ct)
        slow = await executor.execute_code_blocks([py(f"import time\ntime.sleep({SLOW_CELL_SLEEP_S})")], ct)
        after = await executor.execute_code_blocks([py("checkpoint['step'] + 1")], ct)
        return slow, after

    slow, after = asyncio.run(scenario())
    assert slow.exit_code == 1
    assert "ExecutionTimeout" in slow.output, slow.output
    assert (after.exit_code, after.output) == (0, "4")


def test_restart_moves_to_a_fresh_session(executor, delete_session):
    async def scenario():
        ct = CancellationToken()
        await executor.execute_code_blocks([py("before_restart = True")], ct)
        await executor.restart()
        return await executor.execute_code_blocks([py("before_restart")], ct)

    try:
        after = asyncio.run(scenario())
    finally:
        delete_session(executor._session_id)  # cleanup only: restart() made a new identifier
    assert after.exit_code == 1
    assert "NameError" in after.output
