"""Random and malformed input never crashes the core, and every message with
a header that is a query (QR clear) gets an answer with its ID."""

from __future__ import annotations

import struct
import time

import dns.message
import dns.rcode
import dns.update
from dns_testlib import DEFAULT_SRC, KEY_SPEC, LAB, SITE2_SRC, tsig_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipdrill.dns.core import DnsCore
from sipdrill.dns.tsig import keyring
from sipdrill.dns.zone import RecordChange, ZoneStore
from sipdrill.topology import load_topology

_TOPOLOGY = load_topology(LAB).topology
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _core(cache: int = 64) -> DnsCore:
    store = ZoneStore(_TOPOLOGY, serial=1)
    store.apply(
        [RecordChange("add", "big", "TXT", tuple(f'"{i:03d}{"x" * 60}"' for i in range(40)))]
    )
    return DnsCore(store, keyring=keyring([KEY_SPEC]), answer_cache_size=cache)


def _seeds() -> list[bytes]:
    out = []
    for name, rdtype, edns in [
        ("_sipinternaltls._tcp.lab.local", "SRV", 0),
        ("sip.lab.local", "A", -1),
        ("big.lab.local", "TXT", 0),
        ("chain1.lab.local", "A", 0),
        ("nope.lab.local", "A", -1),
        ("lab.local", "ANY", 0),
        ("example.com", "A", 0),
    ]:
        out.append(dns.message.make_query(name, rdtype, use_edns=edns).to_wire())
    signed = dns.message.make_query("lab.local", "SOA")
    signed.use_tsig(tsig_key())
    out.append(signed.to_wire())
    upd = dns.update.UpdateMessage("lab.local")
    upd.present("sip", "A")
    upd.absent("nothing")
    upd.add("fuzzed", 60, "A", "192.0.2.1")
    upd.delete("mail", "MX")
    out.append(upd.to_wire())
    upd.use_tsig(tsig_key())
    out.append(upd.to_wire())
    return out


SEEDS = _seeds()


def _check(core: DnsCore, wire: bytes, transport: str, source: tuple[str, int]) -> None:
    serial = core.zone.serial
    out = core.handle_query(wire, source, time.time(), transport)  # type: ignore[arg-type]
    if len(wire) < 12 or wire[2] & 0x80:
        assert out is None
        return
    assert out is not None, "a query with a header must be answered"
    assert out[:2] == wire[:2]  # same ID
    assert out[2] & 0x80  # QR
    assert (out[2] >> 3) & 0xF == (wire[2] >> 3) & 0xF  # same opcode
    if transport == "udp":
        assert len(out) <= 65535
    reply = dns.message.from_wire(out, keyring=False)  # well-formed
    if core.zone.serial != serial:
        assert reply.rcode() == dns.rcode.NOERROR and reply.had_tsig


@FUZZ
@given(wire=st.binary(max_size=600), transport=st.sampled_from(["udp", "tcp"]))
def test_random_bytes(wire: bytes, transport: str) -> None:
    _check(CORE, wire, transport, DEFAULT_SRC)


@FUZZ
@given(
    header=st.tuples(*[st.integers(0, 0xFFFF)] * 6),
    body=st.binary(max_size=300),
)
def test_random_headers_with_random_bodies(header: tuple[int, ...], body: bytes) -> None:
    _check(CORE, struct.pack("!6H", *header) + body, "udp", DEFAULT_SRC)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[i : i + draw(st.integers(1, 4))]
    return bytes(data)


@FUZZ
@given(wire=mutated(), transport=st.sampled_from(["udp", "tcp"]), site2=st.booleans())
def test_mutated_queries_and_updates(wire: bytes, transport: str, site2: bool) -> None:
    _check(CORE, wire, transport, SITE2_SRC if site2 else DEFAULT_SRC)


@FUZZ
@given(wire=mutated())
def test_answers_do_not_depend_on_the_cache(wire: bytes) -> None:
    """The cache only ever returns what the core would compute (updates aside)."""
    if len(wire) < 12 or (wire[2] >> 3) & 0xF == 5:
        return
    fresh = UNCACHED.handle_query(wire, DEFAULT_SRC, 0.0)
    if fresh is not None and dns.message.from_wire(fresh, keyring=False).had_tsig:
        return  # signed with the clock's time, and never cached
    CACHED.handle_query(wire, DEFAULT_SRC, 0.0)
    assert CACHED.handle_query(wire, DEFAULT_SRC, 0.0) == fresh


CORE = _core()
CACHED = _core(cache=4096)
UNCACHED = _core(cache=0)
