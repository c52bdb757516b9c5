"""Analytical latency model of one inference engine instance (pure functions, no I/O).

The model follows notes/autoscaling.md §3.2:

- prefill batch time ``a_p + b_p * sum(n_i) + c_p * sum(n_i**2)`` (n_i = new prompt tokens of request i);
- decode step time ``a_d + beta_d * B + gamma_d * K`` (B = running sequences, K = their total KV tokens);
- KV capacity ``num_kv_blocks * block_size`` tokens limits admission;
- KV transfer time ``tau0 + n * kv_bytes_per_token / bandwidth``.

All times are seconds of *model* time; the engine multiplies them by its ``time_scale`` before sleeping.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

KIB = 1024
GB = 1e9


@dataclass(frozen=True)
class Coefficients:
    """Coefficients of the analytical engine model (seconds, bytes, tokens)."""

    name: str
    prefill_a_s: float
    prefill_b_s: float  # per prompt token of the batch
    prefill_c_s: float  # per squared prompt token (attention cost); 0 for a linear model
    decode_a_s: float
    decode_beta_s: float  # per running sequence
    decode_gamma_s: float  # per KV token held by running sequences
    num_kv_blocks: int
    block_size: int
    kv_bytes_per_token: int
    transfer_bw_bytes_s: float
    transfer_tau0_s: float
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 131072

    @property
    def kv_capacity_tokens(self) -> int:
        """Total KV tokens the engine can hold."""
        return self.num_kv_blocks * self.block_size


def prefill_time_s(c: Coefficients, prompt_tokens: Sequence[int]) -> float:
    """Time of one prefill batch made of the given per-request prompt lengths."""
    if not prompt_tokens:
        return 0.0
    total = sum(prompt_tokens)
    squares = sum(n * n for n in prompt_tokens)
    return c.prefill_a_s + c.prefill_b_s * total + c.prefill_c_s * squares


def decode_step_time_s(c: Coefficients, batch_size: int, kv_tokens: int) -> float:
    """Time of one continuous-batching decode step producing one token per running sequence."""
    if batch_size <= 0:
        return 0.0
    return c.decode_a_s + c.decode_beta_s * batch_size + c.decode_gamma_s * kv_tokens


def kv_transfer_time_s(c: Coefficients, tokens: int) -> float:
    """Time to move the KV cache of ``tokens`` prompt tokens from a prefill to a decode engine."""
    if tokens <= 0:
        return 0.0
    return c.transfer_tau0_s + tokens * c.kv_bytes_per_token / c.transfer_bw_bytes_s


def blocks_for(c: Coefficients, tokens: int) -> int:
    """Number of KV blocks needed to hold ``tokens`` tokens."""
    return math.ceil(max(tokens, 0) / c.block_size)


# Llama-3.1-8B: 2 (K and V) * 32 layers * 8 KV heads * 128 head dim * 2 bytes (bf16) = 128 KiB per token.
LLAMA31_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
# OPT-13B: 2 * 40 layers * 5120 hidden * 2 bytes (fp16) = 800 KiB per token (no GQA).
OPT13B_KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2

BLIS_LLAMA31_8B_H100 = Coefficients(
    name="blis-llama3.1-8b-h100",
    # BLIS / inference-sim "blackbox" coefficients for Llama-3.1-8B-Instruct on vLLM 0.8.4, H100 TP1
    # (defaults.yaml at commit 8f29ee0c): step us = 5753 + 17.25 * prefill_tokens + 6.00 * decode_tokens,
    # 29,205 KV blocks. The blackbox has no context-length term; gamma_d is our roofline estimate
    # (128 KiB/token / 3.35 TB/s HBM ~= 3.9e-5 ms per KV token), see notes/autoscaling.md §3.3.
    prefill_a_s=5753e-6,
    prefill_b_s=17.25e-6,
    prefill_c_s=0.0,
    decode_a_s=5753e-6,
    decode_beta_s=6.00e-6,
    decode_gamma_s=3.9e-8,
    num_kv_blocks=29205,
    block_size=16,
    kv_bytes_per_token=LLAMA31_8B_KV_BYTES_PER_TOKEN,
    # BLIS default P/D transfer model: 25 GB/s plus 0.05 ms fixed cost.
    transfer_bw_bytes_s=25 * GB,
    transfer_tau0_s=0.05e-3,
)

DISTSERVE_OPT13B_A100 = Coefficients(
    name="distserve-opt13b-a100",
    # DistServe simdistserve profile, OPT-13B on A100-80G TP1: prefill ms = 18.1 + 0.102*l + 7.1e-6*l^2;
    # decode ms (B < 95) = 19.9 + 6.3e-4*K + 0.0385*B (notes/autoscaling.md §3.3).
    prefill_a_s=18.1e-3,
    prefill_b_s=0.102e-3,
    prefill_c_s=7.1e-9,
    decode_a_s=19.9e-3,
    decode_beta_s=0.0385e-3,
    decode_gamma_s=6.3e-7,
    # Our estimate: ~50 GB of KV space left on an 80 GB A100 after 26 GB of fp16 weights,
    # / 800 KiB per token ~= 64k tokens = 4,000 blocks of 16.
    num_kv_blocks=4000,
    block_size=16,
    kv_bytes_per_token=OPT13B_KV_BYTES_PER_TOKEN,
    transfer_bw_bytes_s=25 * GB,
    transfer_tau0_s=0.05e-3,
    max_model_len=2048,
)

PRESETS: dict[str, Coefficients] = {c.name: c for c in (BLIS_LLAMA31_8B_H100, DISTSERVE_OPT13B_A100)}
DEFAULT_PRESET = BLIS_LLAMA31_8B_H100.name


def load_coefficients(spec: str) -> Coefficients:
    """Resolve ``spec`` as a preset name, or as a JSON file of overrides on top of the default preset.

    A JSON file may name a ``base`` preset; every other key must be a field of `Coefficients`.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        if path.suffix == ".json" or "/" in spec:
            raise ValueError(f"no coefficients file {spec!r}")
        raise ValueError(f"unknown coefficients preset {spec!r}; presets: {', '.join(sorted(PRESETS))}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{spec}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: expected a JSON object")
    base_name = str(data.pop("base", DEFAULT_PRESET))
    if base_name not in PRESETS:
        raise ValueError(f"{spec}: unknown base preset {base_name!r}; presets: {', '.join(sorted(PRESETS))}")
    known = {f.name for f in fields(Coefficients)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{spec}: unknown coefficient fields {unknown}")
    problems = coefficient_problems(data)
    if problems:
        raise ValueError(f"{spec}: " + "; ".join(problems))
    merged = replace(PRESETS[base_name], **{k: int(v) if k in _WHOLE else v for k, v in data.items()})  # type: ignore[arg-type]
    if merged.decode_a_s + merged.decode_beta_s <= 0:
        # A decode step that costs nothing has no capacity limit: the scaler would divide by 0.
        raise ValueError(f"{spec}: decode_a_s + decode_beta_s must be > 0")
    if merged.decode_beta_s + merged.decode_gamma_s <= 0:
        # A sequence that adds nothing to a decode step: capacity per replica would be unbounded.
        raise ValueError(f"{spec}: decode_beta_s + decode_gamma_s must be > 0")
    return merged


# Fields a capacity is divided by, or that size the engine: zero makes the model meaningless.
_POSITIVE = frozenset(
    {
        "prefill_b_s",
        "num_kv_blocks",
        "block_size",
        "transfer_bw_bytes_s",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
    }
)


# Count fields (`from __future__ import annotations` makes the types strings).
_WHOLE = frozenset(f.name for f in fields(Coefficients) if f.type in (int, "int"))


def coefficient_problems(data: dict[str, object]) -> list[str]:
    """What is wrong with coefficient overrides read from a file: a value that is not a number
    (or not a whole one for a count), a negative one, or 0 where the model divides by it."""
    out = []
    for key, value in sorted(data.items()):
        if key == "name":
            if not isinstance(value, str):
                out.append("name must be a string")
            continue
        whole = key in _WHOLE
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            out.append(f"{key} must be a finite {'whole number' if whole else 'number'}, not {value!r}")
        elif whole and value != int(value):
            out.append(f"{key} must be a whole number, not {value!r}")
        elif value < 0 or (value == 0 and key in _POSITIVE):
            out.append(f"{key} must be {'> 0' if key in _POSITIVE else '>= 0'}, not {value!r}")
    return out


def describe(c: Coefficients) -> dict[str, object]:
    """Plain-dict view of the coefficients (for logs and /server_info)."""
    return asdict(c)
