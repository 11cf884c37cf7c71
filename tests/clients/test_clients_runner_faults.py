"""The runner against misbehaving peers on 127.0.0.1: one endpoint's trouble stays its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from clients_lab import HOST

from sipdrill.clients.endpoint import ClientProfile, Endpoint, Output, Target, UserSpec
from sipdrill.clients.events import Mode
from sipdrill.clients.runner import ClientRunner, RunnerConfig
from sipdrill.sip.framing import FramerRole, KeepAlivePing, MessageBytes, StreamFramer
from sipdrill.sip.keepalive import KeepAliveConfig
from sipdrill.sip.message import make_response, parse_message, serialize
from sipdrill.sip.tls import client_context, ensure_server_cert, server_context
from sipdrill.sip.transaction import TimerConfig
from sipdrill.sip.transport import Kind

Answer = Callable[[bytes], bytes | None]


class _Peer(asyncio.Protocol):
    def __init__(self, answer: Answer, pong: bool, conns: list[asyncio.Transport]) -> None:
        self.answer = answer
        self.pong = pong
        self.conns = conns
        self.framer = StreamFramer(role=FramerRole.SERVER)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conns.append(transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.framer.feed(data):
            if isinstance(event, KeepAlivePing) and self.pong:
                self.transport.write(b"\r\n")
            elif isinstance(event, MessageBytes):
                out = self.answer(event.data)
                if out == b"":
                    self.transport.close()  # hang up
                elif out is not None:
                    self.transport.write(out)


def register_ok(data: bytes) -> bytes | None:
    request = parse_message(data)
    if request.headers.get("CSeq", "").endswith("REGISTER"):
        response = make_response(request, 200)
        response.headers.add("Contact", f"{request.headers.get('Contact')};expires=600")
        return serialize(response)
    return None


@contextlib.asynccontextmanager
async def tls_peer(tls_dir: Path, answer: Answer, *, pong: bool = True) -> AsyncIterator[int]:
    cert = ensure_server_cert(tls_dir, "peer", dns_names=["peer.lab.local"], ip_addresses=[HOST])
    conns: list[asyncio.Transport] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: _Peer(answer, pong, conns), HOST, 0, ssl=server_context(cert)
    )
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for t in conns:
            t.abort()
        await server.wait_closed()
        await asyncio.sleep(0)


def runner_to(port: int, tls_dir: Path, users: int = 3, **profile: object) -> ClientRunner:
    target = Target("peer.lab.local", port, Kind.TLS, HOST, "static")
    prof = ClientProfile(domain="lab.local", static_targets=(target,), **profile)  # type: ignore[arg-type]
    return ClientRunner(
        RunnerConfig(
            profile=prof,
            users=[UserSpec(uri=f"sip:u{i}@lab.local") for i in range(users)],
            ssl_context=client_context(tls_dir / "ca.pem"),
            ramp=0,
            seed=3,
            fault_pause=0.2,
        )
    )


async def until(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_missing_pong_fails_the_flow_over_real_tls(tmp_path: Path) -> None:
    async with tls_peer(tmp_path, register_ok, pong=False) as port:
        runner = runner_to(
            port,
            tmp_path,
            keepalive=KeepAliveConfig(pong_timeout=0.5, default_interval=(0.3, 0.3)),
        )
        async with runner:
            runner.start()
            await until(lambda: len(runner.events.query(kind="TargetFailed")) >= 3, 5)
            failed = runner.events.query(kind="TargetFailed")
    assert {e["failure"] for e in failed} == {"pong-timeout"}
    registered = runner.events.query(kind="Registered")
    first = min(e["monotonic"] for e in registered)
    first_failure = min(e["monotonic"] for e in failed)
    assert 0.7 <= first_failure - first <= 1.5  # ping at 0.3 s, then 0.5 s without a pong


async def test_malformed_answers_end_in_a_timeout_not_a_crash(tmp_path: Path) -> None:
    garbage = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"  # no Via, From, To...
    async with tls_peer(tmp_path, lambda _data: garbage) as port:
        runner = runner_to(port, tmp_path, timers=TimerConfig(t1=0.02))
        async with runner:
            runner.start()
            await until(lambda: all(ep.mode is Mode.BACKING_OFF for ep in runner.endpoints), 5)
            failed = runner.events.query(kind="TargetFailed")
    assert {e["failure"] for e in failed} == {"transaction-timeout"}
    assert runner.faults == 0


async def test_a_peer_that_hangs_up_on_every_register(tmp_path: Path) -> None:
    async with tls_peer(tmp_path, lambda _data: b"") as port:
        runner = runner_to(port, tmp_path, users=2)
        async with runner:
            runner.start()
            await until(lambda: runner.counts()["by_mode"]["BackingOff"] == 2, 5)
    assert {e["failure"] for e in runner.events.query(kind="TargetFailed")} == {"reset"}
    assert runner.faults == 0


async def test_an_endpoint_that_raises_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_peer(tmp_path, register_ok) as port:
        runner = runner_to(port, tmp_path, users=3)
        async with runner:
            calls = {"n": 0}
            original = Endpoint.connected

            def flaky(self: Endpoint, conn: int, local: tuple[str, int]) -> list[Output]:
                if self.user.uri == "sip:u1@lab.local" and calls["n"] == 0:
                    calls["n"] += 1
                    raise RuntimeError("boom")
                return original(self, conn, local)

            monkeypatch.setattr(Endpoint, "connected", flaky)
            runner.start()
            await until(lambda: runner.counts()["by_mode"]["FullService"] == 3, 5)
            faults = runner.events.query(kind="EndpointFault")
    assert runner.faults == 1
    assert faults[0]["user"] == "sip:u1@lab.local" and faults[0]["detail"] == "boom"


async def test_refused_connections_back_off_and_the_process_keeps_going(tmp_path: Path) -> None:
    ensure_server_cert(tmp_path, "peer", dns_names=["peer.lab.local"])
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        runner = runner_to(port, tmp_path, users=5)
        async with runner:
            runner.start()
            await until(lambda: runner.counts()["by_mode"]["BackingOff"] == 5, 5)
    failed = runner.events.query(kind="TargetFailed")
    assert {e["failure"] for e in failed} == {"refused"}
    retries = runner.events.query(kind="RetryScheduled")
    assert all(30 <= e["delay"] <= 60 for e in retries)


async def test_ramp_spreads_sign_ins(tmp_path: Path) -> None:
    async with tls_peer(tmp_path, register_ok) as port:
        runner = runner_to(port, tmp_path, users=10)
        runner.config.ramp = 20.0
        async with runner:
            runner.start()
            await until(lambda: runner.counts()["by_mode"]["FullService"] == 10, 5)
            starts = [
                e["monotonic"]
                for e in runner.events.query(kind="ModeChanged")
                if e["old"] == "SignedOut"
            ]
    assert len(starts) == 10
    assert 0.40 <= max(starts) - min(starts) <= 1.0  # 9 gaps of 50 ms
