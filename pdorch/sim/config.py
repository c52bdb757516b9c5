"""Settings shared by every engine of a `SimServer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pdorch.sim.faults import Faults
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100, Coefficients

Protocol = Literal["vllm", "sglang"]
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass(frozen=True)
class SimConfig:
    """Engine-wide settings; times in seconds (wall clock, not scaled by `time_scale`)."""

    protocol: Protocol = "vllm"
    model: str = DEFAULT_MODEL
    coefficients: Coefficients = field(default=BLIS_LLAMA31_8B_H100)
    # Multiplies every modelled duration before sleeping: 0.01 runs the model 100x faster than real time.
    time_scale: float = 1.0
    # vLLM NIXL: how long a prefill keeps blocks for its decode (kv_lease_duration default).
    kv_lease_s: float = 30.0
    # vLLM kv_load_failure_policy when the remote blocks are gone: "fail" (HTTP 500) or "recompute".
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"
    nixl_side_channel_port: int = 5600
    # SGLang: prefill waits this long for its decode to connect / decode waits this long for the KV
    # (SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT / _WAITING_TIMEOUT defaults).
    bootstrap_timeout_s: float = 300.0
    waiting_timeout_s: float = 300.0
    # Injected misbehaviour for tests of what sits in front (none by default).
    faults: Faults = field(default_factory=Faults)
