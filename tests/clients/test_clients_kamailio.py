"""Interop: the simulated clients against Kamailio as a plain registrar (registrar+usrloc).

No TLS here: the clients run with TCP (found through the lab DNS server's
_sipinternal._tcp SRV record, as a TCP-allowed Lync client would) and with
UDP (a static registrar). Everything is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clients_lab import HOST, lab_dns, wait_for, write_topology
from procutil import free_port, stop_process

from sipdrill.clients.endpoint import Target
from sipdrill.clients.events import Mode
from sipdrill.clients.metrics import EventLog
from sipdrill.clients.population import profile_for, select_users
from sipdrill.clients.runner import ClientRunner, RunnerConfig
from sipdrill.dns.zone import RecordChange
from sipdrill.sip.transport import Kind

pytestmark = pytest.mark.interop

KAMAILIO_CFG = """\
#!KAMAILIO
debug=2
log_stderror=yes
children=2
tcp_children=2
auto_aliases=no
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
alias="lab.local"
dns=no
rev_dns=no
tcp_crlf_ping=yes

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"

modparam("usrloc", "db_mode", 0)
modparam("registrar", "default_expires", {expires})
modparam("registrar", "min_expires", 1)
modparam("registrar", "max_expires", {expires})

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("OPTIONS")) {{ sl_send_reply("200", "OK"); exit; }}
    if (is_method("REGISTER")) {{
        if (!save("location")) {{ sl_reply_error(); }}
        exit;
    }}
    if (is_method("ACK")) {{ exit; }}
    sl_send_reply("405", "Method Not Allowed");
}}
"""


async def _tcp_up(proc: asyncio.subprocess.Process, port: int, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if loop.time() > deadline or proc.returncode is not None:
                raise
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return


@contextlib.asynccontextmanager
async def kamailio(tmp: Path, expires: int) -> AsyncIterator[int]:
    binary = shutil.which("kamailio") or shutil.which("kamailio", path="/usr/sbin")
    if binary is None:
        pytest.skip("kamailio is not installed (Debian package kamailio)")
    port = free_port(HOST, udp_too=True)
    cfg = tmp / "kamailio.cfg"
    cfg.write_text(KAMAILIO_CFG.format(port=port, expires=expires))
    rundir = tmp / "kamailio-run"
    rundir.mkdir()
    log = tmp / "kamailio.log"
    with log.open("wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-DD",
            "-E",
            "-f",
            str(cfg),
            "-Y",
            str(rundir),
            "-m",
            "32",
            "-M",
            "8",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    try:
        try:
            await _tcp_up(proc, port)
        except OSError:
            pytest.fail(f"kamailio did not start:\n{log.read_text()[-3000:]}")
        yield port
    finally:
        await stop_process(proc)


async def test_tcp_clients_find_kamailio_by_srv_and_keep_alive(tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "lab.yaml", 1, 2, keepalive=1, pong_timeout=1, group=4)
    async with kamailio(tmp_path, expires=600) as port, lab_dns(topology) as (dns_port, store):
        # The TCP SRV name points at Kamailio; the TLS ones at nothing.
        store.apply(
            [
                RecordChange(
                    op="replace",
                    name="_sipinternal._tcp",
                    rtype="SRV",
                    data=(f"0 10 {port} pool1.lab.local.",),
                )
            ]
        )
        users = select_users(topology, ["pool1.lab.local:p1u*"])
        runner = ClientRunner(
            RunnerConfig(
                profile=profile_for(topology, transport=Kind.TCP),
                users=users,
                nameservers=[(HOST, dns_port)],
                ramp=0,
                seed=11,
            ),
            events=EventLog(),
        )
        async with runner:
            runner.start()
            await wait_for(
                lambda: runner.counts()["by_mode"]["FullService"] == len(users), 10, "registered"
            )
            await asyncio.sleep(3.5)  # keep-alives every 0.8-1 s, pong within 1 s
            assert runner.counts()["by_mode"]["FullService"] == len(users)
            stats = runner.stats
    registered = runner.events.query(kind="Registered")
    assert {e["address"] for e in registered} == {f"{HOST}:{port}"}
    assert all(e["expires"] == 600 for e in registered)
    # No flow failed: Kamailio answered every CRLF ping with a pong.
    failed = [
        e for e in runner.events.query(kind="TargetFailed") if e["address"].endswith(f":{port}")
    ]
    assert failed == [], failed
    assert stats["received"] >= len(users)


async def test_udp_clients_register_and_refresh_with_kamailio(tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "lab.yaml", 1, 2)
    async with kamailio(tmp_path, expires=4) as port:
        profile = dataclasses.replace(
            profile_for(topology, transport=Kind.UDP),
            static_targets=(Target(HOST, port, Kind.UDP, None, "static"),),
        )
        users = select_users(topology, ["*:p1u*"], count=3)
        runner = ClientRunner(RunnerConfig(profile=profile, users=users, ramp=0, seed=1))
        async with runner:
            runner.start()
            await wait_for(lambda: runner.counts()["by_mode"]["FullService"] == 3, 10, "registered")
            # Kamailio grants 4 s: refresh at min(4/2, 4-30), floored at 1 s.
            await wait_for(
                lambda: sum(1 for e in runner.events.query(kind="Registered") if e["refresh"]) >= 6,
                6,
                "refreshed",
            )
        assert all(ep.mode is Mode.SIGNED_OUT for ep in runner.endpoints)
    registered = runner.events.query(kind="Registered")
    assert registered and all(e["expires"] <= 4 for e in registered)
    assert not runner.events.query(kind="TargetFailed")
