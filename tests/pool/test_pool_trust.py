"""Who a pool trusts as a pool, and as its partner: the certificate of the
TLS connection a request came on (mutual TLS with the lab CA), never a header.

Each test plays the other side with a :class:`UaStack` whose TLS context
presents a chosen certificate (or none), against real pools on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pool_harness import ALICE, BOB, CAROL, P1, P2, P3, TAKEOVER, Lab, two_pools, wait_for

from sipdrill.pool.sip_context import POOL_HEADER, SENDER_MODE_HEADER
from sipdrill.pool.sip_ua import RequestFailed, UaStack, UserAgent
from sipdrill.sip.tls import LabCA, ServiceCert, client_context
from sipdrill.sip.transport import TransportError


def claims(lab: Lab, fqdn: str, reason: str) -> float:
    value = lab.pools[fqdn].metrics.registry.get_sample_value(
        "sipdrill_pool_untrusted_pool_claims_total", {"reason": reason}
    )
    assert value is not None
    return value


def received(lab: Lab, fqdn: str) -> int:
    return lab.pools[fqdn].sip.heartbeats["received"]


async def partner_state(lab: Lab, fqdn: str) -> str:
    state: str = (await lab.status(fqdn))["partner"]["state"]
    return state


def state_is(lab: Lab, fqdn: str, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await partner_state(lab, fqdn) == state

    return check


@contextlib.asynccontextmanager
async def presenting(
    lab: Lab, cert: ServiceCert | None, aor: str = BOB
) -> AsyncIterator[UserAgent]:
    """A user agent connected to P1 over TLS that presents ``cert`` (None: no
    certificate, like the lab's clients)."""
    async with UaStack(client_context(lab.ca / "ca.pem", cert=cert)) as stack:
        ua = stack.agent(aor)
        host, port = lab.sip_target(P1)
        await ua.connect(host, port, P1)
        yield ua


def options(ua: UserAgent, *headers: tuple[str, str]) -> asyncio.Task[None]:
    """OPTIONS to P1 every 0.1 s (faster than the partner's heartbeats), each answered 200."""

    async def loop() -> None:
        while True:
            r = await ua.send(ua.build("OPTIONS", f"sip:{P1}:5061;transport=tls", headers=headers))
            assert r.code == 200
            await asyncio.sleep(0.1)

    return asyncio.get_running_loop().create_task(loop())


async def stop_quietly(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_the_partner_is_known_by_its_certificate(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        # The pools' own heartbeats, over mutual TLS, count both ways.
        await wait_for(lambda: received(lab, P1) > 0 and received(lab, P2) > 0, 5)
        await lab.stop(P2)
        # A certificate the lab CA issued for P2 is P2, from whoever presents
        # it: its OPTIONS (no header at all) keep P1's partner up.
        cert = LabCA.load(lab.ca).issue_server("test-pool2", pool_fqdn=P2)
        async with presenting(lab, cert) as ua:
            before = received(lab, P1)
            task = options(ua)
            try:
                await asyncio.sleep(2 * TAKEOVER)
                assert not task.done()
                assert await partner_state(lab, P1) == "up"
                assert received(lab, P1) >= before + 10
            finally:
                await stop_quietly(task)
        assert claims(lab, P1, "not-partner") == 0
        assert claims(lab, P1, "client") == 0


async def test_a_client_sending_the_pool_header_gets_no_partner_treatment(
    tmp_path: Path,
) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER) as lab:
        await wait_for(lambda: received(lab, P1) > 0, 5)
        await lab.stop(P2)
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        async with presenting(lab, None) as ua:
            before = received(lab, P1)
            task = options(ua, (POOL_HEADER, P2))
            try:
                # The client's "heartbeats" count for nothing: P1 sees its
                # partner go down on time, as if the client were not there.
                await wait_for(state_is(lab, P1, "down"), 6, step=0.02)
                assert loop.time() - stopped <= 3.5
                assert not task.done()
            finally:
                await stop_quietly(task)
        assert received(lab, P1) == before
        assert claims(lab, P1, "client") >= 5
        metrics = (await lab.get(P1, "/metrics")).text
        assert 'sipdrill_pool_untrusted_pool_claims_total{reason="client"}' in metrics


async def test_a_client_pretending_to_be_a_pool_is_answered_as_a_client(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        alice = await lab.registered(ALICE, P1)
        carol = await lab.registered(CAROL, P2)
        pretend = [(POOL_HEADER, P2), (SENDER_MODE_HEADER, "full")]
        async with presenting(lab, None, aor="sip:mallory@lab.local") as bob:
            # Back-end presence is for pools: a stranger is told to register.
            sub = bob.build(
                "SUBSCRIBE", ALICE,
                headers=[*pretend, ("Event", "presence"), ("Expires", "60"),
                             ("Contact", bob.contact)],
            )
            r = await bob.send(sub)
            assert (r.code, r.phrase) == (403, "Forbidden: register with this pool first")
            # NOTIFY is taken from pools only.
            notify = bob.build("NOTIFY", ALICE, headers=[*pretend, ("Event", "presence")])
            r = await bob.send(notify)
            assert (r.code, r.phrase) == (403, "Forbidden: this pool accepts NOTIFY from pools")
        # A registered client's MESSAGE with the headers is relayed as any
        # client's (a pool's would end here, 480: one pool-to-pool hop), and
        # the headers it made up do not travel on.
        msg = alice.build(
            "MESSAGE", CAROL, headers=[*pretend, ("Content-Type", "text/plain")], body=b"hi"
        )
        assert (await alice.send(msg)).code == 200
        got = await carol.next_request("MESSAGE")
        assert got.body == b"hi"
        assert got.headers.get(POOL_HEADER) is None
        assert got.headers.get(SENDER_MODE_HEADER) == "full"  # P1 says so, of Alice
        assert claims(lab, P1, "client") == 3


async def test_a_pool_that_is_not_the_partner_is_refused_as_partner(tmp_path: Path) -> None:
    async with two_pools(tmp_path, detection=TAKEOVER, third_pool=True) as lab:
        await wait_for(lambda: received(lab, P1) > 0, 5)
        await lab.stop(P2)
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        # P3 is a pool of the lab, unpaired: the CA issued its certificate.
        cert = LabCA.load(lab.ca).issue_server("test-pool3", pool_fqdn=P3)
        async with presenting(lab, cert) as ua:
            before = received(lab, P1)
            task = options(ua, (POOL_HEADER, P2))  # even saying it is P2
            try:
                await wait_for(state_is(lab, P1, "down"), 6, step=0.02)
                assert loop.time() - stopped <= 3.5
                assert not task.done()
            finally:
                await stop_quietly(task)
            assert received(lab, P1) == before
            # Still a pool: trusted as one for what any pool may send (a NOTIFY
            # of a subscription P1 does not hold: 481, where a client gets 403).
            r = await ua.send(ua.build("NOTIFY", ALICE, headers=[("Event", "presence")]))
            assert r.code == 481
        assert claims(lab, P1, "not-partner") >= 5
        assert claims(lab, P1, "wrong-pool") >= 5
        assert claims(lab, P1, "client") == 0


async def test_a_certificate_from_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    async with two_pools(tmp_path) as lab:
        await wait_for(lambda: received(lab, P1) > 0, 5)
        await lab.stop(P2)  # so that every OPTIONS P1 answers from now on is ours
        forged = LabCA.ensure(tmp_path / "other-ca").issue_server("pool2", pool_fqdn=P2)
        requests_before = lab.pools[P1].metrics.registry.get_sample_value(
            "sipdrill_pool_requests_total", {"method": "OPTIONS", "status": "2xx"}
        )
        # TLS 1.3: the client's side of the handshake may finish before the
        # pool rejects its certificate; then the refusal closes the connection
        # and what it sent is never answered.
        with pytest.raises((TransportError, RequestFailed)):
            async with presenting(lab, forged) as ua:
                await ua.send(ua.build("OPTIONS", f"sip:{P1}", headers=[(POOL_HEADER, P2)]),
                              give_up_after=3)
        after = lab.pools[P1].metrics.registry.get_sample_value(
            "sipdrill_pool_requests_total", {"method": "OPTIONS", "status": "2xx"}
        )
        assert after == requests_before
        assert claims(lab, P1, "client") == 0
