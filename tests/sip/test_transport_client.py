"""SipClient and Registration against sipdrill's own registrar on loopback (UDP, TCP, TLS)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipdrill.sip.client import (
    ClientTimeout,
    Registration,
    RegistrationError,
    RequestFailed,
    SipClient,
    Target,
)
from sipdrill.sip.server import ListenSpec, RegistrarConfig, SipService, build_registrar_service
from sipdrill.sip.tls import client_context, ensure_server_cert, server_context
from sipdrill.sip.transaction import TimerConfig
from sipdrill.sip.transport import Kind

HOST = "127.0.0.1"


@pytest.fixture
async def registrar(tmp_path: Path) -> AsyncIterator[tuple[SipService, dict[Kind, int]]]:
    cert = ensure_server_cert(
        tmp_path, "registrar", dns_names=["pool1.lab.local"], ip_addresses=[HOST]
    )
    svc = build_registrar_service(
        RegistrarConfig(
            "lab.local",
            [],
            users={"alice": "wonderland"},
            expires_min=1,
            expires_default=60,
            expires_max=120,
            digest_algorithms=("SHA-256", "MD5"),
        )
    )
    bound = await svc.start(
        [
            ListenSpec(Kind.UDP, HOST, 0),
            ListenSpec(Kind.TCP, HOST, 0),
            ListenSpec(Kind.TLS, HOST, 0),
        ],
        ssl_context=server_context(cert),
    )
    try:
        yield svc, {kind: addr[1] for kind, addr in bound}
    finally:
        await svc.close()


@pytest.mark.parametrize("kind", [Kind.UDP, Kind.TCP, Kind.TLS])
async def test_register_with_digest_refresh_and_unregister(
    registrar, tmp_path: Path, kind: Kind
) -> None:
    svc, ports = registrar
    ctx = client_context(tmp_path / "ca.pem") if kind is Kind.TLS else None
    target = Target(kind, HOST, ports[kind], "pool1.lab.local", ctx)
    async with SipClient() as client:
        reg = Registration(client, "sip:alice@lab.local", target, password="wonderland", expires=30)
        await reg.register()
        assert reg.granted == 30
        (binding,) = svc.registrar.lookup("sip:alice@lab.local")
        assert binding.source.kind is kind
        assert binding.contact.uri.parameters.get("transport") == kind.value
        await reg.register()
        assert len(svc.registrar.lookup("sip:alice@lab.local")) == 1
        assert [c.uri.host for c in await reg.query()] == [HOST]
        await reg.unregister()
        assert svc.registrar.lookup("sip:alice@lab.local") == []


async def test_interval_too_brief_is_retried_with_min_expires(registrar) -> None:
    svc, ports = registrar
    svc.registrar.expiry_min = 20  # type: ignore[union-attr]
    async with SipClient() as client:
        reg = Registration(
            client,
            "sip:alice@lab.local",
            Target(Kind.UDP, HOST, ports[Kind.UDP]),
            password="wonderland",
            expires=5,
        )
        await reg.register()
        assert reg.granted == 20


async def test_bad_password_and_unknown_user(registrar) -> None:
    _, ports = registrar
    async with SipClient() as client:
        for user, password in (("alice", "guess"), ("mallory", "x")):
            reg = Registration(
                client,
                f"sip:{user}@lab.local",
                Target(Kind.TCP, HOST, ports[Kind.TCP]),
                password=password,
            )
            with pytest.raises(RegistrationError) as info:
                await reg.register()
            assert info.value.status_code == 401


async def test_automatic_refresh_keeps_the_binding(registrar) -> None:
    svc, ports = registrar
    async with SipClient() as client:
        reg = Registration(
            client,
            "sip:alice@lab.local",
            Target(Kind.UDP, HOST, ports[Kind.UDP]),
            password="wonderland",
            expires=1,
            refresh_ratio=0.5,
        )
        await reg.register()
        reg.start_refresh()
        await asyncio.sleep(2.2)
        assert reg.registered_count >= 3
        assert (
            len(svc.registrar.lookup("sip:alice@lab.local", asyncio.get_running_loop().time())) == 1
        )
        await reg.unregister()


async def test_tls_name_mismatch_fails_the_request(registrar, tmp_path: Path) -> None:
    _, ports = registrar
    ctx = client_context(tmp_path / "ca.pem")
    async with SipClient() as client:
        reg = Registration(
            client,
            "sip:alice@lab.local",
            Target(Kind.TLS, HOST, ports[Kind.TLS], "sip.lab.local", ctx),
            password="wonderland",
        )
        with pytest.raises(RequestFailed, match="certificate"):
            await reg.register()


async def test_no_answer_is_a_timeout() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((HOST, 0))
    try:
        async with SipClient(timers=TimerConfig(t1=0.02, t2=0.1)) as client:
            reg = Registration(
                client, "sip:alice@lab.local", Target(Kind.UDP, HOST, silent.getsockname()[1])
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ClientTimeout):
                await reg.register()
            # Timer F = 64*T1 = 1.28 s.
            assert 1.0 < loop.time() - started < 4.0
    finally:
        silent.close()
