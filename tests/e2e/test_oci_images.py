"""The image helpers of `oci_images.py`, end to end but without sandpool: the static test app
builds and runs (on the host and in an empty root), a layout is a valid OCI image, a local
`docker-registry` serves it back by tag and by digest (also behind basic auth), and a
`docker save` archive of it is well formed.

Needs cargo and /usr/bin/docker-registry (scripts/test installs Debian's package); the
empty-root test needs root (chroot).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import requests
import websocket  # websocket-client

import oci_images
from oci_images import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    LocalRegistry,
    RegistryError,
    build_testapp,
    fetch_manifest,
    push_layout,
    read_blob,
    read_layout,
    write_docker_archive,
    write_oci_layout,
    write_testapp_layout,
)

APP_START_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def testapp_binary() -> Path:
    if not os.path.exists(oci_images.REGISTRY_BIN):
        pytest.fail(f"{oci_images.REGISTRY_BIN} is missing: apt-get install docker-registry", pytrace=False)
    return build_testapp()


@pytest.fixture(scope="module")
def testapp_layout(tmp_path_factory, testapp_binary) -> tuple[Path, str]:
    layout = tmp_path_factory.mktemp("layout")
    digest = write_testapp_layout(layout, testapp_binary, tag="v1", env={"GREETING": "hello world"})
    return layout, digest


# -- the layout --------------------------------------------------------------------------------


def _layer_members(layout: Path, desc: dict) -> dict[str, tarfile.TarInfo]:
    data = gzip.decompress(read_blob(layout, desc["digest"]))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_testapp_is_static(testapp_binary):
    assert oci_images.is_static_elf(testapp_binary)
    assert not oci_images.is_static_elf(Path("/bin/sh")), "the check must see a dynamic loader"


def test_layout_is_a_valid_oci_image(testapp_layout, testapp_binary):
    layout, digest = testapp_layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    [entry] = index["manifests"]
    assert entry["annotations"][REF_NAME_ANNOTATION] == "v1"
    assert entry["digest"] == digest and entry["mediaType"] == MEDIA_OCI_MANIFEST

    _, manifest_bytes, config = read_layout(layout, "v1")
    assert entry["size"] == len(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["config"]["mediaType"] == MEDIA_OCI_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MEDIA_OCI_LAYER_GZIP]
    # Every blob is stored under its digest with the announced size (read_blob checks the hash).
    for desc in [manifest["config"], *manifest["layers"]]:
        assert len(read_blob(layout, desc["digest"])) == desc["size"]

    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["config"]["Entrypoint"] == [oci_images.TESTAPP_PATH]
    assert "GREETING=hello world" in config["config"]["Env"] and "PORT=8080" in config["config"]["Env"]
    assert config["config"]["ExposedPorts"] == {"8080/tcp": {}}
    # diff_ids are digests of the uncompressed layers.
    [layer] = manifest["layers"]
    uncompressed = gzip.decompress(read_blob(layout, layer["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(uncompressed).hexdigest()]}

    members = _layer_members(layout, layer)
    assert list(members)[:2] == ["app", "app/sandpool-testapp"], "parents come before their children"
    assert members["app"].isdir() and members["app"].mode == 0o755
    app = members["app/sandpool-testapp"]
    assert app.isfile() and app.mode == 0o755 and app.size == testapp_binary.stat().st_size
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["data"].isdir() and members["data"].mode == 0o777
    assert b"app:x:1000:1000:" in oci_images.PASSWD and members["etc/passwd"].isfile() and members["etc/group"].isfile()
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())


def test_layouts_are_reproducible_and_take_extra_layers(tmp_path):
    files = {"/bin/tool": (b"#!x", 0o755)}
    first = write_oci_layout(tmp_path / "a", files, entrypoint=["/bin/tool"], cmd=["--flag"], exposed_port="9000/udp")
    again = write_oci_layout(tmp_path / "b", files, entrypoint=["/bin/tool"], cmd=["--flag"], exposed_port="9000/udp")
    assert first == again

    digest = write_oci_layout(
        tmp_path / "a",
        files,
        entrypoint=["/bin/tool"],
        tag="layered",
        extra_layers=[{"etc/extra/conf": (b"x=1", 0o600)}],
        user="1000:1000",
    )
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert {m["annotations"][REF_NAME_ANNOTATION]: m["digest"] for m in index["manifests"]} == {"latest": first, "layered": digest}
    _, manifest_bytes, config = read_layout(tmp_path / "a", "layered")
    manifest = json.loads(manifest_bytes)
    assert len(manifest["layers"]) == len(config["rootfs"]["diff_ids"]) == 2
    assert config["config"]["User"] == "1000:1000" and "Cmd" not in config["config"]
    extra = _layer_members(tmp_path / "a", manifest["layers"][1])
    assert list(extra) == ["etc", "etc/extra", "etc/extra/conf"] and extra["etc/extra/conf"].mode == 0o600


def test_docker_archive(tmp_path, testapp_layout):
    layout, _ = testapp_layout
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, layout, "localhost:5000/sandpool/testapp:v1")
    with tarfile.open(archive) as tar:
        [entry] = json.loads(tar.extractfile("manifest.json").read())
        assert entry["RepoTags"] == ["localhost:5000/sandpool/testapp:v1"]
        config_bytes = tar.extractfile(entry["Config"]).read()
        config = json.loads(config_bytes)
        assert entry["Config"] == hashlib.sha256(config_bytes).hexdigest() + ".json"
        layer_digests = ["sha256:" + hashlib.sha256(tar.extractfile(name).read()).hexdigest() for name in entry["Layers"]]
        assert layer_digests == config["rootfs"]["diff_ids"]
        assert all(name.endswith("/layer.tar") for name in entry["Layers"])
        repositories = json.loads(tar.extractfile("repositories").read())
        assert list(repositories) == ["localhost:5000/sandpool/testapp"]


# -- the registry ------------------------------------------------------------------------------


def test_push_and_fetch_by_tag_and_digest(testapp_layout):
    layout, digest = testapp_layout
    with LocalRegistry() as registry:
        pushed = push_layout(registry.url, layout, "sandpool/testapp", "v1")
        assert pushed == digest
        # Pushing again is a no-op for the blobs (HEAD finds them) and the same manifest.
        assert registry.push(layout, "sandpool/testapp", "v1") == digest

        by_tag, tag_digest, content_type = fetch_manifest(registry.url, "sandpool/testapp", "v1")
        assert tag_digest == digest and content_type == MEDIA_OCI_MANIFEST
        assert "sha256:" + hashlib.sha256(by_tag).hexdigest() == digest
        by_digest, digest_again, _ = fetch_manifest(registry.url, "sandpool/testapp", digest)
        assert by_digest == by_tag and digest_again == digest

        manifest = json.loads(by_tag)
        for desc in [manifest["config"], *manifest["layers"]]:
            blob = requests.get(f"{registry.url}/v2/sandpool/testapp/blobs/{desc['digest']}", timeout=30)
            assert blob.status_code == 200
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == desc["digest"]
        tags = requests.get(f"{registry.url}/v2/sandpool/testapp/tags/list", timeout=30).json()
        assert tags == {"name": "sandpool/testapp", "tags": ["v1"]}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(registry.host.rsplit(":", 1)[1])), timeout=2)


def test_registry_with_basic_auth(testapp_layout):
    layout, digest = testapp_layout
    with LocalRegistry(auth=("puller", "s3cret pass")) as registry:
        anonymous = requests.get(f"{registry.url}/v2/", timeout=10)
        assert anonymous.status_code == 401 and "Basic" in anonymous.headers["Www-Authenticate"]
        assert requests.get(f"{registry.url}/v2/", auth=("puller", "wrong"), timeout=10).status_code == 401
        with pytest.raises(RegistryError) as refused:
            push_layout(registry.url, layout, "private/app", "v1")
        assert refused.value.status == 401
        assert registry.push(layout, "private/app", "v1") == digest
        with pytest.raises(RegistryError):
            fetch_manifest(registry.url, "private/app", "v1")
        assert fetch_manifest(registry.url, "private/app", "v1", auth=registry.auth)[1] == digest


# -- the test app itself -----------------------------------------------------------------------


class RunningApp:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"


def _start_app(argv: list[str], env: dict[str, str], port: int) -> RunningApp:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    app = RunningApp(proc, port)
    deadline = time.monotonic() + APP_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sandpool-testapp exited with {proc.returncode}: {proc.stdout.read().decode(errors='replace')}")
        try:
            if requests.get(f"{app.url}/health", timeout=1).status_code == 200:
                return app
        except requests.RequestException:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"sandpool-testapp did not answer /health within {APP_START_TIMEOUT_S} s")


def _stop_app(app: RunningApp) -> None:
    if app.proc.poll() is None:
        app.proc.kill()
    app.proc.wait()


@pytest.fixture
def app(testapp_binary, tmp_path):
    port = oci_images.free_port()
    env = {
        "PORT": str(port),
        "DATA_DIR": str(tmp_path / "data"),
        "UNHEALTHY_FILE": str(tmp_path / "unhealthy"),
        "STARTUP_DELAY_MS": "300",
        "X_MARK": "on the host",
    }
    running = _start_app([str(testapp_binary)], env, port)
    yield running
    _stop_app(running)


def test_app_health_startup_and_counter(app):
    assert requests.get(f"{app.url}/health", timeout=5).text == "ok"
    time.sleep(0.3)
    assert requests.get(f"{app.url}/startup", timeout=5).status_code == 200
    with requests.Session() as keep_alive:
        first = keep_alive.get(f"{app.url}/counter", timeout=5).json()
        second = keep_alive.get(f"{app.url}/counter", timeout=5).json()
    assert (first["count"], second["count"]) == (1, 2)
    assert first["pid"] == second["pid"] == app.proc.pid
    assert first["instance"] == second["instance"] and len(first["instance"]) == 32
    assert requests.get(f"{app.url}/env", timeout=5).json()["X_MARK"] == "on the host"

    assert requests.post(f"{app.url}/unhealthy", timeout=5).status_code == 200
    assert requests.get(f"{app.url}/health", timeout=5).status_code == 500


def test_app_startup_probe_waits(testapp_binary, tmp_path):
    port = oci_images.free_port()
    env = {"PORT": str(port), "DATA_DIR": str(tmp_path), "STARTUP_DELAY_MS": "60000"}
    running = _start_app([str(testapp_binary)], env, port)
    try:
        assert requests.get(f"{running.url}/startup", timeout=5).status_code == 503
    finally:
        _stop_app(running)


def test_app_echo_streams_a_chunked_body(app):
    body = [b"first chunk|", os.urandom(100_000), b"|last"]
    resp = requests.post(
        f"{app.url}/echo?mode=x&y=%20",
        data=iter(body),  # a generator: requests sends Transfer-Encoding: chunked
        headers={"X-Test-Trace": "abc", "X-Other": "dropped", "Authorization": "Bearer secret"},
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.content == b"".join(body)
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.headers["X-Test-Trace"] == "abc" and "X-Other" not in resp.headers
    assert resp.headers["x-saw-authorization"] == "yes"
    assert resp.headers["x-query"] == "mode=x&y=%20"
    plain = requests.post(f"{app.url}/echo", data=b"fixed", timeout=10)
    assert plain.content == b"fixed" and plain.headers["Content-Length"] == "5"
    assert plain.headers["x-saw-authorization"] == "no"


def test_app_echo_answers_each_chunk_before_the_next_is_sent(app):
    """The property a streaming proxy test relies on: the first chunk comes back while the
    request body is still open."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        received = b""
        while b"hello" not in received:
            data = sock.recv(4096)
            assert data, f"connection closed early: {received!r}"
            received += data
        assert received.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"0\r\n\r\n")
        while not received.endswith(b"0\r\n\r\n"):
            data = sock.recv(4096)
            assert data, f"connection closed early: {received!r}"
            received += data


def test_app_files_and_listing(app, tmp_path):
    payload = os.urandom(50_000)
    assert requests.put(f"{app.url}/files/blob.bin", data=payload, timeout=10).json() == {"name": "blob.bin", "size": 50_000}
    assert requests.get(f"{app.url}/files/blob.bin", timeout=10).content == payload
    assert requests.get(f"{app.url}/files/missing", timeout=10).status_code == 404
    assert requests.get(f"{app.url}/ls", params={"dir": str(tmp_path / "data")}, timeout=10).json() == ["blob.bin"]
    assert requests.get(f"{app.url}/ls", params={"dir": str(tmp_path / "nope")}, timeout=10).status_code == 404


def test_app_connect_whoami_and_slow(app):
    refused = requests.get(f"{app.url}/connect", params={"addr": f"127.0.0.1:{oci_images.free_port()}"}, timeout=10).json()
    assert refused["connected"] is False and "refused" in refused["error"].lower()
    ok = requests.get(f"{app.url}/connect", params={"addr": f"127.0.0.1:{app.port}", "timeout_ms": 500}, timeout=10).json()
    assert ok == {"addr": f"127.0.0.1:{app.port}", "connected": True, "error": None}
    who = requests.get(f"{app.url}/whoami", timeout=5).json()
    assert who["pid"] == app.proc.pid and who["uid"] == os.geteuid() and app.proc.pid in who["pids"]
    started = time.monotonic()
    assert requests.get(f"{app.url}/slow", params={"ms": 300}, timeout=10).json() == {"slept_ms": 300}
    assert time.monotonic() - started >= 0.3


def test_app_websocket_echo(app):
    ws = websocket.create_connection(f"ws://127.0.0.1:{app.port}/ws", timeout=10, subprotocols=["echo"])
    try:
        assert ws.getsubprotocol() == "echo"
        ws.send("héllo")
        assert ws.recv() == "héllo"
        big = os.urandom(70_000)  # a 64-bit length
        ws.send_binary(big)
        assert ws.recv() == big
        ws.ping(b"are you there")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
    finally:
        ws.close()  # sends a close frame and waits for the server's
    assert requests.get(f"{app.url}/ws", timeout=5).status_code == 426


def test_app_exit_code(testapp_binary, tmp_path):
    port = oci_images.free_port()
    running = _start_app([str(testapp_binary)], {"PORT": str(port), "DATA_DIR": str(tmp_path)}, port)
    try:
        assert requests.post(f"{running.url}/exit", params={"code": 42}, timeout=5).json() == {"exiting": True, "code": 42}
        assert running.proc.wait(timeout=10) == 42
    finally:
        _stop_app(running)


def test_app_runs_in_an_empty_root(testapp_binary, tmp_path):
    """No libc, no /proc, no /dev, no /etc: only the binary."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    root = tmp_path / "root"
    root.mkdir()
    (root / "app").write_bytes(testapp_binary.read_bytes())
    (root / "app").chmod(0o755)
    port = oci_images.free_port()
    running = _start_app([shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/app"], {"PORT": str(port)}, port)
    try:
        counter = requests.get(f"{running.url}/counter", timeout=5).json()
        assert counter["count"] == 1 and len(counter["instance"]) == 32
        who = requests.get(f"{running.url}/whoami", timeout=5).json()
        assert who["pids"] == [] and who["uid"] is None  # nothing mounted at /proc
        assert requests.put(f"{running.url}/files/x", data=b"in the root", timeout=5).status_code == 200
        assert (root / "data" / "x").read_bytes() == b"in the root"
        # No resolver files: a host name fails cleanly instead of crashing the static binary.
        unresolved = requests.get(f"{running.url}/connect", params={"addr": "example.invalid:80"}, timeout=10).json()
        assert unresolved["connected"] is False and unresolved["error"].startswith("resolve")
    finally:
        _stop_app(running)
