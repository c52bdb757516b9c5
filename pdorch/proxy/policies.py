"""Pure pairing and routing policies: which (prefill, decode) pair serves a request.

Every function takes plain state (endpoints, in-flight counts, blocked endpoints, a seeded RNG) and
returns a decision with reason strings for metrics. The one piece of mutable state is `PrefixIndex`,
which the caller updates after a decision (`insert`); choosing only reads it.

Rules that hold for every policy:
- a prefill is only ever paired with a decode of the SAME revision;
- a revision is picked with probability proportional to its ready capacity (min(#prefill, #decode),
  or #decode for decode-only requests), so traffic follows a rollout as the new revision becomes ready;
- endpoints whose breaker is open are never chosen; endpoints that already failed for this request are
  avoided when any alternative exists.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pdorch.proxy.endpoints import Endpoint, EndpointSet, group_by_revision

Policy = Literal["round_robin", "least_load", "power_of_two", "cache_aware"]
Readiness = Literal["ok", "degraded", "unavailable"]
POLICIES: tuple[Policy, ...] = ("round_robin", "least_load", "power_of_two", "cache_aware")
Mode = Literal["pd", "decode_only"]


@dataclass(frozen=True)
class CacheAwareConfig:
    """cache_aware knobs (defaults as in the SGLang gateway)."""

    match_threshold: float = 0.3  # route to the best prefix match when at least this share matches
    balance_abs_threshold: int = 64  # load is imbalanced when max-min exceeds this ...
    balance_rel_threshold: float = 1.5  # ... and max exceeds this multiple of min


@dataclass(frozen=True)
class Decision:
    """Where one attempt of a request goes."""

    decode: Endpoint
    prefill: Endpoint | None  # None: decode-only (no prefill leg)
    revision: str
    reason: str  # why P/D or decode-only (metric label)
    pick: str  # how the policy picked the endpoints (metric label)

    @property
    def mode(self) -> Mode:
        """ "pd" with a prefill leg, else "decode_only"."""
        return "pd" if self.prefill is not None else "decode_only"


@dataclass(frozen=True)
class NoRoute:
    """No usable endpoint (pair) exists; `reason` names what is missing."""

    reason: str


class PrefixIndex:
    """Approximate prefix cache per endpoint: chained hashes of fixed-size text chunks, LRU-bounded.

    Text is cut into ``chunk_chars`` pieces (at most ``max_chunks``); chunk k is keyed by a hash of
    chunks 0..k, so a key match means the whole prefix up to that chunk matches (up to hash collisions,
    which only cost affinity, never correctness).
    """

    def __init__(self, chunk_chars: int = 64, max_chunks: int = 256, max_entries: int = 200_000) -> None:
        self.chunk_chars = chunk_chars
        self.max_chunks = max_chunks
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, str], None] = OrderedDict()

    def _keys(self, text: str) -> list[int]:
        keys: list[int] = []
        h = 0
        n = min(len(text) // self.chunk_chars, self.max_chunks)
        for k in range(n):
            h = hash((h, text[k * self.chunk_chars : (k + 1) * self.chunk_chars]))
            keys.append(h)
        return keys

    def match(self, text: str, candidates: Sequence[Endpoint]) -> tuple[list[Endpoint], float]:
        """The candidates with the longest cached prefix of ``text`` (all of them when several hold
        it, none when none holds any) and its match rate (0..1)."""
        keys = self._keys(text)
        if not keys:
            return [], 0.0
        best: list[Endpoint] = []
        best_len = 0
        for ep in candidates:
            matched = 0
            for k in keys:
                if (k, ep.key) not in self._entries:
                    break
                matched += 1
            if matched and matched == best_len:
                best.append(ep)
            elif matched > best_len:
                best, best_len = [ep], matched
        considered = len(keys) * self.chunk_chars
        return best, (best_len * self.chunk_chars) / considered if considered else 0.0

    def insert(self, text: str, endpoint: Endpoint) -> None:
        """Record that ``endpoint`` now caches ``text``'s prefix."""
        for k in self._keys(text):
            entry = (k, endpoint.key)
            self._entries[entry] = None
            self._entries.move_to_end(entry)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class RouteRequest:
    """Everything a routing decision depends on."""

    endpoints: EndpointSet
    loads: Mapping[str, int]  # in-flight legs per endpoint key, tracked by the proxy
    blocked: frozenset[str] = frozenset()  # endpoints whose breaker is open
    avoid: frozenset[str] = frozenset()  # endpoints that already failed for this request
    policy: Policy = "least_load"
    prompt_text: str = ""
    prompt_tokens: int = 0
    min_prompt_tokens: int = 0
    counter: int = 0  # round-robin position / tie-breaker, advanced by the caller


def _load(loads: Mapping[str, int], ep: Endpoint) -> int:
    return loads.get(ep.key, 0)


def pick_one(
    policy: Policy,
    cands: Sequence[Endpoint],
    loads: Mapping[str, int],
    counter: int,
    rng: random.Random,
    *,
    prefix: PrefixIndex | None = None,
    text: str = "",
    cache_cfg: CacheAwareConfig = CacheAwareConfig(),
) -> tuple[Endpoint, str]:
    """One endpoint from non-empty ``cands`` by ``policy``; returns (endpoint, how it was picked)."""
    if len(cands) == 1:
        return cands[0], "only_candidate"
    cands = sorted(cands, key=lambda e: e.key)  # stable order, independent of discovery order
    if policy == "round_robin":
        return cands[counter % len(cands)], "round_robin"
    if policy == "power_of_two":
        a, b = rng.sample(list(cands), 2)
        return (a if _load(loads, a) <= _load(loads, b) else b), "power_of_two"
    if policy == "cache_aware" and prefix is not None:
        ls = [_load(loads, c) for c in cands]
        hi, lo = max(ls), min(ls)
        if hi - lo > cache_cfg.balance_abs_threshold and hi > cache_cfg.balance_rel_threshold * lo:
            return least_loaded(cands, loads, counter), "imbalanced"
        holders, rate = prefix.match(text, cands)
        if holders and rate >= cache_cfg.match_threshold:
            # Several engines holding the prefix (a shared system prompt): the least loaded of them.
            return least_loaded(holders, loads, counter), "prefix_hit"
        return least_loaded(cands, loads, counter), "prefix_miss"
    return least_loaded(cands, loads, counter), "least_load"


def least_loaded(cands: Sequence[Endpoint], loads: Mapping[str, int], counter: int) -> Endpoint:
    """The endpoint with the fewest in-flight legs; ties rotate with ``counter``."""
    n = len(cands)
    best = min(range(n), key=lambda i: (_load(loads, cands[i]), (i - counter) % n))
    return cands[best]


Groups = Mapping[str, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]]  # see `group_by_revision`


def capacity(groups: Groups, mode: Mode) -> dict[str, int]:
    """Ready capacity per revision of grouped endpoints: min(#prefill, #decode) for P/D, #decode for
    decode-only; revisions without capacity are left out."""
    if mode == "decode_only":
        return {r: len(d) for r, (_, d) in groups.items() if d}
    return {r: min(len(p), len(d)) for r, (p, d) in groups.items() if p and d}


def revision_capacity(endpoints: Sequence[Endpoint], mode: Mode) -> dict[str, int]:
    """Ready capacity per revision: min(#prefill, #decode) for P/D, #decode for decode-only."""
    return capacity(group_by_revision(list(endpoints)), mode)


def pick_revision(capacity: Mapping[str, int], rng: random.Random) -> str:
    """A revision drawn with probability proportional to its capacity (non-empty mapping)."""
    if len(capacity) == 1:
        return next(iter(capacity))  # the common case outside rollouts: no draw
    revs = sorted(capacity)
    total = sum(capacity[r] for r in revs)
    x = rng.random() * total
    for r in revs:
        x -= capacity[r]
        if x < 0:
            return r
    return revs[-1]


def disaggregation(prompt_tokens: int, min_prompt_tokens: int) -> tuple[Mode, str]:
    """Conditional disaggregation: decode-only below ``min_prompt_tokens`` estimated tokens."""
    if min_prompt_tokens <= 0:
        return "pd", "always"
    if prompt_tokens < min_prompt_tokens:
        return "decode_only", "short_prompt"
    return "pd", "long_prompt"


def _route(
    req: RouteRequest,
    groups: Groups,
    mode: Mode,
    reason: str,
    rng: random.Random,
    prefix: PrefixIndex | None,
    cache_cfg: CacheAwareConfig,
) -> Decision | NoRoute:
    cap = capacity(groups, mode)
    if not cap:
        if not any(d for _, d in groups.values()):
            return NoRoute("no_decode")
        if mode == "pd" and not any(p for p, _ in groups.values()):
            return NoRoute("no_prefill")
        return NoRoute("no_same_revision_pair")
    rev = pick_revision(cap, rng)
    prefills, decodes = groups[rev]
    if mode == "decode_only":
        decode, pick = pick_one(
            req.policy,
            decodes,
            req.loads,
            req.counter,
            rng,
            prefix=prefix,
            text=req.prompt_text,
            cache_cfg=cache_cfg,
        )
        return Decision(decode=decode, prefill=None, revision=rev, reason=reason, pick=pick)
    # The prefix cache lives where the prompt is computed: the prefill. Decode goes by load
    # (cache_aware) or by the same policy otherwise.
    prefill, pick = pick_one(
        req.policy,
        prefills,
        req.loads,
        req.counter,
        rng,
        prefix=prefix,
        text=req.prompt_text,
        cache_cfg=cache_cfg,
    )
    decode_policy: Policy = "least_load" if req.policy == "cache_aware" else req.policy
    decode, _ = pick_one(decode_policy, decodes, req.loads, req.counter, rng)
    return Decision(decode=decode, prefill=prefill, revision=rev, reason=reason, pick=pick)


def choose(
    req: RouteRequest,
    rng: random.Random,
    prefix: PrefixIndex | None = None,
    cache_cfg: CacheAwareConfig = CacheAwareConfig(),
) -> Decision | NoRoute:
    """Pick a same-revision (prefill, decode) pair, or a decode alone for short prompts."""
    mode, reason = disaggregation(req.prompt_tokens, req.min_prompt_tokens)
    if not req.blocked and not req.avoid:
        # Every endpoint usable (the usual case): the snapshot's own grouping, computed once.
        return _route(req, req.endpoints.by_revision, mode, reason, rng, prefix, cache_cfg)
    healthy = [e for e in req.endpoints.endpoints if e.key not in req.blocked]
    fresh = [e for e in healthy if e.key not in req.avoid]
    out = _route(req, group_by_revision(fresh), mode, reason, rng, prefix, cache_cfg)
    if isinstance(out, NoRoute) and len(fresh) < len(healthy):
        # Nothing untried is left: a retry on an endpoint that failed once beats no answer.
        out = _route(req, group_by_revision(healthy), mode, reason, rng, prefix, cache_cfg)
    return out


def usable_pair_exists(endpoints: EndpointSet, blocked: frozenset[str]) -> tuple[bool, str]:
    """Whether at least one same-revision (prefill, decode) pair is usable; else why not."""
    healthy = [e for e in endpoints.endpoints if e.key not in blocked]
    if revision_capacity(healthy, "pd"):
        return True, "ok"
    if not endpoints.endpoints:
        return False, "no endpoints discovered"
    if not any(e.can_decode for e in healthy):
        return False, "no healthy decode endpoint"
    if not any(e.role == "prefill" for e in healthy):
        return False, "no healthy prefill endpoint"
    return False, "no prefill and decode of the same revision are both healthy"


def readiness(
    endpoints: EndpointSet, blocked: frozenset[str], decode_only_below: int = 0
) -> tuple[Readiness, str]:
    """The proxy's readiness (its /health) and why.

    "ok": a usable same-revision (prefill, decode) pair exists. "degraded": none does, but prompts
    under ``decode_only_below`` estimated tokens (conditional disaggregation, vLLM only; 0 = off)
    skip the prefill and a healthy decode can serve them, so the proxy still takes traffic (longer
    prompts get 503). "unavailable": nothing can be served.
    """
    ok, reason = usable_pair_exists(endpoints, blocked)
    if ok:
        return "ok", reason
    if decode_only_below > 0 and any(e.can_decode and e.key not in blocked for e in endpoints.endpoints):
        return "degraded", (
            f"decode-only: {reason}; prompts under {decode_only_below} tokens are served by a decode "
            "alone, longer ones get 503"
        )
    return "unavailable", reason
