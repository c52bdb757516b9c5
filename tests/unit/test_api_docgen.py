"""docs/api-reference.md is generated from the API models, complete, and committed up to date."""

from __future__ import annotations

import argparse
import enum
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from pdorch.api import commands as api_commands
from pdorch.api import docgen, scaler, servinggroup
from pdorch.api.base import ApiModel, CelRule, FreeForm, IntOrString, cel_schema

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
REFERENCE = REPO / "docs" / "api-reference.md"


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdorch")
    api_commands.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_committed_reference_is_up_to_date() -> None:
    assert docgen.check_reference(REFERENCE) == "", "run `pdorch api-docs` and commit docs/api-reference.md"


def test_cli_check_passes_on_the_committed_file_and_fails_on_a_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["api-docs", "--check", "--out", str(REFERENCE)]) == 0
    stale = tmp_path / "api-reference.md"
    stale.write_text(REFERENCE.read_text().replace("Pods per group, leader included", "Pods per group"))
    assert _run(["api-docs", "--check", "--out", str(stale)]) == 1
    out = capsys.readouterr()
    assert "+| `size` |" in out.out and "out of date" in out.err
    assert _run(["api-docs", "--out", str(stale)]) == 0
    assert stale.read_text() == REFERENCE.read_text()


def _all_models() -> list[type[BaseModel]]:
    return docgen.models((servinggroup.ServingGroup, scaler.ServingRoleScaler))


def test_every_field_enum_value_and_rule_of_every_model_is_documented() -> None:
    text = docgen.render_reference()
    models = _all_models()
    assert servinggroup.Role in models and scaler.ServingRoleScalerStatus in models
    for model in models:
        assert f"### {model.__name__}\n" in text
        assert text.count(f"### {model.__name__}\n") == 1, f"{model.__name__} documented twice"
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, f"{model.__name__}.{name}"
            assert field.description, f"{model.__name__}.{name} has no docstring"
            assert docgen._cell(field.description) in text
        for rule in getattr(model, "cel_rules", ()):
            assert f"- {rule.message}" in text
    for e in servinggroup.RoleType:
        assert f"`{e.value}`" in text


class _Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class _Inner(ApiModel):
    """Inner doc."""

    x: int = 1
    """An x."""


class _Sample(ApiModel):
    """A sample model."""

    cel_rules = (CelRule(rule="true", message="sample rule message", check=lambda _: True),)
    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(cel_rules)}

    name: str = Field(min_length=1, max_length=8, pattern=r"^[a-z]+$")
    """The name."""
    count: int | None = Field(None, gt=0, le=5)
    """How many."""
    color: _Color = Field(_Color.RED, json_schema_extra={"maxLength": 64})
    """The color."""
    surge: IntOrString = 1
    """Surge."""
    extra: FreeForm | None = None
    """Extra bits."""
    items: list[_Inner] | None = None
    """Inner items."""
    tags: dict[str, str] | None = None
    """Tags."""


def test_model_section_renders_types_constraints_defaults_and_rules() -> None:
    section = docgen.model_section(_Sample)
    assert section.startswith("### _Sample\n\nA sample model.\n")
    assert (
        "| `name` | string | yes |  | min length 1; max length 8; pattern `^[a-z]+$` | The name. |" in section
    )
    assert "| `count` | integer |  |  | > 0; <= 5 | How many. |" in section
    assert '| `color` | string: `red`, `blue` |  | `"red"` |  | The color. |' in section
    assert "| `surge` | int or string |  | `1` |  | Surge. |" in section
    assert "| `extra` | object |  |  |  | Extra bits. |" in section
    assert "| `items` | [][_Inner](#_inner) |" in section
    assert "| `tags` | map[string]string |" in section
    assert "- sample rule message" in section
