"""Authoritative answers from the sans-IO core."""

from __future__ import annotations

import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from dns_testlib import DEFAULT_SRC, SERIAL, SITE1_SRC, SITE2_SRC, Ask, rdatas

from sipdrill.dns.core import DnsCore
from sipdrill.dns.zone import RecordChange, ZoneStore
from sipdrill.topology import Topology

SOA_TEXT = f"lab.local. SOA ns.lab.local. hostmaster.lab.local. {SERIAL} 3600 600 86400 60"


def _wire(
    core: DnsCore, query: bytes, transport: str = "udp", source: object = DEFAULT_SRC
) -> bytes:
    out = core.handle_query(query, source, time.time(), transport)  # type: ignore[arg-type]
    assert out is not None
    return out


def test_srv_answer_is_authoritative_with_targets_in_additional(ask: Ask) -> None:
    r = ask("_sipinternaltls._tcp.lab.local", "SRV")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.QR and not r.flags & dns.flags.RA
    assert rdatas(r) == {
        "_sipinternaltls._tcp.lab.local. SRV 0 10 5061 pool1.lab.local.",
        "_sipinternaltls._tcp.lab.local. SRV 10 10 5061 pool2.lab.local.",
    }
    assert rdatas(r, "additional") == {
        "pool1.lab.local. A 172.30.1.11",
        "pool1.lab.local. A 172.30.1.12",
        "pool2.lab.local. A 172.30.2.11",
        "pool2.lab.local. A 172.30.2.12",
    }
    assert r.authority == []
    assert r.answer[0].ttl == 300


@pytest.mark.parametrize(
    ("source", "first"), [(DEFAULT_SRC, "pool1"), (SITE1_SRC, "pool1"), (SITE2_SRC, "pool2")]
)
def test_view_follows_the_client_address(ask: Ask, source: tuple[str, int], first: str) -> None:
    r = ask("_sipinternaltls._tcp.lab.local", "SRV", source=source)
    best = min(r.answer[0], key=lambda rd: rd.priority)
    assert best.target == dns.name.from_text(f"{first}.lab.local")


def test_configured_client_views_come_first(store: ZoneStore) -> None:
    core = DnsCore(store, client_views={"127.0.0.2/32": "site2"})
    q = dns.message.make_query("sip.lab.local", "A")
    r2 = dns.message.from_wire(_wire(core, q.to_wire(), source=("127.0.0.2", 1)))
    r1 = dns.message.from_wire(_wire(core, q.to_wire(), source=("127.0.0.1", 1)))
    assert {rd.address for rd in r2.answer[0]} == {"172.30.2.11", "172.30.2.12"}
    assert {rd.address for rd in r1.answer[0]} == {"172.30.1.11", "172.30.1.12"}
    # IPv6 and v4-mapped sources, and no source at all, do not crash.
    assert core.view_for(("::ffff:10.2.0.1", 1, 0, 0)) == "site2"
    assert core.view_for(("::1", 1, 0, 0)) == "default"
    assert core.view_for(None) == "default"
    assert core.view_for("not-an-address") == "default"


def test_nxdomain_has_the_soa_with_the_negative_ttl(ask: Ask) -> None:
    r = ask("nothing-here.lab.local", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA
    assert r.answer == []
    assert rdatas(r, "authority") == {SOA_TEXT}
    assert r.authority[0].ttl == 60  # min(SOA TTL 300, MINIMUM 60)


def test_nodata_is_noerror_with_the_soa(ask: Ask) -> None:
    r = ask("sip.lab.local", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    assert [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA]
    assert r.authority[0].ttl == 60


def test_empty_non_terminal_is_nodata_not_nxdomain(ask: Ask) -> None:
    for name in ("a.b.lab.local", "b.lab.local", "_tcp.lab.local"):
        r = ask(name, "A")
        assert r.rcode() == dns.rcode.NOERROR, name
        assert r.authority[0].rdtype == dns.rdatatype.SOA


def test_negative_ttl_is_the_soa_ttl_when_that_is_lower(topology: Topology) -> None:
    dns_settings = topology.dns.model_copy(update={"ttl": 30, "negative_ttl": 600})
    core = DnsCore(ZoneStore(topology.model_copy(update={"dns": dns_settings})))
    r = dns.message.from_wire(_wire(core, dns.message.make_query("x.lab.local", "A").to_wire()))
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].ttl == 30
    assert r.authority[0][0].minimum == 600


def test_names_are_case_insensitive_and_the_question_keeps_its_case(ask: Ask) -> None:
    r = ask("_SipInternalTLS._TCP.Lab.LOCAL", "SRV")
    assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 2
    assert r.question[0].name.to_text() == "_SipInternalTLS._TCP.Lab.LOCAL."
    # Answers keep the zone's spelling (not the question's, via compression).
    assert r.answer[0].name.to_text() == "_sipinternaltls._tcp.lab.local."
    assert {rr.name.to_text() for rr in r.additional} == {"pool1.lab.local.", "pool2.lab.local."}
    r = ask("SIP.LAB.LOCAL", "a", use_edns=-1)
    assert r.question[0].name.to_text() == "SIP.LAB.LOCAL." and len(r.answer[0]) == 2


@pytest.mark.parametrize("qname", ["www.example.com", "local", "lab.local.example.com", "."])
def test_names_outside_the_zone_are_refused(ask: Ask, qname: str) -> None:
    r = ask(qname, "A")
    assert r.rcode() == dns.rcode.REFUSED
    assert not r.flags & dns.flags.AA and r.answer == [] and r.authority == []


def test_other_classes_and_zone_transfers_are_refused(ask: Ask) -> None:
    assert ask("sip.lab.local", "A", rdclass="CH").rcode() == dns.rcode.REFUSED
    assert ask("lab.local", "AXFR").rcode() == dns.rcode.REFUSED
    assert ask("lab.local", "IXFR").rcode() == dns.rcode.REFUSED
    assert ask("sip.lab.local", "A", rdclass="ANY").rcode() == dns.rcode.NOERROR


def test_meta_query_types(ask: Ask) -> None:
    assert ask("sip.lab.local", "MAILB").rcode() == dns.rcode.NOTIMP
    assert ask("sip.lab.local", "TSIG").rcode() == dns.rcode.FORMERR
    assert ask("sip.lab.local", "OPT").rcode() == dns.rcode.FORMERR


def test_any_returns_every_rrset_at_the_name(ask: Ask) -> None:
    r = ask("mail.lab.local", "ANY")
    assert rdatas(r) == {
        "mail.lab.local. MX 10 pool2.lab.local.",
        'mail.lab.local. TXT "v=spf1 -all"',
    }
    assert rdatas(r, "additional") == {
        "pool2.lab.local. A 172.30.2.11",
        "pool2.lab.local. A 172.30.2.12",
    }
    apex = ask("lab.local", "ANY")
    assert {rr.rdtype for rr in apex.answer} == {dns.rdatatype.SOA, dns.rdatatype.NS}
    assert ask("nothing.lab.local", "ANY").rcode() == dns.rcode.NXDOMAIN


def test_ns_and_soa_at_the_apex(ask: Ask) -> None:
    ns = ask("lab.local", "NS")
    assert rdatas(ns) == {"lab.local. NS ns.lab.local."}
    assert rdatas(ns, "additional") == {"ns.lab.local. A 172.30.0.53"}
    soa = ask("lab.local", "SOA")
    assert soa.answer[0][0].serial == SERIAL and soa.answer[0].ttl == 300


def test_cname_is_chased_inside_the_zone(ask: Ask) -> None:
    r = ask("chain1.lab.local", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in r.answer] == [
        dns.rdatatype.CNAME,
        dns.rdatatype.CNAME,
        dns.rdatatype.A,
    ]
    assert rdatas(r) >= {
        "chain1.lab.local. CNAME chain2.lab.local.",
        "sip.lab.local. A 172.30.1.11",
    }


def test_cname_query_returns_the_cname_only(ask: Ask) -> None:
    r = ask("chain1.lab.local", "CNAME")
    assert rdatas(r) == {"chain1.lab.local. CNAME chain2.lab.local."}


def test_cname_to_a_missing_name_is_nxdomain(ask: Ask) -> None:
    r = ask("dangling.lab.local", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert rdatas(r) == {"dangling.lab.local. CNAME nowhere.lab.local."}
    assert r.authority[0].rdtype == dns.rdatatype.SOA


def test_cname_to_nodata_has_the_soa(ask: Ask) -> None:
    r = ask("alias.lab.local", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR
    assert rdatas(r) == {"alias.lab.local. CNAME pool1.lab.local."}
    assert r.authority[0].rdtype == dns.rdatatype.SOA


def test_cname_out_of_zone_and_loops_stop(ask: Ask) -> None:
    r = ask("outside.lab.local", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert rdatas(r) == {"outside.lab.local. CNAME www.example.com."}
    loop = ask("loop1.lab.local", "A")
    assert loop.rcode() == dns.rcode.NOERROR
    assert rdatas(loop) == {
        "loop1.lab.local. CNAME loop2.lab.local.",
        "loop2.lab.local. CNAME loop1.lab.local.",
    }


def test_aaaa_of_srv_targets_goes_to_additional_too(core: DnsCore, ask: Ask) -> None:
    core.zone.apply([RecordChange("add", "pool1", "AAAA", ("2001:db8::11",))])
    r = ask("_sipinternaltls._tcp.lab.local", "SRV")
    assert "pool1.lab.local. AAAA 2001:db8::11" in rdatas(r, "additional")


# --- EDNS -------------------------------------------------------------------


def test_edns_answer_echoes_opt_and_do_bit(ask: Ask, core: DnsCore) -> None:
    r = ask("sip.lab.local", "A", use_edns=0, want_dnssec=True, payload=4096)
    assert r.edns == 0 and r.ednsflags & dns.flags.DO
    assert r.payload == core.max_udp_payload == 1232
    plain = ask("sip.lab.local", "A", use_edns=-1)
    assert plain.edns == -1


def test_unknown_edns_version_is_badvers(ask: Ask) -> None:
    r = ask("sip.lab.local", "A", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS
    assert r.edns == 0 and r.answer == []


def test_two_opt_records_are_formerr(core: DnsCore) -> None:
    q = dns.message.make_query("sip.lab.local", "A", use_edns=0).to_wire()
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    doubled = q[:10] + struct.pack("!H", 2) + q[12:] + opt
    r = _wire(core, doubled)
    assert r[:2] == q[:2] and r[3] & 0xF == dns.rcode.FORMERR


def _big(core: DnsCore, n: int = 120) -> None:
    core.zone.apply(
        [RecordChange("add", "big", "A", tuple(f"10.9.{i // 250}.{i % 250 + 1}" for i in range(n)))]
    )


@pytest.mark.parametrize(
    ("edns", "payload", "limit"), [(-1, 0, 512), (0, 512, 512), (0, 1000, 1000), (0, 4096, 1232)]
)
def test_udp_answers_fit_the_payload_or_are_truncated(
    core: DnsCore, ask: Ask, edns: int, payload: int, limit: int
) -> None:
    _big(core)  # 120 A records: 1,950 bytes
    q = dns.message.make_query("big.lab.local", "A", use_edns=edns, payload=payload)
    udp = _wire(core, q.to_wire())
    assert len(udp) <= limit
    r = dns.message.from_wire(udp)
    assert r.flags & dns.flags.TC and r.answer == [] and r.rcode() == dns.rcode.NOERROR
    tcp = dns.message.from_wire(_wire(core, q.to_wire(), "tcp"))
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 120


def test_a_fitting_answer_is_not_truncated(core: DnsCore) -> None:
    _big(core, 25)  # 25 * 16 + header: about 440 bytes
    q = dns.message.make_query("big.lab.local", "A", use_edns=-1)
    r = dns.message.from_wire(_wire(core, q.to_wire()))
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 25


def test_additional_records_are_dropped_before_truncating(core: DnsCore) -> None:
    # 12 SRV records (targets are not compressed, RFC 2782) whose targets have
    # A records: the answer fits in 512 bytes, the glue does not. The answer is
    # whole and TC is not set.
    names = [f"t{i}" for i in range(12)]
    changes = [RecordChange("add", n, "A", ("192.0.2.1",)) for n in names]
    changes.append(
        RecordChange("add", "_x._tcp", "SRV", tuple(f"0 0 1 {n}.lab.local." for n in names))
    )
    core.zone.apply(changes)
    q = dns.message.make_query("_x._tcp.lab.local", "SRV", use_edns=-1)
    out = _wire(core, q.to_wire())
    r = dns.message.from_wire(out)
    assert len(out) <= 512 and not r.flags & dns.flags.TC
    assert len(r.answer[0]) == 12 and 0 < len(r.additional) < 12


# --- header-level behaviour ---------------------------------------------------


def test_flags_rd_and_cd_and_opcode_are_handled(core: DnsCore) -> None:
    q = dns.message.make_query("sip.lab.local", "A")
    q.flags |= dns.flags.CD
    r = dns.message.from_wire(_wire(core, q.to_wire()))
    assert r.flags & dns.flags.RD and not r.flags & dns.flags.RA
    q.flags &= ~dns.flags.RD
    assert not dns.message.from_wire(_wire(core, q.to_wire())).flags & dns.flags.RD


@pytest.mark.parametrize(
    "opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, 3, 7, 15]
)
def test_unsupported_opcodes_are_notimp(core: DnsCore, opcode: int) -> None:
    q = dns.message.make_query("lab.local", "SOA").to_wire()
    flags = (struct.unpack("!H", q[2:4])[0] & ~0x7800) | (opcode << 11)
    out = _wire(core, q[:2] + struct.pack("!H", flags) + q[4:])
    assert out[:2] == q[:2]
    assert (out[2] >> 3) & 0xF == opcode and out[2] & 0x80
    assert out[3] & 0xF == dns.rcode.NOTIMP


@pytest.mark.parametrize(
    "tail",
    [
        b"",
        b"\x03foo",
        b"\x03foo\x00\x00",
        b"\xc0\x0c\x00\x01\x00\x01",
        b"\x40abc\x00\x00\x01\x00\x01",
    ],
)
def test_unparseable_messages_with_a_header_get_formerr(core: DnsCore, tail: bytes) -> None:
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    out = _wire(core, header + tail)
    assert out[:2] == b"\xbe\xef" and out[2] & 0x80 and out[3] & 0xF == dns.rcode.FORMERR
    assert dns.message.from_wire(out).rcode() == dns.rcode.FORMERR


def test_no_question_and_two_questions_are_formerr(core: DnsCore) -> None:
    empty = struct.pack("!HHHHHH", 7, 0, 0, 0, 0, 0)
    assert dns.message.from_wire(_wire(core, empty)).rcode() == dns.rcode.FORMERR
    q = dns.message.make_query("sip.lab.local", "A")
    q.question.append(dns.message.make_query("pool1.lab.local", "A").question[0])
    assert dns.message.from_wire(_wire(core, q.to_wire())).rcode() == dns.rcode.FORMERR


def test_trailing_junk_is_formerr(core: DnsCore) -> None:
    q = dns.message.make_query("sip.lab.local", "A").to_wire()
    assert _wire(core, q + b"junk")[3] & 0xF == dns.rcode.FORMERR


def test_short_messages_and_responses_get_nothing(core: DnsCore) -> None:
    assert core.handle_query(b"\x00" * 11, DEFAULT_SRC, time.time()) is None
    q = dns.message.make_query("sip.lab.local", "A")
    q.flags |= dns.flags.QR
    assert core.handle_query(q.to_wire(), DEFAULT_SRC, time.time()) is None


# --- the answer cache ---------------------------------------------------------


def test_cached_answers_carry_the_new_id_and_follow_zone_changes(core: DnsCore) -> None:
    q1 = dns.message.make_query("sip.lab.local", "A")
    first = _wire(core, q1.to_wire())
    q2 = dns.message.make_query("sip.lab.local", "A")
    q2.id = (q1.id + 1) % 65536
    second = _wire(core, q2.to_wire())
    assert second[:2] == q2.to_wire()[:2] and second[2:] == first[2:]
    core.zone.apply([RecordChange("replace", "sip", "A", ("192.0.2.99",))])
    third = dns.message.from_wire(_wire(core, q2.to_wire()))
    assert {rd.address for rd in third.answer[0]} == {"192.0.2.99"}


def test_cache_is_per_view_and_per_transport(core: DnsCore) -> None:
    q = dns.message.make_query("sip.lab.local", "A").to_wire()
    a1 = dns.message.from_wire(_wire(core, q, source=SITE1_SRC))
    a2 = dns.message.from_wire(_wire(core, q, source=SITE2_SRC))
    assert {rd.address for rd in a1.answer[0]} != {rd.address for rd in a2.answer[0]}
    _big(core)
    big = dns.message.make_query("big.lab.local", "A", use_edns=-1).to_wire()
    assert dns.message.from_wire(_wire(core, big, "udp")).flags & dns.flags.TC
    assert not dns.message.from_wire(_wire(core, big, "tcp")).flags & dns.flags.TC


def test_cached_answers_keep_each_questions_case(core: DnsCore) -> None:
    """0x20 resolvers check the question's case: a hit must not answer with
    another spelling's bytes (the key is the question as sent)."""
    spellings = ["sip.lab.local", "SIP.Lab.Local", "sip.lab.local", "SIP.Lab.Local"]
    for spelling in spellings:  # the second round comes from the cache
        q = dns.message.make_query(spelling, "A")
        r = dns.message.from_wire(_wire(core, q.to_wire()))
        assert r.id == q.id
        assert r.question[0].name.to_text() == spelling + "."
        assert r.answer[0].name.to_text() == "sip.lab.local."
    assert len(core._cache.entries) == 2


def test_cached_answers_honour_each_queries_edns_payload(core: DnsCore) -> None:
    _big(core, 60)  # about 1,000 bytes
    small = dns.message.make_query("big.lab.local", "A", use_edns=0, payload=512).to_wire()
    large = dns.message.make_query("big.lab.local", "A", use_edns=0, payload=4096).to_wire()
    plain = dns.message.make_query("big.lab.local", "A", use_edns=-1).to_wire()
    for _ in range(2):  # the second round comes from the cache
        r = dns.message.from_wire(_wire(core, small))
        assert r.flags & dns.flags.TC and r.answer == [] and r.payload == 1232
        r = dns.message.from_wire(_wire(core, large))
        assert not r.flags & dns.flags.TC and len(r.answer[0]) == 60 and r.edns == 0
        r = dns.message.from_wire(_wire(core, plain))
        assert r.flags & dns.flags.TC and r.edns == -1
    assert len(core._cache.entries) == 3


def test_a_hit_is_counted_like_a_miss(core: DnsCore) -> None:
    q = dns.message.make_query("nope.lab.local", "SRV").to_wire()
    for _ in range(3):
        _wire(core, q)
    assert core.metrics.query_counts[("SRV", "NXDOMAIN", "udp")] == 3


def test_cache_can_be_disabled_and_is_bounded(store: ZoneStore) -> None:
    core = DnsCore(store, answer_cache_size=0)
    q = dns.message.make_query("sip.lab.local", "A").to_wire()
    assert _wire(core, q) == _wire(core, q)
    small = DnsCore(store, answer_cache_size=3)
    for i in range(10):
        _wire(small, dns.message.make_query(f"h{i}.lab.local", "A").to_wire())
        assert len(small._cache.entries) <= 3


# --- faults -------------------------------------------------------------------


def test_faults_drop_servfail_and_clear(core: DnsCore, ask: Ask) -> None:
    q = dns.message.make_query("sip.lab.local", "A").to_wire()
    core.set_faults(drop=True)
    assert core.handle_query(q, DEFAULT_SRC, time.time()) is None
    core.set_faults(servfail=True)
    r = ask("sip.lab.local", "A")
    assert r.rcode() == dns.rcode.SERVFAIL and r.answer == [] and not r.flags & dns.flags.AA
    core.set_faults()
    assert ask("sip.lab.local", "A").rcode() == dns.rcode.NOERROR
    with pytest.raises(ValueError):
        core.set_faults(latency=-1)


def test_metrics_count_queries_by_type_and_rcode(core: DnsCore, ask: Ask) -> None:
    ask("sip.lab.local", "A")
    ask("sip.lab.local", "A")  # served from the cache, still counted
    ask("nope.lab.local", "SRV")
    ask("sip.lab.local", "TYPE65280")

    def count(qtype: str, rcode: str) -> float:
        value = core.metrics.registry.get_sample_value(
            "sipdrill_dns_queries_total", {"qtype": qtype, "rcode": rcode, "transport": "udp"}
        )
        return value or 0.0

    assert count("A", "NOERROR") == 2
    assert count("SRV", "NXDOMAIN") == 1
    assert count("OTHER", "NOERROR") == 1
    assert core.metrics.registry.get_sample_value("sipdrill_dns_zone_serial") == SERIAL


def test_a_bug_in_the_core_answers_servfail_not_a_crash(
    core: DnsCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(core, "_query", boom)
    out = _wire(core, dns.message.make_query("sip.lab.local", "A").to_wire())
    assert out[3] & 0xF == dns.rcode.SERVFAIL
