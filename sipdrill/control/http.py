"""The client side of the control APIs (docs/control-api.md): one peer,
with the lab's bearer token, timeouts and errors.

Errors: a peer that cannot be reached (connection refused, timeout, reset)
raises :class:`Unreachable`; a peer that answers with an error raises
:class:`~sipdrill.errors.OperationError` with the peer's ``code`` and
``message``, so a refusal crosses the wire unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sipdrill.errors import OperationError

#: Connect quickly (a silently dropped pool must not stall a failover for
#: long), but give an apply of a large page time to commit.
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=60.0, write=60.0, pool=5.0)


@dataclass
class Unreachable(OperationError):
    """A peer that did not answer at all (as opposed to one that refused)."""

    url: str = ""


def error_from(response: httpx.Response, what: str) -> OperationError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), str):
            return OperationError(body["code"], str(body.get("message", "")), response.status_code)
        detail = body.get("detail")
        if isinstance(detail, dict) and isinstance(detail.get("code"), str):
            return OperationError(
                detail["code"], str(detail.get("message", "")), response.status_code
            )
        if detail is not None:
            return OperationError(
                f"http-{response.status_code}", f"{what}: {detail}", response.status_code
            )
    text = response.text[:200]
    return OperationError(f"http-{response.status_code}", f"{what}: {text}", response.status_code)


class ControlClient:
    """One peer: an ``httpx.AsyncClient`` with the lab's auth and errors."""

    #: Human name for messages ("pool pool1.lab.local").
    name: str

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=transport, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self, time_limit: float | None = None) -> dict[str, Any]:
        """``GET /health``: every control API has it, without a token."""
        body = await self.request("GET", "/health", time_limit=time_limit)
        return body if isinstance(body, dict) else {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        time_limit: float | None = None,
    ) -> Any:
        what = f"{self.name}: {method} {path}"
        kwargs: dict[str, Any] = {}
        if time_limit is not None:
            kwargs["timeout"] = time_limit
        try:
            response = await self._client.request(method, path, json=json, params=params, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(
                "unreachable",
                f"{self.name} is unreachable at {self.base_url} ({type(exc).__name__}: {exc})",
                503,
                url=self.base_url,
            ) from None
        if response.status_code >= 400:
            raise error_from(response, what)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text
