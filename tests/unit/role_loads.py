"""A `RoleLoad` built from the few fields a scaling test varies, shared by the scaler policy tests."""

from __future__ import annotations

from pdorch.scaler.observe import RoleLoad


def role_load(rate: float, prompt: float, output: float = 100, **kw: float) -> RoleLoad:
    """A 15 s window at ``rate`` req/s with mean prompt/output tokens; ``ready`` sets ready replicas and
    any other keyword is a `RoleLoad` field."""
    return RoleLoad(
        ready_replicas=int(kw.pop("ready", 2)),
        window_s=15,
        request_rate=rate,
        mean_prompt_tokens=prompt,
        mean_output_tokens=output,
        **kw,
    )
