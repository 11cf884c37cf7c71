"""ControlApp: the one construction of every control API (its errors, its
docs behind the token, unknown fields refused, the errors documented)."""

from __future__ import annotations

from typing import Annotated

import pytest
from apicheck import SECRET, assert_docs_behind_token, assert_routing_errors, client, error_of
from fastapi import Query
from pydantic import Field

from sipdrill.control.app import ControlApp, RequestModel, describe_validation, errors
from sipdrill.control.auth import bearer_auth
from sipdrill.control.settings import OPEN_DOCS_ENV
from sipdrill.errors import OperationError

TOKEN = "app-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Inner(RequestModel):
    contact: str = Field(pattern=r"^sip:[^@]+@[^@]+$")
    weight: float = 1.0


class Body(RequestModel):
    name: str
    enabled: bool = False
    items: list[Inner] = Field(default_factory=list)
    timers: dict[str, float] = Field(default_factory=dict)


def make_app() -> ControlApp:
    app = ControlApp("test", TOKEN)
    auth = [bearer_auth(TOKEN)]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/things", dependencies=auth, responses=errors(409))
    async def things(body: Body) -> dict[str, int]:
        if body.name == "taken":
            raise OperationError("name-taken", "that name is taken", 409)
        return {"items": len(body.items)}

    @app.get("/page", dependencies=auth)
    async def page(limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/boom", dependencies=auth)
    async def boom() -> dict[str, str]:
        raise RuntimeError(f"the secret is {SECRET}")

    return app


async def test_docs_need_the_token_unless_opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    await assert_docs_behind_token(make_app, TOKEN, "/page", monkeypatch)


def test_a_bad_open_docs_setting_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPEN_DOCS_ENV, "perhaps")
    with pytest.raises(OperationError) as exc:
        make_app()
    assert exc.value.code == "bad-setting" and OPEN_DOCS_ENV in exc.value.message


async def test_validation_errors_say_where_and_what_without_the_values() -> None:
    async with client(make_app(), AUTH) as http:
        bad = {
            "enabled": SECRET,
            "items": [{"contact": "sip:a@b"}, {"contact": SECRET, "weight": SECRET}],
            "timers": {SECRET: SECRET},
        }
        message = error_of(await http.post("/things", json=bad), 422, "bad-request")
        assert message == (
            "name: Field required; "
            "enabled: Input should be a valid boolean; "
            "items[1].contact: String should match pattern '^sip:[^@]+@[^@]+$'; "
            "items[1].weight: Input should be a valid number; "
            "timers[<key>]: Input should be a valid number"
        )
        message = error_of(await http.get("/page", params={"limit": SECRET}), 422, "bad-request")
        assert message.startswith("query parameter limit: Input should be a valid integer")
        error_of(await http.get("/page", params={"limit": 0}), 422, "bad-request")


async def test_only_five_problems_are_listed() -> None:
    async with client(make_app(), AUTH) as http:
        bad = {"name": "x", "items": [{"contact": SECRET} for _ in range(8)]}
        message = error_of(await http.post("/things", json=bad), 422)
        assert message.count("items[") == 5 and message.endswith("; and 3 more")


async def test_unknown_fields_are_refused_by_name() -> None:
    async with client(make_app(), AUTH) as http:
        r = await http.post("/things", json={"name": "x", "mode": SECRET, "items": [{
            "contact": "sip:a@b", "wieght": 2}]})
        message = error_of(r, 422, "bad-request")
        assert message == (
            "items[0].wieght: unknown field (not in the schema); "
            "mode: unknown field (not in the schema)"
        )
        r = await http.post("/things", json={"name": "x", f"{SECRET} <b>": 1})
        assert error_of(r, 422) == "[<key>]: unknown field (not in the schema)"


async def test_values_are_taken_as_the_schema_says() -> None:
    async with client(make_app(), AUTH) as http:
        for body in ({"name": "x", "enabled": 0}, {"name": "x", "enabled": "true"},
                     {"name": 5}, {"name": "x", "timers": {"a": "1.5"}}):
            error_of(await http.post("/things", json=body), 422, "bad-request")
        for text in (b'{"name": "x", "timers": {"a": NaN}}', b'{"name": "\\ud800"}'):
            r = await http.post("/things", content=text,
                                headers={"Content-Type": "application/json"})
            error_of(r, 422, "bad-request")
        assert (await http.post("/things", json={"name": "x", "timers": {"a": 1}})).json() == {
            "items": 0
        }


async def test_bodies_that_are_not_json() -> None:
    async with client(make_app(), AUTH) as http:
        headers = {"Content-Type": "application/json"}
        r = await http.post("/things", content=b'{"name": "' + SECRET.encode(), headers=headers)
        message = error_of(r, 422, "bad-request")
        assert message == "body: not valid JSON at character 9 (Unterminated string starting at)"
        r = await http.post("/things", content=b"\xff\xfe" + SECRET.encode(), headers=headers)
        assert error_of(r, 422, "bad-request").startswith("body: not valid JSON")
        assert error_of(await http.post("/things"), 422, "bad-request") == "body: Field required"


async def test_refusals_auth_routing_and_crashes_share_the_format() -> None:
    async with client(make_app()) as http:
        assert error_of(await http.get("/page"), 401, "unauthorized")
        http.headers.update(AUTH)
        r = await http.post("/things", json={"name": "taken"})
        assert error_of(r, 409, "name-taken") == "that name is taken"
        await assert_routing_errors(http, "/things", "DELETE")
        crash = await http.get("/boom")
        message = error_of(crash, 500, "internal-error")
        assert "log" in message and "RuntimeError" not in crash.text


def test_the_openapi_document_declares_the_error_answers() -> None:
    spec = make_app().openapi()
    error = {"$ref": "#/components/schemas/ErrorBody"}
    assert spec["components"]["schemas"]["ErrorBody"]["additionalProperties"] is False
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    things = spec["paths"]["/things"]["post"]["responses"]
    assert set(things) == {"200", "401", "409", "413", "422", "500"}
    for status in ("401", "409", "413", "422", "500"):
        assert things[status]["content"]["application/json"]["schema"] == error, status
    assert set(spec["paths"]["/health"]["get"]["responses"]) == {"200", "500"}
    assert set(spec["paths"]["/page"]["get"]["responses"]) == {"200", "401", "422", "500"}
    assert not set(spec["paths"]) & {"/docs", "/redoc", "/openapi.json"}
    body = spec["components"]["schemas"]["Body"]
    assert body["additionalProperties"] is False


def test_describe_validation_never_shows_values_a_message_would_quote() -> None:
    problems = [
        {"type": "value_error", "loc": ("body", "name"), "msg": f"Value error, {SECRET} is bad",
         "input": SECRET},
        {"type": "union_tag_invalid", "loc": ("body", "kind"),
         "msg": f"Input tag '{SECRET}' found using 'kind' does not match", "input": SECRET},
    ]
    text = describe_validation(problems, {"name", "kind"})
    assert SECRET not in text
    assert text == "name: not valid (value_error); kind: not valid (union_tag_invalid)"
