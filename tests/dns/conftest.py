"""Fixtures of the DNS tests: the dns-lab topology (three views), a zone
store with a fixed serial, a sans-IO core with one TSIG key, and ``ask``."""

from __future__ import annotations

import time
from typing import Any

import dns.message
import pytest
from dns_testlib import DEFAULT_SRC, KEY_SPEC, LAB, SERIAL, Ask

from sipdrill.dns.core import DnsCore
from sipdrill.dns.tsig import keyring
from sipdrill.dns.zone import ZoneStore
from sipdrill.topology import Topology, load_topology


@pytest.fixture(scope="session")
def topology() -> Topology:
    return load_topology(LAB).topology


@pytest.fixture
def store(topology: Topology) -> ZoneStore:
    return ZoneStore(topology, serial=SERIAL)


@pytest.fixture
def core(store: ZoneStore) -> DnsCore:
    return DnsCore(store, keyring=keyring([KEY_SPEC]))



@pytest.fixture
def ask(core: DnsCore) -> Ask:
    """ask(qname, qtype, source=..., transport="udp", **make_query kwargs) -> parsed answer."""

    def _ask(
        qname: str, qtype: str = "A", *, source: Any = DEFAULT_SRC, transport: str = "udp",
        **kwargs: Any,
    ) -> dns.message.Message:
        kwargs.setdefault("use_edns", 0)
        query = dns.message.make_query(qname, qtype, **kwargs)
        wire = core.handle_query(query.to_wire(), source, time.time(), transport)  # type: ignore[arg-type]
        assert wire is not None
        answer = dns.message.from_wire(wire)
        assert answer.id == query.id
        return answer

    return _ask
