"""One simulated engine instance: KV block pool, FCFS prefill batches and continuous-batching decode.

An `Engine` runs one asyncio task that steps its work like an iteration-level scheduler:

1. admit waiting sequences FCFS while KV blocks (prompt + max output) and sequence slots are free;
2. if admitted sequences need a local prefill, run one prefill batch (up to `max_num_batched_tokens`)
   which produces their first token;
3. otherwise run one decode step for every running sequence (one token each).

Sequences whose KV arrives from elsewhere (vLLM NIXL pull, SGLang bootstrap) are admitted, then wait on
their `kv_source` coroutine outside the step loop, and join the decode batch when it returns. Sleeps are
model time multiplied by `time_scale`; latencies recorded in metrics are wall-clock (what a client sees).

KV accounting is conservative: admission reserves blocks for prompt + max output tokens at once, so
`kv_cache_usage_perc` reports reserved blocks (plus blocks leased to remote decodes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pdorch.sim import latency
from pdorch.sim.latency import Coefficients
from pdorch.sim.metrics import EngineMetrics, EngineSnapshot, FinishedRequest

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """P/D role of a simulated engine."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class SeqState(enum.Enum):
    """Where a sequence is in the engine."""

    WAITING = "waiting"
    TRANSFER = "transfer"  # admitted, waiting for remote KV
    PREFILL = "prefill"  # admitted, needs a local prefill
    RUNNING = "running"
    FINISHED = "finished"


class EngineError(Exception):
    """A request failed inside the engine; `status` is the HTTP status to report."""

    def __init__(self, message: str, status: int = 500, err_type: str = "InternalServerError") -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (0-based index) and, on the last one, the finish reason."""

    index: int
    finish_reason: str | None


KvSource = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class Seq:
    """One request inside the engine."""

    prompt_tokens: int
    max_tokens: int  # tokens to generate before finish_reason "length"
    eos_at: int | None = None  # natural length: finish "stop" after this many tokens
    kv_source: KvSource | None = None  # remote KV instead of a local prefill
    keep_kv: bool = False  # keep blocks after finishing (caller releases or leases them)
    seq_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue[TokenEvent | EngineError] = field(default_factory=asyncio.Queue)
    state: SeqState = SeqState.WAITING
    generated: int = 0
    blocks: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    itls: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    kv_task: asyncio.Task[None] | None = None
    # Called when the sequence ends before its KV transfer started (aborted while waiting for
    # admission): the remote blocks it would have read are given back.
    kv_abandoned: Callable[[], None] | None = None

    @property
    def context_tokens(self) -> int:
        """KV tokens this sequence currently holds."""
        return self.prompt_tokens + self.generated


class BlockPool:
    """Free list of KV block ids."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def free(self) -> int:
        """Number of free blocks."""
        return len(self._free)

    @property
    def used(self) -> int:
        """Number of allocated blocks."""
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` blocks, or None if not enough are free."""
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def release(self, ids: list[int]) -> None:
        """Return blocks to the pool."""
        self._free.extend(ids)


@dataclass
class Lease:
    """KV blocks a finished prefill keeps for a decode to pull (vLLM NIXL)."""

    blocks: list[int]
    prompt_tokens: int
    timer: asyncio.TimerHandle | None = None


class Engine:
    """A simulated engine bound to one endpoint (pod IP and port)."""

    def __init__(
        self,
        *,
        endpoint: str,
        host: str,
        role: Role,
        coefficients: Coefficients,
        metrics_factory: Callable[[Callable[[], EngineSnapshot]], EngineMetrics],
        time_scale: float = 1.0,
    ) -> None:
        self.endpoint = endpoint
        self.host = host
        self.role = role
        self.coefficients = coefficients
        self.time_scale = time_scale
        self.engine_id = str(uuid.uuid4())
        self.pool = BlockPool(coefficients.num_kv_blocks)
        self.leases: dict[str, Lease] = {}
        # Prefill engine ids this (decode) engine pulled KV from, with counts: lets tests audit
        # P/D pairing from the engines' side instead of trusting the proxy's own account.
        self.kv_sources: collections.Counter[str] = collections.Counter()
        self.bootstrap_waiting = 0
        self.transfer_waiting = 0
        self._waiting: deque[Seq] = deque()
        self._prefill: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._transfer: set[Seq] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.metrics = metrics_factory(self.snapshot)  # last: its collector reads the state above

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the step loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"sim-engine-{self.endpoint}")

    async def stop(self) -> None:
        """Stop the loop, fail outstanding sequences and drop leases."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for seq in [*self._waiting, *self._prefill, *self._running, *self._transfer]:
            self.abort(seq)
        for lease_id in list(self.leases):
            self.release_lease(lease_id)

    # -- state ---------------------------------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """Live state for gauges."""
        c = self.coefficients
        return EngineSnapshot(
            running=len(self._running) + len(self._prefill),
            # Like vLLM, requests waiting for remote KV count as waiting.
            waiting=len(self._waiting) + len(self._transfer),
            kv_usage=self.pool.used / self.pool.num_blocks if self.pool.num_blocks else 0.0,
            used_tokens=sum(s.context_tokens for s in self._running)
            + sum(lease.prompt_tokens for lease in self.leases.values()),
            max_tokens=c.kv_capacity_tokens,
            num_blocks=c.num_kv_blocks,
            block_size=c.block_size,
            bootstrap_queue=self.bootstrap_waiting,
            transfer_queue=self.transfer_waiting,
            queued=len(self._waiting),
        )

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise a 400 `EngineError` if a request can never run here (too long for the model or KV)."""
        c = self.coefficients
        total = prompt_tokens + max_tokens
        if total > c.max_model_len:
            raise EngineError(
                f"This model's maximum context length is {c.max_model_len} tokens. However, you requested "
                f"{total} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                status=400,
                err_type="BadRequestError",
            )
        if latency.blocks_for(c, total) > self.pool.num_blocks:
            raise EngineError(
                f"request needs {total} KV tokens, more than the KV cache holds", 400, "BadRequestError"
            )

    # -- requests ------------------------------------------------------------------------------------

    def submit(self, seq: Seq) -> None:
        """Queue a sequence; its tokens arrive on `seq.events`."""
        self.check_fits(seq.prompt_tokens, seq.max_tokens)
        self.start()
        seq.state = SeqState.WAITING
        self._waiting.append(seq)
        self._wake.set()

    def abort(self, seq: Seq) -> None:
        """Remove a sequence (client went away); counts as finished with reason "abort"."""
        if seq.state is SeqState.FINISHED:
            return
        for container in (self._waiting, self._prefill):
            with contextlib.suppress(ValueError):
                container.remove(seq)
        with contextlib.suppress(ValueError):
            self._running.remove(seq)
        self._transfer.discard(seq)
        if seq.kv_task is not None and not seq.kv_task.done():
            seq.kv_task.cancel()
        elif seq.kv_task is None and seq.kv_abandoned is not None:
            seq.kv_abandoned()
        seq.keep_kv = False
        self._finish(seq, "abort", time.monotonic())

    def record_abort(self, prompt_tokens: int, arrival: float) -> None:
        """Count a request that ended before it reached the scheduler (e.g. cancelled while bootstrapping)."""
        now = time.monotonic()
        self.metrics.finished(
            FinishedRequest(
                finish_reason="abort",
                prompt_tokens=prompt_tokens,
                generation_tokens=0,
                ttft_s=None,
                e2e_s=now - arrival,
                itls_s=(),
                queue_s=now - arrival,
            )
        )

    def free(self, seq: Seq) -> None:
        """Release the blocks a finished `keep_kv` sequence still holds."""
        self.pool.release(seq.blocks)
        seq.blocks = []
        self._wake.set()

    def lease(self, seq: Seq, lease_id: str, ttl_s: float) -> list[int]:
        """Turn a finished `keep_kv` sequence's blocks into a lease that expires after ``ttl_s`` seconds.

        Returns the leased block ids (the prompt's blocks; the rest are released now).
        """
        n = latency.blocks_for(self.coefficients, seq.prompt_tokens)
        keep, extra = seq.blocks[:n], seq.blocks[n:]
        self.pool.release(extra)
        seq.blocks = []
        loop = asyncio.get_running_loop()
        lease = Lease(blocks=keep, prompt_tokens=seq.prompt_tokens)
        lease.timer = loop.call_later(ttl_s, self._expire_lease, lease_id)
        self.leases[lease_id] = lease
        return keep

    def _expire_lease(self, lease_id: str) -> None:
        if self.release_lease(lease_id):
            log.info("engine %s: KV lease %s expired unclaimed", self.endpoint, lease_id)

    def release_lease(self, lease_id: str) -> bool:
        """Free a lease's blocks (decode pulled them, or it expired). False if unknown."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.timer is not None:
            lease.timer.cancel()
        self.pool.release(lease.blocks)
        self._wake.set()
        return True

    async def sleep_model(self, seconds: float) -> None:
        """Sleep ``seconds`` of model time."""
        await asyncio.sleep(max(seconds * self.time_scale, 0.0))

    # -- step loop -----------------------------------------------------------------------------------

    def _admit(self) -> None:
        c = self.coefficients
        while self._waiting:
            active = len(self._running) + len(self._prefill) + len(self._transfer)
            if active >= c.max_num_seqs:
                return
            seq = self._waiting[0]
            blocks = self.pool.allocate(latency.blocks_for(c, seq.prompt_tokens + seq.max_tokens))
            if blocks is None:
                return  # FCFS: the head waits for KV space, so does everyone behind it
            self._waiting.popleft()
            seq.blocks = blocks
            seq.admitted_at = time.monotonic()
            if seq.kv_source is None:
                seq.state = SeqState.PREFILL
                self._prefill.append(seq)
            else:
                seq.state = SeqState.TRANSFER
                self._transfer.add(seq)
                seq.kv_task = asyncio.create_task(self._await_kv(seq))

    async def _await_kv(self, seq: Seq) -> None:
        assert seq.kv_source is not None
        self.transfer_waiting += 1
        try:
            await seq.kv_source()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._transfer.discard(seq)
            err = exc if isinstance(exc, EngineError) else EngineError(f"KV transfer failed: {exc}")
            seq.events.put_nowait(err)
            seq.keep_kv = False
            self._finish(seq, "abort", time.monotonic())
            return
        finally:
            self.transfer_waiting -= 1
        if seq.state is SeqState.TRANSFER:
            self._transfer.discard(seq)
            seq.state = SeqState.RUNNING
            self._running.append(seq)
            self._wake.set()

    async def _loop(self) -> None:
        c = self.coefficients
        while True:
            self._admit()
            if self._prefill:
                batch: list[Seq] = []
                tokens = 0
                while self._prefill and (
                    not batch or tokens + self._prefill[0].prompt_tokens <= c.max_num_batched_tokens
                ):
                    seq = self._prefill.popleft()
                    batch.append(seq)
                    tokens += seq.prompt_tokens
                # Sequences stay visible as running while the batch computes.
                self._running.extend(batch)
                for seq in batch:
                    seq.state = SeqState.RUNNING
                await self.sleep_model(latency.prefill_time_s(c, [s.prompt_tokens for s in batch]))
                now = time.monotonic()
                for seq in batch:
                    if seq.state is SeqState.RUNNING:
                        self._emit(seq, now)
            elif self._running:
                batch = list(self._running)
                kv = sum(s.context_tokens for s in batch)
                await self.sleep_model(latency.decode_step_time_s(c, len(batch), kv))
                now = time.monotonic()
                for seq in batch:
                    if seq.state is SeqState.RUNNING:
                        self._emit(seq, now)
            else:
                await self._wake.wait()
                self._wake.clear()

    def _emit(self, seq: Seq, now: float) -> None:
        index = seq.generated
        seq.generated += 1
        self.metrics.token(seq.prompt_tokens if seq.first_token_at is None else 0)
        if seq.first_token_at is None:
            seq.first_token_at = now
        else:
            assert seq.last_token_at is not None
            seq.itls.append(now - seq.last_token_at)
        seq.last_token_at = now
        reason: str | None = None
        if seq.eos_at is not None and seq.generated >= seq.eos_at:
            reason = "stop"
        elif seq.generated >= seq.max_tokens:
            reason = "length"
        seq.events.put_nowait(TokenEvent(index, reason))
        if reason is not None:
            with contextlib.suppress(ValueError):
                self._running.remove(seq)
            self._finish(seq, reason, now)

    def _finish(self, seq: Seq, reason: str, now: float) -> None:
        seq.state = SeqState.FINISHED
        seq.finish_reason = reason
        if not seq.keep_kv:
            self.pool.release(seq.blocks)
            seq.blocks = []
        self._wake.set()
        admitted = seq.admitted_at if seq.admitted_at is not None else now
        self.metrics.finished(
            FinishedRequest(
                finish_reason=reason,
                prompt_tokens=seq.prompt_tokens,
                generation_tokens=seq.generated,
                ttft_s=None if seq.first_token_at is None else seq.first_token_at - seq.arrival,
                e2e_s=now - seq.arrival,
                itls_s=seq.itls,
                queue_s=admitted - seq.arrival,
            )
        )
