"""`sipdrill admin backup|cms|pool ...` against fake pools and real Backup
Services served with uvicorn on 127.0.0.1 (in a thread: the commands run
their own event loop)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from fake_pool import FakePool, serve
from labkit import P1, P2, P3, make_topology
from procutil import serve_in_thread
from typer.testing import CliRunner

from sipdrill.backup.api import create_backup_app
from sipdrill.backup.client import LabClients
from sipdrill.backup.service import BackupService
from sipdrill.cli import app
from sipdrill.pool.store import UserStore

runner = CliRunner(env={"COLUMNS": "200"})


@dataclass
class ServedLab:
    root: Path
    topology_file: Path
    pools: dict[str, FakePool]
    pool_urls: dict[str, str] = field(default_factory=dict)
    backup_urls: dict[str, str] = field(default_factory=dict)

    def args(self, *, backups: bool = True) -> list[str]:
        out = ["--topology", str(self.topology_file)]
        for fqdn, url in self.pool_urls.items():
            out += ["--pool-url", f"{fqdn}={url}"]
        if backups:
            for fqdn, url in self.backup_urls.items():
                out += ["--backup-url", f"{fqdn}={url}"]
        return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedLab]:
    topology = make_topology()
    topology_file = tmp_path / "lab.yaml"
    topology_file.write_text(yaml.safe_dump(topology.model_dump(mode="json")))
    pools = {
        p: FakePool(topology, UserStore(tmp_path / f"{p}.db", p), tmp_path / p)
        for p in (P1, P2, P3)
    }
    for p in (P1, P2):
        pools[p].store.seed_from_topology(topology)
    lab = ServedLab(tmp_path, topology_file, pools)

    @contextlib.asynccontextmanager
    async def serve_lab() -> AsyncIterator[ServedLab]:
        async with AsyncExitStack() as stack:
            for fqdn, pool in pools.items():
                lab.pool_urls[fqdn] = await stack.enter_async_context(serve(pool.app))
            clients = LabClients(topology, pool_urls=lab.pool_urls)
            stack.push_async_callback(clients.aclose)
            for fqdn in (P1, P2):
                service = BackupService(topology, fqdn, tmp_path / f"backup-{fqdn}", clients)
                lab.backup_urls[fqdn] = await stack.enter_async_context(
                    serve(create_backup_app(service))
                )
            yield lab

    try:
        with serve_in_thread(serve_lab):
            yield lab
    finally:
        for pool in pools.values():
            pool.store.close()


def invoke(lab: ServedLab, *words: str, backups: bool = True) -> tuple[int, str]:
    result = runner.invoke(app, ["admin", *words, *lab.args(backups=backups)])
    return result.exit_code, result.output


def test_backup_sync_and_status(served: ServedLab) -> None:
    code, out = invoke(served, "backup", "status", "--pool", P1)
    assert code == 0, out
    assert "NotInitialized" in out
    code, out = invoke(served, "backup", "sync", "--pool", P1)
    assert code == 0, out
    assert f"{P1} -> {P2}: caught-up" in out
    code, out = invoke(served, "backup", "status", "--pool", P1, "--json")
    assert code == 0, out
    mine, theirs = json.loads(out)["directions"]
    assert mine["export_state"] == "SteadyState" and mine["backlog"] == 0
    assert theirs["source"] == P2 and theirs["observed_only"]
    code, out = invoke(served, "backup", "status", "--pool", P1, "--category", "CMS")
    assert code == 0 and f"ActiveMasterFqdn: {P1}" in out


def test_backup_status_without_the_service_shows_the_pools(served: ServedLab) -> None:
    served.backup_urls[P1] = "http://127.0.0.1:9"  # nothing listens there
    code, out = invoke(served, "backup", "status", "--pool", P1, "--json")
    assert code == 0, out
    status = json.loads(out)
    assert "unreachable" in status["service_error"]
    assert [d["observed_only"] for d in status["directions"]] == [True, True]
    code, out = invoke(served, "backup", "sync", "--pool", P1)
    assert code == 1 and "unreachable" in out


def test_refusals_exit_1_with_the_reason(served: ServedLab) -> None:
    code, out = invoke(served, "pool", "failover", "--pool", P3)
    assert code == 1 and "no-backup-pool" in out
    code, out = invoke(served, "pool", "failback", "--pool", P1)
    assert code == 1 and "not-failed-over" in out
    code, out = invoke(served, "backup", "sync", "--pool", "nope.lab.local")
    assert code == 1 and "not a pool" in out


def test_pool_failover_then_failback(served: ServedLab) -> None:
    code, out = invoke(served, "pool", "failover", "--pool", P1)
    assert code == 0, out
    assert f"{P1}: users failed over to {P2}" in out and "lost writes: 0" in out
    assert "final sync" in out
    served.pools[P2].store.add_contact("sip:alice@lab.local", "sip:new@example.com")
    code, out = invoke(served, "pool", "failback", "--pool", P1, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["serving_pool"] == P1 and report["lost_writes"] == 0
    assert "sip:new@example.com" in served.pools[P1].store.contacts("sip:alice@lab.local")


def test_cms_status_and_failover(served: ServedLab) -> None:
    code, out = invoke(served, "cms", "status")
    assert code == 0 and f"ActiveMasterFqdn: {P1}" in out and "UpToDate" in out
    code, out = invoke(served, "cms", "failover")
    assert code == 0, out
    assert f"active master {P1} -> {P2}" in out
    code, out = invoke(served, "cms", "status", "--json")
    assert json.loads(out)["ActiveMasterFqdn"] == P2


def test_disaster_failover_and_the_rpo_in_backup_status(served: ServedLab) -> None:
    code, out = invoke(served, "backup", "sync", "--pool", P1)
    assert code == 0, out
    for i in range(2):
        served.pools[P1].store.add_contact("sip:bob@lab.local", f"sip:tail{i}@example.com")
    code, out = invoke(served, "pool", "failover", "--pool", P1, "--disaster-mode")
    assert code == 0, out
    assert "lost writes (RPO): 2" in out and "(disaster mode)" in out
    code, out = invoke(served, "backup", "status", "--pool", P1)
    assert code == 0, out
    assert "FinalState" in out and "held: 2 change(s)" in out
    assert f"RPO of {P1} (FailedOver): its last disaster-mode failover lost 2 write(s)" in out
    code, out = invoke(served, "backup", "status", "--pool", P2, "--json")
    assert [loss["failover_lost_writes"] for loss in json.loads(out)["losses"]] == [2]
