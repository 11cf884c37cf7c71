"""The zone store: content from the topology, views, atomic changes."""

from __future__ import annotations

import threading

import dns.name
import pytest
from dns_testlib import PAIRED, SERIAL

from sipdrill.dns.errors import NotInZone, RecordConflict, UnknownView, ZoneChangeError
from sipdrill.dns.zone import DEFAULT_VIEW, RecordChange, ZoneStore
from sipdrill.errors import DnsError
from sipdrill.topology import ExtraRecord, Topology, load_topology


def _data(store: ZoneStore, view: str, name: str, rtype: str) -> set[str]:
    return {r.data for r in store.records(view, name, rtype)}


def test_zone_holds_soa_ns_and_every_topology_record(store: ZoneStore, topology: Topology) -> None:
    soa = store.records(DEFAULT_VIEW, "@", "SOA")
    assert [r.data for r in soa] == [
        f"ns.lab.local. hostmaster.lab.local. {SERIAL} 3600 600 86400 60"
    ]
    assert _data(store, DEFAULT_VIEW, "@", "NS") == {"ns.lab.local."}
    for view in topology.dns_views():
        key = view or DEFAULT_VIEW
        served = {(r.name, r.rtype, r.data) for r in store.records(key)}
        for rec in topology.dns_records(view):
            data = store.rdata(store.rdtype(rec.rtype), rec.data).to_text()
            assert (rec.name, rec.rtype, data) in served


def test_each_site_view_puts_its_own_pool_first(store: ZoneStore) -> None:
    name = "_sipinternaltls._tcp"
    assert store.view_names == ["default", "site1", "site2"]
    assert _data(store, "site1", name, "SRV") == {
        "0 10 5061 pool1.lab.local.",
        "10 10 5061 pool2.lab.local.",
    }
    assert _data(store, "site2", name, "SRV") == {
        "10 10 5061 pool1.lab.local.",
        "0 10 5061 pool2.lab.local.",
    }
    assert _data(store, "site2", "sip", "A") == {"172.30.2.11", "172.30.2.12"}


def test_loopback_map_rewrites_addresses(topology: Topology) -> None:
    store = ZoneStore(topology, address_map=topology.loopback_map())
    assert _data(store, DEFAULT_VIEW, "pool1", "A") == {"127.77.1.11", "127.77.1.12"}
    assert _data(store, DEFAULT_VIEW, "ns", "A") == {"127.77.0.53"}


def test_budget_dr_standby_is_not_in_the_srv_records() -> None:
    store = ZoneStore(load_topology(PAIRED.parent / "budget-dr.yaml").topology)
    srv = _data(store, DEFAULT_VIEW, "_sipinternaltls._tcp", "SRV")
    assert srv == {"0 10 5061 pool1.lab.local."}
    assert store.records(DEFAULT_VIEW, "_sip._tls") == []  # not in dns.publish


def test_serial_defaults_to_the_clock_and_every_change_bumps_it(topology: Topology) -> None:
    import time

    before = int(time.time())
    store = ZoneStore(topology)
    assert before <= store.serial <= int(time.time())
    first = store.serial
    store.apply([RecordChange("add", "new", "A", ("192.0.2.7",))])
    assert store.serial == first + 1
    _, changed = store.apply([RecordChange("add", "new", "A", ("192.0.2.7",))])
    assert not changed and store.serial == first + 1  # no-op: no bump
    assert store.reset().serial == first + 2  # reset never goes back in serial
    assert store.records(DEFAULT_VIEW, "new") == []


def test_serial_wraps_at_32_bits(topology: Topology) -> None:
    store = ZoneStore(topology, serial=0xFFFFFFFF)
    store.apply([RecordChange("add", "x", "A", ("192.0.2.1",))])
    assert store.serial == 0


@pytest.mark.parametrize(
    ("text", "absolute"),
    [
        ("sip", "sip.lab.local."),
        ("sip.lab.local", "sip.lab.local."),
        ("SIP.Lab.Local.", "sip.lab.local."),
        ("@", "lab.local."),
        ("a.b", "a.b.lab.local."),
    ],
)
def test_owner_names_are_relative_or_absolute(store: ZoneStore, text: str, absolute: str) -> None:
    assert store.name(text) == dns.name.from_text(absolute)


def test_names_outside_the_zone_are_refused(store: ZoneStore) -> None:
    with pytest.raises(NotInZone) as info:
        store.name("www.example.com.")
    assert isinstance(info.value, DnsError) and info.value.http_status == 422
    with pytest.raises(ZoneChangeError):
        store.name("a..b")


def test_a_change_applies_to_every_view_or_the_ones_named(store: ZoneStore) -> None:
    store.apply([RecordChange("add", "everywhere", "A", ("192.0.2.1",))])
    store.apply([RecordChange("add", "only1", "A", ("192.0.2.2",), views=("site1",))])
    for view in store.view_names:
        assert _data(store, view, "everywhere", "A") == {"192.0.2.1"}
        assert _data(store, view, "only1", "A") == ({"192.0.2.2"} if view == "site1" else set())
    with pytest.raises(UnknownView):
        store.apply([RecordChange("add", "x", "A", ("192.0.2.3",), views=("mars",))])


def test_add_replace_delete(store: ZoneStore) -> None:
    store.apply([RecordChange("add", "h", "A", ("192.0.2.1",), ttl=30)])
    store.apply([RecordChange("add", "h", "A", ("192.0.2.2",))])
    recs = store.records(DEFAULT_VIEW, "h", "A")
    assert {r.data for r in recs} == {"192.0.2.1", "192.0.2.2"} and {r.ttl for r in recs} == {30}
    store.apply([RecordChange("replace", "h", "A", ("192.0.2.9",), ttl=40)])
    assert [(r.data, r.ttl) for r in store.records(DEFAULT_VIEW, "h")] == [("192.0.2.9", 40)]
    store.apply([RecordChange("add", "h", "TXT", ('"hello"',))])
    store.apply([RecordChange("delete", "h", "TXT", ('"hello"',))])
    assert _data(store, DEFAULT_VIEW, "h", "TXT") == set()
    store.apply([RecordChange("delete", "h")])
    assert store.records(DEFAULT_VIEW, "h") == []


def test_a_refused_batch_changes_nothing(store: ZoneStore) -> None:
    before = store.current
    with pytest.raises(RecordConflict):
        store.apply(
            [
                RecordChange("add", "ok", "A", ("192.0.2.1",)),
                RecordChange("add", "alias", "A", ("192.0.2.2",)),  # alias is a CNAME
            ]
        )
    assert store.current is before
    assert store.records(DEFAULT_VIEW, "ok") == []


@pytest.mark.parametrize(
    "change",
    [
        RecordChange("add", "pool1", "CNAME", ("sip.lab.local.",)),  # pool1 has A records
        RecordChange("add", "alias", "TXT", ('"x"',)),  # alias is a CNAME
        RecordChange("add", "@", "SOA", ("ns.lab.local. h.lab.local. 1 1 1 1 1",)),
        RecordChange("add", "sub", "NS", ("ns.example.com.",)),
        RecordChange("delete", "@", "NS"),
        RecordChange("add", "two", "CNAME", ("a.lab.local.", "b.lab.local.")),
    ],
)
def test_cname_rule_and_server_managed_records(store: ZoneStore, change: RecordChange) -> None:
    with pytest.raises(RecordConflict) as info:
        store.apply([change])
    assert info.value.http_status == 409


@pytest.mark.parametrize(
    "change",
    [
        RecordChange("add", "x", "A", ("not-an-address",)),
        RecordChange("add", "x", "BOGUS", ("1",)),
        RecordChange("add", "x", "ANY", ("1",)),
        RecordChange("add", "x", "A", ()),
        RecordChange("add", "x"),
        RecordChange("add", "x", "A", ("192.0.2.1",), ttl=-1),
    ],
)
def test_bad_changes_are_refused(store: ZoneStore, change: RecordChange) -> None:
    with pytest.raises(ZoneChangeError):
        store.apply([change])


def test_cname_replaces_cname(store: ZoneStore) -> None:
    store.apply([RecordChange("add", "alias", "CNAME", ("pool2.lab.local.",))])
    assert _data(store, DEFAULT_VIEW, "alias", "CNAME") == {"pool2.lab.local."}


def test_deleting_the_apex_keeps_soa_and_ns(store: ZoneStore) -> None:
    store.apply([RecordChange("add", "@", "TXT", ('"apex"',)), RecordChange("delete", "@")])
    assert {r.rtype for r in store.records(DEFAULT_VIEW, "@")} == {"NS", "SOA"}


def test_empty_non_terminals_are_names(store: ZoneStore) -> None:
    view = store.current.view(DEFAULT_VIEW)
    assert dns.name.from_text("a.b.lab.local.") in view.names
    assert dns.name.from_text("a.b.lab.local.") not in view.nodes
    store.apply([RecordChange("delete", "deep.a.b")])
    assert dns.name.from_text("a.b.lab.local.") not in store.current.view(DEFAULT_VIEW).names


def test_readers_see_whole_versions_while_a_writer_works(store: ZoneStore) -> None:
    """A reader that takes `current` during a batch sees none of it or all of it."""
    names = [f"n{i}" for i in range(50)]
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            nodes = store.current.view(DEFAULT_VIEW).nodes
            seen.append(sum(1 for n in names if store.name(n) in nodes))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(20):
            store.apply([RecordChange("add", n, "A", ("192.0.2.1",)) for n in names])
            store.apply([RecordChange("delete", n) for n in names])
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) <= {0, len(names)}


def test_listeners_hear_every_new_version(store: ZoneStore) -> None:
    serials: list[int] = []
    store.on_change(lambda v: serials.append(v.serial))
    store.apply([RecordChange("add", "x", "A", ("192.0.2.1",))])
    store.reset()
    assert serials == [SERIAL + 1, SERIAL + 2]


def test_records_outside_the_zone_are_skipped_with_a_warning(topology: Topology) -> None:
    extra = [
        *topology.dns.extra_records,
        ExtraRecord(name="www.example.com.", type="A", value="192.0.2.1"),
    ]
    t2 = topology.model_copy(
        update={"dns": topology.dns.model_copy(update={"extra_records": extra})}
    )
    store = ZoneStore(t2)
    assert any("www.example.com" in w for w in store.warnings)


def test_a_site_named_default_is_refused(topology: Topology) -> None:
    sites = [topology.sites[0].model_copy(update={"name": "default"}), topology.sites[1]]
    pools = [topology.pools[0].model_copy(update={"site": "default"}), topology.pools[1]]
    with pytest.raises(ZoneChangeError):
        ZoneStore(topology.model_copy(update={"sites": sites, "pools": pools}))


def test_delete_then_add_in_one_batch(store: ZoneStore) -> None:
    store.apply(
        [
            RecordChange("delete", "sip", "A"),
            RecordChange("add", "sip", "A", ("192.0.2.1",)),
            RecordChange("delete", "v6"),
            RecordChange("add", "v6", "TXT", ('"back"',)),
        ]
    )
    assert _data(store, DEFAULT_VIEW, "sip", "A") == {"192.0.2.1"}
    assert [r.rtype for r in store.records(DEFAULT_VIEW, "v6")] == ["TXT"]
    assert store.serial == SERIAL + 1
