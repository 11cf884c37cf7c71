"""Hooks for the whole suite: what `make test` needs to run it on several
pytest-xdist workers at once (docs/decisions.md, "CI wall time")."""

from __future__ import annotations

import pytest

#: The local drills of this file are one group, the other slow tests another:
#: about 320 and 390 s here, each shorter than the docker group (~620 s).
_SLOW_A_FILES = frozenset({"test_drill_local.py"})


def _group(item: pytest.Item) -> str | None:
    """Three groups, each run on one worker in file order as in a serial run:
    ``docker``: the tests share one engine (compose projects, networks, a swarm
    init/leave that is engine-wide); ``slow-a`` and ``slow-b``: the local
    drills and other multi-process labs, two at a time at most (more at once on
    2 cores would push their timing bounds past their margins), each on its
    own loopback block (tests/labnet.py)."""
    if item.get_closest_marker("docker"):
        return "docker"
    if item.get_closest_marker("slow"):
        return "slow-a" if item.path.name in _SLOW_A_FILES else "slow-b"
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` xdist sends tests whose node id ends in
    ``@<group>`` to one worker. xdist 3.8 appends it by assigning
    ``item._nodeid``, which pytest 9 no longer reads (the id is ``item._id``):
    every group was silently spread over the workers. So the suffix is put
    here, where pytest 9 keeps the id; the check below fails loudly if a
    pytest upgrade moves it again."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        group = _group(item)
        if group is None or item.nodeid.endswith(f"@{group}"):
            continue
        item._id = coerce_node_id(f"{item.nodeid}@{group}")  # type: ignore[attr-defined]
        if not item.nodeid.endswith(f"@{group}"):
            raise pytest.UsageError(f"cannot put {item.nodeid} in xdist group {group!r}")
