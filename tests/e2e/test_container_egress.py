"""Custom container pools with `network_status = "EgressEnabled"`, end to end.

A real sandpool server runs the project's test app (crates/testapp, from an OCI layout) in
three pools: egress enabled under crun, egress enabled under gVisor (runsc), and egress
disabled. The test app's `GET /connect?addr=HOST:PORT` tells whether a TCP connection from
inside the session succeeds.

"The outside world" is a network namespace made by the test: reached from the host through a
router-like transit link (as the internet is, through a gateway), it holds a public-looking
address (TEST-NET-3, 203.0.113.0/24) and, on the same server, addresses in private ranges,
and it also sits on a second link whose network is one of the host's own (a LAN neighbour).
Every one of those addresses is reachable from the host (checked first), so a refusal from a
session is the egress policy at work, not a missing route. A session must reach the public
address (masqueraded behind the host), and nothing else: not the host (loopback, its own
addresses, the veth gateway, a server on 0.0.0.0), not private or link-local ranges, not a
LAN neighbour, not another session. An egress-disabled pool of the same server reaches
nothing, and the server's veths and nftables table go when sessions and the server stop.

Needs root, `ip` (iproute2) and `nft` (nftables).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

import oci_images
from conftest import SandpoolServer

EXTERNAL_PORT = 8000
CONNECT_TIMEOUT_MS = 800

CONFIG = """\
[[pools]]
name = "egress"
container_type = "CustomContainer"
network_status = "EgressEnabled"
max_concurrent_sessions = 6
ready_session_instances = 2

[pools.container]
image = "oci:{layout}:v1"
target_port = 8080

[pools.resources]
memory = "128Mi"
data_dir_size = "16Mi"

[[pools]]
name = "egressgvisor"
container_type = "CustomContainer"
network_status = "EgressEnabled"
runtime = "runsc"
max_concurrent_sessions = 3
ready_session_instances = 1

[pools.container]
image = "oci:{layout}:v1"
target_port = 8080

[pools.resources]
memory = "256Mi"
data_dir_size = "16Mi"

[[pools]]
name = "closed"
container_type = "CustomContainer"
network_status = "EgressDisabled"
max_concurrent_sessions = 3
ready_session_instances = 1

[pools.container]
image = "oci:{layout}:v1"
target_port = 8080

[pools.resources]
memory = "128Mi"
data_dir_size = "16Mi"
"""

# A TCP server for the fake outside world: records each peer's address (to see the
# masquerade) and answers like an HTTP server.
EXTERNAL_SERVER = r"""
import socket, sys
log = open(sys.argv[2], "a", buffering=1)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen(128)
print("ready", flush=True)
while True:
    conn, peer = listener.accept()
    log.write(peer[0] + "\n")
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nexternal\n")
    conn.close()
"""


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class OutsideWorld:
    """The test's fake internet, in network namespace `netns`."""

    netns: str
    public: str
    private: list[str]
    lan_neighbour: str
    transit_peer: str
    host_addresses_on_its_links: list[str]
    log: Path
    host_links: list[str]
    server: subprocess.Popen | None = None

    @classmethod
    def create(cls, work: Path) -> OutsideWorld:
        tag = uuid.uuid4().hex[:6]
        n = int(tag[:2], 16) % 250 + 1
        lan = ipaddress.ip_network(f"198.51.100.{16 * (int(tag[2:4], 16) % 16)}/28")
        world = cls(
            netns=f"sandpool-e2e-egress-{tag}",
            public=f"203.0.113.{n}",
            private=[f"192.168.{n}.10", f"172.16.{n}.10", f"100.64.{n}.10", f"169.254.{n}.10"],
            lan_neighbour=str(lan[2]),
            transit_peer=f"10.254.{n}.2",
            host_addresses_on_its_links=[f"10.254.{n}.1", str(lan[1])],
            log=work / "outside-world-peers.log",
            host_links=[f"spx{tag}t", f"spx{tag}l"],
        )
        try:
            world._build(n, lan)
        except BaseException:
            world.destroy()
            raise
        return world

    def _build(self, n: int, lan: ipaddress.IPv4Network) -> None:
        transit, lan_link = self.host_links
        ip("netns", "add", self.netns)
        ip("link", "add", transit, "type", "veth", "peer", "name", "transit0", "netns", self.netns)
        ip("link", "add", lan_link, "type", "veth", "peer", "name", "lan0", "netns", self.netns)
        ip("addr", "add", f"10.254.{n}.1/30", "dev", transit)
        ip("addr", "add", f"{lan[1]}/{lan.prefixlen}", "dev", lan_link)
        for link in self.host_links:
            ip("link", "set", link, "up")
        for link in ("lo", "transit0", "lan0"):
            ip("-n", self.netns, "link", "set", link, "up")
        ip("-n", self.netns, "addr", "add", f"{self.transit_peer}/30", "dev", "transit0")
        ip("-n", self.netns, "addr", "add", f"{self.lan_neighbour}/{lan.prefixlen}", "dev", "lan0")
        ip("-n", self.netns, "route", "add", "default", "via", f"10.254.{n}.1")
        # Routed through the transit link, like the internet through a gateway.
        for address in [self.public, *self.private]:
            ip("-n", self.netns, "addr", "add", f"{address}/32", "dev", "lo")
            ip("route", "add", f"{address}/32", "via", self.transit_peer)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", EXTERNAL_SERVER, str(EXTERNAL_PORT), str(self.log)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        line = self.server.stdout.readline()
        assert line.strip() == "ready", f"the outside world's server did not start: {line}"

    def reachable_from_the_host(self) -> list[str]:
        return [self.public, *self.private, self.lan_neighbour, self.transit_peer]

    def peers(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def destroy(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        # Deleting the namespace deletes the veth peers, the host ends and the routes.
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        for link in self.host_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)


class HostService:
    """A TCP server on the host's 0.0.0.0, what a careless host service looks like."""

    def __init__(self):
        self.listener = socket.create_server(("0.0.0.0", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.listener.close()


@dataclass
class Egress:
    server: SandpoolServer
    token: str
    world: OutsideWorld
    host_service: HostService
    instance: str
    interface_prefix: str
    identifiers: list[tuple[str, str]] = field(default_factory=list)

    def connect(self, pool: str, identifier: str, target: str) -> dict:
        resp = requests.get(
            f"{self.server.base_url}/pools/{pool}/connect",
            params={"identifier": identifier, "addr": target, "timeout_ms": str(CONNECT_TIMEOUT_MS)},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        return resp.json()

    def connected(self, pool: str, identifier: str, targets: list[str]) -> dict[str, bool]:
        """Which targets a session reaches, tried concurrently (each refusal is a timeout)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool_executor:
            results = pool_executor.map(lambda target: self.connect(pool, identifier, target), targets)
            return {target: result["connected"] for target, result in zip(targets, results)}

    def read(self, pool: str, identifier: str, path: str) -> str:
        resp = requests.get(
            f"{self.server.base_url}/pools/{pool}/read",
            params={"identifier": identifier, "path": path},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        return resp.text

    def session_gateway(self, pool: str, identifier: str) -> str:
        """The session's default gateway, from its own /proc/net/route."""
        for line in self.read(pool, identifier, "/proc/net/route").splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return str(ipaddress.IPv4Address(int(fields[2], 16).to_bytes(4, "little")))
        raise AssertionError("the session has no default route")

    def veth_gateways(self) -> dict[str, str]:
        """The server's host-side veths and their addresses (the sessions' gateways)."""
        links = json.loads(ip("-j", "-4", "addr", "show"))
        return {
            link["ifname"]: info["local"]
            for link in links
            if link["ifname"].startswith(self.interface_prefix)
            for info in link.get("addr_info", [])
        }

    def new_session(self, pool: str) -> str:
        identifier = f"egress-{uuid.uuid4().hex[:12]}"
        self.identifiers.append((pool, identifier))
        return identifier


def instance_names(state_dir: Path) -> tuple[str, str]:
    """The server's instance name (its nftables table) and its veth name prefix, computed as
    serve.rs and egress.rs do."""
    instance = "sandpool-" + hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:8]
    return instance, "sp" + hashlib.sha256(instance.encode()).hexdigest()[:6] + "-"


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout


def host_ipv4_addresses() -> list[str]:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if ":" not in a]


@pytest.fixture(scope="module")
def egress():
    binary = oci_images.build_testapp()
    work = Path(tempfile.mkdtemp(prefix="sandpool-e2e-egress-"))
    layout = work / "layout"
    oci_images.write_testapp_layout(layout, binary, tag="v1")
    # Before the server starts: the server snapshots the host's networks (the LAN link's
    # network among them) when it writes its rules.
    world = OutsideWorld.create(work)
    host_service = HostService()
    server = None
    try:
        for address in world.reachable_from_the_host():
            with socket.create_connection((address, EXTERNAL_PORT), timeout=2):
                pass
        config = work / "config.toml"
        config.write_text(CONFIG.format(layout=layout))
        server = SandpoolServer(state_dir=work / "state", config_path=config, stderr_path=work / "sandpool.stderr.log")
        server.state_dir.mkdir()
        instance, prefix = instance_names(server.state_dir)
        server.start()
        env = Egress(server, server.issue_token(), world, host_service, instance, prefix)
        yield env
        code = server.stop()
        assert code == 0, f"sandpool exited with {code}\n{server.stderr_tail(100)}"
        assert not env.veth_gateways(), f"veths outlived the server: {env.veth_gateways()}"
        assert instance not in nft_tables(), "the server's nftables table outlived it"
    finally:
        if server is not None:
            server.stop()
        host_service.close()
        world.destroy()


EGRESS_POOLS = ["egress", "egressgvisor"]


@pytest.mark.parametrize("pool", EGRESS_POOLS)
def test_an_egress_session_reaches_the_outside_world_behind_the_hosts_address(egress: Egress, pool: str):
    identifier = egress.new_session(pool)
    before = len(egress.world.peers())
    result = egress.connect(pool, identifier, f"{egress.world.public}:{EXTERNAL_PORT}")
    assert result["connected"] is True, result
    # Masqueraded: the outside world sees the host's address on the link, never the session's.
    peers = egress.world.peers()[before:]
    assert peers and set(peers) <= set(egress.world.host_addresses_on_its_links), peers


@pytest.mark.parametrize("pool", EGRESS_POOLS)
def test_an_egress_session_reaches_none_of_the_hosts_own_services(egress: Egress, pool: str):
    identifier = egress.new_session(pool)
    server_port = egress.server.base_url.rsplit(":", 1)[1]
    service = egress.host_service.port
    addresses = {*host_ipv4_addresses(), *egress.world.host_addresses_on_its_links, *egress.veth_gateways().values()}
    targets = [f"127.0.0.1:{server_port}", f"127.0.0.1:{service}"]
    targets += [f"{address}:{port}" for address in sorted(addresses) for port in (service, server_port)]
    reached = [target for target, ok in egress.connected(pool, identifier, targets).items() if ok]
    assert not reached, f"{pool} reached host services: {reached}"
    # The server's own way in (inside the namespace) still works.
    assert egress.connect(pool, identifier, "127.0.0.1:8080")["connected"] is True


@pytest.mark.parametrize("pool", EGRESS_POOLS)
def test_private_ranges_and_lan_neighbours_are_out_of_reach(egress: Egress, pool: str):
    identifier = egress.new_session(pool)
    world = egress.world
    refused = [*world.private, world.transit_peer, world.lan_neighbour]
    results = egress.connected(pool, identifier, [f"{address}:{EXTERNAL_PORT}" for address in [world.public, *refused]])
    # The same server, through the same routes: only its public address is allowed.
    assert results.pop(f"{world.public}:{EXTERNAL_PORT}") is True
    reached = [target for target, ok in results.items() if ok]
    assert not reached, f"{pool} reached {reached}"


def test_sessions_cannot_reach_each_other(egress: Egress):
    first, second = egress.new_session("egress"), egress.new_session("egress")
    # Each session's address is its gateway's partner in the /31.
    address = {
        identifier: str(ipaddress.IPv4Address(egress.session_gateway("egress", identifier)) + 1) for identifier in (first, second)
    }
    assert address[first] != address[second]
    # A session reaches its own address (the app listens on 0.0.0.0:8080), not the other's.
    assert egress.connect("egress", first, f"{address[first]}:8080")["connected"] is True
    assert egress.connect("egress", first, f"{address[second]}:8080")["connected"] is False
    assert egress.connect("egress", second, f"{address[first]}:8080")["connected"] is False


def test_an_egress_disabled_pool_of_the_same_server_reaches_nothing(egress: Egress):
    identifier = egress.new_session("closed")
    world = egress.world
    targets = [f"{world.public}:{EXTERNAL_PORT}", f"{world.lan_neighbour}:{EXTERNAL_PORT}", f"{world.private[0]}:{EXTERNAL_PORT}"]
    targets += [f"{gateway}:{egress.host_service.port}" for gateway in egress.veth_gateways().values()]
    reached = [target for target, ok in egress.connected("closed", identifier, targets).items() if ok]
    assert not reached, f"an EgressDisabled session reached {reached}"
    assert egress.read("closed", identifier, "/proc/net/route").count("\n") <= 1, "an EgressDisabled session has routes"


def test_deleting_a_session_deletes_its_veth(egress: Egress):
    identifier = egress.new_session("egress")
    gateway = egress.session_gateway("egress", identifier)
    assert gateway in egress.veth_gateways().values()
    resp = requests.delete(
        f"{egress.server.base_url}/pools/egress/session",
        params={"identifier": identifier},
        headers={"Authorization": f"Bearer {egress.token}"},
        timeout=60,
    )
    assert resp.status_code in (200, 204), resp.text
    deadline = time.monotonic() + 15
    while gateway in egress.veth_gateways().values():
        assert time.monotonic() < deadline, f"the veth of {gateway} outlived its session"
        time.sleep(0.2)
