"""Repointing DNS from a failed pool to a standby pool: the last step of the
budget disaster-recovery plan (seed 001, docs/sources.md: "update DNS records so that the A
record points to the IP address of your DR Standard Edition server, or update
your SRV records to point to the DR Standard Edition server").

Pure: it reads one DNS view's records (as the DNS control API lists them) and
returns the changes for the API's ``POST /changes``, so the same plan works
whatever addresses a runtime gave the pools.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sipdrill.errors import OperationError

_ADDRESS_TYPES = ("A", "AAAA")


def _fqdn(name: str) -> str:
    return name.lower().rstrip(".")


def repoint_changes(
    records: Iterable[Mapping[str, Any]],
    old_pool: str,
    new_pool: str,
    *,
    old_hosts: Iterable[str] = (),
    view: str | None = None,
) -> list[dict[str, Any]]:
    """The changes that send clients looking for ``old_pool`` to ``new_pool``.

    ``records``: one view's records (``name``, ``type``, ``ttl``, ``data``).
    SRV records that name ``old_pool`` name ``new_pool`` instead (priority,
    weight and port kept); address records that hold ``old_pool``'s addresses,
    at names other than the pool's own (``old_pool`` and ``old_hosts``, its
    front ends), get ``new_pool``'s addresses instead. Empty when nothing in
    the view points to ``old_pool``; raises :class:`OperationError` when
    ``new_pool`` has no address in the view.
    """
    old, new = _fqdn(old_pool), _fqdn(new_pool)
    own = {old, new} | {_fqdn(h) for h in old_hosts}
    rrsets: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        rrsets.setdefault((_fqdn(record["name"]), str(record["type"]).upper()), []).append(record)
    where = f" in DNS view {view!r}" if view else ""
    old_addresses = {t: {str(r["data"]) for r in rrsets.get((old, t), [])} for t in _ADDRESS_TYPES}
    new_addresses = {t: [str(r["data"]) for r in rrsets.get((new, t), [])] for t in _ADDRESS_TYPES}
    if not any(new_addresses.values()):
        raise OperationError(
            "dns-repoint", f"{new_pool} has no A or AAAA record{where}: nothing to point to", 409
        )
    views = [view] if view else None
    changes: list[dict[str, Any]] = []
    for (name, rtype), rrset in sorted(rrsets.items()):
        data: list[str] = []
        if rtype == "SRV":
            for r in rrset:
                priority, weight, port, target = str(r["data"]).split()
                if _fqdn(target) == old:
                    target = new + "."
                data.append(f"{priority} {weight} {port} {target}")
        elif rtype in _ADDRESS_TYPES and name not in own:
            ours = old_addresses[rtype]
            for r in rrset:
                data += new_addresses[rtype] if str(r["data"]) in ours else [str(r["data"])]
        else:
            continue
        data = list(dict.fromkeys(data))
        if data != [str(r["data"]) for r in rrset] and data:
            change: dict[str, Any] = {
                "op": "replace",
                "name": name + ".",
                "type": rtype,
                "data": data,
                "ttl": int(rrset[0]["ttl"]),
            }
            if views is not None:
                change["views"] = views
            changes.append(change)
    return changes
