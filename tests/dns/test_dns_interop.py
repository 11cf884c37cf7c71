"""Interop: dig and kdig query the server, nsupdate changes it (TSIG).

Every tool talks to 127.0.0.1 and the port the in-process server picked;
nsupdate is always given `server` and `zone`, so it never asks a resolver.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml
from dns_testlib import KEY_NAME, KEY_SPEC, LAB, SECRET, SERIAL, WRONG_SECRET

from sipdrill.dns.service import DnsService

pytestmark = pytest.mark.interop
TOKEN = "interop"

SRV_DEFAULT = {
    "_sipinternaltls._tcp.lab.local. 300 IN SRV 0 10 5061 pool1.lab.local.",
    "_sipinternaltls._tcp.lab.local. 300 IN SRV 10 10 5061 pool2.lab.local.",
}
GLUE = {
    "pool1.lab.local. 300 IN A 172.30.1.11",
    "pool1.lab.local. 300 IN A 172.30.1.12",
    "pool2.lab.local. 300 IN A 172.30.2.11",
    "pool2.lab.local. 300 IN A 172.30.2.12",
}


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install bind9-dnsutils knot-dnsutils)")
    return path


async def run(*argv: str, stdin: str | None = None, within: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), within)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture
async def lab() -> AsyncIterator[DnsService]:
    svc = DnsService.from_file(
        LAB,
        listen=["127.0.0.1:0"],
        control="127.0.0.1:0",
        token=TOKEN,
        tsig_keys=[KEY_SPEC],
        serial=SERIAL,
    )
    async with svc:
        yield svc


def _port(svc: DnsService) -> str:
    return str(svc.dns_addresses[0][1])


# --- dig ----------------------------------------------------------------------


async def dig(svc: DnsService, *args: str) -> dict[str, Any]:
    rc, out = await run(
        need("dig"), "@127.0.0.1", "-p", _port(svc), "+yaml", "+tries=1", "+time=3", *args
    )
    assert rc == 0, out
    docs = yaml.safe_load(out)
    return docs[-1]["message"]["response_message_data"]  # type: ignore[no-any-return]


def _section(data: dict[str, Any], name: str) -> set[str]:
    return {" ".join(rr.split()) for rr in data.get(name, [])}


@pytest.mark.parametrize(
    "mode", [["+noedns"], ["+edns=0", "+bufsize=1232"], ["+tcp"], ["+tcp", "+noedns"]]
)
async def test_dig_srv_lookup(lab: DnsService, mode: list[str]) -> None:
    data = await dig(lab, *mode, "_sipinternaltls._tcp.lab.local", "SRV")
    assert data["status"] == "NOERROR"
    assert set(data["flags"].split()) == {"qr", "aa", "rd"}  # no tc, no ra
    assert _section(data, "ANSWER_SECTION") == SRV_DEFAULT
    assert _section(data, "ADDITIONAL_SECTION") == GLUE
    assert ("OPT_PSEUDOSECTION" in data) == ("+noedns" not in mode)


async def test_dig_negative_answers_and_case(lab: DnsService) -> None:
    nx = await dig(lab, "nothing.lab.local", "A")
    assert nx["status"] == "NXDOMAIN"
    assert _section(nx, "AUTHORITY_SECTION") == {
        f"lab.local. 60 IN SOA ns.lab.local. hostmaster.lab.local. {SERIAL} 3600 600 86400 60"
    }
    nodata = await dig(lab, "sip.lab.local", "AAAA")
    assert nodata["status"] == "NOERROR" and "ANSWER_SECTION" not in nodata
    assert len(_section(nodata, "AUTHORITY_SECTION")) == 1
    mixed = await dig(lab, "SiP.LaB.LoCaL", "A")
    assert _section(mixed, "ANSWER_SECTION") == {
        "sip.lab.local. 300 IN A 172.30.1.11",
        "sip.lab.local. 300 IN A 172.30.1.12",
    }
    assert (await dig(lab, "www.example.com", "A"))["status"] == "REFUSED"
    assert (await dig(lab, "+edns=1", "+noednsnegotiation", "sip.lab.local", "A"))[
        "status"
    ] == "BADVERS"


async def test_dig_cname_chain_and_any(lab: DnsService) -> None:
    chain = await dig(lab, "chain1.lab.local", "A")
    assert _section(chain, "ANSWER_SECTION") == {
        "chain1.lab.local. 300 IN CNAME chain2.lab.local.",
        "chain2.lab.local. 300 IN CNAME sip.lab.local.",
        "sip.lab.local. 300 IN A 172.30.1.11",
        "sip.lab.local. 300 IN A 172.30.1.12",
    }
    any_ = await dig(lab, "mail.lab.local", "ANY")
    assert _section(any_, "ANSWER_SECTION") == {
        "mail.lab.local. 300 IN MX 10 pool2.lab.local.",
        'mail.lab.local. 120 IN TXT "v=spf1 -all"',
    }


async def _add_big(svc: DnsService) -> set[str]:
    data = [f"10.20.{i // 200}.{i % 200 + 1}" for i in range(150)]
    assert svc.control_url is not None
    async with httpx.AsyncClient(
        base_url=svc.control_url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as c:
        r = await c.post("/records", json={"name": "big", "type": "A", "data": data})
        assert r.status_code == 200
    return {f"big.lab.local. 300 IN A {a}" for a in data}


async def test_dig_truncation_over_udp_and_the_full_answer_over_tcp(lab: DnsService) -> None:
    expected = await _add_big(lab)  # 150 A records: about 2,450 bytes
    for mode in (["+noedns"], ["+bufsize=1232"], ["+bufsize=4096"]):
        udp = await dig(lab, "+ignore", *mode, "big.lab.local", "A")
        assert "tc" in udp["flags"].split() and "ANSWER_SECTION" not in udp, mode
    full = await dig(lab, "+tcp", "big.lab.local", "A")
    assert "tc" not in full["flags"].split() and _section(full, "ANSWER_SECTION") == expected
    retried = await dig(lab, "big.lab.local", "A")  # dig retries over TCP by itself
    assert _section(retried, "ANSWER_SECTION") == expected


# --- kdig ---------------------------------------------------------------------


async def kdig(svc: DnsService, *args: str) -> dict[str, Any]:
    rc, out = await run(
        need("kdig"), "@127.0.0.1", "-p", _port(svc), "+json", "+retry=0", "+timeout=3", *args
    )
    assert rc == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


def _rrs(data: dict[str, Any], section: str) -> set[str]:
    out = set()
    for rr in data.get(section, []):
        if rr["TYPEname"] == "OPT":
            continue
        rdata = rr[f"rdata{rr['TYPEname']}"]
        out.add(f"{rr['NAME']} {rr['TTL']} IN {rr['TYPEname']} {rdata}")
    return out


def _opt(data: dict[str, Any]) -> dict[str, Any] | None:
    return next((rr for rr in data.get("additionalRRs", []) if rr["TYPEname"] == "OPT"), None)


@pytest.mark.parametrize(
    "mode", [["+noedns"], ["+edns", "+bufsize=1232"], ["+tcp"], ["+tcp", "+edns"]]
)
async def test_kdig_srv_lookup(lab: DnsService, mode: list[str]) -> None:
    data = await kdig(lab, *mode, "_sipinternaltls._tcp.lab.local", "SRV")
    assert data["RCODE"] == 0 and data["AA"] == 1 and data["TC"] == 0
    assert _rrs(data, "answerRRs") == SRV_DEFAULT
    assert _rrs(data, "additionalRRs") == GLUE
    opt = _opt(data)
    if "+noedns" in mode or mode == ["+tcp"]:
        assert opt is None
    else:
        assert opt is not None and opt["CLASS"] == 1232


async def test_kdig_do_bit_is_echoed(lab: DnsService) -> None:
    data = await kdig(lab, "+dnssec", "sip.lab.local", "A")
    opt = _opt(data)
    assert opt is not None and opt["TTL"] & 0x8000


async def test_kdig_truncation_over_udp_and_the_full_answer_over_tcp(lab: DnsService) -> None:
    expected = await _add_big(lab)
    udp = await kdig(lab, "+ignore", "+edns", "+bufsize=1232", "big.lab.local", "A")
    assert udp["TC"] == 1 and not _rrs(udp, "answerRRs")
    full = await kdig(lab, "+tcp", "big.lab.local", "A")
    assert full["TC"] == 0 and _rrs(full, "answerRRs") == expected


# --- nsupdate -------------------------------------------------------------------


async def nsupdate(
    svc: DnsService,
    commands: str,
    *,
    key: str | None = f"hmac-sha256:{KEY_NAME}:{SECRET}",
    tcp: bool = False,
) -> tuple[int, str]:
    script = f"server 127.0.0.1 {_port(svc)}\nzone lab.local\n{commands.strip()}\nsend\n"
    argv = [need("nsupdate"), "-t", "5"]
    if tcp:
        argv.append("-v")
    if key is not None:
        argv += ["-y", key]
    return await run(*argv, stdin=script)


async def _serial(svc: DnsService) -> int:
    soa = await dig(svc, "lab.local", "SOA")
    return int(soa["ANSWER_SECTION"][0].split()[6])


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_nsupdate_adds_and_deletes_records(lab: DnsService, tcp: bool) -> None:
    rc, out = await nsupdate(
        lab,
        """
        update add web.lab.local. 120 A 192.0.2.10
        update add web.lab.local. 120 A 192.0.2.11
        update add _sipinternaltls._tcp.lab.local. 300 SRV 20 10 5061 web.lab.local.
        update delete pool2.lab.local. A 172.30.2.12
    """,
        tcp=tcp,
    )
    assert rc == 0, out
    assert _section(await dig(lab, "web.lab.local", "A"), "ANSWER_SECTION") == {
        "web.lab.local. 120 IN A 192.0.2.10",
        "web.lab.local. 120 IN A 192.0.2.11",
    }
    srv = await dig(lab, "_sipinternaltls._tcp.lab.local", "SRV")
    assert _section(srv, "ANSWER_SECTION") == SRV_DEFAULT | {
        "_sipinternaltls._tcp.lab.local. 300 IN SRV 20 10 5061 web.lab.local."
    }
    assert "web.lab.local. 120 IN A 192.0.2.10" in _section(srv, "ADDITIONAL_SECTION")
    assert _section(await dig(lab, "pool2.lab.local", "A"), "ANSWER_SECTION") == {
        "pool2.lab.local. 300 IN A 172.30.2.11"
    }
    assert await _serial(lab) == SERIAL + 1  # one UPDATE, one serial bump

    rc, out = await nsupdate(lab, "update delete web.lab.local.", tcp=tcp)
    assert rc == 0, out
    assert (await dig(lab, "web.lab.local", "A"))["status"] == "NXDOMAIN"
    assert await _serial(lab) == SERIAL + 2


async def test_nsupdate_repoints_srv_for_every_view(lab: DnsService) -> None:
    rc, out = await nsupdate(
        lab,
        """
        update delete _sipinternaltls._tcp.lab.local. SRV
        update add _sipinternaltls._tcp.lab.local. 300 SRV 0 10 5061 pool2.lab.local.
    """,
    )
    assert rc == 0, out
    srv = await dig(lab, "_sipinternaltls._tcp.lab.local", "SRV")
    assert _section(srv, "ANSWER_SECTION") == {
        "_sipinternaltls._tcp.lab.local. 300 IN SRV 0 10 5061 pool2.lab.local."
    }
    for view in lab.zone.view_names:
        assert [r.data for r in lab.zone.records(view, "_sipinternaltls._tcp")] == [
            "0 10 5061 pool2.lab.local."
        ]


async def test_nsupdate_prerequisites(lab: DnsService) -> None:
    rc, out = await nsupdate(
        lab,
        """
        prereq nxdomain sip.lab.local.
        update add marker.lab.local. 60 A 192.0.2.1
    """,
    )
    assert rc != 0 and "YXDOMAIN" in out
    rc, out = await nsupdate(
        lab,
        """
        prereq yxrrset sip.lab.local. A 172.30.1.11
        update add marker.lab.local. 60 A 192.0.2.1
    """,
    )
    assert rc != 0 and "NXRRSET" in out  # the RRset has two records, not one
    assert (await dig(lab, "marker.lab.local", "A"))["status"] == "NXDOMAIN"
    rc, out = await nsupdate(
        lab,
        """
        prereq yxrrset sip.lab.local. A
        prereq nxrrset sip.lab.local. AAAA
        prereq nxdomain marker.lab.local.
        update add marker.lab.local. 60 A 192.0.2.1
    """,
    )
    assert rc == 0, out
    assert _section(await dig(lab, "marker.lab.local", "A"), "ANSWER_SECTION") == {
        "marker.lab.local. 60 IN A 192.0.2.1"
    }


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"hmac-sha256:{KEY_NAME}:{WRONG_SECRET}", "BADSIG"),
        (f"hmac-sha256:some-other-key:{SECRET}", "BADKEY"),
        (None, "REFUSED"),
    ],
    ids=["wrong-secret", "unknown-key", "unsigned"],
)
async def test_nsupdate_with_a_wrong_key_changes_nothing(
    lab: DnsService, key: str | None, expected: str
) -> None:
    before = await dig(lab, "_sipinternaltls._tcp.lab.local", "SRV")
    rc, out = await nsupdate(
        lab,
        """
        update delete _sipinternaltls._tcp.lab.local. SRV
        update add evil.lab.local. 60 A 192.0.2.66
    """,
        key=key,
    )
    assert rc != 0 and expected in out, out
    after = await dig(lab, "_sipinternaltls._tcp.lab.local", "SRV")
    assert _section(after, "ANSWER_SECTION") == _section(before, "ANSWER_SECTION") == SRV_DEFAULT
    assert (await dig(lab, "evil.lab.local", "A"))["status"] == "NXDOMAIN"
    assert await _serial(lab) == SERIAL
