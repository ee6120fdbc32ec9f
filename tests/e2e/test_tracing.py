"""OpenTelemetry traces, end to end: a server configured with `[telemetry] otlp_endpoint` sends
its spans over OTLP/HTTP (protobuf) to a collector served by this test (`http.server`), which
decodes them with the official `opentelemetry-proto` messages. The test checks the spans a
user's trace backend would show: one `request` span per API call with `auth`, `allocate`,
`execute` and `files` phases inside it, the service name, and no identifier anywhere.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from conftest import CONFIG_TEMPLATE, SandpoolServer
from e2e_support import EXECUTION_TIMEOUT_S, POOL_NAME, RUNTIME_DIR

SERVICE_NAME = "sandpool-e2e-traces"


class Collector(ThreadingHTTPServer):
    """Receives OTLP/HTTP trace exports; keeps (resource attributes, span) pairs."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[tuple[dict, object]] = []
        self.lock = threading.Lock()
        self.content_types: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        with self.server.lock:
            self.server.content_types.add(self.headers.get("content-type", ""))
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.server.spans.append((resource, span))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def traced():
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    work_dir = Path(tempfile.mkdtemp(prefix="sandpool-e2e-traces-"))
    config_path = work_dir / "config.toml"
    config_path.write_text(
        f'[telemetry]\notlp_endpoint = "{collector.url}"\nservice_name = "{SERVICE_NAME}"\n\n'
        + CONFIG_TEMPLATE.format(runtime_dir=RUNTIME_DIR, pool=POOL_NAME, timeout=EXECUTION_TIMEOUT_S)
    )
    server = SandpoolServer(state_dir=work_dir / "state", config_path=config_path, stderr_path=work_dir / "sandpool.stderr.log")
    server.state_dir.mkdir()
    try:
        server.start()
    except BaseException:
        server.stop()
        collector.shutdown()
        raise
    yield server, collector
    server.stop()
    collector.shutdown()
    shutil.rmtree(work_dir, ignore_errors=True)


def attributes(span) -> dict[str, str]:
    return {a.key: a.value.string_value or str(a.value.int_value) for a in span.attributes}


def test_requests_and_their_phases_arrive_as_spans_without_identifiers(traced):
    server, collector = traced
    token = server.issue_token()
    identifier = f"traced-{uuid.uuid4()}"
    auth = {"Authorization": f"Bearer {token}"}
    params = {"api-version": "2025-10-02-preview", "identifier": identifier}
    pool = f"{server.base_url}/pools/{POOL_NAME}"
    resp = requests.post(f"{pool}/executions", params=params, headers=auth, json={"code": "21 * 2"}, timeout=60)
    assert resp.status_code == 200, resp.text
    resp = requests.post(f"{pool}/files", params=params, headers=auth, files={"file": ("t.txt", b"hello")}, timeout=60)
    assert resp.status_code == 200, resp.text

    # The batch exporter sends every few seconds.
    deadline = time.monotonic() + 30
    names: set[str] = set()
    while time.monotonic() < deadline:
        with collector.lock:
            names = {span.name for _, span in collector.spans}
        if {"request", "auth", "allocate", "execute", "files"} <= names:
            break
        time.sleep(0.5)
    assert {"request", "auth", "allocate", "execute", "files"} <= names, names
    assert collector.content_types == {"application/x-protobuf"}

    with collector.lock:
        spans = list(collector.spans)
    assert all(resource.get("service.name") == SERVICE_NAME for resource, _ in spans)
    by_id = {span.span_id: span for _, span in spans}
    execute = next(span for _, span in spans if span.name == "execute")
    assert attributes(execute)["pool"] == POOL_NAME
    # `execute` sits inside the POST .../executions request span, in the same trace.
    parent = by_id[execute.parent_span_id]
    while parent.name != "request":
        parent = by_id[parent.parent_span_id]
    assert attributes(parent)["method"] == "POST" and attributes(parent)["path"].endswith("/executions")
    assert parent.trace_id == execute.trace_id
    allocate = next(span for _, span in spans if span.name == "allocate" and span.trace_id == execute.trace_id)
    assert allocate.end_time_unix_nano <= execute.start_time_unix_nano + 1_000_000
    # Nothing identifies the session or holds a secret.
    text = str([(span.name, attributes(span)) for _, span in spans])
    assert identifier not in text and token not in text and "21 * 2" not in text
