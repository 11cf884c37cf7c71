"""The shared process layer: atomic writes, the bearer-token check, the
uvicorn runner and the control-API client base."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from sipdrill.control.auth import bearer_auth
from sipdrill.control.files import write_atomically
from sipdrill.control.http import ControlClient, Unreachable, error_from
from sipdrill.control.server import AppServer, bind_tcp
from sipdrill.errors import OperationError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_the_file_with_exact_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"one")
    assert path.read_bytes() == b"one" and _mode(path) == 0o600
    write_atomically(path, b"two", mode=0o644)
    assert path.read_bytes() == b"two" and _mode(path) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")

    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_makes_the_directory_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "cms.json"
    with pytest.raises(FileNotFoundError):
        write_atomically(path, b"{}")
    write_atomically(path, b"{}", make_parents=True)
    assert path.read_bytes() == b"{}"


def _app(token: str | None) -> FastAPI:
    app = FastAPI()

    @app.get("/open")
    async def open_() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/closed", dependencies=[bearer_auth(token)])
    async def closed() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_bearer_auth_admits_the_token_only() -> None:
    transport = httpx.ASGITransport(app=_app("s3cret"))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/open")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            r = await http.get("/closed", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert r.json() == {"detail": "a valid bearer token is required"}
        r = await http.get("/closed", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


async def test_bearer_auth_without_a_token_admits_everyone() -> None:
    transport = httpx.ASGITransport(app=_app(None))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/closed")).status_code == 200


async def test_app_server_serves_until_stopped_and_frees_the_port() -> None:
    sock = bind_tcp("127.0.0.1", 0)
    host, port = sock.getsockname()
    server = AppServer(_app(None), sock)
    await server.start(lambda: RuntimeError("did not start"))
    try:
        with pytest.raises(OSError):
            bind_tcp(host, port)  # in use: listening
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://{host}:{port}/open")).json() == {"ok": True}
    finally:
        await server.stop()
    bind_tcp(host, port).close()
    await server.stop()  # twice is harmless


async def test_control_client_unreachable_and_refusals() -> None:
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = ControlClient("pool p1", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(Unreachable) as exc:
            await client.request("GET", "/status")
        assert exc.value.code == "unreachable" and exc.value.http_status == 503
    finally:
        await client.aclose()

    def answer(status: int, body: object) -> OperationError:
        return error_from(httpx.Response(status, json=body), "pool p1: GET /x")

    refused = answer(409, {"code": "read-only", "message": "no"})
    assert (refused.code, refused.message, refused.http_status) == ("read-only", "no", 409)
    assert answer(401, {"detail": "a valid bearer token is required"}).code == "http-401"


async def test_bodies_over_the_limit_get_413_and_are_not_echoed() -> None:
    app = FastAPI()
    seen: list[int] = []

    @app.post("/changes")
    async def changes(request: Request) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"bytes": len(body)}

    sock = bind_tcp("127.0.0.1", 0)
    host, port = sock.getsockname()
    server = AppServer(app, sock, max_body=1000)
    await server.start(lambda: RuntimeError("did not start"))
    url = f"http://{host}:{port}/changes"
    try:
        async with httpx.AsyncClient() as http:
            assert (await http.post(url, content=b"x" * 1000)).json() == {"bytes": 1000}
            big = await http.post(url, content=b"SECRET" * 1000)  # Content-Length declared
            assert big.status_code == 413 and big.json()["code"] == "too-large"
            assert "SECRET" not in big.text

            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(50):
                    yield b"SECRET" * 100

            # No Content-Length: refused as soon as it goes over; the server may close
            # the connection while the client still sends (then the client sees it cut).
            try:
                chunked = await http.post(url, content=chunks())
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                pass
            else:
                assert chunked.status_code == 413 and "SECRET" not in chunked.text
            app.state.body_limits = {"/changes": 10_000}  # an app may allow more on a path
            assert (await http.post(url, content=b"x" * 9000)).json() == {"bytes": 9000}
        assert seen == [1000, 9000]  # the handler never saw an oversized body
    finally:
        await server.stop()
