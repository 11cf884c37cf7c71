"""The loopback network of the tests' local labs: 127.78.0.0/16 unless
SIPDRILL_TEST_NET says another /16 (two checkouts testing at once on one
machine must not start their labs on the same addresses)."""

from __future__ import annotations

import ipaddress
import os

NET = ipaddress.ip_network(os.environ.get("SIPDRILL_TEST_NET", "127.78.0.0/16"))
#: "127.78." for the default: the prefix of every address of the tests' labs.
PREFIX = ".".join(str(NET.network_address).split(".")[:2]) + "."


def addr(rest: str) -> str:
    """``addr("0.53")`` -> "127.78.0.53"."""
    return PREFIX + rest
