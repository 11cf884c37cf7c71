"""The pool with its TLS on worker processes (``tls_workers``): clients see the
same pool, the SIP state stays in the pool's one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pool_harness import ALICE, BOB, P1, P2, TAKEOVER, two_pools, wait_for


async def test_registration_over_a_tls_worker(tmp_path: Path) -> None:
    async with two_pools(tmp_path, tls_workers=2) as lab:
        pool = lab.pools[P1]
        ua = await lab.agent(ALICE, P1)
        r = await ua.register()
        assert r.code == 200 and r.headers.get("X-Sipdrill-Mode") == "full"
        assert (await lab.status(P1))["registrations"]["full"] == 1
        # The binding records the client's own address, not the worker's pipe.
        assert ua.flow is not None
        (binding,) = pool.sip.registrations.registrar.lookup(ALICE)
        assert binding.source.remote == ua.flow.local  # type: ignore[attr-defined]
        assert binding.source.kind.value == "tls"  # type: ignore[attr-defined]
        # A second client of the same user: both bindings in the one registrar,
        # whichever worker took each connection.
        other = await lab.agent(ALICE, P1)
        assert (await other.register()).code == 200
        r = await ua.register()
        assert len(r.headers.getlist("Contact")) == 2
        front = pool.sip._tls_front
        assert front is not None and front.adopted >= 2  # and pool2's heartbeats


async def test_the_client_closing_its_flow_reaches_the_pool(tmp_path: Path) -> None:
    async with two_pools(tmp_path, tls_workers=1) as lab:
        ua = await lab.agent(ALICE, P1)
        assert (await ua.register()).code == 200
        pool = lab.pools[P1]
        assert pool.sip.endpoint.transport.connection_count >= 1
        before = pool.sip.endpoint.transport.connection_count
        ua.disconnect()

        async def gone() -> bool:
            return pool.sip.endpoint.transport.connection_count == before - 1

        await wait_for(gone, 5, step=0.1)


async def test_requests_from_the_pool_and_its_closing_reach_the_client(tmp_path: Path) -> None:
    """The nudge (a NOTIFY the pool sends on the client's flow) goes out through
    the worker, and so does the pool closing the flow when it is ignored."""
    async with two_pools(
        tmp_path, detection=TAKEOVER, nudge_grace=0.5, tls_workers=2
    ) as lab:
        await lab.stop(P1)
        ua = await lab.agent(BOB, P2)

        async def taken() -> bool:
            return (await ua.register()).code == 200

        await wait_for(taken, 5, step=0.2)
        await lab.start(P1)
        await ua.next_request("NOTIFY", within=6)
        await asyncio.wait_for(ua.closed.wait(), 3)
        assert (await lab.status(P2))["registrations"]["resiliency"] == 0


async def test_the_partner_is_trusted_through_the_workers(tmp_path: Path) -> None:
    """The workers pass the names of the certificate they verified with the flow:
    the partner's heartbeats, received through them, count (mutual TLS)."""
    async with two_pools(tmp_path, tls_workers=1) as lab:

        async def heard() -> bool:
            return all(lab.pools[p].sip.heartbeats["received"] > 0 for p in (P1, P2))

        await wait_for(heard, 5, step=0.1)

        async def both_up() -> bool:  # (P1 may have called P2 down while P2 started)
            states = [(await lab.status(p))["partner"]["state"] for p in (P1, P2)]
            return states == ["up", "up"]

        await wait_for(both_up, 10, step=0.2)
        for fqdn in (P1, P2):
            claims = lab.pools[fqdn].metrics.registry.get_sample_value(
                "sipdrill_pool_untrusted_pool_claims_total", {"reason": "client"}
            )
            assert not claims
