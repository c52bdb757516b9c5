"""Engine scheduling: FCFS prefill batches, continuous-batching decode, KV admission and leases.

The engine's model-time sleep is replaced by a recorder that returns at once, so the test checks which
steps the scheduler ran (and with what batch), not how long anything took.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from pdorch.sim import latency
from pdorch.sim.engine import Engine, EngineError, Role, Seq, SeqState, TokenEvent
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100
from pdorch.sim.metrics import VllmMetrics

pytestmark = pytest.mark.unit


class Recorder:
    """Stands in for `Engine.sleep_model`: records model durations, yields once."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.steps.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, Recorder]]:
    eng = Engine(
        endpoint="t:1",
        host="t",
        role=Role.BOTH,
        coefficients=BLIS_LLAMA31_8B_H100,
        metrics_factory=lambda snap: VllmMetrics("m", snap),
    )
    rec = Recorder()
    eng.sleep_model = rec  # type: ignore[method-assign]
    yield eng, rec
    await eng.stop()


async def drain(seq: Seq) -> list[TokenEvent]:
    out: list[TokenEvent] = []
    while True:
        ev = await asyncio.wait_for(seq.events.get(), 5)
        assert isinstance(ev, TokenEvent)
        out.append(ev)
        if ev.finish_reason is not None:
            return out


async def test_prefill_batches_respect_token_budget(engine: tuple[Engine, Recorder]) -> None:
    eng, rec = engine
    c = eng.coefficients
    seqs = [Seq(prompt_tokens=5000, max_tokens=1) for _ in range(3)]
    for s in seqs:
        eng.submit(s)
    for s in seqs:
        assert [e.finish_reason for e in await drain(s)] == ["length"]
    # 3 x 5000 tokens with an 8192-token budget: three single-request prefill batches, no decode step.
    assert rec.steps == [latency.prefill_time_s(c, [5000])] * 3
    assert eng.pool.used == 0


async def test_continuous_batching_decode(engine: tuple[Engine, Recorder]) -> None:
    eng, rec = engine
    c = eng.coefficients
    seqs = [Seq(prompt_tokens=100, max_tokens=3) for _ in range(2)]
    for s in seqs:
        eng.submit(s)
    results = [await drain(s) for s in seqs]
    assert [[e.index for e in r] for r in results] == [[0, 1, 2], [0, 1, 2]]
    # One prefill batch of both (first tokens), then two decode steps with B=2 and growing KV.
    assert rec.steps == [
        latency.prefill_time_s(c, [100, 100]),
        latency.decode_step_time_s(c, 2, 202),
        latency.decode_step_time_s(c, 2, 204),
    ]


async def test_eos_before_limit(engine: tuple[Engine, Recorder]) -> None:
    eng, _ = engine
    seq = Seq(prompt_tokens=10, max_tokens=50, eos_at=4)
    eng.submit(seq)
    events = await drain(seq)
    assert len(events) == 4 and events[-1].finish_reason == "stop"


async def test_kv_admission_is_fcfs_and_bounded() -> None:
    small = replace(BLIS_LLAMA31_8B_H100, num_kv_blocks=4)
    eng = Engine(
        endpoint="t:2",
        host="t",
        role=Role.BOTH,
        coefficients=small,
        metrics_factory=lambda snap: VllmMetrics("m", snap),
    )
    gate = asyncio.Event()

    async def blocked(seconds: float) -> None:
        await gate.wait()

    eng.sleep_model = blocked  # type: ignore[method-assign]
    try:
        a, b = Seq(prompt_tokens=30, max_tokens=10), Seq(prompt_tokens=30, max_tokens=10)  # 3 blocks each
        eng.submit(a)
        eng.submit(b)
        for _ in range(100):  # let the step loop admit what fits (bounded number of yields)
            if eng.snapshot().running:
                break
            await asyncio.sleep(0)
        snap = eng.snapshot()
        assert (snap.running, snap.waiting) == (1, 1)
        assert snap.kv_usage == pytest.approx(3 / 4)
        with pytest.raises(EngineError) as too_big:
            eng.submit(Seq(prompt_tokens=60, max_tokens=10))
        assert too_big.value.status == 400
        gate.set()
        await drain(a)
        await drain(b)
        assert eng.pool.used == 0
    finally:
        gate.set()
        await eng.stop()


async def test_abort_frees_and_counts(engine: tuple[Engine, Recorder]) -> None:
    eng, _ = engine
    seq = Seq(prompt_tokens=10, max_tokens=10_000)
    eng.submit(seq)
    await asyncio.wait_for(seq.events.get(), 5)
    eng.abort(seq)
    assert seq.state is SeqState.FINISHED and seq.finish_reason == "abort"
    assert eng.pool.used == 0
    labels = {"model_name": "m", "engine": "0", "finished_reason": "abort"}
    assert eng.metrics.registry.get_sample_value("vllm:request_success_total", labels) == 1


async def test_lease_keeps_prompt_blocks_until_released(engine: tuple[Engine, Recorder]) -> None:
    eng, _ = engine
    seq = Seq(prompt_tokens=40, max_tokens=1, keep_kv=True)
    eng.submit(seq)
    await drain(seq)
    blocks = eng.lease(seq, "L1", ttl_s=60)
    assert len(blocks) == 3 and eng.pool.used == 3
    assert eng.release_lease("L1") and not eng.release_lease("L1")
    assert eng.pool.used == 0


async def test_remote_kv_source_skips_local_prefill(engine: tuple[Engine, Recorder]) -> None:
    eng, rec = engine
    pulled = asyncio.Event()

    async def source() -> None:
        pulled.set()

    seq = Seq(prompt_tokens=500, max_tokens=2, kv_source=source)
    eng.submit(seq)
    events = await drain(seq)
    assert pulled.is_set() and len(events) == 2
    c = eng.coefficients
    assert rec.steps == [latency.decode_step_time_s(c, 1, 500), latency.decode_step_time_s(c, 1, 501)]


async def test_failed_kv_source_reports_error(engine: tuple[Engine, Recorder]) -> None:
    eng, _ = engine

    async def source() -> None:
        raise EngineError("gone", 500)

    seq = Seq(prompt_tokens=5, max_tokens=2, kv_source=source)
    eng.submit(seq)
    ev = await asyncio.wait_for(seq.events.get(), 5)
    assert isinstance(ev, EngineError) and ev.status == 500
    assert seq.finish_reason == "abort" and eng.pool.used == 0


def test_an_explicit_max_tokens_beyond_the_context_is_refused_not_clamped() -> None:
    """vLLM answers 400 when prompt + max_tokens exceeds max_model_len; only an absent max_tokens
    is sized to the room left."""
    from pdorch.sim.openai_api import output_plan, parse_request

    c = replace(BLIS_LLAMA31_8B_H100, max_model_len=2048)
    engine = Engine(
        endpoint="e",
        host="t",
        role=Role.BOTH,
        coefficients=c,
        metrics_factory=lambda snap: VllmMetrics("m", snap),
    )
    req = parse_request({"prompt": [1] * 2000, "max_tokens": 500}, "completion")
    max_tokens, _ = output_plan(req, c.max_model_len)
    assert max_tokens == 500
    with pytest.raises(EngineError, match="maximum context length is 2048"):
        engine.check_fits(req.prompt_tokens, max_tokens)
    unset = parse_request({"prompt": [1] * 2040}, "completion")
    assert output_plan(unset, c.max_model_len)[0] == 8  # vLLM's default 16, cut to the room left


def test_stream_options_count_when_they_say_something_and_min_tokens_fit_max_tokens() -> None:
    from pdorch.sim.openai_api import BadRequest, parse_request

    assert not parse_request({"prompt": "x", "stream_options": {}}, "completion").stream_options_given
    given = {"prompt": "x", "stream_options": {"include_usage": True}}
    assert parse_request(given, "completion").stream_options_given
    with pytest.raises(BadRequest, match="min_tokens must be less than or equal to max_tokens=4"):
        parse_request({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "completion")
    with pytest.raises(BadRequest, match="max_tokens=16, got 20"):  # completions' default limit
        parse_request({"prompt": "x", "min_tokens": 20}, "completion")
