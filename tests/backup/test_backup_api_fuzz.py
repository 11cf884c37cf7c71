"""The Backup Service's control API fuzzed from its OpenAPI (tests/apifuzz.py):
pool1's Backup Service over the two-pool loopback lab, in process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from apifuzz import LoopThread, fuzz
from pool_harness import P1, TOKEN, two_pools

from sipdrill.backup.api import create_backup_app
from sipdrill.backup.client import LabClients
from sipdrill.backup.service import BackupService


@contextlib.asynccontextmanager
async def backup_service(tmp: Path) -> AsyncIterator[BackupService]:
    async with (
        two_pools(tmp) as lab,
        LabClients(lab.topology, token=TOKEN, loopback=True) as clients,
    ):
        yield BackupService(lab.topology, P1, tmp / "backup", clients)


def test_backup_control_api_survives_fuzzing(tmp_path: Path) -> None:
    with LoopThread() as loop:
        service = loop.enter(backup_service(tmp_path))
        failures = fuzz(loop, create_backup_app(service, TOKEN), TOKEN)
    assert not failures, "\n\n".join(failures)
