"""The registrar's UDP fast path (sipdrill.sip.fastpath) against the full path.

Two registrar services, one with the fast path and one without, get the same
datagrams at the same instants; they must send the same bytes and be left
with the same bindings and server transactions. The datagrams are REGISTERs
as SIPp and Lync send them, varied header by header towards everything the
fast path must refuse (and the full path answer 400, 404, 423, 500, ...),
then sometimes mutated byte by byte.
"""

from __future__ import annotations

import asyncio
import functools
import operator
from collections.abc import Callable
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sipdrill.sip import fastpath
from sipdrill.sip.registrar import Registrar
from sipdrill.sip.server import ListenSpec, SipService, registrar_service
from sipdrill.sip.transport import Flow, Kind

DOMAIN = "lab.local"
SIPP = (
    b"REGISTER sip:lab.local SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1-1-0\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:u1@lab.local>;tag=99T1\r\n"
    b"To: <sip:u1@lab.local>\r\n"
    b"Call-ID: 1-99@127.0.0.1\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:u1@127.0.0.1:5061;transport=UDP>\r\n"
    b"Expires: 600\r\n"
    b"User-Agent: SIPp\r\n"
    b"Content-Length: 0\r\n\r\n"
)

# Each part of a REGISTER: variants the fast path takes, then variants it
# must leave to the full path (or that change the answer). A drawn REGISTER
# spoils at most two parts, so that most of them go the fast way.
PARTS: dict[str, tuple[list[str | None], list[str | None]]] = {
    "request": (
        ["REGISTER sip:lab.local SIP/2.0", "REGISTER sips:LAB.local:5061 SIP/2.0"],
        [
            "REGISTER sip:lab.local SIP/3.0",
            "REGISTER lab.local SIP/2.0",
            "REGISTER tel:+1555 SIP/2.0",
            "REGISTER  sip:lab.local SIP/2.0",
            "REGISTER sip:lab.local;transport=udp SIP/2.0",
        ],
    ),
    "via name": (["Via", "v", "VIA", "via "], ["Via\t", " Via"]),
    "via": (
        [
            "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{b};rport",
            "SIP/2.0/UDP 127.0.0.1;rport;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bK-{b};received=10.0.0.1",
            "SIP/2.0/UDP client.lab.local:0;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-x;branch=z9hG4bK-{b}",
        ],
        [
            "SIP/2.0/UDP [::1]:5061;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 127.0.0.1:5061;branch=old-{b}",
            "SIP/2.0/UDP 127.0.0.1:5061",
            "SIP / 2.0 / UDP 127.0.0.1:5061;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{b}, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-p",
            "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-%41{b}",
            'SIP/2.0/UDP 127.0.0.1:5061;branch="z9hG4bK-{b}"',
            "SIP/2.0/UDP 127.0.0.1:99999999999999999999;branch=z9hG4bK-{b}",
            "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{b};rport=1;rport",
            "garbage",
        ],
    ),
    "from name": (["From", "f"], ["Frm"]),
    "from": (
        ["<sip:{u}@lab.local>", "<sip:{u}@lab.local:5061;transport=tls>"],
        ['"Alice Smith" <sip:{u}@lab.local>', "sip:{u}@lab.local", "<sip:{u}@>", "<tel:+1555>"],
    ),
    "to name": (["To", "t", "tO"], ["T o"]),
    "to": (
        [
            "<sip:{u}@lab.local>",
            "<sip:{u}@LAB.LOCAL>",
            "<sips:{u}@lab.local>",
            "<sip:{u}:secret@lab.local>",
            "<sip:lab.local>",
        ],
        [
            '"Alice Smith" <sip:{u}@lab.local>',
            "Alice <sip:{u}@lab.local>",
            "sip:{u}@lab.local",
            "<sip:{u}@other.domain>",
            "<sip:{u}%40x@lab.local>",
            "<tel:+15551234>",
            "<sip:{u}@>",
            "<sip:{u}@lab.local> ;x=1",
        ],
    ),
    "to tag": (["", ";tag=t1", ";TAG=t2", ";tag", ";tag=t1;x=y"], [";tag=a b"]),
    "call-id name": (["Call-ID", "i", "call-id"], ["Call-ID:"]),
    "call-id": (["c1@h", "c2@h"], ["", " c1@h "]),
    "cseq": (
        ["1 REGISTER", "2 REGISTER", "3 REGISTER", "01 REGISTER"],
        ["2147483648 REGISTER", "1 INVITE", "x REGISTER", "1  REGISTER", "1 register"],
    ),
    "contact name": (["Contact", "m"], ["Contacts"]),
    "contact": (
        [
            "<sip:{u}@127.0.0.1:5061;transport=UDP>",
            "<sip:{u}@127.0.0.1:5061;transport=UDP>",
            "<sip:{u}@127.0.0.1:5062>",
            "<sip:{u}@127.0.0.1:5061>;q=0.5",
            "<sip:{u}@127.0.0.1:5061;transport=UDP>;expires=0",
            "<sip:{u}@127.0.0.1:5061>;EXPIRES=700",
            "<sip:{u}@127.0.0.1:5061;maddr=10.0.0.1;lr>",
            None,
        ],
        [
            "<sip:{u}@127.0.0.1:5061>;expires=10",
            "<sip:{u}@10.0.0.9:5070;ob>;reg-id=1;"
            '+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>"',
            "*",
            "<sip:{u}@127.0.0.1:5061>, <sip:{u}@127.0.0.1:5062>",
            "",
            '"Phone" <sip:{u}@127.0.0.1:5061>',
            "sip:{u}@127.0.0.1:5061;expires=0",
            "<sip:{u}@bad host>",
        ],
    ),
    "expires": (["600", "0", "1000", None], ["10", "abc", "", "6OO", "-1"]),
    "max-forwards": (["70", "255", None], ["256", "x"]),
    "length name": (["Content-Length", "l"], ["Content-Lenght"]),
    "length": (["0", "00", None], ["5", "x"]),
    "body": ([""], ["hello", "\r\n"]),
    "extra": (
        ["User-Agent: SIPp", "Supported: path, outbound", "Allow: REGISTER", None],
        [
            "X Bad: name",
            " folded",
            "\tfolded",
            "Subject: a\tb",
            'Authorization: Digest username="u1"',
            "Expires: 600",
            "To: <sip:u9@lab.local>",
            "Contact: <sip:u1@127.0.0.1:5099>",
            "Content-Length: 0",
            "Max-Forwards: 70",
            "Call-ID: other",
            "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK-second",
            "NoColon",
            "X-Utf8: caf\u00e9",
            "X-Nul: a\x00b",
            "X-Long: " + "x" * 9000,
        ],
    ),
}
USERS = st.sampled_from(["u1", "U1", "u2", "Alice.Smith"])
BRANCHES = st.sampled_from(["a", "b", "c"])


@st.composite
def registers(draw: st.DrawFn) -> bytes:
    spoilt = draw(st.sets(st.sampled_from(sorted(PARTS)), max_size=2))
    part: dict[str, str | None] = {}
    for name, (good, bad) in PARTS.items():
        value = draw(st.sampled_from(bad if name in spoilt else good))
        part[name] = (
            value.format(u=draw(USERS) if name == "to" else "{u}", b="{b}") if value else value
        )
    user, branch = draw(USERS), draw(BRANCHES)

    def fill(value: str | None) -> str | None:
        return None if value is None else value.replace("{u}", user).replace("{b}", branch)

    lines = [
        f"{part['via name']}: {fill(part['via'])}",
        f"{part['from name']}: {fill(part['from'])};tag=f1",
        f"{part['to name']}: {fill(part['to'])}{part['to tag']}",
        f"{part['call-id name']}: {part['call-id']}",
        f"CSeq: {part['cseq']}",
    ]
    for name, value in (
        (part["contact name"], fill(part["contact"])),
        ("Expires", part["expires"]),
        ("Max-Forwards", part["max-forwards"]),
        (part["length name"], part["length"]),
    ):
        if value is not None:
            lines.append(f"{name}: {value}")
    if part["extra"] is not None:
        lines.append(part["extra"])
    lines = draw(st.permutations(lines))
    text = f"{part['request']}\r\n" + "\r\n".join(lines) + f"\r\n\r\n{part['body']}"
    data = text.encode()
    if draw(st.integers(0, 3)) == 0:
        # A byte changed, dropped or truncated at: whatever the fast path makes of it,
        # the two paths must still agree.
        where = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["set", "drop", "cut"]))
        if how == "set":
            data = data[:where] + bytes([draw(st.integers(0, 255))]) + data[where + 1 :]
        elif how == "drop":
            data = data[:where] + data[where + 1 :]
        else:
            data = data[:where]
    return data


REMOTES = st.sampled_from([("127.0.0.1", 5061), ("10.0.0.9", 5070), ("127.0.0.1", 6000)])


def _state(service: SipService) -> dict[str, Any]:
    """Everything the two paths must agree on, leaving out the local socket's port."""
    registrar = service.registrar
    assert registrar is not None
    bindings = {}
    for aor in registrar.aors():
        for b in registrar.lookup(aor):
            source = b.source
            assert isinstance(source, Flow)
            bindings[(aor, b.key)] = (
                b.contact, b.call_id, b.cseq, b.expires_at, b.registered_at, b.text,
                source.kind, source.remote,
            )  # fmt: skip
    transactions = {
        key: (tx.state, tx.last_response, tx.deadlines(), tx.peer)
        for key, tx in service.transactions._server.items()
    }
    return {"bindings": bindings, "count": len(registrar), "transactions": transactions}


def _registrar() -> Registrar:
    return Registrar(DOMAIN, expiry_default=600, expiry_min=60, expiry_max=900)


def _capture(udp: Any, sent: list[bytes]) -> None:
    """Keep what the service sends instead of sending it."""
    udp._sendto = lambda data, remote: sent.append(data)


async def _run(
    steps: list[tuple[bytes, tuple[str, int]]], make: Callable[[], Registrar] = _registrar
) -> list[tuple[list[bytes], dict[str, Any]]]:
    outcomes = []
    for fast in (True, False):
        service = registrar_service(make(), fast_path=fast)
        await service.start([ListenSpec(Kind.UDP, "127.0.0.1", 0)])
        try:
            transport = service.transport
            udp = transport._udp[0]
            sent: list[bytes] = []
            clock = [1000.0]
            _capture(udp, sent)
            service._now = functools.partial(operator.getitem, clock, 0)  # type: ignore[method-assign]
            for i, (data, remote) in enumerate(steps):
                clock[0] = 1000.0 + 7 * i
                transport._on_datagram(udp, data, remote)
            outcomes.append((sent, _state(service)))
        finally:
            await service.close()
    return outcomes


def test_fast_and_full_paths_agree() -> None:
    loop = asyncio.new_event_loop()  # one for every example: asyncio.run's set-up is most of one

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(registers(), REMOTES), min_size=1, max_size=4))
    @example([(SIPP, ("127.0.0.1", 5061))])
    @example([(SIPP, ("127.0.0.1", 5061)), (SIPP, ("127.0.0.1", 5061))])
    @example([(SIPP, ("127.0.0.1", 5061)), (SIPP.replace(b"-1-0", b"-2-0"), ("127.0.0.1", 5061))])
    def agree(steps: list[tuple[bytes, tuple[str, int]]]) -> None:
        fast, full = loop.run_until_complete(_run(steps))
        assert fast[0] == full[0]  # the same bytes sent, in the same order
        assert fast[1] == full[1]

    try:
        agree()
    finally:
        loop.close()


def test_the_sipp_register_takes_the_fast_path() -> None:
    plain = fastpath.read_register(SIPP)
    assert plain is not None
    assert (plain.aor, plain.branch, plain.sent_by, plain.expires) == (
        "sip:u1@lab.local", "z9hG4bK-1-1-0", "127.0.0.1:5061", 600,
    )  # fmt: skip
    assert fastpath.read_register(SIPP.replace(b"Expires: 600", b"Expires: 6x0")) is None


async def test_a_retransmission_is_answered_from_the_transaction() -> None:
    """The original through the fast path, its retransmission through the full
    path (the transaction exists): the same bytes again, one binding."""
    (sent, state), _ = await _run([(SIPP, ("127.0.0.1", 5061))] * 3)
    assert len(sent) == 3 and sent[0] == sent[1] == sent[2]
    assert sent[0].startswith(b"SIP/2.0 200 OK\r\n")
    assert state["count"] == 1


async def test_refused_when_the_registrar_checks_more() -> None:
    """Digest authentication or a policy: the full path alone decides."""

    def with_policy() -> Registrar:
        registrar = _registrar()
        registrar.policy = lambda aor, request: None
        return registrar

    (sent, state), _ = await _run([(SIPP, ("127.0.0.1", 5061))], with_policy)
    assert sent and state["count"] == 1
    registrar = with_policy()
    transactions = registrar_service(registrar).transactions
    flow = Flow(Kind.UDP, ("127.0.0.1", 5060), ("127.0.0.1", 5061), 1)
    assert fastpath.answer_register(registrar, transactions, SIPP, flow, 0.0, "x") is None
