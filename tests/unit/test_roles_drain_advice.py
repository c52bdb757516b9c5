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
    # SGLang drains without a flag.
    assert roles_without_drain(ServingGroup.model_validate(_without_flag(_example("sglang-pd")))) == []


def _vllm_with(containers: list[dict[str, Any]]) -> list[str]:
    """roles_without_drain of the vllm-pd example whose decode pod runs `containers`."""
    doc = _example("vllm-pd")
    for role in doc["spec"]["roles"]:
        if role["type"] == "decode":
            role["workerTemplate"]["spec"]["containers"] = containers
    return roles_without_drain(ServingGroup.model_validate(doc))


def test_each_vllm_container_is_judged_on_its_own_flag() -> None:
    image = "vllm/vllm-openai:v0.18.2"
    # The image's entrypoint runs vLLM: only args given, no flag.
    assert _vllm_with([{"name": "e", "image": image, "args": ["--model", "m"]}]) == ["decode"]
    assert (
        _vllm_with([{"name": "e", "image": image, "args": ["--model", "m", "--shutdown-timeout=30"]}]) == []
    )
    # 0 is vLLM's default (abort); so is a value vLLM would refuse.
    assert _vllm_with([{"name": "e", "image": image, "args": ["--shutdown-timeout", "0"]}]) == ["decode"]
    # Inside `sh -c`, in either spelling.
    sh = ["sh", "-c", "exec vllm serve m --port 8000"]
    assert _vllm_with([{"name": "e", "image": "busybox", "command": sh}]) == ["decode"]
    sh = ["sh", "-c", "exec vllm serve m --shutdown_timeout=30"]
    assert _vllm_with([{"name": "e", "image": "busybox", "command": sh}]) == []
    # A sidecar's flag does not cover the engine; a sidecar's name is no engine; a model path
    # that merely contains "vllm" is no vLLM command.
    side = {"name": "s", "image": "exporter:1", "args": ["--shutdown-timeout=5"]}
    assert _vllm_with([{"name": "e", "image": image, "args": ["--model", "m"]}, side]) == ["decode"]
    assert _vllm_with([{"name": "e", "image": "my-engine:1", "args": ["--model", "/models/vllm-foo"]}]) == []
    assert _vllm_with([{"name": "vllm-exporter", "image": "exporter:1"}]) == []
