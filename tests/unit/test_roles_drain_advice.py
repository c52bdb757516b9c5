"""Which vLLM roles `pdorch render` warns about: their engines abort requests on SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pdorch.api.servinggroup import ServingGroup
from pdorch.roles.drain_advice import roles_without_drain

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).parents[2] / "examples"


def _example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name / "servinggroup.yaml").read_text())


def _without_flag(doc: dict[str, Any]) -> dict[str, Any]:
    for role in doc["spec"]["roles"]:
        for c in (role.get("workerTemplate") or {}).get("spec", {}).get("containers", []):
            for key in ("command", "args"):
                argv = c.get(key) or []
                if "--shutdown-timeout" in argv:  # the sim-pd form: flag, then value
                    i = argv.index("--shutdown-timeout")
                    argv = argv[:i] + argv[i + 2 :]
                c[key] = [a for a in argv if not str(a).startswith("--shutdown-timeout=")]
    return doc


def test_the_examples_drain_and_roles_without_the_flag_are_named() -> None:
    for name in ("vllm-pd", "sim-pd", "sglang-pd"):
        assert roles_without_drain(ServingGroup.model_validate(_example(name))) == [], name
    assert roles_without_drain(ServingGroup.model_validate(_without_flag(_example("vllm-pd")))) == [
        "prefill",
        "decode",
    ]
    assert roles_without_drain(ServingGroup.model_validate(_without_flag(_example("sim-pd")))) == [
        "prefill",
        "decode",
    ]
    # SGLang drains without a flag; a template leaving the command to the image is not judged.
    assert roles_without_drain(ServingGroup.model_validate(_without_flag(_example("sglang-pd")))) == []
    doc = _without_flag(_example("vllm-pd"))
    for role in doc["spec"]["roles"]:
        for c in (role.get("workerTemplate") or {}).get("spec", {}).get("containers", []):
            c.pop("command", None)
            c.pop("args", None)
    assert roles_without_drain(ServingGroup.model_validate(doc)) == []
    # The underscore spelling vLLM also takes, and a flag inside `sh -c`.
    doc = _without_flag(_example("vllm-pd"))
    for role in doc["spec"]["roles"]:
        for c in (role.get("workerTemplate") or {}).get("spec", {}).get("containers", []):
            c["command"] = ["sh", "-c", "exec vllm serve m --shutdown_timeout=30"]
            c.pop("args", None)
    assert roles_without_drain(ServingGroup.model_validate(doc)) == []
