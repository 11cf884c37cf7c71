"""Checks every control API's tests share (no tests in here): the one error
format, and the docs behind the token (sipdrill.control.app, docs/control-api.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

#: A string no error message could hold by chance: sent in a bad field, it must not come back.
SECRET = "ZZ-secret-7f3a91"
DOCS = ("/openapi.json", "/docs", "/redoc")
#: The operator's opt-in (docs/control-api.md), spelt out: the name is the contract.
OPEN_DOCS_ENV = "SIPDRILL_CONTROL_OPEN_DOCS"


def error_of(response: httpx.Response, status: int, code: str | None = None) -> str:
    """The message of an error answer, after checking it is exactly
    ``{"code", "message"}`` with ``status`` (and ``code``), and repeats
    nothing the request carried."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"code", "message"}, body
    assert isinstance(body["code"], str) and isinstance(body["message"], str), body
    if code is not None:
        assert body["code"] == code, body
    assert SECRET not in response.text, response.text
    # Neither a traceback nor pydantic's reprs ({'input': ...}, input_value=...).
    for leak in ("Traceback", "'input'", "input_value", "{'type'"):
        assert leak not in body["message"], body
    message: str = body["message"]
    return message


def client(app: Any, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://control",
        headers=headers,
    )


async def assert_docs_behind_token(
    build: Callable[[], Any], token: str, secured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``build()`` makes the service's app: its docs answer 401 without the
    token and 200 with it; with SIPDRILL_CONTROL_OPEN_DOCS=1 they answer
    without it, while ``secured`` (a GET route) still needs it."""
    monkeypatch.delenv(OPEN_DOCS_ENV, raising=False)
    async with client(build()) as http:
        for path in DOCS:
            anonymous = await http.get(path)
            assert error_of(anonymous, 401, "unauthorized"), path
            assert anonymous.headers["WWW-Authenticate"] == "Bearer"
            wrong = await http.get(path, headers={"Authorization": "Bearer wrong"})
            error_of(wrong, 401, "unauthorized")
            ok = await http.get(path, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200, (path, ok.text)
        spec = (await http.get(DOCS[0], headers={"Authorization": f"Bearer {token}"})).json()
        assert spec["openapi"].startswith("3.") and spec["paths"]
    monkeypatch.setenv(OPEN_DOCS_ENV, "1")
    async with client(build()) as http:
        for path in DOCS:
            assert (await http.get(path)).status_code == 200, path
        error_of(await http.get(secured), 401, "unauthorized")


async def assert_routing_errors(http: httpx.AsyncClient, route: str, wrong_method: str) -> None:
    """An unknown path (404) and a method ``route`` does not take (405) in the one format."""
    assert "route" in error_of(await http.get(f"/no-such-route/{SECRET}"), 404, "not-found")
    response = await http.request(wrong_method, route)
    message = error_of(response, 405, "method-not-allowed")
    assert wrong_method in message and response.headers["Allow"], message
