"""Atomic file writes: a crash or a kill leaves the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(
    path: Path, data: bytes, *, mode: int = 0o600, make_parents: bool = False
) -> None:
    """Replace ``path`` with ``data``: write a temporary file beside it, fsync
    it, rename it over ``path``. A reader (or a restart after a crash) sees
    the whole old file or the whole new one, never a part.

    ``mode`` is the new file's permission bits, exactly (the default suits
    files that may hold tokens or keys); ``make_parents`` creates the
    directory first. A failure removes the temporary file and raises.
    """
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if mode != 0o600:  # mkstemp's
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
