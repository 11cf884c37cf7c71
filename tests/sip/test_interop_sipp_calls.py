"""SIPp places and answers calls through the pools: a SIPp callee registered
on pool2 (over UDP) answers calls that a SIPp caller places through pool1
(over UDP and TCP), across the pools' TLS, with Record-Route, ACK and BYE
along the route set. Every call must succeed on both ends.

SIPp's callee registers with one run (call_register.xml) and answers with a
second one on the same UDP port (call_uas.xml): a SIPp client scenario
cannot answer an INVITE whose Call-ID it did not start.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pool_harness import CAROL, P1, P2, two_pools

pytestmark = [pytest.mark.interop]

CALLS = 10


@pytest.fixture(autouse=True)
def _need_sipp(sip_harness) -> None:  # type: ignore[no-untyped-def]
    sip_harness.require_binary("sipp")


@pytest.mark.parametrize("caller_transport", ["u1", "t1"])
async def test_sipp_calls_through_two_pools(
    tmp_path: Path, caller_transport: str, sip_harness  # type: ignore[no-untyped-def]
) -> None:
    h = sip_harness
    async with two_pools(tmp_path) as lab:
        p1_host, _ = lab.sip_target(P1)
        p2_host, _ = lab.sip_target(P2)
        port = lab.topology.pool(P1).sip_udp_port
        callee_port = h.free_port()
        keys = ["-key", "callee", CAROL.split(":")[1].split("@")[0], "-key", "caller", "alice"]
        reg = await h.run_sipp(
            "call_register.xml", f"{p2_host}:{port}", tmp_path, transport="u1", calls=1,
            extra=[*keys, "-p", str(callee_port)],
        )
        assert reg.returncode == 0 and reg.successful == 1, reg
        status = await lab.status(P2)
        assert status["registrations"]["full"] == 1

        sipp = h.require_binary("sipp")
        uas_stats = tmp_path / "uas-stats.csv"
        uas = await asyncio.create_subprocess_exec(
            sipp, "-sf", str(Path(__file__).parent / "scenarios" / "call_uas.xml"),
            "-i", h.HOST, "-p", str(callee_port), "-t", "u1", "-m", str(CALLS),
            "-nostdin", "-trace_stat", "-stf", str(uas_stats), "-fd", "1",
            "-timeout", "40s", "-timeout_error", *keys,
            cwd=tmp_path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await asyncio.sleep(0.5)  # the callee listens
            uac = await h.run_sipp(
                "call_uac.xml", f"{p1_host}:{port}", tmp_path, transport=caller_transport,
                calls=CALLS, rate=5, extra=keys,
            )
            out, _ = await asyncio.wait_for(uas.communicate(), 30)
        finally:
            await h.stop_process(uas)
        callee = h.read_sipp_stats(uas_stats)
        assert uac.returncode == 0, uac
        assert (uac.successful, uac.failed) == (CALLS, 0), uac
        assert uas.returncode == 0, out.decode(errors="replace")[-3000:]
        assert (int(callee["SuccessfulCall(C)"]), int(callee["FailedCall(C)"])) == (CALLS, 0)
        text = (await lab.get(P1, "/metrics")).text
        assert f'sipdrill_pool_calls_total{{result="answered"}} {float(CALLS)}' in text
        text = (await lab.get(P2, "/metrics")).text
        assert f'sipdrill_pool_calls_total{{result="answered"}} {float(CALLS)}' in text
