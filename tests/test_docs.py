"""Docs that describe the code must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from sipdrill import topology
from sipdrill.orchestrator import drill

ROOT = Path(__file__).resolve().parents[1]


def _models(module: object) -> list[type[BaseModel]]:
    return [
        m
        for m in vars(module).values()
        if isinstance(m, type)
        and issubclass(m, BaseModel)
        and m.__module__ == module.__name__  # type: ignore[attr-defined]
        and not m.__name__.startswith("_")
        and m.__name__ != "LoadedDrill"
    ]


@pytest.mark.parametrize(
    ("module", "doc_name"), [(topology, "topology-format.md"), (drill, "drill-format.md")]
)
def test_file_formats_document_every_field(module: object, doc_name: str) -> None:
    doc = (ROOT / "docs" / doc_name).read_text()
    missing = [
        f"{m.__name__}.{name}"
        for m in _models(module)
        for name in m.model_fields
        if f"`{name}`" not in doc
    ]
    assert not missing, f"docs/{doc_name} does not mention: {missing}"


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert "make test" in head
    assert "sipdrill " in head
