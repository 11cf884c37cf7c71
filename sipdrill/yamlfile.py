"""YAML files the user writes (topologies, drills), loaded into pydantic models
with every problem located: file, line, field, and what to change."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sipdrill.errors import ConfigFileError, FileIssue

M = TypeVar("M", bound=BaseModel)


class Lines:
    """Maps a path of keys and indexes in the YAML document to a line number."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def line(self, path: Sequence[str | int]) -> int | None:
        node = self.root
        if node is None:
            return None
        best = node.start_mark.line + 1
        for part in path:
            child: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == part:
                        child = value
                        # Point at the key's line: a multi-line value starts below it.
                        best = key.start_mark.line + 1
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                child = node.value[part]
                best = child.start_mark.line + 1
            if child is None:
                break
            node = child
        return best


def dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def fix_for(err_type: str, ctx: Mapping[str, Any] | None, field: str) -> str:
    ctx = ctx or {}
    fixes = {
        "missing": f"add `{field.rsplit('.', 1)[-1]}`",
        "extra_forbidden": "remove this field or correct its spelling",
        "greater_than_equal": f"use a value of at least {ctx.get('ge')}",
        "less_than_equal": f"use a value of at most {ctx.get('le')}",
        "greater_than": f"use a value above {ctx.get('gt')}",
        "less_than": f"use a value below {ctx.get('lt')}",
        "enum": f"use one of {ctx.get('expected')}",
        "literal_error": f"use one of {ctx.get('expected')}",
        "string_pattern_mismatch": f"match the pattern {ctx.get('pattern')}",
        "too_short": "add at least one entry",
    }
    if err_type.startswith("ip_v4") or "dotted IPv4" in str(ctx.get("error", "")):
        return "write a dotted IPv4 address or network such as 172.30.1.0/24"
    return fixes.get(err_type, "correct the value")


def load_model(
    text: str, fname: str, model: type[M], error: type[ConfigFileError], start_hint: str
) -> tuple[M, Lines]:
    """Parse ``text`` as YAML into ``model``; raise ``error`` listing every issue."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(
            fname,
            [
                FileIssue(
                    fname,
                    line,
                    "(yaml)",
                    f"malformed YAML: {problem}",
                    "fix the YAML syntax (indentation, colons, quotes) at this line",
                )
            ],
        ) from None
    lines = Lines(root)
    if not isinstance(data, dict):
        raise error(
            fname,
            [FileIssue(fname, 1, "(document)", "the document is not a mapping", start_hint)],
        )
    try:
        return model.model_validate(data), lines
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if isinstance(p, (str, int))]
            field = dotted(loc)
            issues.append(
                FileIssue(
                    fname,
                    lines.line(loc),
                    field,
                    err["msg"],
                    fix_for(err["type"], err.get("ctx"), field),
                )
            )
        raise error(fname, issues) from None
