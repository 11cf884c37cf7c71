"""sipdrill.sip.shard: the AoR key, the frames, and workers sharing a UDP listener."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipdrill.sip.message import parse_message
from sipdrill.sip.registrar import aor_of
from sipdrill.sip.shard import aor_key, pack, shard_of, unpack

HOST = "127.0.0.1"


def register(
    to: str, *, via_port: int = 5060, contact_port: int = 5060, call_id: str = "c1"
) -> bytes:
    return (
        "REGISTER sip:lab.local SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{via_port};branch=z9hG4bK{call_id}{contact_port}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:caller@lab.local>;tag=f1\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:dev@{HOST}:{contact_port}>\r\n"
        "Expires: 600\r\nContent-Length: 0\r\n\r\n"
    ).encode()


_LABEL = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8
)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["sip", "sips"]),
    user=st.none() | _LABEL | st.builds(lambda a, b: f"{a}.{b}", _LABEL, _LABEL),
    password=st.none() | _LABEL,
    host=st.sampled_from(["lab.local", "LAB.Local", "10.0.0.7", "[::1]", "pool1.lab.local"]),
    port=st.none() | st.integers(1, 65535),
    uri_params=st.sampled_from(["", ";transport=tls", ";user=phone;lr"]),
    name=st.sampled_from(["", "Alice ", '"Bob Smith" ']),
    header=st.sampled_from(["To", "to", "TO", "t"]),
    angle=st.booleans(),
)
def test_the_key_is_the_registrars_aor(
    scheme, user, password, host, port, uri_params, name, header, angle
) -> None:
    userinfo = "" if user is None else user + (f":{password}" if password else "") + "@"
    uri = f"{scheme}:{userinfo}{host}{'' if port is None else f':{port}'}"
    value = f"{name}<{uri}{uri_params}>;x=1" if angle or name else f"{uri};x=1"
    data = register(value).replace(b"\r\nTo:", f"\r\n{header}:".encode())
    parsed = parse_message(data)
    assert aor_key(data) == aor_of(parsed.to_address.uri).encode()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_the_key_never_raises(data: bytes) -> None:
    assert isinstance(aor_key(data), bytes)
    assert 0 <= shard_of(data, 3) < 3


def test_retransmissions_and_refreshes_of_an_aor_go_to_one_worker() -> None:
    first = register("<sip:alice@lab.local>", via_port=5060, call_id="a")
    other_device = register("Alice <sip:ALICE@lab.local:5060>;tag=x", via_port=7000, call_id="b")
    assert shard_of(first, 4) == shard_of(other_device, 4)


def test_aors_spread_over_the_workers() -> None:
    counts = [0, 0]
    for i in range(1000):
        counts[shard_of(register(f"<sip:u{i}@lab.local>"), 2)] += 1
    assert min(counts) > 400, counts


def test_frames_round_trip() -> None:
    assert unpack(pack(("10.1.2.3", 5060), b"REGISTER ...")) == (
        ("10.1.2.3", 5060),
        b"REGISTER ...",
    )
    assert unpack(pack(("::1", 65535), b"")) == (("::1", 65535), b"")
    for bad in (b"", b"\x00ab", b"host\x00a"):
        with pytest.raises(ValueError):
            unpack(bad)


@pytest.mark.parametrize("batched", [True, False], ids=["mmsg", "one-by-one"])
async def test_each_worker_handles_what_it_owns_and_passes_on_the_rest(batched: bool) -> None:
    """Two workers' transports read one listener; each request is handled once, by its
    owner, and answered from the listener's address: with recvmmsg/sendmmsg
    (sipdrill_mmsg) and with the recvfrom/sendto fallback."""
    from sipdrill.sip.transport import SipTransport, TransportLimits, _mmsg

    if batched and _mmsg is None:
        pytest.skip("sipdrill_mmsg is not installed (pip install ext/mmsg)")

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((HOST, 0))
    where = listener.getsockname()
    # Each worker holds its own descriptor of the one socket, as after fork().
    shared = [listener, socket.socket(fileno=os.dup(listener.fileno()))]
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    senders = [sender for sender, _ in pairs]
    handled: list[tuple[int, bytes]] = []
    transports: list[SipTransport] = []

    def handler_for(me: int):
        def handle(rx) -> None:
            call_id = rx.message.headers["Call-ID"].encode()
            handled.append((me, call_id))
            transports[me].send(rx.flow, b"answer " + call_id)

        return handle

    for me in range(2):
        transport = SipTransport(handler_for(me), limits=TransportLimits(udp_batch_io=batched))
        transports.append(transport)
        transport.attach_shard(shared[me], pairs[me][1], senders, me)
        assert transport._udp[-1].batched == batched  # type: ignore[attr-defined]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((HOST, 0))
    client.setblocking(False)
    sent = [register(f"<sip:u{i}@lab.local>", call_id=str(i)) for i in range(40)]
    loop = asyncio.get_running_loop()
    answers: list[tuple[bytes, tuple[str, int]]] = []
    try:
        for data in sent:
            client.sendto(data, where)
        deadline = loop.time() + 5
        while len(answers) < len(sent) and loop.time() < deadline:
            try:
                answers.append(client.recvfrom(65536))
            except BlockingIOError:
                await asyncio.sleep(0.01)
    finally:
        for transport in transports:
            await transport.close()
        client.close()
        for sock in [*shared, *(end for pair in pairs for end in pair)]:
            sock.close()
    assert sorted(call_id for _, call_id in handled) == sorted(str(i).encode() for i in range(40))
    for me, call_id in handled:
        assert shard_of(sent[int(call_id)], 2) == me
    assert {me for me, _ in handled} == {0, 1}
    assert sum(t.stats["forwarded"] for t in transports) > 0
    assert len(answers) == len(sent)
    assert all(addr == where for _, addr in answers)


def _bindings_in(response: bytes) -> int:
    return sum(1 for line in response.split(b"\r\n") if line.lower().startswith(b"contact:"))


@pytest.mark.slow
async def test_two_workers_keep_one_location_service_per_aor(tmp_path: Path, sip_harness) -> None:
    """Two devices of each user, each from a port of its own: the 200 lists both, always.

    With SO_REUSEPORT (the sharing by source address used before) the two
    devices of a user land in different workers half the time, so the
    second 200 lists one binding; over 16 users that all but surely shows.
    """
    async with sip_harness.registrar_process(tmp_path, workers=2) as reg:
        for i in range(16):
            devices = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
            try:
                answers = []
                for d, sock in enumerate(devices):
                    sock.bind((HOST, 0))
                    sock.settimeout(5)
                    me = sock.getsockname()[1]
                    request = register(
                        f"<sip:u{i}@lab.local>", via_port=me, contact_port=me, call_id=f"{i}-{d}"
                    )
                    sock.sendto(request, (HOST, reg.udp))
                    answers.append(await asyncio.to_thread(sock.recv, 65536))
            finally:
                for sock in devices:
                    sock.close()
            assert all(a.startswith(b"SIP/2.0 200") for a in answers), answers
            assert _bindings_in(answers[1]) == 2, answers[1].decode()
