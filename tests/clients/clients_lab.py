"""A small lab on 127.0.0.1 for the runner's integration tests.

- the topology: pool1 (site1, SRV priority 0) paired with pool2 (site2,
  priority 10), every front end mapped to 127.0.0.1 on a port of its own;
- the lab DNS server (:mod:`sipdrill.dns`) serving that topology's zone;
- :class:`FakePool`: sipdrill's SIP service and generic registrar with a
  policy that plays the Front End pool (home users in full service, a
  partner's users in resiliency mode or redirected, as the test says), on
  TLS with a certificate from the lab CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from procutil import free_port
from sipmessage import Request, Response

from sipdrill.clients.metrics import EventLog
from sipdrill.clients.population import profile_for, select_users
from sipdrill.clients.runner import ClientRunner, RunnerConfig
from sipdrill.dns.core import DnsCore
from sipdrill.dns.server import DnsServer
from sipdrill.dns.zone import ZoneStore
from sipdrill.sip.message import make_response
from sipdrill.sip.registrar import Accept, Decision, Redirect, Registrar
from sipdrill.sip.server import ListenSpec, SipService
from sipdrill.sip.tls import client_context, ensure_server_cert, server_context
from sipdrill.sip.transport import Flow, Kind, Received
from sipdrill.topology import Topology, load_topology

HOST = "127.0.0.1"


def write_topology(
    path: Path,
    port1: int,
    port2: int,
    *,
    ttl: int = 5,
    keepalive: float = 30,
    pong_timeout: float = 10,
    group: int = 6,
) -> Topology:
    path.write_text(
        textwrap.dedent(
            f"""\
            name: clients-lab
            domain: lab.local
            sites:
              - {{name: site1, subnet: 172.30.1.0/24}}
              - {{name: site2, subnet: 172.30.2.0/24}}
            pools:
              - fqdn: pool1.lab.local
                site: site1
                edition: Enterprise
                backup: pool2.lab.local
                sip_tls_port: {port1}
                front_ends: [{{fqdn: fe1.pool1.lab.local, address: 172.30.1.11}}]
              - fqdn: pool2.lab.local
                site: site2
                edition: Enterprise
                backup: pool1.lab.local
                sip_tls_port: {port2}
                front_ends: [{{fqdn: fe1.pool2.lab.local, address: 172.30.2.11}}]
            cms: {{active: pool1.lab.local}}
            dns: {{address: 172.30.0.53, ttl: {ttl}, negative_ttl: 5}}
            timers:
              keepalive_interval: {keepalive}
              keepalive_pong_timeout: {pong_timeout}
            users:
              - uri: sip:alice@lab.local
                home_pool: pool1.lab.local
                contacts: [sip:bob@lab.local]
                conferences: [{{id: alice-weekly}}]
              - uri: sip:bob@lab.local
                home_pool: pool2.lab.local
                contacts: [sip:alice@lab.local]
            user_groups:
              - {{home_pool: pool1.lab.local, prefix: p1u, count: {group}, contacts_per_user: 2}}
            """
        )
    )
    return load_topology(path).topology


LOOPBACK = {"172.30.1.11": HOST, "172.30.2.11": HOST, "172.30.0.53": HOST}


@contextlib.asynccontextmanager
async def lab_dns(topology: Topology) -> AsyncIterator[tuple[int, ZoneStore]]:
    store = ZoneStore(topology, address_map=LOOPBACK)
    async with DnsServer(DnsCore(store), [(HOST, 0)]) as server:
        yield server.addresses[0][1], store


@dataclass
class FakePool:
    """The registrar side of a Front End pool, enough for the clients."""

    fqdn: str
    port: int
    tls_dir: Path
    topology: Topology
    #: Users of the partner pool: "resiliency" (serve them limited), "redirect" (301).
    partner_users: str = "redirect"
    #: Mode for home users ("full"; "resiliency" during a failover cmdlet).
    home_mode: str = "full"
    work_status: int = 200
    service: SipService | None = None
    flows: set[Flow] = field(default_factory=set)
    registers: int = 0
    _registrar: Registrar | None = None

    def _home_of(self, aor: str) -> str | None:
        for user in self.topology.all_users():
            if user.uri == aor:
                return user.home_pool
        return None

    def _policy(self, aor: str, request: Request) -> Decision | None:
        home = self._home_of(aor)
        if home == self.fqdn or self.partner_users == "resiliency":
            return Accept()
        backup = self.topology.backup_of(home) if home else None
        contacts = [(f"sip:{home}:{self._port_of(home)};transport=tls", 0.7)]
        if backup is not None:
            contacts.append((f"sip:{backup.fqdn}:{backup.sip_tls_port};transport=tls", 0.3))
        return Redirect(tuple(contacts))

    def _port_of(self, fqdn: str | None) -> int:
        return self.topology.pool(fqdn).sip_tls_port if fqdn else 5061

    def _handle(self, request: Request, rx: Received, now: float) -> Response:
        if request.method != "REGISTER":
            return make_response(request, self.work_status)
        self.registers += 1
        self.flows.add(rx.flow)
        assert self._registrar is not None
        response = self._registrar.handle(request, now, rx.flow).response
        if response.code == 200:
            aor = str(request.to_address.uri)
            home = self._home_of(aor)
            mode = self.home_mode if home == self.fqdn else "resiliency"
            response.headers.add("X-Sipdrill-Mode", mode)
        return response

    async def start(self) -> None:
        names = [self.fqdn] + [fe.fqdn for fe in self.topology.pool(self.fqdn).front_ends]
        cert = ensure_server_cert(
            self.tls_dir, self.fqdn.split(".")[0], dns_names=names, ip_addresses=[HOST]
        )
        self._registrar = Registrar("lab.local", 600, 300, 900, policy=self._policy)
        self.service = SipService(
            self._handle, methods=("REGISTER", "MESSAGE", "SUBSCRIBE", "INVITE", "BYE")
        )
        await self.service.start(
            [ListenSpec(Kind.TLS, HOST, self.port)], ssl_context=server_context(cert)
        )

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.close()
            self.service = None
        self.flows.clear()

    def kick(self) -> None:
        """Close every client flow: the pool's way to make clients register again."""
        assert self.service is not None
        for flow in list(self.flows):
            self.service.transport.close_flow(flow)
        self.flows.clear()


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.05)
    return loop.time() - start


class Lab:
    def __init__(self, tmp: Path, **topo: float) -> None:
        self.port1, self.port2 = free_port(), free_port()
        self.tls = tmp / "tls"
        self.topology: Topology = write_topology(tmp / "lab.yaml", self.port1, self.port2, **topo)  # type: ignore[arg-type]
        self.pool1 = FakePool("pool1.lab.local", self.port1, self.tls, self.topology)
        self.pool2 = FakePool("pool2.lab.local", self.port2, self.tls, self.topology)
        self.dns_port = 0


def runner_for(
    lab: Lab, patterns: list[str], stream: io.StringIO | None = None, **kw: object
) -> ClientRunner:
    users = select_users(lab.topology, patterns)
    settings: dict[str, object] = {
        "ssl_context": client_context(lab.tls / "ca.pem"),
        "ramp": 200,
        "seed": 7,
    }
    config = RunnerConfig(
        profile=profile_for(lab.topology),
        users=users,
        nameservers=[(HOST, lab.dns_port)],
        **(settings | kw),  # type: ignore[arg-type]
    )
    return ClientRunner(config, events=EventLog(stream=stream))
