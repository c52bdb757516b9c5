"""Scaler test helpers: a `RoleLoad` built from the few fields a scaling test varies (the policy
tests), and the rates a role's ticks read (the metric source tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pdorch.scaler import observe
from pdorch.scaler.loop import RoleState
from pdorch.scaler.observe import RoleLoad
from pdorch.scaler.scrape import EngineSample


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


def rates_read(ticks: Sequence[tuple[float, Sequence[EngineSample]]], stamped: bool = True) -> list[float]:
    """The request rate each tick reads, through the scaler's own `RoleState.read` (from the second
    tick on). Each tick is (when, its engines' samples in a fixed order); without `stamped` the
    samples lose their scrape times, as sources without them read."""
    st, out = RoleState(), []
    for now, samples in ticks:
        got = [s if stamped else replace(s, at=None) for s in samples]
        # `now` is also the wall clock: the samples' scrape times are on it (their age is bounded).
        seen, last = st.read([str(i) for i in range(len(got))], got, (), now, now)
        if last is not None:
            out.append(observe.role_load(seen.prev, seen.cur, now - last).request_rate)
    return out
