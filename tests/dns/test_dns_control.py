"""The HTTP control API (in-process ASGI), and the whole service with uvicorn."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import dns.message
import dns.rcode
import httpx
import pytest
from apicheck import SECRET, assert_docs_behind_token, assert_routing_errors, error_of
from dns_clients import udp_query
from dns_testlib import DEFAULT_SRC, KEY_SPEC, LAB, SERIAL

from sipdrill.dns.control import create_control_app
from sipdrill.dns.core import DnsCore
from sipdrill.dns.errors import ConfigError
from sipdrill.dns.service import DnsService
from sipdrill.topology import Topology

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(core: DnsCore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_control_app(core.zone, core, TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://dns", headers=AUTH
    ) as client:
        yield client


def _answer(core: DnsCore, name: str, rtype: str = "A") -> dns.message.Message:
    out = core.handle_query(dns.message.make_query(name, rtype).to_wire(), DEFAULT_SRC, time.time())
    assert out is not None
    return dns.message.from_wire(out)


async def test_health_and_metrics_need_no_token(core: DnsCore) -> None:
    app = create_control_app(core.zone, core, TOKEN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://dns"
    ) as c:
        health = (await c.get("/health")).json()
        assert health["status"] == "ok" and health["serial"] == SERIAL
        assert health["zone"] == "lab.local" and health["views"] == ["default", "site1", "site2"]
        _answer(core, "sip.lab.local")
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        assert (
            'sipdrill_dns_queries_total{qtype="A",rcode="NOERROR",transport="udp"} 1.0'
            in metrics.text
        )
        assert "sipdrill_dns_query_duration_seconds_bucket" in metrics.text
        assert f"sipdrill_dns_zone_serial {float(SERIAL)}" in metrics.text


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dDA="}]
)
async def test_everything_else_needs_the_token(core: DnsCore, headers: dict[str, str]) -> None:
    app = create_control_app(core.zone, core, TOKEN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://dns"
    ) as c:
        for method, path, body in [
            ("GET", "/records", None),
            ("GET", "/zone", None),
            ("GET", "/faults", None),
            ("POST", "/records", {"name": "x", "type": "A", "data": ["192.0.2.1"]}),
            ("PUT", "/faults", {"drop": True}),
            ("DELETE", "/records/sip/A", None),
            ("POST", "/zone/reset", None),
        ]:
            r = await c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path)
            assert r.headers["www-authenticate"] == "Bearer"
    assert core.zone.serial == SERIAL and not core.faults.active


async def test_list_records_of_a_view(api: httpx.AsyncClient) -> None:
    r = await api.get("/records", params={"view": "site2", "name": "_sipinternaltls._tcp"})
    assert r.status_code == 200
    assert {(x["data"], x["view"]) for x in r.json()} == {
        ("0 10 5061 pool2.lab.local.", "site2"),
        ("10 10 5061 pool1.lab.local.", "site2"),
    }
    everything = (await api.get("/records")).json()
    assert {
        "name": "ns.lab.local",
        "type": "A",
        "ttl": 300,
        "data": "172.30.0.53",
        "view": "default",
    } in everything
    assert (await api.get("/records", params={"view": "mars"})).status_code == 404


async def test_add_replace_delete_are_live_and_bump_the_serial(
    api: httpx.AsyncClient, core: DnsCore
) -> None:
    r = await api.post(
        "/records", json={"name": "web", "type": "A", "data": ["192.0.2.1", "192.0.2.2"], "ttl": 30}
    )
    assert r.status_code == 200 and r.json() == {"serial": SERIAL + 1, "changed": True}
    a = _answer(core, "web.lab.local")
    assert {rd.address for rd in a.answer[0]} == {"192.0.2.1", "192.0.2.2"} and a.answer[
        0
    ].ttl == 30

    r = await api.put("/records/web/A", json={"data": ["192.0.2.3"]})
    assert r.json() == {"serial": SERIAL + 2, "changed": True}
    assert {rd.address for rd in _answer(core, "web.lab.local").answer[0]} == {"192.0.2.3"}

    r = await api.put("/records/web/A", json={"data": ["192.0.2.3"]})
    assert r.json() == {"serial": SERIAL + 2, "changed": False}

    r = await api.delete("/records/sip.lab.local/A", params={"data": "172.30.1.11"})
    assert r.json()["changed"]
    assert {rd.address for rd in _answer(core, "sip.lab.local").answer[0]} == {"172.30.1.12"}

    assert (await api.delete("/records/web/A")).json()["changed"]
    assert _answer(core, "web.lab.local").rcode() == dns.rcode.NXDOMAIN
    assert (await api.delete("/records/mail")).json()["changed"]
    assert _answer(core, "mail.lab.local", "TXT").rcode() == dns.rcode.NXDOMAIN


async def test_changes_to_one_view(api: httpx.AsyncClient, core: DnsCore) -> None:
    r = await api.put("/records/sip/A", json={"data": ["192.0.2.9"], "views": ["site1"]})
    assert r.json()["changed"]
    site1 = core.handle_query(
        dns.message.make_query("sip.lab.local", "A").to_wire(), ("10.1.0.9", 1), 0
    )
    assert site1 is not None
    assert dns.message.from_wire(site1).answer[0][0].address == "192.0.2.9"
    assert len(_answer(core, "sip.lab.local").answer[0]) == 2  # the default view is untouched


async def test_batch_is_atomic(api: httpx.AsyncClient, core: DnsCore) -> None:
    repoint = {
        "changes": [
            {"op": "delete", "name": "_sipinternaltls._tcp", "type": "SRV"},
            {
                "op": "add",
                "name": "_sipinternaltls._tcp",
                "type": "SRV",
                "data": ["0 10 5061 pool2.lab.local."],
            },
            {"op": "replace", "name": "sip", "type": "A", "data": ["172.30.2.11"]},
        ]
    }
    r = await api.post("/changes", json=repoint)
    assert r.json() == {"serial": SERIAL + 1, "changed": True}
    srv = _answer(core, "_sipinternaltls._tcp.lab.local", "SRV")
    assert [rd.target.to_text() for rd in srv.answer[0]] == ["pool2.lab.local."]

    bad = {
        "changes": [
            {"op": "add", "name": "fine", "type": "A", "data": ["192.0.2.1"]},
            {"op": "add", "name": "alias", "type": "A", "data": ["192.0.2.1"]},  # alias is a CNAME
        ]
    }
    r = await api.post("/changes", json=bad)
    assert r.status_code == 409
    assert r.json() == {
        "code": "record-conflict",
        "message": "changes[1]: the name is a CNAME, so it cannot have other data",
    }
    assert core.zone.serial == SERIAL + 1
    assert _answer(core, "fine.lab.local").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "x", "type": "A", "data": ["nope"]}, 422),
        ({"name": "www.example.com.", "type": "A", "data": ["192.0.2.1"]}, 422),
        ({"name": "x", "type": "A", "data": []}, 422),
        ({"name": "x", "type": "A", "data": ["192.0.2.1"], "ttl": -5}, 422),
        ({"name": "x", "type": "A", "data": ["192.0.2.1"], "views": ["mars"]}, 404),
        ({"name": "@", "type": "NS", "data": ["ns2.lab.local."]}, 409),
        ({"name": "x", "type": "A"}, 422),
    ],
)
async def test_refused_changes_change_nothing(
    api: httpx.AsyncClient, core: DnsCore, body: dict[str, object], status: int
) -> None:
    r = await api.post("/records", json=body)
    assert r.status_code == status, r.text
    assert core.zone.serial == SERIAL


async def test_reset_goes_back_to_the_topology(api: httpx.AsyncClient, core: DnsCore) -> None:
    await api.post("/records", json={"name": "tmp", "type": "A", "data": ["192.0.2.1"]})
    r = await api.post("/zone/reset")
    assert r.json() == {"serial": SERIAL + 2, "changed": True}
    assert _answer(core, "tmp.lab.local").rcode() == dns.rcode.NXDOMAIN
    assert (await api.get("/zone")).json()["serial"] == SERIAL + 2


async def test_fault_hooks(api: httpx.AsyncClient, core: DnsCore) -> None:
    assert (await api.get("/faults")).json() == {
        "drop": False,
        "servfail": False,
        "latency_ms": 0.0,
    }
    r = await api.put("/faults", json={"servfail": True, "latency_ms": 250})
    assert r.json() == {"drop": False, "servfail": True, "latency_ms": 250.0}
    assert core.faults.servfail and core.faults.latency == 0.25
    assert _answer(core, "sip.lab.local").rcode() == dns.rcode.SERVFAIL
    assert (await api.get("/health")).json()["faults"]["servfail"] is True
    await api.put("/faults", json={"drop": True})
    assert core.faults.drop and not core.faults.servfail
    q = dns.message.make_query("sip.lab.local", "A").to_wire()
    assert core.handle_query(q, DEFAULT_SRC, 0) is None
    metrics = (await api.get("/metrics")).text
    assert 'sipdrill_dns_fault_active{fault="drop"} 1.0' in metrics
    assert (await api.delete("/faults")).json() == {
        "drop": False,
        "servfail": False,
        "latency_ms": 0.0,
    }
    assert _answer(core, "sip.lab.local").rcode() == dns.rcode.NOERROR
    assert (await api.put("/faults", json={"latency_ms": -1})).status_code == 422


async def test_api_changes_are_counted(api: httpx.AsyncClient, core: DnsCore) -> None:
    await api.post("/records", json={"name": "x", "type": "A", "data": ["192.0.2.1"]})
    await api.post("/records", json={"name": "alias", "type": "A", "data": ["192.0.2.1"]})
    get = core.metrics.registry.get_sample_value
    assert get("sipdrill_dns_updates_total", {"via": "api", "rcode": "NOERROR"}) == 1
    assert get("sipdrill_dns_updates_total", {"via": "api", "rcode": "YXRRSET"}) == 1


async def test_service_runs_dns_and_control_together(topology: Topology) -> None:
    async with DnsService(
        topology,
        listen=["127.0.0.1:0"],
        control="127.0.0.1:0",
        token=TOKEN,
        tsig_keys=[KEY_SPEC],
        serial=SERIAL,
    ) as svc:
        assert svc.control_url is not None and svc.control_url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=svc.control_url, headers=AUTH) as c:
            assert (await c.get("/health")).json()["serial"] == SERIAL
            r = await c.post("/records", json={"name": "live", "type": "A", "data": ["192.0.2.77"]})
            assert r.status_code == 200
        answer = await udp_query(
            svc.dns_addresses[0], dns.message.make_query("live.lab.local", "A")
        )
        assert answer.answer[0][0].address == "192.0.2.77"
    # Closed: the control port no longer answers.
    async with httpx.AsyncClient(base_url=svc.control_url) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/health")


async def test_service_without_control_and_with_loopback_addresses(topology: Topology) -> None:
    async with DnsService(topology, listen=["127.0.0.1:0"], loopback=True) as svc:
        assert svc.control_url is None
        r = await udp_query(svc.dns_addresses[0], dns.message.make_query("pool1.lab.local", "A"))
        assert {rd.address for rd in r.answer[0]} == {"127.77.1.11", "127.77.1.12"}


def test_control_off_loopback_needs_a_token(topology: Topology) -> None:
    with pytest.raises(ConfigError):
        DnsService(topology, listen=["127.0.0.1:0"], control="0.0.0.0:8053")
    DnsService(topology, listen=["127.0.0.1:0"], control="0.0.0.0:8053", token="x")  # no I/O yet


def test_settings_come_from_the_environment(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPDRILL_DNS_MAX_UDP_PAYLOAD", "1400")
    monkeypatch.setenv("SIPDRILL_DNS_TSIG_KEYS", f'["{KEY_SPEC}"]')
    monkeypatch.setenv("SIPDRILL_DNS_CLIENT_VIEWS", '{"127.0.0.2/32": "site2"}')
    svc = DnsService(topology, listen=["127.0.0.1:0"])
    assert svc.core.max_udp_payload == 1400 and len(svc.core.keyring) == 1
    assert svc.core.view_for(("127.0.0.2", 5)) == "site2"


@pytest.mark.parametrize(
    "overrides",
    [
        {"listen": ["localhost:53"]},
        {"listen": []},
        {"listen": ["127.0.0.1:99999"]},
        {"control": "nowhere"},
        {"tsig_keys": ["just-a-name"]},
        {"tsig_keys": ["k:not base64!"]},
        {"tsig_keys": ["hmac-md5:k:c2VjcmV0"]},
        {"client_views": {"10.0.0.0/8": "mars"}},
    ],
)
def test_bad_settings_are_refused(topology: Topology, overrides: dict[str, object]) -> None:
    with pytest.raises((ConfigError, ValueError)):
        DnsService(topology, **overrides)


def test_from_file() -> None:
    svc = DnsService.from_file(LAB, listen=["127.0.0.1:0"])
    assert svc.zone.view_names == ["default", "site1", "site2"]


async def test_docs_need_the_token(core: DnsCore, monkeypatch: pytest.MonkeyPatch) -> None:
    await assert_docs_behind_token(
        lambda: create_control_app(core.zone, core, TOKEN), TOKEN, "/faults", monkeypatch
    )


async def test_errors_are_code_and_message_without_the_body(
    api: httpx.AsyncClient, core: DnsCore
) -> None:
    r = await api.post("/records", json={"name": "x", "type": "A", "data": SECRET, "ttl": SECRET})
    message = error_of(r, 422, "bad-request")
    assert message == "data: Input should be a valid list; ttl: Input should be a valid integer"
    # Refused by the zone, not by the schema: where, and why, not what.
    r = await api.post("/records", json={"name": "x", "type": "A", "data": ["192.0.2.1", SECRET]})
    assert error_of(r, 422, "bad-change") == (
        "data[1]: not valid A data (text input is malformed)"
    )
    r = await api.post("/changes", json={"changes": [
        {"op": "add", "name": "ok", "type": "A", "data": ["192.0.2.1"]},
        {"op": "add", "name": f"{SECRET}.example.com.", "type": "A", "data": ["192.0.2.1"]},
    ]})
    message = error_of(r, 422, "not-in-zone")
    assert message == "changes[1].name: the name is outside the zone lab.local."
    r = await api.post("/records", json={"name": "x", "type": SECRET, "data": ["1"]})
    assert error_of(r, 422, "bad-change") == "type: unknown record type"
    r = await api.get("/records", params={"view": SECRET})
    assert error_of(r, 404, "unknown-view") == "unknown DNS view; views: default, site1, site2"
    assert core.zone.serial == SERIAL
    await assert_routing_errors(api, "/faults", "POST")


async def test_unknown_fields_are_refused(api: httpx.AsyncClient, core: DnsCore) -> None:
    r = await api.put("/faults", json={"mode": "bogus", "servfail": True})
    assert error_of(r, 422, "bad-request") == "mode: unknown field (not in the schema)"
    assert not core.faults.active
    r = await api.post("/changes", json={"changes": [{"op": "add", "name": "x", "type": "A",
                                                      "data": ["192.0.2.1"], "tll": 30}]})
    assert error_of(r, 422) == "changes[0].tll: unknown field (not in the schema)"
    r = await api.put("/records/sip/A", json={"data": ["192.0.2.1"], "view": ["site1"]})
    assert error_of(r, 422) == "view: unknown field (not in the schema)"
    assert core.zone.serial == SERIAL
