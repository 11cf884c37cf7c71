"""The lab plan: which processes a topology needs, where they listen, and how
each is started. Both runtimes (docker, local) run the same plan; only the
addresses and a few ports differ (the address plan: :mod:`sipdrill.addresses`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sipdrill import addresses
from sipdrill.addresses import CONTROL_PORT
from sipdrill.topology import FrontEnd, Pool, Topology


class Role(StrEnum):
    DNS = "dns"
    POOL = "pool"
    BACKUP = "backup"
    CLIENTS = "clients"


class RuntimeKind(StrEnum):
    DOCKER = "docker"
    LOCAL = "local"
    SWARM = "swarm"


#: DNS listens on 53 in containers; the local runtime uses an unprivileged port.
#: Sign-ins per second of a whole lab's clients at start, split over its
#: clients processes (a single process's own ``--ramp`` default).
LAB_SIGN_IN_RATE = 100.0

DNS_PORT = {
    RuntimeKind.DOCKER: addresses.DNS_PORT,
    RuntimeKind.SWARM: addresses.DNS_PORT,
    RuntimeKind.LOCAL: addresses.LOCAL_DNS_PORT,
}


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
    front_end: str | None = None  # the front end's FQDN, for the pool role
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def control_url(self) -> str:
        return f"http://{self.address}:{self.control_port}"


def short_name(pool_fqdn: str) -> str:
    return pool_fqdn.split(".", 1)[0]


def front_end_services(pool: Pool) -> list[tuple[str, FrontEnd]]:
    """The service of each front end of ``pool``: ``pool1`` for a pool of one
    (as the lab always had), ``pool1-fe1``, ``pool1-fe2``... for more."""
    name = short_name(pool.fqdn)
    if len(pool.front_ends) == 1:
        return [(name, pool.front_ends[0])]
    return [(f"{name}-{short_name(fe.fqdn)}", fe) for fe in pool.front_ends]


def pool_fault_targets(topology: Topology) -> dict[str, list[str]]:
    """Fault targets naming pools and front ends, and the services each hits:
    ``pool1`` (every front end of the pool: the pool lost) and ``pool1/fe2``
    (that front end alone)."""
    out: dict[str, list[str]] = {}
    for pool in topology.pools:
        services = front_end_services(pool)
        out[short_name(pool.fqdn)] = [name for name, _ in services]
        for name, fe in services:
            out[f"{short_name(pool.fqdn)}/{short_name(fe.fqdn)}"] = [name]
    return out


def pool_targets(specs: Iterable[ServiceSpec]) -> dict[str, list[str]]:
    """The pool and front-end fault targets of a lab plan (every runtime
    resolves them with this): ``pool1`` -> the service of every front end of
    the pool, in plan order (the pool lost); ``pool1/fe2`` -> that front
    end's alone. :func:`pool_fault_targets` is the same from a topology."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        if spec.role is not Role.POOL or not spec.pool:
            continue
        pool = short_name(spec.pool)
        out.setdefault(pool, []).append(spec.name)
        if spec.front_end:
            out[f"{pool}/{short_name(spec.front_end)}"] = [spec.name]
    return out


def lab_plan(
    topology: Topology,
    runtime: RuntimeKind,
    *,
    topology_path: str,
    state_dir: str,
    clients: int = 0,
    clients_processes: int = 1,
    client_args: tuple[str, ...] = (),
) -> list[ServiceSpec]:
    """The processes for ``topology``: DNS, one pool process per front end
    (sharing the pool's state directory, its Back End), one Backup Service per
    paired pool, and clients
    (``client_args``: more arguments for each clients process, a workload).

    Paths (``topology_path``, ``state_dir``) are as the process sees them: the
    docker runtime passes container paths.
    """
    local = runtime is RuntimeKind.LOCAL
    common = ("--topology", topology_path)
    addressing = ("--loopback",) if local else ()
    dns_addr = addresses.dns_host(topology, loopback=local)
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
        name = short_name(pool.fqdn)
        several = len(pool.front_ends) > 1
        fe_services = front_end_services(pool)
        for index, (fe_name, fe) in enumerate(fe_services):
            specs.append(
                ServiceSpec(
                    name=fe_name,
                    role=Role.POOL,
                    network=pool.site,
                    address=addresses.host(topology, fe.address, loopback=local),
                    pool=pool.fqdn,
                    front_end=fe.fqdn,
                    # The pool's first front end makes its store (the Back End)
                    # before the others open it: one after another, on every
                    # runtime that orders its starts (Compose's depends_on too).
                    depends_on=("dns", fe_services[0][0]) if index else ("dns",),
                    control_port=pool.control_port,
                    args=(
                        "serve",
                        "pool",
                        *common,
                        *addressing,
                        "--pool",
                        pool.fqdn,
                        *(("--front-end", fe.fqdn) if several else ()),
                        "--state-dir",
                        f"{state_dir}/{name}",
                        "--ca",
                        ca_dir,
                    ),
                )
            )
        if pool.backup:
            specs.append(
                ServiceSpec(
                    name=f"backup-{name}",
                    role=Role.BACKUP,
                    network=pool.site,
                    address=addresses.backup_host(topology, pool, loopback=local),
                    pool=pool.fqdn,
                    depends_on=(fe_services[0][0],),
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
    per_process = -(-clients // clients_processes) if clients else 0
    # The lab signs in at one process's default rate whatever the number of
    # processes: 20 replicas at 100/s each offered 2,000 TLS sign-ins a second
    # to two pools on two cores; handshakes timed out (5 s), were retried, and
    # 50,000 clients took many minutes to sign in (issue 20's bench).
    ramp: tuple[str, ...] = ()
    if clients_processes > 1 and "--ramp" not in client_args:
        ramp = ("--ramp", f"{LAB_SIGN_IN_RATE / clients_processes:g}")
    for i in range(clients_processes if clients else 0):
        count = min(per_process, clients - i * per_process)
        if count <= 0:
            break
        a = addresses.clients_host(topology, i, loopback=local)
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
                    *ramp,
                    *client_args,
                ),
            )
        )
    return specs


def with_running_clients(
    specs: Sequence[ServiceSpec], rows: Iterable[Mapping[str, Any]]
) -> list[ServiceSpec]:
    """``specs`` with the clients as they run: one spec per running clients
    replica (``rows`` of a runtime's status), at the address the engine gave
    it, with the planned clients' arguments (container runtimes, where
    replicas are not in the plan)."""
    out = [s for s in specs if s.role is not Role.CLIENTS]
    template = next((s for s in specs if s.role is Role.CLIENTS), None)
    if template is None:
        return out
    for row in rows:
        if row["role"] == Role.CLIENTS.value and row["address"]:
            out.append(
                ServiceSpec(
                    name=row["name"],
                    role=Role.CLIENTS,
                    network=template.network,
                    address=row["address"],
                    args=template.args,
                    control_port=template.control_port,
                )
            )
    return out
