"""Docs that describe the code must not drift from it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from sipdrill import topology

ROOT = Path(__file__).resolve().parents[1]


def _models() -> list[type[BaseModel]]:
    return [
        m
        for m in vars(topology).values()
        if isinstance(m, type)
        and issubclass(m, BaseModel)
        and m.__module__ == topology.__name__
        and not m.__name__.startswith("_")
    ]


def test_topology_format_documents_every_field() -> None:
    doc = (ROOT / "docs" / "topology-format.md").read_text()
    missing = [
        f"{m.__name__}.{name}"
        for m in _models()
        for name in m.model_fields
        if f"`{name}`" not in doc
    ]
    assert not missing, f"docs/topology-format.md does not mention: {missing}"


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert "make test" in head
    assert "sipdrill " in head
