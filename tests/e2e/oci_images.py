"""OCI images for the custom-container tests, built and served without Docker.

* `build_testapp()` builds `crates/testapp` as a static binary (no dynamic loader, no libc
  in the image), so an image can hold nothing but that binary and a few files.
* `write_oci_layout()` writes an OCI image layout (what `skopeo copy ... oci:DIR:TAG`
  produces); `write_docker_archive()` turns one into a `docker save` tarball.
* `LocalRegistry` runs Debian's `docker-registry` (CNCF distribution 2.8) on loopback, with
  optional htpasswd basic auth; `push_layout()` pushes a layout to it with the registry
  HTTP API, and `fetch_manifest()` reads a manifest back.

Everything here is standard library except `bcrypt` (only for `LocalRegistry(auth=...)`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# The images are amd64; building for the explicit triple also keeps the static binary in
# its own directory (target/x86_64-unknown-linux-gnu/debug), so it never replaces the
# dynamically linked one that `cargo build --workspace` puts in target/debug.
TESTAPP_TARGET = "x86_64-unknown-linux-gnu"
TESTAPP_BUILD_COMMAND = [
    "cargo", "rustc", "-p", "sandpool-testapp", "--bin", "sandpool-testapp", "--target", TESTAPP_TARGET,
    "--message-format=json-render-diagnostics",
    # +crt-static: glibc's static libraries instead of libc.so and the dynamic loader.
    # strip=debuginfo: 2.4 MB instead of 9.6 MB, which every layer push and gzip pays for.
    "--", "-C", "target-feature=+crt-static", "-C", "strip=debuginfo",
]
# Where the image runs the app and what it listens on by default.
TESTAPP_PATH = "/app/sandpool-testapp"
TESTAPP_PORT = 8080

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Minimal account files so an image can run as a non-root user ("app", 1000:1000).
PASSWD = (
    b"root:x:0:0:root:/root:/sbin/nologin\n"
    b"app:x:1000:1000:app:/data:/sbin/nologin\n"
    b"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
)
GROUP = b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"

# Fixed timestamps keep layers, and so digests, reproducible.
LAYER_MTIME = 0
CREATED = "1970-01-01T00:00:00Z"

FileMap = Mapping[str, tuple[bytes, int]]


# -- the static test app ---------------------------------------------------------------------


def build_testapp() -> Path:
    """Builds the static `sandpool-testapp` (incremental: seconds when nothing changed) and
    returns its path. Raises RuntimeError with cargo's output if the build fails or the
    result is not statically linked."""
    cargo = os.environ.get("CARGO", "cargo")
    proc = subprocess.run(
        [cargo, *TESTAPP_BUILD_COMMAND[1:]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"building sandpool-testapp failed ({proc.returncode}): {' '.join(TESTAPP_BUILD_COMMAND)}\n"
            f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout[-5000:]}"
        )
    # cargo reports the executable's path, wherever CARGO_TARGET_DIR or .cargo/config put it.
    executable = None
    for line in proc.stdout.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("reason") == "compiler-artifact" and message.get("target", {}).get("name") == "sandpool-testapp":
            executable = message.get("executable") or executable
    if not executable:
        raise RuntimeError(f"cargo did not report the sandpool-testapp executable\n{proc.stderr}")
    path = Path(executable)
    if not is_static_elf(path):
        raise RuntimeError(f"{path} is not statically linked (it has an ELF interpreter)")
    return path


def is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP program header, i.e. one the
    kernel runs without a dynamic loader (static or static-pie)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != pt_interp for i in range(phnum))


# -- OCI image layout ------------------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _normalize(path: str) -> str:
    """`/a//b/` -> `a/b` (tar entries are relative to the root)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad path in image: {path!r}")
    return "/".join(parts)


def layer_tar(files: FileMap, *, dirs: Mapping[str, int] | None = None) -> bytes:
    """An uncompressed layer tar: `files` (path -> (content, mode)), the directories in `dirs`
    (path -> mode), and every missing parent directory (0755). All owned by 0:0, all with a
    fixed mtime, parents before children."""
    entries: dict[str, tuple[bytes | None, int]] = {}
    for path, mode in (dirs or {}).items():
        entries[_normalize(path)] = (None, mode)
    for path, (content, mode) in files.items():
        entries[_normalize(path)] = (content, mode)
    for path in list(entries):
        parent = path.rpartition("/")[0]
        while parent and parent not in entries:
            entries[parent] = (None, 0o755)
            parent = parent.rpartition("/")[0]

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # Sorting puts "a" before "a/b" (and "a-b" in between, which is harmless).
        for path in sorted(entries):
            content, mode = entries[path]
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = mode, LAYER_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    # mtime=0 and no file name: the same tar always gives the same blob.
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return out.getvalue()


def _write_blob(layout: Path, data: bytes) -> dict:
    """Stores `data` under blobs/sha256/ and returns its descriptor (without mediaType)."""
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _dump(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _env_list(env: Mapping[str, str] | Iterable[str] | None) -> list[str]:
    """`KEY=VALUE` strings, with a default PATH unless the caller sets one."""
    if env is None:
        items: list[str] = []
    elif isinstance(env, Mapping):
        items = [f"{k}={v}" for k, v in env.items()]
    else:
        items = list(env)
    if not any(item.startswith("PATH=") for item in items):
        items.insert(0, f"PATH={DEFAULT_PATH}")
    return items


def write_oci_layout(
    dest: Path,
    files: FileMap,
    *,
    entrypoint: list[str],
    cmd: list[str] | None = None,
    env: Mapping[str, str] | Iterable[str] | None = None,
    tag: str = "latest",
    exposed_port: int | str | None = None,
    extra_layers: Iterable[FileMap | bytes] = (),
    user: str | None = None,
    working_dir: str | None = None,
) -> str:
    """Writes an OCI image layout at `dest` and returns the manifest digest ("sha256:...").

    The first layer holds `files` (path -> (content, mode)) plus `/tmp` (1777), `/data`
    (0777), `/etc/passwd` and `/etc/group` (a root, an `app` 1000:1000 and a `nobody`
    account) unless `files` provides them. Each of `extra_layers` is another gzip layer on
    top: a file map like `files`, or an uncompressed tar as bytes (for symlinks, whiteouts...).

    `env` is a mapping or `KEY=VALUE` strings (PATH gets a default); `exposed_port` an int
    (tcp) or "PORT/PROTO". If `dest` already is a layout, the image is added to its index
    (replacing one with the same `tag`).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base_files = {"etc/passwd": (PASSWD, 0o644), "etc/group": (GROUP, 0o644)}
    base_files.update({_normalize(p): v for p, v in files.items()})
    tars = [layer_tar(base_files, dirs={"tmp": 0o1777, "data": 0o777})]
    for layer in extra_layers:
        tars.append(bytes(layer) if isinstance(layer, (bytes, bytearray)) else layer_tar(layer))

    layers = [{"mediaType": MEDIA_OCI_LAYER_GZIP, **_write_blob(dest, _gzip(tar))} for tar in tars]
    container_config: dict = {"Entrypoint": list(entrypoint), "Env": _env_list(env)}
    if cmd is not None:
        container_config["Cmd"] = list(cmd)
    if exposed_port is not None:
        port = f"{exposed_port}/tcp" if isinstance(exposed_port, int) else str(exposed_port)
        container_config["ExposedPorts"] = {port: {}}
    if user is not None:
        container_config["User"] = user
    if working_dir is not None:
        container_config["WorkingDir"] = working_dir
    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": container_config,
        # diff_ids name the layers as unpacked: digests of the uncompressed tars.
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar) for tar in tars]},
        "history": [{"created": CREATED, "created_by": "sandpool tests/e2e/oci_images.py"} for _ in tars],
    }
    config_desc = {"mediaType": MEDIA_OCI_CONFIG, **_write_blob(dest, _dump(config))}
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST, "config": config_desc, "layers": layers}
    manifest_desc = _write_blob(dest, _dump(manifest))

    (dest / "oci-layout").write_bytes(_dump({"imageLayoutVersion": "1.0.0"}))
    index_path = dest / "index.json"
    index = json.loads(index_path.read_bytes()) if index_path.exists() else {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []}
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag]
    index["manifests"].append(
        {
            "mediaType": MEDIA_OCI_MANIFEST,
            **manifest_desc,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {REF_NAME_ANNOTATION: tag},
        }
    )
    index_path.write_bytes(_dump(index))
    return manifest_desc["digest"]


def write_testapp_layout(
    dest: Path,
    binary: Path,
    *,
    tag: str = "latest",
    env: Mapping[str, str] | Iterable[str] | None = None,
    port: int = TESTAPP_PORT,
    user: str | None = None,
    extra_layers: Iterable[FileMap | bytes] = (),
) -> str:
    """An image whose only program is the static test app at /app/sandpool-testapp,
    listening on `port` (env PORT). Returns the manifest digest."""
    env_items = _env_list(env)
    if not any(item.startswith("PORT=") for item in env_items):
        env_items.append(f"PORT={port}")
    return write_oci_layout(
        dest,
        {TESTAPP_PATH: (Path(binary).read_bytes(), 0o755)},
        entrypoint=[TESTAPP_PATH],
        env=env_items,
        tag=tag,
        exposed_port=port,
        extra_layers=extra_layers,
        user=user,
    )


def read_layout(layout_dir: Path, tag: str | None = None) -> tuple[dict, bytes, dict]:
    """The index entry, the manifest bytes and the parsed config of one image in a layout:
    the one tagged `tag`, or the only one when `tag` is None or matches nothing and there is
    exactly one."""
    layout_dir = Path(layout_dir)
    manifests = json.loads((layout_dir / "index.json").read_bytes())["manifests"]
    tagged = [m for m in manifests if tag is not None and m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag]
    if tagged:
        entry = tagged[0]
    elif len(manifests) == 1:
        entry = manifests[0]
    else:
        raise ValueError(f"{layout_dir} holds {len(manifests)} images and none is tagged {tag!r}")
    manifest_bytes = read_blob(layout_dir, entry["digest"])
    config = json.loads(read_blob(layout_dir, json.loads(manifest_bytes)["config"]["digest"]))
    return entry, manifest_bytes, config


def read_blob(layout_dir: Path, digest: str) -> bytes:
    """A blob of the layout, checked against its digest."""
    algorithm, hex_digest = digest.split(":", 1)
    data = (Path(layout_dir) / "blobs" / algorithm / hex_digest).read_bytes()
    if sha256_digest(data) != digest:
        raise ValueError(f"blob {digest} in {layout_dir} does not match its digest")
    return data


def split_repo_tag(repo_tag: str) -> tuple[str, str]:
    """"host:5000/repo:tag" -> ("host:5000/repo", "tag"); no tag means "latest"."""
    name, sep, tag = repo_tag.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return repo_tag, "latest"


def write_docker_archive(dest: Path, layout_dir: Path, repo_tag: str) -> None:
    """Writes the image of `layout_dir` (the one tagged like `repo_tag`'s tag, or its only
    one) as a `docker save` tarball at `dest`: manifest.json (Config, RepoTags, Layers), the
    config as `<hex>.json`, each layer uncompressed as `<diff_id hex>/layer.tar`, and the
    legacy `repositories` file."""
    repo, tag = split_repo_tag(repo_tag)
    _, manifest_bytes, config = read_layout(layout_dir, tag)
    manifest = json.loads(manifest_bytes)
    config_bytes = read_blob(layout_dir, manifest["config"]["digest"])
    members: list[tuple[str, bytes]] = []
    layer_names = []
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = read_blob(layout_dir, layer["digest"])
        tar = gzip.decompress(blob) if layer["mediaType"].endswith("+gzip") else blob
        if sha256_digest(tar) != diff_id:
            raise ValueError(f"layer {layer['digest']} does not unpack to its diff_id {diff_id}")
        name = f"{diff_id.split(':', 1)[1]}/layer.tar"
        layer_names.append(name)
        members.append((name, tar))
    config_name = manifest["config"]["digest"].split(":", 1)[1] + ".json"
    members.append((config_name, config_bytes))
    members.append(("manifest.json", _dump([{"Config": config_name, "RepoTags": [f"{repo}:{tag}"], "Layers": layer_names}])))
    top = layer_names[-1].split("/", 1)[0]
    members.append(("repositories", _dump({repo: {tag: top}})))

    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as out:
        for name in sorted({n.split("/", 1)[0] for n in layer_names}):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, LAYER_MTIME
            out.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, LAYER_MTIME
            out.addfile(info, io.BytesIO(data))


# -- a local registry ------------------------------------------------------------------------

REGISTRY_BIN = "/usr/bin/docker-registry"
REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
  secret: {secret}
{auth}"""
REGISTRY_AUTH = """\
auth:
  htpasswd:
    realm: sandpool-test
    path: {htpasswd}
"""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """Debian's `docker-registry` on 127.0.0.1 with a temporary storage dir.

    `with LocalRegistry() as reg:` ... `reg.url` is "http://127.0.0.1:PORT", `reg.host`
    "127.0.0.1:PORT" (for image references like f"{reg.host}/repo:tag"). With
    `auth=("user", "pass")` every request needs that basic auth (htpasswd with bcrypt; the
    registry accepts it over plain HTTP).
    """

    def __init__(self, auth: tuple[str, str] | None = None, *, binary: str = REGISTRY_BIN, startup_timeout: float = 30.0):
        self.auth = auth
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.host = ""
        self.url = ""

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(f"{self.binary} not found: apt-get install docker-registry (scripts/test does)")
        self.dir = Path(tempfile.mkdtemp(prefix="sandpool-registry-"))
        try:
            # The port is picked before the registry binds it; retry if someone took it meanwhile.
            for _ in range(3):
                if self._start_on(free_port()):
                    return
            raise RuntimeError(f"docker-registry did not start\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _start_on(self, port: int) -> bool:
        assert self.dir is not None
        auth = ""
        if self.auth is not None:
            htpasswd = self.dir / "htpasswd"
            htpasswd.write_text(htpasswd_line(*self.auth))
            auth = REGISTRY_AUTH.format(htpasswd=htpasswd)
        config = self.dir / "config.yml"
        config.write_text(
            REGISTRY_CONFIG.format(storage=self.dir / "storage", addr=f"127.0.0.1:{port}", secret=secrets.token_hex(16), auth=auth)
        )
        log = open(self.dir / "registry.log", "ab")
        try:
            self.proc = subprocess.Popen([self.binary, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                # 401 is an answer too: the registry is up and wants credentials.
                status = _request("GET", f"{self.url}/v2/", timeout=2)[0]
                if status in (200, 401):
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        self._terminate()
        raise RuntimeError(f"docker-registry did not answer GET /v2/ within {self.startup_timeout} s\n{self.log_tail()}")

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._terminate()
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.dir / "registry.log").read_text(errors="replace") if self.dir else ""
        except OSError:
            text = ""
        return "\n".join(text.splitlines()[-lines:]) or "(registry logged nothing)"

    def push(self, layout_dir: Path, repository: str, tag: str = "latest") -> str:
        """`push_layout` to this registry, with its credentials."""
        return push_layout(self.url, layout_dir, repository, tag, auth=self.auth)


def htpasswd_line(user: str, password: str) -> str:
    """An htpasswd entry with a bcrypt hash, the only kind distribution accepts."""
    import bcrypt  # only needed with auth

    # Cost 4 (the minimum): the registry checks the hash on every request.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}\n"


# -- the registry HTTP API -------------------------------------------------------------------

# No proxy for loopback, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: bytes):
        super().__init__(f"{method} {url} -> {status}: {body[:500].decode(errors='replace')}")
        self.status = status


def _request(
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    """One request; returns (status, headers with lower-case names, body) for any status."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def _expect(method: str, url: str, expected: int, **kwargs) -> tuple[dict[str, str], bytes]:
    status, headers, body = _request(method, url, **kwargs)
    if status != expected:
        raise RegistryError(method, url, status, body)
    return headers, body


def push_blob(registry_url: str, repository: str, data: bytes, auth: tuple[str, str] | None = None) -> str:
    """Uploads one blob (monolithic: POST an upload, PUT the bytes with ?digest=) unless the
    registry has it already; returns its digest."""
    digest = sha256_digest(data)
    base = f"{registry_url.rstrip('/')}/v2/{repository}"
    if _request("HEAD", f"{base}/blobs/{digest}", auth=auth)[0] == 200:
        return digest
    headers, _ = _expect("POST", f"{base}/blobs/uploads/", 202, data=b"", auth=auth)
    # Location may be relative, and already carries a query (the upload state).
    location = urllib.parse.urljoin(f"{base}/blobs/uploads/", headers["location"])
    separator = "&" if "?" in location else "?"
    _expect(
        "PUT",
        f"{location}{separator}digest={urllib.parse.quote(digest)}",
        201,
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        auth=auth,
    )
    return digest


def push_layout(
    registry_url: str, layout_dir: Path, repository: str, tag: str, auth: tuple[str, str] | None = None
) -> str:
    """Pushes the image of `layout_dir` tagged `tag` (or its only image) as
    `repository:tag`: every blob, then the OCI manifest. Returns the manifest digest the
    registry reports (`Docker-Content-Digest`)."""
    _, manifest_bytes, _ = read_layout(layout_dir, tag)
    manifest = json.loads(manifest_bytes)
    for desc in [manifest["config"], *manifest["layers"]]:
        push_blob(registry_url, repository, read_blob(layout_dir, desc["digest"]), auth)
    headers, _ = _expect(
        "PUT",
        f"{registry_url.rstrip('/')}/v2/{repository}/manifests/{tag}",
        201,
        data=manifest_bytes,
        headers={"Content-Type": manifest.get("mediaType", MEDIA_OCI_MANIFEST)},
        auth=auth,
    )
    return headers["docker-content-digest"]


def fetch_manifest(
    registry_url: str, repository: str, reference: str, auth: tuple[str, str] | None = None
) -> tuple[bytes, str, str]:
    """GETs a manifest by tag or digest: (body, Docker-Content-Digest, Content-Type)."""
    accept = ", ".join([MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, "application/vnd.docker.distribution.manifest.v2+json"])
    headers, body = _expect(
        "GET", f"{registry_url.rstrip('/')}/v2/{repository}/manifests/{reference}", 200, headers={"Accept": accept}, auth=auth
    )
    return body, headers.get("docker-content-digest", ""), headers.get("content-type", "")
