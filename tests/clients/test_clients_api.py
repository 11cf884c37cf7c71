"""The control API in-process (httpx over ASGI), and `sipdrill serve clients` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from apicheck import SECRET, assert_docs_behind_token, assert_routing_errors, client, error_of
from clients_lab import HOST, Lab, free_port, runner_for, wait_for

from sipdrill.clients.api import create_app


async def test_counts_events_start_stop_and_metrics(lab: Lab) -> None:
    runner = runner_for(lab, ["pool1.lab.local:*"])
    n = len(runner.config.users)
    async with runner:
        app = create_app(runner)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://clients") as api:
            health = (await api.get("/health")).json()
            assert health["status"] == "ok" and health["endpoints"] == n
            assert health["running"] is False and health["registered"] == 0
            assert (await api.post("/start")).json()["running"] is True
            await wait_for(lambda: runner.counts()["by_mode"]["FullService"] == n, 10, "signed in")

            counts = (await api.get("/counts")).json()
            assert counts["by_mode"]["FullService"] == n
            assert counts["by_pool"] == {"pool1.lab.local": {"FullService": n}}
            assert counts["by_home_pool"]["pool1.lab.local"]["FullService"] == n

            page = (await api.get("/events", params={"limit": 5})).json()
            assert len(page["events"]) == 5 and page["latest"] >= 5
            rest = (await api.get("/events", params={"after": page["next_after"]})).json()
            seqs = [e["seq"] for e in page["events"] + rest["events"]]
            assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate
            cut = rest["events"][-1]["wall"]
            later = (await api.get("/events", params={"since": cut})).json()["events"]
            assert later and all(e["wall"] >= cut for e in later)
            alice = (
                await api.get(
                    "/events", params={"user": "sip:alice@lab.local", "kind": "Registered"}
                )
            ).json()["events"]
            assert [e["pool"] for e in alice] == ["pool1.lab.local"]
            raw = await api.get("/events.jsonl", params={"after": 2, "limit": 3})
            assert raw.headers["content-type"].startswith("application/x-ndjson")
            assert raw.headers["X-First-Seq"] == "1"
            assert int(raw.headers["X-Latest-Seq"]) == page["latest"]
            assert [json.loads(x)["seq"] for x in raw.text.splitlines()] == [3, 4, 5]

            metrics = (await api.get("/metrics")).text
            assert (
                f'sipdrill_client_endpoints{{mode="FullService",pool="pool1.lab.local"}} {n}.0'
                in metrics
            )
            assert "sipdrill_client_registrations_total" in metrics

            stopped = (await api.post("/stop")).json()
            assert stopped["running"] is False
            counts = (await api.get("/counts")).json()
            assert counts["by_mode"]["SignedOut"] == n
            assert (await api.get("/events", params={"limit": 0})).status_code == 422


async def _get_json(url: str) -> dict[str, object]:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=2)
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result


async def test_serve_clients_command(lab: Lab, tmp_path: Path) -> None:
    control = free_port()
    events = tmp_path / "events.jsonl"
    topology = tmp_path / "lab.yaml"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sipdrill",
        "serve",
        "clients",
        "--topology",
        str(topology),
        "--users",
        "pool1.lab.local:p1u*",
        "--count",
        "4",
        "--dns",
        f"{HOST}:{lab.dns_port}",
        "--ca",
        str(lab.tls),
        "--control",
        f"{HOST}:{control}",
        "--events",
        str(events),
        "--seed",
        "5",
        "--ramp",
        "50",
        "--workload",
        "im",
        "--workload-interval",
        "0.3",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = f"http://{HOST}:{control}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        counts: dict[str, object] = {}
        while loop.time() < deadline:
            try:
                counts = await _get_json(f"{url}/counts")
            except (httpx.HTTPError, OSError):
                await asyncio.sleep(0.1)
                continue
            by_mode = counts["by_mode"]
            assert isinstance(by_mode, dict)
            if by_mode["FullService"] == 4:
                break
            await asyncio.sleep(0.1)
        assert counts["by_pool"] == {"pool1.lab.local": {"FullService": 4}}, counts
        await asyncio.sleep(1.0)  # some IMs
        assert "sipdrill_client_workload_total" in (await _get_json_text(f"{url}/metrics"))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    assert b"4 endpoints" in err
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    users = {e["user"] for e in lines}
    assert users == {f"sip:p1u{i}@lab.local" for i in range(1, 5)}
    assert any(e["event"] == "WorkloadResult" and e["status_code"] == 200 for e in lines)
    # SIGTERM signs everyone out
    last_modes = {}
    for e in lines:
        if e["event"] == "ModeChanged":
            last_modes[e["user"]] = e["new"]
    assert set(last_modes.values()) == {"SignedOut"}


async def _get_json_text(url: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=2)
        return response.text


async def test_with_a_token_only_health_and_metrics_are_open(lab: Lab) -> None:
    runner = runner_for(lab, ["pool1.lab.local:*"])
    async with runner:
        app = create_app(runner, token="s3cret")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://clients") as api:
            assert (await api.get("/health")).status_code == 200
            assert (await api.get("/metrics")).status_code == 200
            for method, path in [
                ("POST", "/stop"),
                ("POST", "/start"),
                ("GET", "/counts"),
                ("GET", "/events"),
                ("GET", "/events.jsonl"),
            ]:
                anonymous = await api.request(method, path)
                assert anonymous.status_code == 401, path
                assert anonymous.headers["WWW-Authenticate"] == "Bearer"
                wrong = await api.request(method, path, headers={"Authorization": "Bearer x"})
                assert wrong.status_code == 401, path
            ok = await api.get("/counts", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["running"] is False


async def test_docs_need_the_token(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = runner_for(lab, ["pool1.lab.local:*"])
    async with runner:
        await assert_docs_behind_token(
            lambda: create_app(runner, token="s3cret"), "s3cret", "/counts", monkeypatch
        )


async def test_errors_are_code_and_message(lab: Lab) -> None:
    runner = runner_for(lab, ["pool1.lab.local:*"])
    async with runner, client(create_app(runner, token="s3cret")) as api:
        assert error_of(await api.get("/counts"), 401, "unauthorized")
        api.headers["Authorization"] = "Bearer s3cret"
        r = await api.get("/events", params={"limit": SECRET, "after": -1})
        assert error_of(r, 422, "bad-request") == (
            "query parameter after: Input should be greater than or equal to 0; query parameter "
            "limit: Input should be a valid integer, unable to parse string as an integer"
        )
        await assert_routing_errors(api, "/start", "GET")
