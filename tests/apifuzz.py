"""Property-based fuzzing of a control API from its own OpenAPI document
(schemathesis; the choice, and how it is bounded: docs/decisions.md). No tests
in here: each service's tests call :func:`fuzz` on the app it builds.

The app runs in process (httpx over ASGI) on a loop of its own, in a thread
(:class:`LoopThread`), with the real objects it serves (pools, runners, a
zone) started on that loop; hypothesis drives the requests from the test's
thread. Every operation of ``/openapi.json`` (fetched with the token, as a
client would) gets ``examples`` valid requests and ``examples`` invalid ones,
with the token. Each answer is checked:

- no 5xx (``not_a_server_error``);
- the status is one the operation documents (``status_code_conformance``),
  with the documented content type and a body that matches the documented
  schema, errors included (``content_type_conformance``,
  ``response_schema_conformance``);
- an invalid request is refused with a 4xx (``negative_data_rejection``);
- an error never repeats a string the body carried (:func:`no_echo`).

Hypothesis is derandomized (the same examples on every run: a red run is a
finding, not luck); ``SIPDRILL_API_FUZZ_EXAMPLES`` raises the budget for a
deeper run by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, TypeVar
from urllib.parse import unquote

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

T = TypeVar("T")
BASE = "http://control"
EXAMPLES = int(os.environ.get("SIPDRILL_API_FUZZ_EXAMPLES", "0")) or None


class LoopThread:
    """An event loop running in a thread of its own: the app and what it
    serves live there, a synchronous test (hypothesis) calls into it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stack = AsyncExitStack()

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stack.aclose(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def enter(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` on the loop; it is exited (in reverse order) when the thread stops."""
        return self.run(self._stack.enter_async_context(cm), timeout=60)


def no_echo(ctx: Any, response: Any, case: Case) -> bool | None:
    """An error never repeats a string the request body carried (six
    characters or more, and not a word of the API's own document)."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
        shown = body.get("message", "") if isinstance(body, dict) else response.text
    except ValueError:
        shown = response.text
    # The schema's own words, and the path and query (a refusal may name what
    # the path addressed), are not the body's; nor is the name of an unknown
    # field, which a message names on purpose.
    own = json.dumps(case.operation.schema.raw_schema)
    shown = _UNKNOWN_FIELD.sub("", shown)
    echoed = [
        s for s in _strings(case.body)
        # "[<key>]" is how a message shows a dict key; a body may hold that text too.
        if len(s) >= 6 and s not in own and s not in _texts(case) and "<key>" not in s
        and s in shown
    ]
    if echoed:
        raise AssertionError(f"the error repeats the request's {echoed[0]!r}: {shown!r}")
    return None


_UNKNOWN_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}(?=: unknown field)")


def _texts(case: Case) -> set[str]:
    # Path parameters are kept percent-encoded once the case was sent.
    path = {unquote(s) for s in _strings(dict(case.path_parameters or {}))}
    return path | set(_strings(dict(case.query or {})))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    no_echo,
]


def fuzz(
    runner: LoopThread,
    app: Any,
    token: str,
    *,
    examples: int = 10,
    skip: Callable[[str], bool] = lambda label: False,
) -> list[str]:
    """Fuzz every operation of ``app`` (``skip(label)`` leaves one out, e.g.
    ``POST /stop`` where it would end the run); the failures, one text each."""
    examples = EXAMPLES or examples
    auth = {"Authorization": f"Bearer {token}"}
    crashes: list[str] = []

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        # The app answers 500 itself, then re-raises for the server's log: keep the traceback.
        try:
            await app(scope, receive, send)
        except Exception:
            crashes.append(traceback.format_exc())

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=recorded), base_url=BASE)
    spec = runner.run(http.get("/openapi.json", headers=auth))
    assert spec.status_code == 200, spec.text
    schema = schemathesis.openapi.from_dict(spec.json())
    failures: list[str] = open_bodies(spec.json())

    async def send(kwargs: dict[str, Any]) -> httpx.Response:
        if "data" in kwargs:
            kwargs["content"] = kwargs.pop("data")
        kwargs.pop("cookies", None)
        crashes.clear()
        response = await http.request(**kwargs)
        if crashes:
            raise AssertionError(f"{response.status_code} after a crash:\n{crashes[-1]}")
        return response

    for result in schema.get_all_operations():
        operation = result.ok()
        if skip(operation.label):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_one(runner, send, operation, mode, auth, examples)
            except Unsatisfiable:
                pass  # no invalid request exists (no parameters, no body)
            # Every operation runs; the failures are reported together.
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is Base
                text = str(exc)  # the reproducing curl line can carry a body of megabytes
                if len(text) > 3000:
                    text = text[:3000] + " ... (cut)"
                failures.append(f"{operation.label} ({mode.value}): {text}")
    runner.run(http.aclose())
    return failures


def open_bodies(spec: dict[str, Any]) -> list[str]:
    """Request bodies whose objects take fields they do not declare: every
    model a route reads must refuse unknown fields (RequestModel)."""
    components = spec.get("components", {}).get("schemas", {})
    found: list[str] = []

    def walk(node: Any, where: str, seen: frozenset[str]) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, where, seen)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                walk(components.get(name), f"{where} ({name})", seen | {name})
            return
        if "properties" in node and node.get("additionalProperties") is not False:
            found.append(f"{where}: takes unknown fields")
        for key, value in node.items():
            if key != "properties":
                walk(value, where, seen)
        for value in (node.get("properties") or {}).values():
            walk(value, where, seen)

    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            body = operation.get("requestBody") if isinstance(operation, dict) else None
            if body:
                walk(body, f"{method.upper()} {path}", frozenset())
    return found


def _fuzz_one(
    runner: LoopThread,
    send: Callable[[dict[str, Any]], Awaitable[httpx.Response]],
    operation: Any,
    mode: GenerationMode,
    auth: dict[str, str],
    examples: int,
) -> None:
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, headers=auth))
    def one(case: Case) -> None:
        kwargs = case.as_transport_kwargs(base_url=BASE, headers=auth)
        response = runner.run(send(kwargs))
        case.validate_response(response, checks=checks, headers=auth)

    one()
