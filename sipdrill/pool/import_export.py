"""Export-CsUserData and Import-CsUserData on a running pool: the store to
a file in the state directory's ``exports`` folder (the control API returns
its bytes), and an uploaded file back into the store. :mod:`.userdata`
writes and reads the formats.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sipdrill.pool.store import UserStore
from sipdrill.pool.userdata import export_cs_user_data, import_cs_user_data

EXPORTS = "exports"


async def export_users(
    store: UserStore, state_dir: Path, fmt: str
) -> tuple[bytes, dict[str, Any]]:
    """The export (XML, or JSON for ``fmt`` json) and its counts."""

    def run() -> tuple[bytes, dict[str, Any]]:
        out_dir = state_dir / EXPORTS
        out_dir.mkdir(exist_ok=True)
        path = out_dir / f"userdata-{int(time.time())}.{fmt}"
        result = export_cs_user_data(store, path, fmt="json" if fmt == "json" else "xml")
        summary = {"pool": result.pool, "users": result.users, "contacts": result.contacts}
        return path.read_bytes(), summary

    return await asyncio.to_thread(run)


async def import_users(store: UserStore, state_dir: Path, data: bytes) -> dict[str, Any]:
    """Restore an export's users and contacts into ``store``; what was restored."""

    def run() -> dict[str, Any]:
        out_dir = state_dir / EXPORTS
        out_dir.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix="import-", suffix=".dat")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # Errors name "the uploaded export", not the temporary file's path.
            result = import_cs_user_data(store, tmp, name="the uploaded export")
        finally:
            Path(tmp).unlink(missing_ok=True)
        return {
            "users_restored": result.users_restored,
            "contacts_restored": result.contacts_restored,
            "skipped": list(result.skipped),
        }

    return await asyncio.to_thread(run)
