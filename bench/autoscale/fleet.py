"""Discrete-event simulator of a prefill/decode fleet under an autoscaling policy.

Engines use pdorch's analytical latency model (`pdorch.sim.latency`, the same functions and
coefficients `pdorch sim` runs): FCFS prefill batches of up to max_num_batched_tokens, KV transfer,
continuous-batching decode whose step time is a_d + beta_d*B + gamma_d*K, admission only when the
request's prompt + output blocks fit in KV (as the sim reserves prompt + max_tokens).

Decode is simulated per sequence event, not per step: every running sequence of a replica gains
one token per step, so a replica keeps a "tokens per sequence" clock G that advances at 1/step_time
and a sequence finishes when G reaches its join value + output tokens. The step time is recomputed
whenever the batch changes (a join or a finish); between two such events K grows by B tokens per
step and is held at its value at the last event (the gamma_d term is small next to a_d; noted in
the docs).

Pods: created on a scale-up, ready after `startup_s`, and charged GPU time from creation until they
end; a scale-down cancels starting pods first, then drains ready ones (no new work, in-flight work
finishes, then the pod ends). Routing: prefill to the ready pod with the fewest queued prompt tokens,
decode to the ready pod with the most free KV. Requests with no ready pod wait in the proxy.

`proxy_queue_ttft_s` models pdorch's prefill queue (`router.prefillQueue`,
`pdorch.proxy.prefill_queue`): prompts wait in the proxy instead of the engines' FCFS queues, and an
idle prefill engine takes its next batch from there (a pod that just started serves the queue at
once): first any prompt that has waited `proxy_queue_max_wait_s` (oldest first), then the prompts
that can still meet that TTFT, shortest first, then the others, oldest first. Idealised against the real proxy: the proxy knows each prompt's exact prefill time (the real
one estimates it from characters and measured legs) and an engine gets its next batch the moment it
is idle (the real one keeps up to `maxInflightTokens` on the wire to each engine). The scaler sees
these prompts as the prefill role's `waiting` (and so their arrivals in its request rate) only when
`queue_visible` is set; otherwise it reads the engines' own queues only, as `pdorch scaler` does (it
scrapes the engines, not the proxy). `run.sees_queue` sets it for the peers, whose deployments
would read the proxy's queue depth or arrivals.

`decode_prefill_share` (with the queue) is a what-if, not a pdorch feature: decode engines also
prefill held prompts that can still meet the TTFT when no prefill engine is idle, as Dynamo's
conditional disaggregation and Splitwise's mixed pool do. Such a prompt's KV stays where it is
computed; the engine's running sequences pause for the prefill (no chunking), and prefills take at
most that share of its time. Those prompts count as the prefill role's, so the scaler sees the
whole prompt load.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pdorch.scaler.observe import RoleLoad, role_load
from pdorch.scaler.scrape import EngineSample
from pdorch.sim.latency import (
    Coefficients,
    blocks_for,
    decode_step_time_s,
    kv_transfer_time_s,
    prefill_time_s,
)

PREFILL, DECODE = "prefill", "decode"


class Req:
    """One request of the workload and its timeline."""

    __slots__ = (
        "alloc",
        "arrival",
        "finish",
        "first_token",
        "g_end",
        "output",
        "prefill_end",
        "prompt",
        "sent",
        "taken",
    )

    def __init__(self, arrival: float, prompt: int, output: int) -> None:
        self.arrival, self.prompt, self.output = arrival, prompt, max(output, 1)
        self.prefill_end = -1.0
        self.first_token = -1.0
        self.finish = -1.0
        self.g_end = 0.0
        self.alloc = 0
        self.taken = False  # sent from the proxy's queue (the queue's heaps drop it lazily)
        self.sent = arrival  # when an engine got it: later than `arrival` behind the proxy's queue

    def ttft(self) -> float:
        return self.first_token - self.arrival if self.first_token >= 0 else float("inf")

    def tpot(self) -> float:
        if self.finish < 0:
            return float("inf")
        return (self.finish - self.first_token) / (self.output - 1) if self.output > 1 else 0.0


@dataclass
class Pod:
    role: str
    created: float
    ready_at: float
    pid: int
    ready: bool = False
    draining: bool = False
    end: float | None = None
    # prefill
    queue: deque[Req] = field(default_factory=deque)
    queued_tokens: int = 0
    busy: bool = False
    batch: list[Req] = field(default_factory=list)
    # decode
    waitq: deque[Req] = field(default_factory=deque)
    running: list[tuple[float, int, Req]] = field(default_factory=list)  # heap on g_end
    n_running: int = 0
    sum_prompt: int = 0
    sum_gjoin: float = 0.0
    kv_used: int = 0
    kv_waiting: int = 0
    g: float = 0.0
    t_last: float = 0.0
    step: float = 0.0
    version: int = 0
    # decode, what-if: a prefill of its own in progress (its sequences pause until `t_last`), and
    # when the next may start (the share of its time prefills may take)
    prefilling: bool = False
    prefill_after: float = 0.0

    def idle(self) -> bool:
        if self.role == PREFILL:
            return not self.busy and not self.queue
        return self.n_running == 0 and not self.waitq and not self.prefilling


@dataclass
class Counters:
    """Cumulative per-role counters, shaped like the engines' Prometheus metrics."""

    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_n: int = 0
    itl_sum: float = 0.0
    itl_n: int = 0


# A policy sees (now, loads per role, current replicas per role) and returns targets per role.
PolicyFn = Callable[[float, dict[str, RoleLoad], dict[str, int]], dict[str, int]]


@dataclass
class FleetResult:
    requests: list[Req]
    pods: list[Pod]
    horizon: float
    scale_events: dict[str, int]
    timeline: list[tuple[float, int, int]]  # (t, prefill pods alive, decode pods alive)


class Fleet:
    """The simulated fleet; `run` replays a workload under a policy."""

    def __init__(
        self,
        c: Coefficients,
        startup_s: float,
        initial: tuple[int, int],
        interval_s: float,
        proxy_queue_ttft_s: float | None = None,
        queue_visible: bool = False,
        proxy_queue_max_wait_s: float = 30.0,
        decode_prefill_share: float | None = None,
        decode_prefill_max_tokens: int = 2048,
    ) -> None:
        self.c = c
        self.startup_s = startup_s
        self.initial = initial
        self.interval_s = interval_s
        self.kv_cap = c.kv_capacity_tokens
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.pods: list[Pod] = []
        # Pods not ended yet, per role (routing and sampling scan these, not every pod ever made).
        self.live: dict[str, list[Pod]] = {PREFILL: [], DECODE: []}
        self.pending: dict[str, deque[Req]] = {PREFILL: deque(), DECODE: deque()}
        self.in_transfer = 0
        self.proxy_queue_ttft_s = proxy_queue_ttft_s
        self.queue_visible = queue_visible
        # Prompts the proxy holds: by length (those that turn out late when picked move on), and
        # those that cannot meet the TTFT any more, by arrival.
        self.held: list[tuple[int, float, int, Req]] = []
        self.late: list[tuple[float, int, Req]] = []
        # ... and all of them by arrival, for the wait bound; `queued` counts those not sent yet.
        self.arrived: deque[Req] = deque()
        self.queued = 0
        self.max_wait_s = proxy_queue_max_wait_s
        self.decode_prefill_share = decode_prefill_share
        self.decode_prefill_max_tokens = decode_prefill_max_tokens
        self.counters = {PREFILL: Counters(), DECODE: Counters()}
        self.scale_events = {PREFILL: 0, DECODE: 0}
        self.now = 0.0

    # ------------------------------------------------------------------ plumbing
    def _at(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def alive(self, role: str) -> list[Pod]:
        return [p for p in self.live[role] if not p.draining]

    def _add_pod(self, role: str, ready_now: bool = False) -> None:
        pod = Pod(
            role=role,
            created=self.now,
            ready_at=self.now + (0.0 if ready_now else self.startup_s),
            pid=len(self.pods),
        )
        self.pods.append(pod)
        self.live[role].append(pod)
        if ready_now:
            self._ready(pod)
        else:
            self._at(pod.ready_at, "ready", pod)

    def _ready(self, pod: Pod) -> None:
        if pod.end is not None:
            return
        pod.ready = True
        pod.t_last = self.now
        if pod.role == PREFILL and self.proxy_queue_ttft_s is not None:
            self._start_prefill(pod)
            return
        q = self.pending[pod.role]
        while q:
            self._route(pod.role, q.popleft())
        if pod.role == DECODE:
            self._decode_prefills()

    def _end(self, pod: Pod) -> None:
        pod.end = self.now
        self.live[pod.role].remove(pod)

    def scale_to(self, role: str, target: int) -> None:
        """Create or remove pods of `role` until `target` are alive (not draining)."""
        alive = self.alive(role)
        if target == len(alive):
            return
        self.scale_events[role] += 1
        if target > len(alive):
            for _ in range(target - len(alive)):
                self._add_pod(role)
            return
        # Starting pods go first (youngest first), then the least loaded ready ones drain.
        victims = sorted(alive, key=lambda p: (p.ready, self._load_of(p), -p.created))
        for pod in victims[: len(alive) - target]:
            pod.draining = True
            if not pod.ready or pod.idle():
                self._end(pod)

    def _load_of(self, pod: Pod) -> float:
        if pod.role == PREFILL:
            return pod.queued_tokens
        return pod.kv_used + pod.kv_waiting

    # ------------------------------------------------------------------ routing
    def _route(self, role: str, req: Req) -> None:
        ready = [p for p in self.live[role] if p.ready and not p.draining]
        if role == PREFILL and self.proxy_queue_ttft_s is not None:
            heapq.heappush(self.held, (req.prompt, req.arrival, next(self.seq), req))
            self.arrived.append(req)
            self.queued += 1
            for pod in ready:
                if not self.queued:
                    break
                if not pod.busy:
                    self._start_prefill(pod)
            self._decode_prefills()
            return
        if not ready:
            self.pending[role].append(req)
            return
        if role == PREFILL:
            pod = min(ready, key=lambda p: p.queued_tokens)
            pod.queue.append(req)
            pod.queued_tokens += req.prompt
            if not pod.busy:
                self._start_prefill(pod)
        else:
            self._queue_decode(min(ready, key=lambda p: p.kv_used + p.kv_waiting), [req])

    def _queue_decode(self, pod: Pod, reqs: list[Req]) -> None:
        """Queue `reqs` on decode `pod`, each reserving its prompt + output KV, and admit what fits."""
        for r in reqs:
            r.alloc = blocks_for(self.c, r.prompt + r.output) * self.c.block_size
            pod.waitq.append(r)
            pod.kv_waiting += r.alloc
        self._decode_update(pod)

    # ------------------------------------------------------------------ prefill
    def _start_prefill(self, pod: Pod) -> None:
        if self.proxy_queue_ttft_s is None:
            batch = self._take_batch(pod.queue)
        else:
            batch = self._sent(self._take_overdue() or self._take_in_time() or self._take_late())
            if not batch:
                return
            pod.queued_tokens = sum(r.prompt for r in batch)
        pod.busy = True
        pod.batch = batch
        self._at(self.now + prefill_time_s(self.c, [r.prompt for r in batch]), "prefill_done", pod)

    def _sent(self, batch: list[Req]) -> list[Req]:
        """`batch`, taken from the proxy's queue (its heaps drop the entries lazily)."""
        for r in batch:
            r.taken = True
            r.sent = self.now
        self.queued -= len(batch)
        return batch

    def _take_batch(self, q: deque[Req]) -> list[Req]:
        """FCFS from `q`, up to max_num_batched_tokens (at least one prompt)."""
        batch: list[Req] = []
        tokens = 0
        while q and (not batch or tokens + q[0].prompt <= self.c.max_num_batched_tokens):
            r = q.popleft()
            batch.append(r)
            tokens += r.prompt
        return batch

    def _take_overdue(self) -> list[Req]:
        """A batch of the prompts that waited the bound, oldest first (none when the oldest has not)."""
        arrived = self.arrived
        while arrived and arrived[0].taken:
            arrived.popleft()
        if not arrived or self.now - arrived[0].arrival < self.max_wait_s:
            return []
        batch: list[Req] = []
        tokens = 0
        while arrived and (not batch or tokens + arrived[0].prompt <= self.c.max_num_batched_tokens):
            r = arrived.popleft()
            if r.taken:
                continue
            if self.now - r.arrival < self.max_wait_s:
                arrived.appendleft(r)
                break
            batch.append(r)
            tokens += r.prompt
        return batch

    def _take_in_time(self, max_tokens: int | None = None) -> list[Req]:
        """A batch of the held prompts that can still meet the TTFT, shortest first; the late ones
        met on the way move to `late`. With `max_tokens`, nothing longer, not even one prompt."""
        limit = self.proxy_queue_ttft_s or 0.0
        budget = max_tokens or self.c.max_num_batched_tokens
        batch: list[Req] = []
        tokens = 0
        held = self.held
        while held and (not (batch or max_tokens) or tokens + held[0][0] <= budget):
            r = heapq.heappop(held)[3]
            if r.taken:
                continue
            if self.now + prefill_time_s(self.c, [r.prompt]) > r.arrival + limit:
                heapq.heappush(self.late, (r.arrival, next(self.seq), r))
                continue
            batch.append(r)
            tokens += r.prompt
        return batch

    def _take_late(self) -> list[Req]:
        """A batch of the late prompts, oldest first."""
        batch: list[Req] = []
        tokens = 0
        late = self.late
        while late and (not batch or tokens + late[0][2].prompt <= self.c.max_num_batched_tokens):
            r = heapq.heappop(late)[2]
            if r.taken:
                continue
            batch.append(r)
            tokens += r.prompt
        return batch

    def _count_prefilled(self, batch: list[Req]) -> None:
        cnt = self.counters[PREFILL]
        for r in batch:
            r.prefill_end = self.now
            cnt.requests += 1
            cnt.prompt_tokens += r.prompt
            # The engine's own TTFT (vllm:time_to_first_token_seconds), from when it got the prompt:
            # time held in the proxy's queue is not in it.
            cnt.ttft_sum += self.now - r.sent
            cnt.ttft_n += 1

    def _prefill_done(self, pod: Pod) -> None:
        self._count_prefilled(pod.batch)
        for r in pod.batch:
            pod.queued_tokens -= r.prompt
            self.in_transfer += 1
            self._at(self.now + kv_transfer_time_s(self.c, r.prompt), "xfer_done", r)
        pod.batch = []
        pod.busy = False
        if pod.draining and not pod.queue:
            self._end(pod)
        elif pod.queue or self.proxy_queue_ttft_s is not None:
            self._start_prefill(pod)

    def _decode_prefills(self) -> None:
        """What-if: idle-enough decode engines take in-time held prompts no prefill engine took."""
        if self.decode_prefill_share is None:
            return
        for pod in self.live[DECODE]:
            if not self.queued:
                return
            if not pod.ready or pod.draining or pod.prefilling or self.now < pod.prefill_after:
                continue
            # Room for the prompts' KV beside what the engine holds (half its free KV at most).
            room = min(self.decode_prefill_max_tokens, (self.kv_cap - pod.kv_used - pod.kv_waiting) // 2)
            batch = self._sent(self._take_in_time(room)) if room > 0 else []
            if not batch:
                continue
            pause = prefill_time_s(self.c, [r.prompt for r in batch])
            self._advance(pod)
            pod.t_last = self.now + pause  # the running sequences' clock resumes then
            pod.prefilling = True
            self._decode_update(pod)
            self._at(self.now + pause, "local_prefill_done", (pod, batch, pause))

    def _local_prefill_done(self, pod: Pod, batch: list[Req], pause: float) -> None:
        pod.prefilling = False
        share = self.decode_prefill_share or 1.0
        pod.prefill_after = self.now + pause * (1 - share) / share
        self._count_prefilled(batch)
        self._queue_decode(pod, batch)
        self._decode_prefills()

    # ------------------------------------------------------------------ decode
    def _advance(self, pod: Pod) -> None:
        # `t_last` is in the future while a local prefill pauses the sequences (what-if above).
        if pod.n_running and pod.step > 0 and self.now > pod.t_last:
            pod.g += (self.now - pod.t_last) / pod.step
        pod.t_last = max(self.now, pod.t_last)

    def _decode_update(self, pod: Pod) -> None:
        """Advance the clock, retire finished sequences, admit waiting ones, reschedule."""
        c = self.c
        self._advance(pod)
        resume = pod.t_last  # now, or the end of a local prefill's pause
        cnt = self.counters[DECODE]
        while pod.running and pod.running[0][0] <= pod.g + 1e-9:
            _, _, r = heapq.heappop(pod.running)
            r.finish = self.now
            pod.n_running -= 1
            pod.sum_prompt -= r.prompt
            pod.sum_gjoin -= r.g_end - r.output
            pod.kv_used -= r.alloc
            cnt.requests += 1
            cnt.prompt_tokens += r.prompt
            cnt.generation_tokens += r.output
            if r.output > 1:
                cnt.itl_sum += r.finish - r.first_token
                cnt.itl_n += r.output - 1
        joined: list[Req] = []
        while (
            pod.waitq and pod.n_running < c.max_num_seqs and pod.kv_used + pod.waitq[0].alloc <= self.kv_cap
        ):
            r = pod.waitq.popleft()
            joined.append(r)
            pod.kv_waiting -= r.alloc
            pod.kv_used += r.alloc
            r.g_end = pod.g + r.output
            heapq.heappush(pod.running, (r.g_end, id(r), r))
            pod.n_running += 1
            pod.sum_prompt += r.prompt
            pod.sum_gjoin += pod.g
        if pod.n_running:
            kv = pod.sum_prompt + pod.n_running * pod.g - pod.sum_gjoin
            pod.step = decode_step_time_s(c, pod.n_running, int(kv))
            # Sequences that joined now get their first token one step from now.
            for r in joined:
                r.first_token = resume + pod.step
            pod.version += 1
            t_next = resume + max(pod.running[0][0] - pod.g, 0.0) * pod.step
            self._at(t_next, "decode", (pod, pod.version))
        else:
            pod.step = 0.0
            if pod.draining and not pod.waitq and not pod.prefilling:
                self._end(pod)

    # ------------------------------------------------------------------ observation
    def _sample(self, role: str) -> EngineSample:
        cnt = self.counters[role]
        ready = [p for p in self.live[role] if p.ready]
        if role == PREFILL:
            running = sum(len(p.batch) for p in ready)
            waiting = sum(len(p.queue) for p in ready) + len(self.pending[PREFILL])
            if self.queue_visible:
                waiting += self.queued
            kv = 0.0
        else:
            running = sum(p.n_running for p in ready)
            waiting = sum(len(p.waitq) for p in ready) + len(self.pending[DECODE]) + self.in_transfer
            kv = sum(p.kv_used for p in ready) / (self.kv_cap * len(ready)) if ready else 0.0
        return EngineSample(
            engine="vllm",
            running=running,
            waiting=waiting,
            kv_usage=kv,
            requests_total=cnt.requests,
            prompt_tokens_total=cnt.prompt_tokens,
            generation_tokens_total=cnt.generation_tokens,
            ttft_sum_s=cnt.ttft_sum,
            ttft_count=cnt.ttft_n,
            itl_sum_s=cnt.itl_sum,
            itl_count=cnt.itl_n,
        )

    # ------------------------------------------------------------------ main loop
    def run(self, requests: Sequence[Req], policy: PolicyFn, horizon: float) -> FleetResult:
        """Replay `requests` (sorted by arrival) under `policy` until all finish (or 2x horizon)."""
        for _ in range(self.initial[0]):
            self._add_pod(PREFILL, ready_now=True)
        for _ in range(self.initial[1]):
            self._add_pod(DECODE, ready_now=True)
        for r in requests:
            self._at(r.arrival, "arrival", r)
        self._at(0.0, "tick", None)
        prev = {role: self._sample(role) for role in (PREFILL, DECODE)}
        timeline: list[tuple[float, int, int]] = []
        total = len(requests)
        limit = 2 * horizon + 600
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > limit:
                break
            self.now = t
            if kind == "arrival":
                self._route(PREFILL, payload)  # type: ignore[arg-type]
            elif kind == "prefill_done":
                self._prefill_done(payload)  # type: ignore[arg-type]
            elif kind == "xfer_done":
                self.in_transfer -= 1
                self._route(DECODE, payload)  # type: ignore[arg-type]
            elif kind == "decode":
                pod, version = payload  # type: ignore[misc]
                if version == pod.version and pod.end is None:
                    self._decode_update(pod)
            elif kind == "ready":
                self._ready(payload)  # type: ignore[arg-type]
            elif kind == "local_prefill_done":
                self._local_prefill_done(*payload)  # type: ignore[misc]
            elif kind == "tick":
                loads = {}
                for role in (PREFILL, DECODE):
                    cur = self._sample(role)
                    ready_n = sum(1 for p in self.live[role] if p.ready and not p.draining)
                    loads[role] = replace(
                        role_load([prev[role]], [cur], self.interval_s), ready_replicas=ready_n
                    )
                    prev[role] = cur
                current = {role: len(self.alive(role)) for role in (PREFILL, DECODE)}
                targets = policy(t, loads, current)
                for role, n in targets.items():
                    self.scale_to(role, max(n, 1))
                timeline.append((t, len(self.alive(PREFILL)), len(self.alive(DECODE))))
                if self.counters[DECODE].requests < total and t < limit:
                    self._at(t + self.interval_s, "tick", None)
            if self.counters[DECODE].requests >= total and t >= horizon:
                break
        end = max(self.now, horizon)
        for p in self.pods:
            if p.end is None:
                p.end = end
        return FleetResult(list(requests), self.pods, end, dict(self.scale_events), timeline)
