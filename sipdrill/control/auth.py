"""The bearer-token check every control API (DNS, pool, Backup Service) makes.

Everything but ``/health`` and ``/metrics`` needs ``Authorization: Bearer
<token>`` when the process has a token. A missing or wrong token raises
``HTTPException(401)`` with ``WWW-Authenticate: Bearer``;
:class:`~sipdrill.control.app.ControlApp` answers it as ``{"code": "unauthorized",
"message": ...}`` (a bare FastAPI app, as FastAPI does: ``{"detail": ...}``).
"""

# No `from __future__ import annotations`: FastAPI reads the dependency's signature.

import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False)


def bearer_auth(token: str | None) -> Any:
    """The dependency (``Depends(...)``) that admits a request with ``token``;
    with ``token`` None, every request."""

    async def authorised(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if token is None:
            return
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    return Depends(authorised)
