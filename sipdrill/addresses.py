"""The lab's address plan: where every process of a topology listens.

One plan for the orchestrator (which starts the processes there), the
processes themselves (which bind there) and everything that reaches them
(administrator commands, pools calling pools, Backup Services):

- a pool runs one process per front end, each on its front end's address:
  SIP on the pool's ports, its control API on ``pool.control_port``; "the
  pool's" control API is its first front end's (administrators, the Backup
  Service and other pools reach the pool there);
- its Backup Service sits next to it, at that address + 100, port 8080;
- DNS listens on the topology's DNS address, port 53 (5353 where the lab
  cannot bind privileged ports), its control API on 8080;
- clients processes sit on the core network from host .100 up, control API
  on 8080.

``loopback=True`` is the local runtime's plan: every address is replaced by
its 127.x stand-in (:meth:`~sipdrill.topology.Topology.loopback_address`).
"""

from __future__ import annotations

import ipaddress

from sipdrill.topology import FrontEnd, Pool, Topology

#: The control API port of DNS, Backup Services and clients (per address, so no
#: clashes); a pool's is its ``control_port`` (8080 unless the topology says otherwise).
CONTROL_PORT = 8080
#: DNS in containers; and in the local runtime (an unprivileged port).
DNS_PORT = 53
LOCAL_DNS_PORT = 5353
#: Backup Services sit next to their pool, at pool front-end address + 100.
BACKUP_ADDRESS_OFFSET = 100
#: Clients processes sit on the core network from .100 up.
CLIENTS_FIRST_HOST = 100


def host(topology: Topology, address: ipaddress.IPv4Address, *, loopback: bool = False) -> str:
    """``address`` as the lab uses it: itself, or its loopback stand-in."""
    return str(topology.loopback_address(address) if loopback else address)


def _pool(topology: Topology, pool: Pool | str) -> Pool:
    return topology.pool(pool) if isinstance(pool, str) else pool


def pool_host(topology: Topology, pool: Pool | str, *, loopback: bool = False) -> str:
    """Where the pool process listens: its first front end (KeyError: no such pool)."""
    return host(topology, _pool(topology, pool).front_ends[0].address, loopback=loopback)


def front_end(topology: Topology, pool: Pool | str, name: str | None) -> FrontEnd:
    """The pool's front end ``name`` (its FQDN, or its first label: ``fe2``); None:
    the first (KeyError: no such pool or front end)."""
    p = _pool(topology, pool)
    if name is None:
        return p.front_ends[0]
    key = name.lower()
    for fe in p.front_ends:
        if key in (fe.fqdn, fe.fqdn.split(".", 1)[0]):
            return fe
    raise KeyError(name)


def front_end_host(
    topology: Topology, pool: Pool | str, name: str | None, *, loopback: bool = False
) -> str:
    """Where the front end ``name`` of the pool listens."""
    return host(topology, front_end(topology, pool, name).address, loopback=loopback)


def front_end_sip_addresses(
    topology: Topology, pool: Pool | str, *, loopback: bool = False
) -> list[tuple[str, int]]:
    """SIP over TLS of every front end of the pool, in topology order (the
    order of the pool FQDN's A records)."""
    p = _pool(topology, pool)
    return [(host(topology, fe.address, loopback=loopback), p.sip_tls_port) for fe in p.front_ends]


def pool_sip_address(
    topology: Topology, pool: Pool | str, *, loopback: bool = False
) -> tuple[str, int]:
    """The pool's SIP over TLS."""
    p = _pool(topology, pool)
    return pool_host(topology, p, loopback=loopback), p.sip_tls_port


def pool_sip_uri(topology: Topology, pool: Pool | str) -> str:
    """The pool's SIP URI over TLS, by name (a 301's Contact, a heartbeat's target)."""
    p = _pool(topology, pool)
    return f"sip:{p.fqdn}:{p.sip_tls_port};transport=tls"


def pool_control_url(topology: Topology, pool: Pool | str, *, loopback: bool = False) -> str:
    """The pool's control API."""
    p = _pool(topology, pool)
    return f"http://{pool_host(topology, p, loopback=loopback)}:{p.control_port}"


def backup_host(topology: Topology, pool: Pool | str, *, loopback: bool = False) -> str:
    """Where the pool's Backup Service listens: first front end + 100."""
    address = _pool(topology, pool).front_ends[0].address + BACKUP_ADDRESS_OFFSET
    return host(topology, address, loopback=loopback)


def backup_listen_address(
    topology: Topology, pool: Pool | str, *, loopback: bool = False
) -> tuple[str, int]:
    """The control API of the pool's Backup Service: first front end + 100, port 8080."""
    return backup_host(topology, pool, loopback=loopback), CONTROL_PORT


def backup_control_url(topology: Topology, pool: Pool | str, *, loopback: bool = False) -> str:
    h, port = backup_listen_address(topology, pool, loopback=loopback)
    return f"http://{h}:{port}"


def dns_host(topology: Topology, *, loopback: bool = False) -> str:
    return host(topology, topology.dns.address, loopback=loopback)


def clients_host(topology: Topology, index: int, *, loopback: bool = False) -> str:
    """Where the ``index``-th (from 0) clients process sits on the core network."""
    address = topology.lab.core_subnet.network_address + CLIENTS_FIRST_HOST + index
    return host(topology, address, loopback=loopback)
