"""Latency model math and coefficient presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pdorch.sim import latency
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100 as BLIS
from pdorch.sim.latency import DISTSERVE_OPT13B_A100 as DIST

pytestmark = pytest.mark.unit


def test_blis_prefill_matches_published_step_formula() -> None:
    # 5753 + 17.25 * 1000 us = 23.003 ms for a 1000-token prefill.
    assert latency.prefill_time_s(BLIS, [1000]) == pytest.approx(23.003e-3)
    # A batch pays the fixed cost once.
    assert latency.prefill_time_s(BLIS, [600, 400]) == pytest.approx(23.003e-3)


def test_distserve_prefill_is_quadratic_per_request() -> None:
    # 18.1 + 0.102*l + 7.1e-6*l^2 ms
    assert latency.prefill_time_s(DIST, [1000]) == pytest.approx((18.1 + 102 + 7.1) * 1e-3)
    two = latency.prefill_time_s(DIST, [500, 500])
    assert two == pytest.approx((18.1 + 102 + 7.1e-6 * 2 * 500**2) * 1e-3)
    assert two < latency.prefill_time_s(DIST, [1000])


def test_decode_step_terms() -> None:
    # DistServe: 19.9 + 6.3e-4*K + 0.0385*B ms
    assert latency.decode_step_time_s(DIST, 10, 10_000) == pytest.approx((19.9 + 6.3 + 0.385) * 1e-3)
    assert latency.decode_step_time_s(BLIS, 1, 0) == pytest.approx(5759e-6)
    assert latency.decode_step_time_s(BLIS, 0, 123) == 0.0
    assert latency.decode_step_time_s(BLIS, 64, 64_000) > latency.decode_step_time_s(BLIS, 64, 1_000)


def test_kv_transfer_llama_1k_tokens_about_5ms() -> None:
    assert BLIS.kv_bytes_per_token == 128 * 1024
    t = latency.kv_transfer_time_s(BLIS, 1000)
    assert t == pytest.approx(0.05e-3 + 1000 * 131072 / 25e9)
    assert 5e-3 < t < 5.5e-3
    assert latency.kv_transfer_time_s(BLIS, 0) == 0.0


def test_capacity_and_blocks() -> None:
    assert BLIS.kv_capacity_tokens == 29205 * 16
    assert latency.blocks_for(BLIS, 0) == 0
    assert latency.blocks_for(BLIS, 1) == 1
    assert latency.blocks_for(BLIS, 16) == 1
    assert latency.blocks_for(BLIS, 17) == 2


def test_load_coefficients_presets_and_file(tmp_path: Path) -> None:
    assert latency.load_coefficients("distserve-opt13b-a100") is DIST
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"base": "distserve-opt13b-a100", "num_kv_blocks": 10}))
    c = latency.load_coefficients(str(f))
    assert c.num_kv_blocks == 10 and c.prefill_a_s == DIST.prefill_a_s
    f.write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        latency.load_coefficients(str(f))
    with pytest.raises(ValueError, match="unknown coefficients preset"):
        latency.load_coefficients("nope")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prefill_b_s": 0}, "prefill_b_s must be > 0, not 0"),
        ({"decode_a_s": 0, "decode_beta_s": 0}, "decode_a_s + decode_beta_s must be > 0"),
        # Accepted before, then every tick of the scaler raised ZeroDivisionError (helper-65).
        ({"decode_beta_s": 0, "decode_gamma_s": 0}, "decode_beta_s + decode_gamma_s must be > 0"),
        ({"prefill_a_s": -0.001}, "prefill_a_s must be >= 0"),
        ({"block_size": 2.5}, "block_size must be a whole number, not 2.5"),
        ({"num_kv_blocks": True}, "num_kv_blocks must be a finite whole number, not True"),
        ({"transfer_bw_bytes_s": "fast"}, "transfer_bw_bytes_s must be a finite number"),
        ({"base": "nope"}, "unknown base preset 'nope'"),
        ({"num_kv_blocks": float("inf")}, "num_kv_blocks must be a finite whole number, not inf"),
        ({"decode_a_s": float("nan")}, "decode_a_s must be a finite number, not nan"),
    ],
)
def test_a_coefficients_file_the_model_cannot_use_is_refused_by_name(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    """A file of zeros made the scaler divide by zero on its first tick; each bad value is now
    named when the file is loaded."""
    f = tmp_path / "c.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(message)):
        latency.load_coefficients(str(f))


def test_whole_numbers_written_as_floats_load_as_counts(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"block_size": 32.0, "prefill_c_s": 0}))
    c = latency.load_coefficients(str(f))
    assert c.block_size == 32 and isinstance(c.block_size, int) and c.prefill_c_s == 0
