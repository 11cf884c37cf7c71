"""The lab plan: which processes a topology needs, where they listen, and how
each is started. Both runtimes (docker, local) run the same plan; only the
addresses and a few ports differ."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from sipdrill.topology import Topology


class Role(StrEnum):
    DNS = "dns"
    POOL = "pool"
    BACKUP = "backup"
    CLIENTS = "clients"


class RuntimeKind(StrEnum):
    DOCKER = "docker"
    LOCAL = "local"


#: The control API port every role listens on (per address, so no clashes).
CONTROL_PORT = 8080
#: DNS listens on 53 in containers; the local runtime uses an unprivileged port.
DNS_PORT = {RuntimeKind.DOCKER: 53, RuntimeKind.LOCAL: 5353}
#: Backup Services sit next to their pool, at pool front-end address + 100.
BACKUP_ADDRESS_OFFSET = 100
#: Clients processes sit on the core network from .100 up.
CLIENTS_FIRST_HOST = 100


@dataclass(frozen=True)
class ServiceSpec:
    """One process of the lab."""

    name: str  # unique in the lab: "dns", "pool1", "backup-pool1", "clients-1"
    role: Role
    network: str  # "core" or a site name
    address: str  # where it listens, in this runtime's address plan
    args: tuple[str, ...]  # arguments after `sipdrill`
    depends_on: tuple[str, ...] = ()
    control_port: int = CONTROL_PORT
    pool: str | None = None  # the pool FQDN for pool and backup roles
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def control_url(self) -> str:
        return f"http://{self.address}:{self.control_port}"


def short_name(pool_fqdn: str) -> str:
    return pool_fqdn.split(".", 1)[0]


def lab_plan(
    topology: Topology,
    runtime: RuntimeKind,
    *,
    topology_path: str,
    state_dir: str,
    clients: int = 0,
    clients_processes: int = 1,
) -> list[ServiceSpec]:
    """The processes for ``topology``: DNS, one pool process per pool (on its
    first front end), one Backup Service per paired pool, and clients.

    Paths (``topology_path``, ``state_dir``) are as the process sees them: the
    docker runtime passes container paths.
    """
    local = runtime is RuntimeKind.LOCAL

    def addr(a: ipaddress.IPv4Address) -> str:
        return str(topology.loopback_address(a) if local else a)

    common = ("--topology", topology_path)
    addressing = ("--loopback",) if local else ()
    dns_addr = addr(topology.dns.address)
    dns_port = DNS_PORT[runtime]
    ca_dir = f"{state_dir}/ca"
    specs = [
        ServiceSpec(
            name="dns",
            role=Role.DNS,
            network="core",
            address=dns_addr,
            args=(
                "serve",
                "dns",
                *common,
                *addressing,
                "--listen",
                f"{dns_addr}:{dns_port}",
                "--control",
                f"{dns_addr}:{CONTROL_PORT}",
            ),
        )
    ]
    for pool in topology.pools:
        fe = pool.front_ends[0]
        name = short_name(pool.fqdn)
        specs.append(
            ServiceSpec(
                name=name,
                role=Role.POOL,
                network=pool.site,
                address=addr(fe.address),
                pool=pool.fqdn,
                depends_on=("dns",),
                control_port=pool.control_port,
                args=(
                    "serve",
                    "pool",
                    *common,
                    *addressing,
                    "--pool",
                    pool.fqdn,
                    "--state-dir",
                    f"{state_dir}/{name}",
                    "--ca",
                    ca_dir,
                ),
            )
        )
        if pool.backup:
            backup_addr = fe.address + BACKUP_ADDRESS_OFFSET
            specs.append(
                ServiceSpec(
                    name=f"backup-{name}",
                    role=Role.BACKUP,
                    network=pool.site,
                    address=addr(backup_addr),
                    pool=pool.fqdn,
                    depends_on=(name,),
                    args=(
                        "serve",
                        "backup",
                        *common,
                        *addressing,
                        "--pool",
                        pool.fqdn,
                        "--state-dir",
                        f"{state_dir}/backup-{name}",
                    ),
                )
            )
    core = topology.lab.core_subnet
    per_process = -(-clients // clients_processes) if clients else 0
    for i in range(clients_processes if clients else 0):
        count = min(per_process, clients - i * per_process)
        if count <= 0:
            break
        a = addr(core.network_address + CLIENTS_FIRST_HOST + i)
        specs.append(
            ServiceSpec(
                name=f"clients-{i + 1}",
                role=Role.CLIENTS,
                network="core",
                address=a,
                depends_on=tuple(s.name for s in specs if s.role is Role.POOL),
                args=(
                    "serve",
                    "clients",
                    *common,
                    "--count",
                    str(count),
                    *(("--offset", str(i * per_process)) if clients_processes > 1 else ()),
                    "--dns",
                    f"{dns_addr}:{dns_port}",
                    "--ca",
                    ca_dir,
                    "--bind",
                    a,
                    "--control",
                    f"{a}:{CONTROL_PORT}",
                ),
            )
        )
    return specs
