"""The runner on loopback: real TLS flows to fake pools, the real lab DNS server."""

from __future__ import annotations

import io
import json
import ssl
from pathlib import Path

import pytest
from clients_lab import HOST, Lab, lab_dns, runner_for, wait_for

from sipdrill.clients.endpoint import WorkloadKind
from sipdrill.clients.events import Failure, Mode
from sipdrill.clients.population import profile_for
from sipdrill.dns.zone import RecordChange
from sipdrill.sip.tls import LabCA, client_context


async def test_endpoints_register_fail_over_and_come_back(lab: Lab) -> None:
    stream = io.StringIO()
    runner = runner_for(lab, ["pool1.lab.local:*"], stream)
    n = len(runner.config.users)
    assert n == 7  # alice and the p1u group
    async with runner:
        runner.start()
        await wait_for(
            lambda: runner.counts()["by_pool"].get("pool1.lab.local", {}).get("FullService") == n,
            10,
            "all in full service on pool1",
        )
        assert lab.pool1.registers == n

        # Site 1 is lost: the backup takes pool1's users in resiliency mode.
        lab.pool2.partner_users = "resiliency"
        await lab.pool1.stop()
        took = await wait_for(
            lambda: (
                runner.counts()["by_pool"].get("pool2.lab.local", {}).get("ResiliencyMode") == n
            ),
            10,
            "all in resiliency mode on pool2",
        )
        assert took < 5

        # Site 1 is back; the backup sends its partner's users home.
        await lab.pool1.start()
        lab.pool2.partner_users = "redirect"
        lab.pool2.kick()
        await wait_for(
            lambda: runner.counts()["by_pool"].get("pool1.lab.local", {}).get("FullService") == n,
            10,
            "all back in full service on pool1",
        )
        metrics = runner.metrics.render().decode()
        assert runner._resolver is not None
        queries = runner._resolver.queries
    assert runner.faults == 0
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    # One uncached DnsLookup event per query the DNS server got: n endpoints signing
    # in at once share one query per name (they claimed one each before).
    uncached = [e for e in events if e["event"] == "DnsLookup" and not e["cached"]]
    assert 0 < len(uncached) == queries < n * 3
    kinds = {e["event"] for e in events}
    assert {"ModeChanged", "Registered", "TargetFailed", "DnsLookup"} <= kinds
    alice = [e for e in events if e["user"] == "sip:alice@lab.local"]
    registered = [e for e in alice if e["event"] == "Registered" and not e["refresh"]]
    assert [(r["pool"], r["mode"]) for r in registered] == [
        ("pool1.lab.local", "FullService"),
        ("pool2.lab.local", "ResiliencyMode"),
        ("pool1.lab.local", "FullService"),
    ]
    assert registered[1]["outage"] is not None and registered[1]["outage"] < 5
    assert registered[1]["previous_pool"] == "pool1.lab.local"
    failures = {e["failure"] for e in alice if e["event"] == "TargetFailed"}
    assert {Failure.RESET.value, Failure.REFUSED.value} <= failures
    for e in events:
        assert e["wall"] > 1.6e9 and e["monotonic"] > 0 and e["seq"] > 0
    assert (
        'sipdrill_client_failovers_total{from_pool="pool1.lab.local",to_pool="pool2.lab.local"} 7.0'
        in metrics
    )
    assert "sipdrill_client_time_to_reconnect_seconds_count 14.0" in metrics
    assert all(ep.mode is Mode.SIGNED_OUT for ep in runner.endpoints)  # close() signs out


async def test_tls_resumed_on_the_same_pool_full_on_failover(lab: Lab) -> None:
    """As SChannel: a reconnect to the same pool resumes the TLS session that pool
    gave; the failover to the backup pool is a full handshake."""
    ctx = client_context(lab.tls / "ca.pem")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # Lync 2013's (the CLI's default)
    runner = runner_for(lab, ["pool1.lab.local:*"], ssl_context=ctx)
    n = len(runner.config.users)
    p1, p2 = "pool1.lab.local", "pool2.lab.local"

    def on(pool: str, mode: str) -> bool:
        return runner.counts()["by_pool"].get(pool, {}).get(mode) == n

    async with runner:
        runner.start()
        await wait_for(lambda: on(p1, "FullService"), 10, "all on pool1")
        assert (runner.stats["tls_full"], runner.stats["tls_resumed"]) == (n, 0)
        # pool1 drops every flow: each endpoint reconnects to pool1 and resumes.
        lab.pool1.kick()
        await wait_for(lambda: runner.stats["tls_resumed"] == n, 10, "n resumed handshakes")
        await wait_for(lambda: on(p1, "FullService"), 10, "all back on pool1")
        assert runner.stats["tls_full"] == n
        # Site 1 is lost: the backup pool is another server, a full handshake each.
        lab.pool2.partner_users = "resiliency"
        await lab.pool1.stop()
        await wait_for(lambda: on(p2, "ResiliencyMode"), 10, "all on pool2")
        metrics = runner.metrics.render().decode()
    assert runner.stats["tls_resumed"] == n
    line = 'sipdrill_client_tls_handshakes_total{{kind="{}",server="{}"}} {}'
    assert line.format("resumed", p1, f"{n}.0") in metrics
    assert line.format("full", p1, f"{n}.0") in metrics
    assert line.format("full", p2, f"{n}.0") in metrics
    assert 'kind="resumed",server="pool2.lab.local"' not in metrics


async def test_a_user_homed_elsewhere_is_redirected_home(lab: Lab) -> None:
    runner = runner_for(lab, ["pool2.lab.local:bob"])
    async with runner:
        runner.start()
        await wait_for(
            lambda: runner.counts()["by_pool"].get("pool2.lab.local", {}).get("FullService") == 1,
            10,
            "bob on his home pool",
        )
        assert lab.pool1.registers == 1 and lab.pool2.registers == 1
    kinds = [e["event"] for e in runner.events.query(user="sip:bob@lab.local")]
    assert "Redirected" in kinds
    assert lab.pool2.registers == 2  # the REGISTER with Expires 0 when signing out


async def test_workload_over_real_flows(lab: Lab) -> None:
    runner = runner_for(lab, ["pool1.lab.local:alice"])
    runner.config.profile = profile_for(
        lab.topology,
        workload=tuple(WorkloadKind),
        workload_interval=0.2,
    )
    async with runner:
        runner.start()
        await wait_for(
            lambda: len({e["kind"] for e in runner.events.query(kind="WorkloadResult")}) == 3,
            10,
            "one of each workload",
        )
        results = runner.events.query(kind="WorkloadResult")
    assert all(r["status_code"] == 200 and r["ok"] for r in results)
    assert {r["kind"] for r in results} == {"im", "presence", "conference"}


async def test_a_certificate_from_another_ca_is_refused(lab: Lab, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    LabCA.ensure(other)
    runner = runner_for(lab, ["pool1.lab.local:alice"])
    runner.config.ssl_context = client_context(other / "ca.pem")  # trusts another CA
    async with runner:
        runner.start()
        await wait_for(lambda: runner.endpoints[0].mode is Mode.BACKING_OFF, 10, "backing off")
    failed = {(e["pool"], e["failure"]) for e in runner.events.query(kind="TargetFailed")}
    assert ("pool1.lab.local", "tls") in failed and ("pool2.lab.local", "tls") in failed
    # The A-record names of the lookup order point at port 5061, where nothing listens.
    assert {f for _, f in failed} <= {"tls", "refused"}


async def test_a_certificate_without_the_name_is_refused(tmp_path: Path) -> None:
    """Seed 003's fix: the certificate must carry the name the client connects to."""
    lab = Lab(tmp_path)
    async with lab_dns(lab.topology) as (port, store):
        lab.dns_port = port
        store.apply(
            [
                RecordChange(
                    op="replace",
                    name="_sipinternaltls._tcp",
                    rtype="SRV",
                    data=(f"0 10 {lab.port1} fe9.lab.local.",),
                ),
                RecordChange(op="add", name="fe9", rtype="A", data=(HOST,)),
            ]
        )
        await lab.pool1.start()
        try:
            runner = runner_for(lab, ["pool1.lab.local:alice"])
            async with runner:
                runner.start()
                await wait_for(lambda: runner.endpoints[0].mode is Mode.BACKING_OFF, 10, "backoff")
        finally:
            await lab.pool1.stop()
    failed = [e for e in runner.events.query(kind="TargetFailed") if e["pool"] == "fe9.lab.local"]
    assert failed and failed[0]["failure"] == "tls"
    assert "fe9.lab.local" in failed[0]["reason"] or "match" in failed[0]["reason"]


async def test_bind_sets_the_source_address_of_dns_and_sip(lab: Lab) -> None:
    runner = runner_for(lab, ["pool1.lab.local:*"], bind=HOST)
    n = len(runner.config.users)
    async with runner:
        runner.start()
        await wait_for(
            lambda: runner.counts()["by_pool"].get("pool1.lab.local", {}).get("FullService") == n,
            10,
            "all registered from the bound address",
        )
        flows = list(lab.pool1.flows)
    assert len(flows) == n and all(f.remote[0] == HOST for f in flows)
    assert runner.faults == 0


async def test_heap_trimmed_once_a_burst_of_connects_is_over(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sipdrill.clients.runner as runner_module

    assert runner_module.trim_heap()  # glibc here
    monkeypatch.setattr(runner_module, "TRIM_AFTER_CONNECTS", 3)
    runner = runner_for(lab, ["pool1.lab.local:*"])
    async with runner:
        runner.start()
        n = len(runner.config.users)
        await wait_for(lambda: runner.counts()["by_mode"]["FullService"] == n, 10, "registered")
        await wait_for(lambda: runner.trims == 1, 3, "trimmed after the sign-in burst")
        assert runner._connecting == 0 and runner._connects_since_trim == 0


async def test_a_connect_to_a_silent_peer_gives_its_slot_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One connect slot: a TLS connect that hangs (a stopped pool answers no
    ClientHello) must not hold up the next one past ``connect_slot_hold``; the
    slot is released once, and the hung connect still ends in its timeout."""
    import asyncio
    import socket
    import ssl

    from sipdrill.clients.endpoint import ClientProfile, Target, UserSpec
    from sipdrill.clients.runner import ClientRunner, RunnerConfig
    from sipdrill.sip.transport import Kind, TransportLimits

    users = [UserSpec(f"sip:u{i}@lab.local", home_pool="pool1.lab.local") for i in range(2)]
    runner = ClientRunner(
        RunnerConfig(
            profile=ClientProfile(domain="lab.local"),
            users=users,
            ssl_context=ssl.create_default_context(),
            connect_concurrency=1,
            connect_slot_hold=0.1,
            transport_limits=TransportLimits(tls_handshake_timeout=1.0),
        )
    )
    loop = asyncio.get_running_loop()
    adopted: dict[int, float] = {}
    failed: dict[int, float] = {}

    def adopt(index: int, conn: int, ep: object, flow: object, local: object) -> None:
        adopted[index] = loop.time()
        flow.abort()  # type: ignore[attr-defined]

    monkeypatch.setattr(runner, "_adopt", adopt)
    monkeypatch.setattr(runner, "_call", lambda index, fn: failed.setdefault(index, loop.time()))
    # Listening sockets that never accept: the kernel completes the TCP
    # handshake, nothing ever answers the ClientHello.
    with socket.create_server((HOST, 0)) as silent, socket.create_server((HOST, 0)) as live:
        async with runner:
            start = loop.time()
            conn = runner.endpoints[0].conn
            hung = Target("silent", silent.getsockname()[1], Kind.TLS, HOST)
            runner._begin_connect(0, conn, hung)
            runner._begin_connect(1, conn, Target("live", live.getsockname()[1], Kind.TCP, HOST))
            assert runner._slots == 0 and len(runner._slot_queue) == 1
            await wait_for(lambda: 1 in adopted, 2.0, "the live connect")
            assert adopted[1] - start < 0.5  # not after the silent connect's 1 s timeout
            await wait_for(lambda: 0 in failed, 3.0, "the silent connect's timeout")
            assert 0.9 <= failed[0] - start < 2.0
            assert 0 not in adopted and 1 not in failed
            assert runner._slots == 1  # released once, not twice
            assert runner._connecting == 0 and not runner._connects


async def test_counts_are_rebuilt_once_an_endpoint_changes() -> None:
    """counts() is remembered between polls, but never served stale: a mode change,
    a sign-out and a replaced (faulty) endpoint each show at once."""
    from sipdrill.clients.endpoint import ClientProfile, Endpoint, UserSpec
    from sipdrill.clients.runner import ClientRunner, RunnerConfig

    users = [UserSpec(f"sip:u{i}@lab.local", home_pool="pool1.lab.local") for i in range(3)]
    runner = ClientRunner(
        RunnerConfig(profile=ClientProfile(domain="lab.local"), users=users, seed=1)
    )
    async with runner:
        first = runner.counts()
        assert first["by_mode"]["SignedOut"] == 3
        assert runner.counts() is first  # nothing changed: the same answer
        runner._call(0, Endpoint.sign_in)  # no nameserver: it discovers, then backs off
        second = runner.counts()
        assert second is not first
        assert second["by_mode"]["SignedOut"] == 2
        assert sum(second["by_mode"].values()) == 3

        def boom(ep: Endpoint) -> list[object]:
            raise RuntimeError("bug")

        runner._call(0, boom)  # type: ignore[arg-type]
        third = runner.counts()
        assert third["by_mode"]["SignedOut"] == 3
        assert runner.faults == 1


@pytest.mark.parametrize("seed", [None, 0, 3])
async def test_each_pools_clients_take_round_robin_turns_from_the_seed(seed: int | None) -> None:
    """A pool's clients start on consecutive DNS turns, the first at the seed:
    with three front ends, every one gets a third of the pool's clients, the
    same ones in every run (whatever the order in which they resolve)."""
    from sipdrill.clients.endpoint import ClientProfile, UserSpec, dns_order
    from sipdrill.clients.runner import ClientRunner, RunnerConfig

    pools = ["pool1.lab.local", "pool2.lab.local"]
    users = [UserSpec(f"sip:u{i}@lab.local", home_pool=pools[i % 4 == 0]) for i in range(12)]
    runner = ClientRunner(
        RunnerConfig(profile=ClientProfile(domain="lab.local"), users=users, seed=seed)
    )
    fes = ("10.0.1.11", "10.0.1.12", "10.0.1.13")
    async with runner:
        turns = {ep.user.uri: ep._dns_turn for ep in runner.endpoints}
    first = seed or 0
    for pool in pools:
        mine = [turns[u.uri] for u in users if u.home_pool == pool]
        assert mine == list(range(first, first + len(mine)))
        firsts = [dns_order(fes, t)[0] for t in mine]
        assert {firsts.count(fe) for fe in fes} == {len(mine) // 3}
