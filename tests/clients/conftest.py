"""Fixtures of the clients tests: a loopback lab with two fake pools and the lab DNS server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clients_lab import Lab, lab_dns


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    async with lab_dns(lab.topology) as (port, _store):
        lab.dns_port = port
        await lab.pool1.start()
        await lab.pool2.start()
        try:
            yield lab
        finally:
            await lab.pool1.stop()
            await lab.pool2.stop()
