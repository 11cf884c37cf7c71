"""The loopback network of the tests' local labs: 127.78.0.0/16 unless
SIPDRILL_TEST_NET says another /16 (two checkouts testing at once on one
machine must not start their labs on the same addresses).

Under pytest-xdist (`make test`) each worker gets a /20 of its own inside
that /16 (gw0 the first, gw1 the next...): the local runtime binds fixed
ports (DNS 5353, control 8080) at fixed offsets of the network, so two
workers' labs on one network would take each other's ports. A /20 holds
16 /24s, the core network and up to 15 sites."""

from __future__ import annotations

import ipaddress
import os

#: The whole test network of this checkout (SIPDRILL_TEST_NET).
BASE = ipaddress.IPv4Network(os.environ.get("SIPDRILL_TEST_NET", "127.78.0.0/16"))
_WORKER_PREFIX = 20


def _worker_net(base: ipaddress.IPv4Network, worker: str | None) -> ipaddress.IPv4Network:
    if not worker:
        return base
    index = int(worker.removeprefix("gw"))
    blocks = list(base.subnets(new_prefix=_WORKER_PREFIX))
    if index >= len(blocks):
        raise RuntimeError(
            f"xdist worker {worker}: SIPDRILL_TEST_NET={base} has {len(blocks)} "
            f"/{_WORKER_PREFIX} blocks for local labs; run with at most {len(blocks)} workers (-n)"
        )
    return blocks[index]


#: This process's labs: BASE, or this xdist worker's block of it.
NET = _worker_net(BASE, os.environ.get("PYTEST_XDIST_WORKER"))
#: "127.78." for the default: the prefix of every address of the tests' labs.
PREFIX = ".".join(str(BASE.network_address).split(".")[:2]) + "."


def addr(rest: str) -> str:
    """``addr("0.53")`` -> "127.78.0.53": network ``0`` (the core), host 53 of
    this process's lab network (another third octet under an xdist worker)."""
    network, host = (int(part) for part in rest.split("."))
    return str(NET.network_address + network * 256 + host)
