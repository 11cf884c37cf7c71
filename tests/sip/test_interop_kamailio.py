"""sipdrill's SIP client registers, refreshes and unregisters at a real Kamailio.

Kamailio runs on 127.0.0.1 with a minimal in-memory registrar (written by
the harness into tmp_path, usrloc db_mode 0, `-DD -E`). Kamailio's own view
of the AoR is read back with a REGISTER that has no Contact. The SIPp
scenarios are also checked against Kamailio here, so a scenario bug cannot
pass for a sipdrill bug in test_interop_sipp.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sipdrill.sip.client import Registration, RegistrationError, SipClient, Target
from sipdrill.sip.transaction import TimerConfig
from sipdrill.sip.transport import Kind

pytestmark = [pytest.mark.interop]

HOST = "127.0.0.1"


@pytest.fixture(autouse=True)
def _need_kamailio(sip_harness) -> None:
    sip_harness.require_binary("kamailio")


def _mine(contacts, reg: Registration) -> list:
    return [c for c in contacts if c.uri.user == "alice" and c.uri.host == HOST]


@pytest.mark.parametrize("kind", [Kind.UDP, Kind.TCP])
@pytest.mark.parametrize("auth", [False, True])
async def test_register_refresh_unregister(tmp_path: Path, sip_harness, kind: Kind, auth: bool):
    async with (
        sip_harness.kamailio(tmp_path, auth=auth, password="s3cret") as kam,
        SipClient(timers=TimerConfig(t1=0.1)) as client,
    ):
        reg = Registration(
            client,
            "sip:alice@lab.local",
            Target(kind, HOST, kam.port),
            password="s3cret" if auth else None,
            expires=120,
        )
        first = await reg.register()
        assert first.code == 200 and reg.granted == 120
        (bound,) = _mine(await reg.query(), reg)
        assert bound.uri.parameters.get("transport") == kind.value

        cseq_before = reg.cseq
        await reg.register()  # refresh: same Call-ID, higher CSeq
        assert reg.cseq > cseq_before and reg.registered_count == 2
        assert len(_mine(await reg.query(), reg)) == 1

        await reg.unregister()
        assert _mine(await reg.query(), reg) == []


async def test_wrong_password_is_refused(tmp_path: Path, sip_harness) -> None:
    async with (
        sip_harness.kamailio(tmp_path, auth=True, password="s3cret") as kam,
        SipClient() as client,
    ):
        reg = Registration(
            client, "sip:alice@lab.local", Target(Kind.UDP, HOST, kam.port), password="nope"
        )
        with pytest.raises(RegistrationError) as info:
            await reg.register()
        assert info.value.status_code == 401


async def test_automatic_refresh(tmp_path: Path, sip_harness) -> None:
    async with sip_harness.kamailio(tmp_path, min_expires=1) as kam, SipClient() as client:
        reg = Registration(
            client,
            "sip:alice@lab.local",
            Target(Kind.TCP, HOST, kam.port),
            expires=2,
            refresh_ratio=0.4,
        )
        await reg.register()
        reg.start_refresh()
        try:
            await asyncio.sleep(3.0)
            # Refreshed at least twice; still bound after the first expiry.
            assert reg.registered_count >= 3
            (bound,) = _mine(await reg.query(), reg)
            assert 0 < int(bound.parameters.get("expires") or 0) <= 2
        finally:
            await reg.stop_refresh()
        await reg.unregister()


@pytest.mark.parametrize(
    ("scenario", "auth"), [("register.xml", False), ("register_auth.xml", True)]
)
async def test_sipp_scenarios_pass_against_kamailio(
    tmp_path: Path, sip_harness, scenario: str, auth: bool
) -> None:
    sip_harness.require_binary("sipp")
    async with sip_harness.kamailio(tmp_path, auth=auth, password="s3cret") as kam:
        result = await sip_harness.run_sipp(
            scenario,
            f"{HOST}:{kam.port}",
            tmp_path,
            calls=10,
            extra=["-s", "alice", "-au", "alice", "-ap", "s3cret"] if auth else [],
        )
    assert result.returncode == 0, result
    assert (result.successful, result.failed) == (10, 0), result
