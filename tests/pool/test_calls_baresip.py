"""baresip, a SIP phone nobody here wrote, calls through the pools: registered
on pool1 (over TCP), it calls a simulated client (sipdrill.clients) registered
on pool2 over TLS, and answers a call that another simulated client places.

baresip runs headless: no sound card (an 8 kHz silent WAV as its microphone),
driven through its ctrl_tcp module (JSON netstrings on a loopback port):
``dial``, ``hangup``, and the CALL_* events it reports. Debian: apt package
``baresip`` (1.0.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pool_harness import ALICE, CAROL, ERIN, P1, P2, Lab, two_pools, wait_for
from procutil import free_port, stop_process

from sipdrill.clients.endpoint import ClientProfile, Target, UserSpec, WorkloadKind
from sipdrill.clients.events import CallAnswered, CallEnded, CallFailed, ClientEvent
from sipdrill.clients.metrics import EventLog
from sipdrill.clients.runner import ClientRunner, RunnerConfig
from sipdrill.sip.tls import client_context
from sipdrill.sip.transport import Kind

pytestmark = [pytest.mark.interop]


@pytest.fixture(autouse=True)
def _need_baresip() -> None:
    if shutil.which("baresip") is None:
        pytest.skip("baresip is not installed (Debian package: baresip); interop test skipped")


def netstring(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj).encode()
    return str(len(data)).encode() + b":" + data + b","


class Baresip:
    """One baresip process and its control connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict[str, Any]] = []

    async def command(self, command: str, params: str = "") -> None:
        self.writer.write(netstring({"command": command, "params": params, "token": command}))
        await self.writer.drain()

    async def event(self, kind: str, within: float = 10.0) -> dict[str, Any]:
        """The next event of ``kind`` (CALL_ESTABLISHED, CALL_CLOSED, ...)."""
        async with asyncio.timeout(within):
            while True:
                head = await self.reader.readuntil(b":")
                body = await self.reader.readexactly(int(head[:-1]) + 1)
                message: dict[str, Any] = json.loads(body[:-1])
                if message.get("event"):
                    self.events.append(message)
                    if message.get("type") == kind:
                        return message


@contextlib.asynccontextmanager
async def baresip(tmp: Path, aor: str, proxy: tuple[str, int]) -> AsyncIterator[Baresip]:
    """baresip registered as ``aor`` through ``proxy`` (TCP), answering calls at once."""
    cfg = tmp / "baresip"
    cfg.mkdir()
    with wave.open(str(cfg / "silence.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)  # baresip's aufile takes 8 kHz only
        w.writeframes(b"\0\0" * 8000)
    ctrl = free_port("127.0.0.1")
    (cfg / "config").write_text(
        "poll_method epoll\n"
        "sip_listen 127.0.0.1:0\n"
        "sip_trans_def tcp\n"
        f"audio_source aufile,{cfg / 'silence.wav'}\n"
        "module_path /usr/lib/baresip/modules\n"
        "module g711.so\nmodule aufile.so\n"
        "module_app account.so\nmodule_app menu.so\nmodule_app ctrl_tcp.so\n"
        f"ctrl_tcp_listen 127.0.0.1:{ctrl}\n"
    )
    host, port = proxy
    (cfg / "accounts").write_text(
        f'<{aor};transport=tcp>;outbound="sip:{host}:{port};transport=tcp";regint=600;'
        "answermode=auto\n"
    )
    (cfg / "contacts").write_text("")
    log = (tmp / "baresip.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        "baresip", "-f", str(cfg), "-s",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                return await asyncio.open_connection("127.0.0.1", ctrl)
            except OSError:
                return None

        conn = None
        for _ in range(100):
            conn = await connect()
            if conn is not None or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert conn is not None, f"baresip did not start: {(tmp / 'baresip.log').read_text()}"
        bs = Baresip(*conn)
        try:
            yield bs
        finally:
            bs.writer.close()
    finally:
        await stop_process(proc)
        log.close()


@contextlib.asynccontextmanager
async def simulated(
    lab: Lab, user: str, pool: str, profile: dict[str, Any] | None = None
) -> AsyncIterator[tuple[ClientRunner, list[ClientEvent]]]:
    """A lab client (sipdrill.clients) for ``user``, registered on ``pool`` over TLS."""
    host, port = lab.sip_target(pool)
    events: list[ClientEvent] = []
    log = EventLog()
    log.listeners.append(lambda _seq, event: events.append(event))
    config = RunnerConfig(
        profile=ClientProfile(
            domain="lab.local",
            static_targets=(Target(pool, port, Kind.TLS, host, "test"),),
            **(profile or {}),
        ),
        users=[UserSpec(user, pool)],
        ssl_context=client_context(lab.ca / "ca.pem"),
        ramp=0,
        seed=7,
    )
    runner = ClientRunner(config, events=log)
    await runner.open()
    try:
        runner.start()
        await wait_for(lambda: runner.counts()["by_mode"]["FullService"] == 1, 10)
        yield runner, events
    finally:
        await runner.close()


async def calls_answered(lab: Lab, pool: str) -> float:
    text = (await lab.get(pool, "/metrics")).text
    for row in text.splitlines():
        if row.startswith('sipdrill_pool_calls_total{result="answered"}'):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def test_baresip_calls_a_simulated_client_and_answers_one(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        p1_host, _ = lab.sip_target(P1)
        p1_tcp = lab.topology.pool(P1).sip_tcp_port
        async with baresip(tmp_path, ALICE, (p1_host, p1_tcp)) as phone:

            async def alice_registered() -> bool:
                return (await lab.status(P1))["registrations"]["full"] == 1

            await wait_for(alice_registered, 10)

            # baresip on pool1 calls carol, a simulated client on pool2.
            async with simulated(lab, CAROL, P2):
                await phone.command("dial", "sip:carol@lab.local")
                up = await phone.event("CALL_ESTABLISHED")
                assert up["direction"] == "outgoing"
                await asyncio.sleep(0.5)
                await phone.command("hangup")
                closed = await phone.event("CALL_CLOSED")
                assert closed["id"] == up["id"]
            assert await calls_answered(lab, P1) == 1
            assert await calls_answered(lab, P2) == 1

            # erin, a simulated client on pool2 with the call workload, calls
            # alice: baresip answers, and erin hangs up after the hold time.
            workload = {"workload": (WorkloadKind.CALL,), "call_fraction": 1.0,
                        "call_interval": 0.5, "call_hold": 0.5, "call_targets": (ALICE,)}
            async with simulated(lab, ERIN, P2, workload) as (_, events):
                await wait_for(lambda: any(isinstance(e, CallEnded) for e in events), 10)
            incoming = await phone.event("CALL_CLOSED")
            assert incoming["direction"] == "incoming"
            answered = [e for e in events if isinstance(e, CallAnswered)]
            assert answered and answered[0].setup < 2.0
            ended = [e for e in events if isinstance(e, CallEnded)]
            assert ended[0].ok, ended[0]  # baresip answered the BYE
            assert not [e for e in events if isinstance(e, CallFailed)]
