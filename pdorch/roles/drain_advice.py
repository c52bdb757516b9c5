"""Advice printed by `pdorch render`: vLLM engines that would abort their requests in flight when a
rollout or a scale-down deletes their pod (vLLM's default on SIGTERM)."""

from __future__ import annotations

from pdorch.api.servinggroup import EngineName, RoleType, ServingGroup

# vLLM's flag (0.18+) for finishing requests in flight on SIGTERM; it takes either spelling.
SHUTDOWN_FLAGS = ("--shutdown-timeout", "--shutdown_timeout")


def roles_without_drain(sg: ServingGroup) -> list[str]:
    """Prefill and decode roles whose serving pod runs vLLM without ``--shutdown-timeout``.

    Only argv that names vLLM counts (``vllm serve``, ``python -m vllm...``, ``pdorch sim
    --protocol vllm``, also inside ``sh -c``): a template that leaves the command to the image
    cannot be judged from here.
    """
    if sg.spec.engine.name != EngineName.VLLM:
        return []
    out = []
    for role in sg.spec.roles:
        template = role.leader_template or role.worker_template
        if role.type not in (RoleType.PREFILL, RoleType.DECODE) or template is None:
            continue
        containers = (template.get("spec") or {}).get("containers") or []
        argv = " ".join(str(a) for c in containers for a in (c.get("command") or []) + (c.get("args") or []))
        if "vllm" in argv and not any(flag in argv for flag in SHUTDOWN_FLAGS):
            out.append(role.name)
    return out
