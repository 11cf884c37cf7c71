"""The environment every lab process and administrator command reads."""

from __future__ import annotations

import os

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sipdrill.errors import OperationError

#: The bearer token of every control API (the lab's processes and its admin commands).
TOKEN_ENV = "SIPDRILL_CONTROL_TOKEN"
#: The topology file of the admin commands (``--topology``).
TOPOLOGY_ENV = "SIPDRILL_TOPOLOGY"
#: The admin commands' ``--loopback``: the lab runs on the local runtime's 127.x addresses.
LOOPBACK_ENV = "SIPDRILL_LOOPBACK"
#: Serve every control API's /docs, /redoc and /openapi.json without the token.
OPEN_DOCS_ENV = "SIPDRILL_CONTROL_OPEN_DOCS"


class ControlSettings(BaseSettings):
    """What every control API reads from ``SIPDRILL_CONTROL_*`` (the token is
    read by :func:`token_from_env`, as the admin commands read it too)."""

    model_config = SettingsConfigDict(env_prefix="SIPDRILL_CONTROL_", extra="ignore")

    open_docs: bool = Field(
        default=False,
        description="Serve /docs, /redoc and /openapi.json without the bearer token "
        "(a lab on a trusted network, a browser that cannot send the header).",
    )


def control_settings() -> ControlSettings:
    """The settings from the environment; a value that is not one refuses to start."""
    try:
        return ControlSettings()
    except ValidationError:
        raise OperationError(
            "bad-setting", f"{OPEN_DOCS_ENV} is 1 or 0 (true or false, yes or no)", 500
        ) from None


def token_from_env(token: str | None = None) -> str | None:
    """``token`` if given, else ``$SIPDRILL_CONTROL_TOKEN`` (None if unset or empty)."""
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)
