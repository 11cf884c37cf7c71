"""The topology model: the shipped files, every kind of invalid file, and the
DNS records the model implies."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sipdrill.errors import TopologyError, TopologyIssue
from sipdrill.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
name: t
domain: lab.local
sites:
  - name: site1
    subnet: 172.30.1.0/24
  - name: site2
    subnet: 172.30.2.0/24
pools:
  - fqdn: pool1.lab.local
    site: site1
    edition: Enterprise
    backup: pool2.lab.local
    front_ends:
      - {fqdn: fe1.pool1.lab.local, address: 172.30.1.11}
  - fqdn: pool2.lab.local
    site: site2
    edition: Enterprise
    backup: pool1.lab.local
    front_ends:
      - {fqdn: fe1.pool2.lab.local, address: 172.30.2.11}
cms:
  active: pool1.lab.local
dns:
  address: 172.30.0.53
timers:
  failover_detection_interval: 120
  sync_interval: 120
users:
  - uri: sip:alice@lab.local
    home_pool: pool1.lab.local
    contacts: [sip:bob@lab.local]
  - uri: sip:bob@lab.local
    home_pool: pool2.lab.local
"""


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    seen = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return n
    raise AssertionError(f"{needle!r} not in text")


def errors_of(text: str) -> list[TopologyIssue]:
    with pytest.raises(TopologyError) as exc_info:
        parse_topology(text, "lab.yaml")
    errs = [i for i in exc_info.value.issues if i.severity == "error"]
    assert errs, "a TopologyError must carry at least one error"
    for i in errs:
        assert i.file == "lab.yaml"
        assert i.fix, "every error says what to change"
    return errs


def test_base_is_valid() -> None:
    loaded = parse_topology(BASE, "lab.yaml")
    t = loaded.topology
    assert [p.fqdn for p in t.pools] == ["pool1.lab.local", "pool2.lab.local"]
    assert t.cms_standby == "pool2.lab.local"
    assert loaded.warnings == []


@pytest.mark.parametrize("name", ["paired-pools.yaml", "budget-dr.yaml", "enterprise.yaml"])
def test_shipped_topologies_are_valid(name: str) -> None:
    loaded = load_topology(ROOT / "topologies" / name)
    assert loaded.topology.all_users()


def test_paired_pools_shape() -> None:
    t = load_topology(ROOT / "topologies" / "paired-pools.yaml").topology
    assert [(a.fqdn, b.fqdn) for a, b in t.pairs()] == [("pool1.lab.local", "pool2.lab.local")]
    assert {p.site for p in t.pools} == {"site1", "site2"}
    assert t.cms.active == "pool1.lab.local"
    counts = t.users_by_pool()
    assert counts["pool1.lab.local"] >= 100 and counts["pool2.lab.local"] >= 100
    users = t.all_users()
    assert len({u.uri for u in users}) == len(users)
    known = {u.uri for u in users}
    assert all(c in known for u in users for c in u.contacts)
    assert sum(len(u.contacts) for u in users) > 1000


def test_budget_dr_shape() -> None:
    loaded = load_topology(ROOT / "topologies" / "budget-dr.yaml")
    t = loaded.topology
    assert t.pairs() == []
    dr = t.pool("drpool.lab.local")
    assert dr.edition.value == "Standard" and dr.backup is None
    assert t.cms.active == "drpool.lab.local" and t.cms_standby is None
    # The standby pool stays out of SRV until the drill repoints DNS.
    srv = [r for r in t.dns_records() if r.rtype == "SRV"]
    assert srv and all("drpool" not in r.data for r in srv)
    assert any(w.field == "cms.active" for w in loaded.warnings)


# --- each invalid kind names file, line, field -------------------------------


def test_cross_edition_pair() -> None:
    text = BASE.replace(
        "    site: site2\n    edition: Enterprise", "    site: site2\n    edition: Standard"
    )
    errs = errors_of(text)
    e = next(e for e in errs if "cannot pair" in e.message)
    assert e.field == "pools[0].backup"
    assert e.line == line_of(text, "backup: pool2.lab.local")
    assert "Enterprise with Enterprise" in e.fix


def test_self_pair() -> None:
    text = BASE.replace("backup: pool2.lab.local", "backup: pool1.lab.local")
    errs = errors_of(text)
    e = next(e for e in errs if "itself" in e.message)
    assert e.field == "pools[0].backup"
    assert e.line == line_of(text, "backup: pool1.lab.local")


def test_asymmetric_pair() -> None:
    text = BASE.replace("    backup: pool1.lab.local\n", "")
    errs = errors_of(text)
    e = next(e for e in errs if "symmetric" in e.message)
    assert e.field == "pools[0].backup"
    assert e.line == line_of(text, "backup: pool2.lab.local")
    assert "backup: pool1.lab.local" in e.fix


def test_unknown_backup_pool() -> None:
    text = BASE.replace("backup: pool2.lab.local", "backup: pool9.lab.local")
    e = next(e for e in errors_of(text) if "does not exist" in e.message)
    assert e.field == "pools[0].backup"


def test_unknown_home_pool() -> None:
    text = BASE.replace("    home_pool: pool2.lab.local", "    home_pool: pool3.lab.local")
    errs = errors_of(text)
    e = next(e for e in errs if e.field == "users[1].home_pool")
    assert e.line == line_of(text, "home_pool: pool3.lab.local")
    assert "pool1.lab.local" in e.fix


@pytest.mark.parametrize(
    ("old", "new", "field", "needle"),
    [
        ("sync_interval: 120", "sync_interval: 2", "timers.sync_interval", "sync_interval"),
        ("sync_interval: 120", "sync_interval: 20000", "timers.sync_interval", "sync_interval"),
        (
            "failover_detection_interval: 120",
            "failover_detection_interval: -5",
            "timers.failover_detection_interval",
            "failover_detection_interval",
        ),
        (
            "sync_interval: 120",
            "sync_interval: 120\n  registration_expiry: {default: 600, min: 200, max: 900}",
            "timers.registration_expiry.min",
            "registration_expiry",
        ),
    ],
)
def test_timer_out_of_range(old: str, new: str, field: str, needle: str) -> None:
    text = BASE.replace(old, new)
    errs = errors_of(text)
    e = next(e for e in errs if e.field == field)
    assert e.line == line_of(text, needle)
    assert "at least" in e.fix or "at most" in e.fix or "above" in e.fix


def test_registration_expiry_order() -> None:
    text = BASE.replace(
        "sync_interval: 120",
        "sync_interval: 120\n  registration_expiry: {default: 300, min: 600, max: 900}",
    )
    e = next(e for e in errors_of(text) if e.field == "timers.registration_expiry")
    assert "min <= default <= max" in e.message


def test_short_detection_interval_is_a_warning() -> None:
    text = BASE.replace("failover_detection_interval: 120", "failover_detection_interval: 30")
    loaded = parse_topology(text, "lab.yaml")
    (w,) = loaded.warnings
    assert w.field == "timers.failover_detection_interval"
    assert w.line == line_of(text, "failover_detection_interval: 30")


def test_same_site_pair_is_a_warning() -> None:
    text = BASE.replace(
        "      - {fqdn: fe1.pool2.lab.local, address: 172.30.2.11}",
        "      - {fqdn: fe1.pool2.lab.local, address: 172.30.1.12}",
    ).replace("    site: site2\n", "    site: site1\n")
    loaded = parse_topology(text, "lab.yaml")
    assert [w.field for w in loaded.warnings] == ["pools[0].backup"]
    assert "different sites" in loaded.warnings[0].fix


def test_duplicate_address() -> None:
    text = BASE.replace("address: 172.30.2.11", "address: 172.30.1.11").replace(
        "    site: site2\n", "    site: site1\n"
    )
    errs = errors_of(text)
    e = next(e for e in errs if "already used" in e.message)
    assert e.field == "pools[1].front_ends[0].address"
    assert e.line == line_of(text, "fe1.pool2.lab.local")


def test_address_outside_site_subnet() -> None:
    text = BASE.replace("address: 172.30.2.11", "address: 172.30.9.11")
    e = next(e for e in errors_of(text) if "outside" in e.message)
    assert e.field == "pools[1].front_ends[0].address"
    assert "172.30.2.0/24" in e.fix


def test_dns_address_collides_with_front_end() -> None:
    text = BASE.replace("address: 172.30.0.53", "address: 172.30.1.11")
    fields = {e.field for e in errors_of(text)}
    assert "pools[0].front_ends[0].address" in fields  # taken by dns.address
    assert "dns.address" in fields  # and outside the core network


def test_malformed_yaml() -> None:
    text = BASE.replace("  - name: site2\n", "  - name: site2\n   bad: [unclosed\n")
    (e,) = errors_of(text)
    assert e.field == "(yaml)"
    assert e.line is not None and abs(e.line - line_of(text, "bad: [unclosed")) <= 1
    assert "malformed YAML" in e.message


def test_unknown_field_is_named() -> None:
    text = BASE.replace("    backup: pool2.lab.local", "    bakup: pool2.lab.local")
    errs = errors_of(text)
    e = next(e for e in errs if e.field == "pools[0].bakup")
    assert e.line == line_of(text, "bakup:")
    assert "spelling" in e.fix


def test_missing_field_is_named() -> None:
    text = BASE.replace("cms:\n  active: pool1.lab.local\n", "")
    e = next(e for e in errors_of(text) if e.field == "cms")
    assert e.fix == "add `cms`"


def test_standard_pool_has_one_front_end() -> None:
    text = BASE.replace("edition: Enterprise", "edition: Standard").replace(
        "      - {fqdn: fe1.pool1.lab.local, address: 172.30.1.11}",
        "      - {fqdn: fe1.pool1.lab.local, address: 172.30.1.11}\n"
        "      - {fqdn: fe2.pool1.lab.local, address: 172.30.1.12}",
    )
    e = next(e for e in errors_of(text) if e.field == "pools[0].front_ends")
    assert "exactly one" in e.message


def test_contact_must_exist() -> None:
    text = BASE.replace("contacts: [sip:bob@lab.local]", "contacts: [sip:zed@lab.local]")
    e = next(e for e in errors_of(text) if e.field == "users[0].contacts[0]")
    assert "not a user" in e.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError) as exc_info:
        load_topology(tmp_path / "missing.yaml")
    (issue,) = exc_info.value.issues
    assert issue.file.endswith("missing.yaml") and issue.line is None


def test_error_text_names_file_line_field_fix() -> None:
    text = BASE.replace("backup: pool2.lab.local", "backup: pool1.lab.local")
    with pytest.raises(TopologyError) as exc_info:
        parse_topology(text, "lab.yaml")
    rendered = str(exc_info.value)
    assert (
        f"lab.yaml:{line_of(text, 'backup: pool1.lab.local')}: error: pools[0].backup:" in rendered
    )
    assert "(fix:" in rendered


# --- derived data ------------------------------------------------------------


def test_dns_records_follow_lookup_order_and_srv_priorities() -> None:
    t = parse_topology(BASE).topology
    recs = t.dns_records()
    srv = sorted(r.data for r in recs if r.name == "_sipinternaltls._tcp.lab.local")
    assert srv == ["0 10 5061 pool1.lab.local.", "10 10 5061 pool2.lab.local."]
    tcp = sorted(r.data for r in recs if r.name == "_sipinternal._tcp.lab.local")
    assert tcp == ["0 10 5060 pool1.lab.local.", "10 10 5060 pool2.lab.local."]
    names = {r.name for r in recs}
    for label in ("lyncdiscoverinternal", "lyncdiscover", "sipinternal", "sip", "sipexternal"):
        assert f"{label}.lab.local" in names
    # SRV targets are A records in the same domain.
    a_names = {r.name for r in recs if r.rtype == "A"}
    assert {"pool1.lab.local", "pool2.lab.local"} <= a_names


def test_site_view_puts_local_pool_first() -> None:
    text = BASE.replace(
        "    subnet: 172.30.2.0/24\n", "    subnet: 172.30.2.0/24\n    client_subnet: 10.2.0.0/16\n"
    )
    t = parse_topology(text).topology
    assert t.dns_views() == [None, "site2"]
    assert t.view_for_client(ipaddress.IPv4Address("10.2.3.4")) == "site2"
    srv = sorted(
        r.data for r in t.dns_records("site2") if r.name == "_sipinternaltls._tcp.lab.local"
    )
    assert srv == ["0 10 5061 pool2.lab.local.", "10 10 5061 pool1.lab.local."]


def test_enterprise_pool_resolves_to_every_front_end() -> None:
    text = BASE.replace(
        "      - {fqdn: fe1.pool1.lab.local, address: 172.30.1.11}",
        "      - {fqdn: fe1.pool1.lab.local, address: 172.30.1.11}\n"
        "      - {fqdn: fe2.pool1.lab.local, address: 172.30.1.12}",
    )
    t = parse_topology(text).topology
    pool_a = sorted(r.data for r in t.dns_records() if r.name == "pool1.lab.local")
    assert pool_a == ["172.30.1.11", "172.30.1.12"]


def test_loopback_map_is_unique_and_in_loopback() -> None:
    t = load_topology(ROOT / "topologies" / "paired-pools.yaml").topology
    m = t.loopback_map()
    assert len(set(m.values())) == len(m)
    assert all(ipaddress.IPv4Address(v).is_loopback for v in m.values())
    assert m["172.30.1.11"] == "127.77.1.11" and m["172.30.0.53"] == "127.77.0.53"
    recs = t.dns_records(address_map=m)
    assert all(ipaddress.IPv4Address(r.data).is_loopback for r in recs if r.rtype == "A")


def test_generated_users_are_deterministic() -> None:
    t = load_topology(ROOT / "topologies" / "paired-pools.yaml").topology
    a = [(u.uri, tuple(u.contacts)) for u in t.all_users()]
    b = [(u.uri, tuple(u.contacts)) for u in t.all_users()]
    assert a == b
    first = next(u for u in t.all_users() if u.uri == "sip:p1u001@lab.local")
    assert first.contacts[:2] == ["sip:p1u002@lab.local", "sip:p1u003@lab.local"]
    assert [c.id for c in first.conferences] == ["p1u001-m1"]


# --- no input crashes the loader ---------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes(text: str) -> None:
    try:
        parse_topology(text, "fuzz.yaml")
    except TopologyError as exc:
        assert exc.issues and all(i.file == "fuzz.yaml" for i in exc.issues)


def _mutations() -> st.SearchStrategy[tuple[list[str | int], object]]:
    doc = yaml.safe_load(BASE)
    paths: list[list[str | int]] = []

    def walk(node: object, path: list[str | int]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, [*path, i])

    walk(doc, [])
    values = st.one_of(
        st.none(),
        st.integers(-10, 100000),
        st.text(max_size=20),
        st.booleans(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )
    return st.tuples(st.sampled_from(paths[1:]), values)


@settings(max_examples=200, deadline=None)
@given(_mutations())
def test_mutated_documents_give_located_errors(mutation: tuple[list[str | int], object]) -> None:
    path, value = mutation
    doc = yaml.safe_load(BASE)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    text = yaml.safe_dump(doc, sort_keys=False)
    try:
        parse_topology(text, "m.yaml")
    except TopologyError as exc:
        for issue in exc.issues:
            assert issue.line is not None and 1 <= issue.line <= len(text.splitlines())


def _with_front_ends(n: int) -> str:
    fes = "\n".join(
        f"      - {{fqdn: fe{k}.pool1.lab.local, address: 172.30.1.{10 + k}}}"
        for k in range(1, n + 1)
    )
    return BASE.replace("      - {fqdn: fe1.pool1.lab.local, address: 172.30.1.11}", fes)


def test_thirteen_front_ends_are_refused() -> None:
    text = _with_front_ends(13)
    e = next(e for e in errors_of(text) if e.field == "pools[0].front_ends")
    assert "at most 12" in e.message and "not 13" in e.message
    assert e.line == line_of(text, "front_ends:")
    assert "split" in e.fix


def test_twelve_front_ends_are_a_pool() -> None:
    pool = parse_topology(_with_front_ends(12), "lab.yaml").topology.pool("pool1.lab.local")
    assert len(pool.front_ends) == 12


def test_two_front_ends_warn() -> None:
    loaded = parse_topology(_with_front_ends(2), "lab.yaml")
    (w,) = loaded.warnings
    assert w.field == "pools[0].front_ends" and "at least three" in w.message


def test_pool_fqdn_resolves_to_every_front_end() -> None:
    t = parse_topology(_with_front_ends(3), "lab.yaml").topology
    records = t.dns_records(address_map=t.loopback_map())
    pool_a = [r.data for r in records if r.name == "pool1.lab.local" and r.rtype == "A"]
    # DNS load balancing: every front end, in topology order (clients try them so).
    assert pool_a == ["127.77.1.11", "127.77.1.12", "127.77.1.13"]
    for k in (1, 2, 3):
        (own,) = [r.data for r in records if r.name == f"fe{k}.pool1.lab.local"]
        assert own == f"127.77.1.{10 + k}"
    srv_targets = {r.data.split()[-1] for r in records if r.rtype == "SRV"}
    assert srv_targets == {"pool1.lab.local.", "pool2.lab.local."}
