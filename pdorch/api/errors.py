"""Turn validation failures into messages that name the field and say what to fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml
from pydantic import ValidationError

from pdorch.api.servinggroup import KIND, ServingGroup


class SpecError(ValueError):
    """A ServingGroup (or the file holding it) is invalid; `problems` lists one message per issue."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def field_path(loc: Iterable[int | str]) -> str:
    """`('spec', 'roles', 1, 'size')` -> `spec.roles[1].size`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "-" in part:
            # pydantic's internal step names (e.g. `function-after[...]`, union tags): not fields.
            continue
        else:
            out += f".{part}" if out else part
    return out


def format_validation_error(err: ValidationError) -> list[str]:
    """One `field.path: message` line per problem (a model rule may contribute several lines)."""
    lines: list[str] = []
    for e in err.errors(include_url=False):
        path = field_path(e["loc"]) or "<object>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.extend(f"{path}: {part}" for part in msg.splitlines() if part.strip())
    return lines


def load_documents(text: str, source: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of `text` (each must be a mapping)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(source, [f"not valid YAML: {exc}"]) from exc
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise SpecError(source, [f"document {i} is not a YAML mapping"])
    return docs


def load_servinggroups(text: str, source: str = "<input>") -> list[ServingGroup]:
    """Every ServingGroup in a (multi-document) YAML text, validated; other kinds are refused."""
    groups = []
    problems: list[str] = []
    for i, doc in enumerate(load_documents(text, source)):
        if doc.get("kind") != KIND:
            problems.append(f"document {i}: kind must be {KIND}, got {doc.get('kind')!r}")
            continue
        try:
            groups.append(ServingGroup.model_validate(doc))
        except ValidationError as exc:
            problems.extend(format_validation_error(exc))
    if problems:
        raise SpecError(source, problems)
    if not groups:
        raise SpecError(source, [f"no {KIND} found"])
    return groups
