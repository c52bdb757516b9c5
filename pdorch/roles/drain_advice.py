"""Whether an engine container drains on SIGTERM, and the advice `pdorch render` prints for vLLM
engines that would abort their requests in flight when a rollout or a scale-down deletes their pod
(vLLM's default on SIGTERM)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from pdorch.api.servinggroup import EngineName, RoleType, ServingGroup

# vLLM's flag (0.18+) for finishing requests in flight on SIGTERM; it takes either spelling.
SHUTDOWN_FLAGS = ("--shutdown-timeout", "--shutdown_timeout")


def _words(container: dict[str, Any]) -> list[str]:
    # Whitespace-split, so a command inside `sh -c "..."` is read word by word too.
    return " ".join(str(a) for a in (container.get("command") or []) + (container.get("args") or [])).split()


def flag_seconds(container: dict[str, Any], flags: tuple[str, ...]) -> float | None:
    """The seconds a container's command gives one of ``flags`` (``--flag N`` or ``--flag=N``);
    None when absent, 0 when not a number (a process refusing to start waits for nothing)."""
    words = _words(container)
    for i, word in enumerate(words):
        value = None
        if word in flags and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(tuple(f + "=" for f in flags)):
            value = word.split("=", 1)[1]
        if value is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return None


def shutdown_timeout_s(container: dict[str, Any]) -> float | None:
    """The container's ``--shutdown-timeout`` in seconds (`flag_seconds`)."""
    return flag_seconds(container, SHUTDOWN_FLAGS)


def runs_vllm(container: dict[str, Any]) -> bool:
    """Whether a container runs vLLM: a vLLM image, a `vllm` command word (`vllm serve`, `python
    -m vllm.entrypoints...`, also inside `sh -c`), or `pdorch sim --protocol vllm`."""
    image = str(container.get("image") or "").rsplit("/", 1)[-1]
    words = _words(container)
    return (
        "vllm" in image.lower()
        or any(w == "vllm" or w.endswith("/vllm") or w.startswith("vllm.") for w in words)
        or any(a == "--protocol" and b == "vllm" for a, b in pairwise(words))
        or "--protocol=vllm" in words
    )


def roles_without_drain(sg: ServingGroup) -> list[str]:
    """Prefill and decode roles whose serving pod has a vLLM container without a positive
    ``--shutdown-timeout`` (judged per container; a flag set by an image's entrypoint is not seen)."""
    if sg.spec.engine.name != EngineName.VLLM:
        return []
    out = []
    for role in sg.spec.roles:
        template = role.leader_template or role.worker_template
        if role.type not in (RoleType.PREFILL, RoleType.DECODE) or template is None:
            continue
        containers = (template.get("spec") or {}).get("containers") or []
        if any(runs_vllm(c) and not (shutdown_timeout_s(c) or 0) > 0 for c in containers):
            out.append(role.name)
    return out
