"""The DNS control API fuzzed from its OpenAPI (tests/apifuzz.py)."""

from __future__ import annotations

from apifuzz import LoopThread, fuzz
from labnet import addr

from sipdrill.dns.service import DnsService
from sipdrill.topology import Topology

TOKEN = "dns-fuzz-token"


def test_dns_control_api_survives_fuzzing(topology: Topology) -> None:
    with LoopThread() as loop:
        service = loop.enter(
            DnsService(topology, listen=[addr("0.53") + ":0"], token=TOKEN, serial=1000)
        )
        failures = fuzz(loop, service.control_app, TOKEN)
    assert not failures, "\n\n".join(failures)
