"""The clients control API fuzzed from its OpenAPI (tests/apifuzz.py), over a
runner whose endpoints sign in to the loopback lab's pools."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from apifuzz import LoopThread, fuzz
from clients_lab import Lab, lab_dns, runner_for

from sipdrill.clients.api import create_app
from sipdrill.clients.runner import ClientRunner

TOKEN = "clients-fuzz-token"


@contextlib.asynccontextmanager
async def running(tmp: Path) -> AsyncIterator[ClientRunner]:
    lab = Lab(tmp)
    async with lab_dns(lab.topology) as (port, _store):
        lab.dns_port = port
        await lab.pool1.start()
        await lab.pool2.start()
        try:
            async with runner_for(lab, ["pool1.lab.local:*", "pool2.lab.local:*"]) as runner:
                runner.start()
                yield runner
        finally:
            await lab.pool1.stop()
            await lab.pool2.stop()


def test_clients_control_api_survives_fuzzing(tmp_path: Path) -> None:
    with LoopThread() as loop:
        runner = loop.enter(running(tmp_path))
        failures = fuzz(loop, create_app(runner, TOKEN), TOKEN)
    assert not failures, "\n\n".join(failures)
