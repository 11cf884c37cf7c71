"""RFC 2136 UPDATE with TSIG (RFC 8945), through the sans-IO core."""

from __future__ import annotations

import time

import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update
import pytest
from dns_testlib import DEFAULT_SRC, KEY_NAME, SERIAL, SITE2_SRC, WRONG_SECRET, tsig_key

from sipdrill.dns.core import DnsCore
from sipdrill.dns.zone import DEFAULT_VIEW, ZoneStore

KEY = tsig_key()


def _update(zone: str = "lab.local", key: dns.tsig.Key | None = KEY) -> dns.update.UpdateMessage:
    u = dns.update.UpdateMessage(zone)
    if key is not None:
        u.use_tsig(key)
    return u


def _send(
    core: DnsCore,
    msg: dns.message.Message,
    *,
    now: float | None = None,
    source: tuple[str, int] = DEFAULT_SRC,
    transport: str = "udp",
) -> dns.message.Message:
    wire = msg.to_wire()
    out = core.handle_query(wire, source, time.time() if now is None else now, transport)  # type: ignore[arg-type]
    assert out is not None
    # keyring=False: parse whatever the server signed (or not) without checking.
    return dns.message.from_wire(out, keyring=False)


def _verified(core: DnsCore, msg: dns.message.Message) -> dns.message.Message:
    """Send ``msg`` and check the server's TSIG on the answer with our key."""
    wire = msg.to_wire()
    out = core.handle_query(wire, DEFAULT_SRC, time.time())
    assert out is not None
    return dns.message.from_wire(out, keyring={KEY.name: KEY}, request_mac=msg.mac)


def _a(store: ZoneStore, name: str, view: str = DEFAULT_VIEW) -> set[str]:
    return {r.data for r in store.records(view, name, "A")}


def test_signed_update_adds_in_every_view_and_the_answer_is_signed(core: DnsCore) -> None:
    u = _update()
    u.add("new", 120, "A", "192.0.2.10")
    u.add("new", 120, "A", "192.0.2.11")
    r = _verified(core, u)
    assert r.rcode() == dns.rcode.NOERROR and r.had_tsig
    for view in core.zone.view_names:
        assert _a(core.zone, "new", view) == {"192.0.2.10", "192.0.2.11"}
    assert core.zone.serial == SERIAL + 1
    assert {r.ttl for r in core.zone.records(DEFAULT_VIEW, "new")} == {120}
    value = core.metrics.registry.get_sample_value(
        "sipdrill_dns_updates_total", {"via": "wire", "rcode": "NOERROR"}
    )
    assert value == 1


def test_update_over_tcp(core: DnsCore) -> None:
    u = _update()
    u.add("viatcp", 60, "TXT", '"hello"')
    assert _send(core, u, transport="tcp").rcode() == dns.rcode.NOERROR
    assert [r.data for r in core.zone.records(DEFAULT_VIEW, "viatcp")] == ['"hello"']


def test_delete_rr_rrset_and_name(core: DnsCore) -> None:
    u = _update()
    u.delete("pool1", "A", "172.30.1.11")  # one record
    u.delete("mail", "MX")  # an RRset
    u.delete("v6")  # every RRset at a name
    assert _send(core, u).rcode() == dns.rcode.NOERROR
    z = core.zone
    assert _a(z, "pool1") == {"172.30.1.12"}
    assert z.records(DEFAULT_VIEW, "mail", "MX") == [] and z.records(DEFAULT_VIEW, "mail", "TXT")
    assert z.records(DEFAULT_VIEW, "v6") == []


def test_replace_is_delete_then_add_in_one_update(core: DnsCore) -> None:
    """What the drill does to repoint DNS: one UPDATE, one serial bump."""
    u = _update()
    u.delete("_sipinternaltls._tcp", "SRV")
    u.add("_sipinternaltls._tcp", 300, "SRV", "0 10 5061 pool2.lab.local.")
    assert _send(core, u).rcode() == dns.rcode.NOERROR
    for view in core.zone.view_names:
        srv = {r.data for r in core.zone.records(view, "_sipinternaltls._tcp", "SRV")}
        assert srv == {"0 10 5061 pool2.lab.local."}
    assert core.zone.serial == SERIAL + 1


def test_unsigned_update_is_refused_and_changes_nothing(core: DnsCore) -> None:
    u = _update(key=None)
    u.add("sneaky", 60, "A", "192.0.2.66")
    r = _send(core, u)
    assert r.rcode() == dns.rcode.REFUSED
    assert core.zone.records(DEFAULT_VIEW, "sneaky") == [] and core.zone.serial == SERIAL


def test_updates_are_refused_without_configured_keys(store: ZoneStore) -> None:
    core = DnsCore(store)
    u = _update(key=None)
    u.add("x", 60, "A", "192.0.2.1")
    assert _send(core, u).rcode() == dns.rcode.REFUSED
    signed = _update()
    signed.add("x", 60, "A", "192.0.2.1")
    r = _send(core, signed)
    assert r.rcode() == dns.rcode.NOTAUTH and r.tsig_error == dns.rcode.BADKEY
    assert store.serial == SERIAL


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (tsig_key(secret=WRONG_SECRET), dns.rcode.BADSIG),
        (tsig_key(name="other-key"), dns.rcode.BADKEY),
        (dns.tsig.Key(KEY_NAME, KEY.secret, dns.tsig.HMAC_SHA512), dns.rcode.BADKEY),
    ],
    ids=["wrong-secret", "unknown-name", "wrong-algorithm"],
)
def test_badly_signed_update_is_notauth_unsigned_and_changes_nothing(
    core: DnsCore, key: dns.tsig.Key, error: int
) -> None:
    u = _update(key=key)
    u.add("sneaky", 60, "A", "192.0.2.66")
    r = _send(core, u)
    assert r.rcode() == dns.rcode.NOTAUTH and r.tsig_error == error
    assert r.mac == b""  # RFC 8945 5.3.2: BADSIG/BADKEY answers are not signed
    assert core.zone.records(DEFAULT_VIEW, "sneaky") == [] and core.zone.serial == SERIAL


def test_a_tampered_update_is_badsig(core: DnsCore) -> None:
    u = _update()
    u.add("tamper", 60, "A", "192.0.2.1")
    wire = bytearray(u.to_wire())
    i = wire.index(bytes([192, 0, 2, 1]))
    wire[i + 3] = 2  # 192.0.2.2 after signing
    out = core.handle_query(bytes(wire), DEFAULT_SRC, time.time())
    assert out is not None
    r = dns.message.from_wire(out, keyring=False)
    assert r.rcode() == dns.rcode.NOTAUTH and r.tsig_error == dns.rcode.BADSIG
    assert core.zone.serial == SERIAL


def test_an_old_signature_is_badtime_and_the_answer_is_signed(core: DnsCore) -> None:
    u = _update()
    u.add("late", 60, "A", "192.0.2.1")
    r = _send(core, u, now=time.time() + 3600)  # fudge is 300 s
    assert r.rcode() == dns.rcode.NOTAUTH and r.tsig_error == dns.rcode.BADTIME
    assert r.mac  # signed, with the server's time in other data
    assert core.zone.serial == SERIAL


def test_wrong_zone_is_notauth_and_names_outside_are_notzone(core: DnsCore) -> None:
    other = _update(zone="example.com")
    other.add("www", 60, "A", "192.0.2.1")
    assert _send(core, other).rcode() == dns.rcode.NOTAUTH
    u = _update()
    u.add(dns.name.from_text("www.example.com."), 60, "A", "192.0.2.1")
    assert _send(core, u).rcode() == dns.rcode.NOTZONE
    p = _update()
    p.present(dns.name.from_text("www.example.com."))
    assert _send(core, p).rcode() == dns.rcode.NOTZONE
    assert core.zone.serial == SERIAL


@pytest.mark.parametrize(
    ("prereq", "rcode"),
    [
        (lambda u: u.present("sip"), dns.rcode.NOERROR),  # name in use
        (lambda u: u.present("nobody"), dns.rcode.NXDOMAIN),
        (lambda u: u.present("a.b"), dns.rcode.NXDOMAIN),  # an empty non-terminal is not "in use"
        (lambda u: u.absent("nobody"), dns.rcode.NOERROR),  # name not in use
        (lambda u: u.absent("sip"), dns.rcode.YXDOMAIN),
        (lambda u: u.present("sip", "A"), dns.rcode.NOERROR),  # RRset exists
        (lambda u: u.present("sip", "AAAA"), dns.rcode.NXRRSET),
        (lambda u: u.absent("sip", "AAAA"), dns.rcode.NOERROR),  # RRset does not exist
        (lambda u: u.absent("sip", "A"), dns.rcode.YXRRSET),
        # RRset exists with exactly these values
        (
            lambda u: (
                u.present("pool1", "A", "172.30.1.11"),
                u.present("pool1", "A", "172.30.1.12"),
            ),
            dns.rcode.NOERROR,
        ),
        (lambda u: u.present("pool1", "A", "172.30.1.11"), dns.rcode.NXRRSET),  # a subset
        (lambda u: u.present("pool1", "A", "172.30.1.99"), dns.rcode.NXRRSET),
    ],
)
def test_prerequisites(core: DnsCore, prereq: object, rcode: int) -> None:
    u = _update()
    prereq(u)  # type: ignore[operator]
    u.add("marker", 60, "A", "192.0.2.1")
    assert _send(core, u).rcode() == rcode
    applied = core.zone.records(DEFAULT_VIEW, "marker") != []
    assert applied == (rcode == dns.rcode.NOERROR)


def test_prerequisites_are_checked_in_the_senders_view(core: DnsCore) -> None:
    # site2's view has pool2 at priority 0; the default view has pool1 there.
    u = _update()
    u.present("_sipinternaltls._tcp", "SRV", "0 10 5061 pool2.lab.local.")
    u.present("_sipinternaltls._tcp", "SRV", "10 10 5061 pool1.lab.local.")
    u.add("marker", 60, "A", "192.0.2.1")
    assert _send(core, u, source=DEFAULT_SRC).rcode() == dns.rcode.NXRRSET
    assert _send(core, u, source=SITE2_SRC).rcode() == dns.rcode.NOERROR


def _raw_rrset(
    name: str, rdtype: str, ttl: int, deleting: int | None, rdata: str | None
) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(
        dns.name.from_text(name),
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
        deleting=deleting,
    )
    if rdata is not None:
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata))
    rrset.ttl = ttl
    return rrset


def test_prerequisite_with_a_ttl_is_formerr(core: DnsCore) -> None:
    u = _update()
    u.prerequisite.append(_raw_rrset("sip.lab.local.", "A", 5, None, "172.30.1.11"))
    u.add("marker", 60, "A", "192.0.2.1")
    assert _send(core, u).rcode() == dns.rcode.FORMERR
    assert core.zone.serial == SERIAL


def test_delete_with_a_ttl_is_formerr_and_nothing_before_it_is_applied(core: DnsCore) -> None:
    u = _update()
    u.add("first", 60, "A", "192.0.2.1")
    u.update.append(_raw_rrset("sip.lab.local.", "A", 5, dns.rdataclass.NONE, "172.30.1.11"))
    assert _send(core, u).rcode() == dns.rcode.FORMERR
    assert core.zone.records(DEFAULT_VIEW, "first") == [] and core.zone.serial == SERIAL


def test_cname_conflicts_and_soa_ns_changes_are_ignored(core: DnsCore) -> None:
    u = _update()
    u.add("pool1", 60, "CNAME", "sip.lab.local.")  # pool1 has A records
    u.add("alias", 60, "A", "192.0.2.1")  # alias is a CNAME
    u.add("@", 60, "NS", "evil.example.com.")
    u.delete("@", "NS")
    u.delete("@", "SOA")
    u.add("@", 60, "SOA", "evil. evil. 1 1 1 1 1")
    assert _send(core, u).rcode() == dns.rcode.NOERROR
    z = core.zone
    assert z.records(DEFAULT_VIEW, "pool1", "CNAME") == []
    assert z.records(DEFAULT_VIEW, "alias", "A") == []
    assert [r.data for r in z.records(DEFAULT_VIEW, "@", "NS")] == ["ns.lab.local."]
    assert z.serial == SERIAL  # nothing changed, so no new serial


def test_deleting_everything_at_the_apex_keeps_soa_and_ns(core: DnsCore) -> None:
    u = _update()
    u.add("@", 60, "TXT", '"apex"')
    u.delete("@")
    assert _send(core, u).rcode() == dns.rcode.NOERROR
    assert {r.rtype for r in core.zone.records(DEFAULT_VIEW, "@")} == {"SOA", "NS"}


def test_servfail_fault_refuses_updates(core: DnsCore) -> None:
    core.set_faults(servfail=True)
    u = _update()
    u.add("x", 60, "A", "192.0.2.1")
    assert _send(core, u).rcode() == dns.rcode.SERVFAIL
    assert core.zone.serial == SERIAL


def test_updated_records_are_answered(core: DnsCore) -> None:
    q = dns.message.make_query("fresh.lab.local", "A")
    assert _send(core, q).rcode() == dns.rcode.NXDOMAIN  # and now cached
    u = _update()
    u.add("fresh", 60, "A", "192.0.2.5")
    _send(core, u)
    r = _send(core, q)
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "192.0.2.5"


def test_signed_query_gets_a_signed_answer(core: DnsCore) -> None:
    q = dns.message.make_query("lab.local", "SOA")
    q.use_tsig(KEY)
    r = _verified(core, q)
    assert r.had_tsig and r.answer[0][0].serial == SERIAL
    bad = dns.message.make_query("lab.local", "SOA")
    bad.use_tsig(tsig_key(secret=WRONG_SECRET))
    r = _send(core, bad)
    assert r.rcode() == dns.rcode.NOTAUTH and r.tsig_error == dns.rcode.BADSIG


def test_handle_update_rejects_other_opcodes(core: DnsCore) -> None:
    q = dns.message.make_query("lab.local", "SOA").to_wire()
    out = core.handle_update(q, DEFAULT_SRC, time.time())
    assert out is not None and out[3] & 0xF == dns.rcode.FORMERR
    u = _update()
    u.add("viahandle", 60, "A", "192.0.2.1")
    out = core.handle_update(u.to_wire(), DEFAULT_SRC, time.time())
    assert out is not None and dns.message.from_wire(out, keyring=False).rcode() == 0


def test_owner_names_are_stored_in_lower_case(core: DnsCore) -> None:
    u = _update()
    u.add("MixedCase", 60, "A", "192.0.2.1")
    u.add("sip", 60, "A", "192.0.2.2")
    _send(core, u)
    u2 = _update()
    u2.add("SIP", 60, "A", "192.0.2.3")
    _send(core, u2)
    assert [r.name for r in core.zone.records(DEFAULT_VIEW, "mixedcase")] == ["mixedcase.lab.local"]
    r = _send(core, dns.message.make_query("MIXEDCASE.lab.local", "A"))
    assert r.answer[0].name.to_text() == "mixedcase.lab.local."
    assert _a(core.zone, "sip") == {"172.30.1.11", "172.30.1.12", "192.0.2.2", "192.0.2.3"}
    assert {r.name for r in core.zone.records(DEFAULT_VIEW, "sip")} == {"sip.lab.local"}
