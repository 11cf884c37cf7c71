"""dns-repoint, the budget-DR plan's last step (seed 001): the pure plan, and
the drill's admin step against the real DNS control API and zone."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
from procutil import serve_in_thread

from sipdrill.dns.service import DnsService
from sipdrill.errors import OperationError
from sipdrill.orchestrator.drill import AdminStep
from sipdrill.orchestrator.live import LiveLab
from sipdrill.orchestrator.plan import Role, ServiceSpec
from sipdrill.orchestrator.repoint import repoint_changes
from sipdrill.topology import load_topology

BUDGET_DR = Path(__file__).parents[2] / "topologies" / "budget-dr.yaml"
TOKEN = "t0ken"
Lab = tuple[LiveLab, tuple[str, int], Callable[[], int]]


def _rec(name: str, rtype: str, data: str, ttl: int = 300) -> dict[str, Any]:
    return {"name": name, "type": rtype, "ttl": ttl, "data": data}


ZONE = [
    _rec("_sipinternaltls._tcp.lab.local", "SRV", "0 10 5061 pool1.lab.local."),
    _rec("_sipinternaltls._tcp.lab.local", "SRV", "10 10 5061 pool2.lab.local."),
    _rec("sipinternal.lab.local", "A", "172.30.1.11"),
    _rec("sipinternal.lab.local", "A", "172.30.1.12"),
    _rec("sip.lab.local", "A", "192.0.2.7"),  # someone else's: kept
    _rec("pool1.lab.local", "A", "172.30.1.11"),
    _rec("pool1.lab.local", "A", "172.30.1.12"),
    _rec("fe1.pool1.lab.local", "A", "172.30.1.11"),
    _rec("drpool.lab.local", "A", "172.30.2.11", ttl=60),
]


def test_srv_targets_and_the_pools_addresses_move_to_the_new_pool() -> None:
    changes = repoint_changes(
        ZONE, "pool1.lab.local", "drpool.lab.local", old_hosts=["fe1.pool1.lab.local"], view="site1"
    )
    assert changes == [
        {
            "op": "replace",
            "name": "_sipinternaltls._tcp.lab.local.",
            "type": "SRV",
            "data": ["0 10 5061 drpool.lab.local.", "10 10 5061 pool2.lab.local."],
            "ttl": 300,
            "views": ["site1"],
        },
        {
            "op": "replace",
            "name": "sipinternal.lab.local.",
            "type": "A",
            "data": ["172.30.2.11"],
            "ttl": 300,
            "views": ["site1"],
        },
    ]


def test_nothing_pointing_at_the_old_pool_is_no_change() -> None:
    assert repoint_changes(ZONE, "pool9.lab.local", "drpool.lab.local") == []


def test_a_new_pool_without_an_address_is_refused() -> None:
    with pytest.raises(OperationError) as caught:
        repoint_changes(ZONE, "pool1.lab.local", "pool2.lab.local")
    assert caught.value.http_status == 409
    assert "pool2.lab.local has no A or AAAA record" in str(caught.value)


def _answer(server: tuple[str, int], name: str, rtype: str) -> list[str]:
    """Asked over real UDP, as a client would."""
    message = dns.query.udp(
        dns.message.make_query(name, rtype), server[0], port=server[1], timeout=3
    )
    return sorted(
        rd.to_text()
        for rrset in message.answer
        if rrset.rdtype == dns.rdatatype.from_text(rtype)
        for rd in rrset
    )


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The lab's DNS service (DNS and control API on loopback, in a thread of its
    own: LiveLab.admin runs its own event loop) and a LiveLab that knows it."""
    topology = load_topology(BUDGET_DR).topology

    def service() -> DnsService:
        return DnsService(
            topology, listen=["127.0.0.1:0"], control="127.0.0.1:0", token=TOKEN, serial=100
        )

    with serve_in_thread(service) as svc:
        assert svc.control_url is not None
        control = urllib.parse.urlsplit(svc.control_url)
        assert control.hostname is not None and control.port is not None
        dns_spec = ServiceSpec(
            name="dns",
            role=Role.DNS,
            network="core",
            address=control.hostname,
            args=(),
            control_port=control.port,
        )
        live = LiveLab(
            None,  # type: ignore[arg-type]  # no faults here
            topology,
            [dns_spec],
            TOKEN,
            loopback=True,
            topology_path=str(BUDGET_DR),
        )
        host, port = svc.dns_addresses[0][:2]
        try:
            yield live, (host, port), lambda: svc.zone.serial
        finally:
            live.close()


def test_the_drill_step_repoints_every_view_in_one_change(lab: Lab) -> None:
    live, server, serial = lab
    srv = "_sipinternaltls._tcp.lab.local"
    before = _answer(server, srv, "SRV")
    assert before and all(r.endswith(" pool1.lab.local.") for r in before)
    dr_address = _answer(server, "drpool.lab.local", "A")
    assert dr_address

    result = live.admin(AdminStep(op="dns-repoint", pool="pool1.lab.local", to="drpool.lab.local"))

    assert result["serial"] == 101 and result["changed"]  # one atomic change
    assert all(r.endswith(" drpool.lab.local.") for r in _answer(server, srv, "SRV"))
    assert _answer(server, "sipinternal.lab.local", "A") == dr_address
    # The failed pool's own names still say where it is.
    assert _answer(server, "pool1.lab.local", "A") != dr_address
    # Again: nothing points to pool1 any more, so the step fails, changing nothing.
    with pytest.raises(OperationError) as caught:
        live.admin(AdminStep(op="dns-repoint", pool="pool1.lab.local", to="drpool.lab.local"))
    assert caught.value.http_status == 409 and serial() == 101


def test_unknown_pools_are_refused(lab: Lab) -> None:
    live, _server, serial = lab
    with pytest.raises(OperationError) as caught:
        live.admin(AdminStep(op="dns-repoint", pool="pool1.lab.local", to="nope.lab.local"))
    assert caught.value.http_status == 422 and serial() == 100
