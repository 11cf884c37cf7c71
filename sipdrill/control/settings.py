"""The environment every lab process and administrator command reads."""

from __future__ import annotations

import os

#: The bearer token of every control API (the lab's processes and its admin commands).
TOKEN_ENV = "SIPDRILL_CONTROL_TOKEN"
#: The topology file of the admin commands (``--topology``).
TOPOLOGY_ENV = "SIPDRILL_TOPOLOGY"
#: The admin commands' ``--loopback``: the lab runs on the local runtime's 127.x addresses.
LOOPBACK_ENV = "SIPDRILL_LOOPBACK"


def token_from_env(token: str | None = None) -> str | None:
    """``token`` if given, else ``$SIPDRILL_CONTROL_TOKEN`` (None if unset or empty)."""
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)
