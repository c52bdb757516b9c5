"""Pairing and routing policies: same-revision pairs, revision weighting, per-policy behaviour."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdorch.proxy.endpoints import Endpoint, EndpointSet, group_by_revision
from pdorch.proxy.policies import (
    Decision,
    NoRoute,
    PrefixIndex,
    RouteRequest,
    capacity,
    choose,
    disaggregation,
    pick_one,
    readiness,
    revision_capacity,
    usable_pair_exists,
)

pytestmark = pytest.mark.unit


def ep(role: str, n: int, rev: str = "r1") -> Endpoint:
    return Endpoint(url=f"http://10.0.0.{n}:8000", role=role, host=f"10.0.0.{n}", port=8000, revision=rev)  # type: ignore[arg-type]


def eps(*items: Endpoint) -> EndpointSet:
    return EndpointSet(tuple(items))


def decide(req: RouteRequest, seed: int = 0, prefix: PrefixIndex | None = None) -> Decision:
    out = choose(req, random.Random(seed), prefix)
    assert isinstance(out, Decision), out
    return out


endpoint_lists = st.lists(
    st.tuples(st.sampled_from(["prefill", "decode"]), st.integers(1, 40), st.sampled_from(["a", "b", "c"])),
    min_size=1,
    max_size=12,
)


@given(
    endpoint_lists,
    st.integers(0, 1000),
    st.sampled_from(["round_robin", "least_load", "power_of_two", "cache_aware"]),
)
def test_pairs_never_cross_revisions(items: list[tuple[str, int, str]], seed: int, policy: str) -> None:
    # Unique URLs per (role, n): a URL is one endpoint.
    by_url = {
        f"{role}-{n}": Endpoint(f"http://{role}-{n}:1", role, f"{role}-{n}", 1, rev) for role, n, rev in items
    }  # type: ignore[arg-type]
    s = EndpointSet(tuple(by_url.values()))
    out = choose(
        RouteRequest(endpoints=s, loads={}, policy=policy, prompt_text="x" * 200),
        random.Random(seed),
        PrefixIndex(),
    )  # type: ignore[arg-type]
    if isinstance(out, Decision):
        assert out.prefill is not None and out.prefill.role == "prefill" and out.decode.role == "decode"
        assert out.prefill.revision == out.decode.revision == out.revision
    else:
        # No route only if no revision has both roles.
        assert not revision_capacity(list(s.endpoints), "pd")


def test_revision_weighted_by_ready_capacity() -> None:
    # r-old: 3 prefill + 3 decode (capacity 3); r-new: 1 prefill + 3 decode (capacity 1) -> 3:1 split.
    s = eps(*(ep("prefill", i, "old") for i in range(1, 4)), *(ep("decode", i, "old") for i in range(4, 7)),
            ep("prefill", 7, "new"), *(ep("decode", i, "new") for i in range(8, 11)))  # fmt: skip
    rng = random.Random(1)
    counts = Counter()
    for i in range(4000):
        d = choose(RouteRequest(endpoints=s, loads={}, counter=i), rng)
        assert isinstance(d, Decision)
        counts[d.revision] += 1
    assert 0.70 < counts["old"] / 4000 < 0.80
    assert revision_capacity(list(s.endpoints), "pd") == {"old": 3, "new": 1}
    assert revision_capacity(list(s.endpoints), "decode_only") == {"old": 3, "new": 3}


def test_revision_without_a_pair_gets_nothing() -> None:
    s = eps(ep("prefill", 1, "old"), ep("decode", 2, "old"), ep("decode", 3, "new"))
    for seed in range(50):
        assert decide(RouteRequest(endpoints=s, loads={}), seed).revision == "old"


def test_least_load_picks_fewest_inflight_and_rotates_ties() -> None:
    s = eps(ep("prefill", 1), ep("prefill", 2), ep("decode", 3), ep("decode", 4))
    loads = {
        "http://10.0.0.1:8000": 5,
        "http://10.0.0.2:8000": 1,
        "http://10.0.0.3:8000": 0,
        "http://10.0.0.4:8000": 2,
    }
    d = decide(RouteRequest(endpoints=s, loads=loads, policy="least_load"))
    assert d.prefill is not None and d.prefill.host == "10.0.0.2"
    assert d.decode.host == "10.0.0.3"
    tied = {decide(RouteRequest(endpoints=s, loads={}, counter=i)).decode.host for i in range(4)}
    assert tied == {"10.0.0.3", "10.0.0.4"}


def test_round_robin_cycles() -> None:
    s = eps(ep("prefill", 1), ep("prefill", 2), ep("prefill", 3), ep("decode", 4))
    picks = [
        decide(RouteRequest(endpoints=s, loads={}, policy="round_robin", counter=i)).prefill for i in range(6)
    ]
    assert [p.host for p in picks if p] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    cands = [ep("decode", 1), ep("decode", 2), ep("decode", 3)]
    loads = {"http://10.0.0.1:8000": 9, "http://10.0.0.2:8000": 0, "http://10.0.0.3:8000": 4}
    rng = random.Random(3)
    seen = Counter(pick_one("power_of_two", cands, loads, 0, rng)[0].host for _ in range(300))
    assert seen["10.0.0.1"] == 0
    assert seen["10.0.0.2"] > seen["10.0.0.3"] > 0


def test_cache_aware_prefers_prefix_owner_unless_imbalanced() -> None:
    s = eps(ep("prefill", 1), ep("prefill", 2), ep("decode", 3))
    index = PrefixIndex(chunk_chars=16)
    system = "You are a helpful assistant. " * 20
    index.insert(system + "first question", s.endpoints[1])
    d = decide(
        RouteRequest(endpoints=s, loads={}, policy="cache_aware", prompt_text=system + "second one"),
        prefix=index,
    )
    assert d.prefill is not None and d.prefill.host == "10.0.0.2" and d.pick == "prefix_hit"
    # Unrelated text: no match -> least load.
    d2 = decide(
        RouteRequest(
            endpoints=s, loads={"http://10.0.0.1:8000": 3}, policy="cache_aware", prompt_text="z" * 400
        ),
        prefix=index,
    )
    assert d2.pick == "prefix_miss" and d2.prefill is not None and d2.prefill.host == "10.0.0.2"
    # The owner is overloaded: balance wins over affinity.
    heavy = {"http://10.0.0.2:8000": 200, "http://10.0.0.1:8000": 1}
    d3 = decide(
        RouteRequest(endpoints=s, loads=heavy, policy="cache_aware", prompt_text=system), prefix=index
    )
    assert d3.pick == "imbalanced" and d3.prefill is not None and d3.prefill.host == "10.0.0.1"


def test_cache_aware_sends_a_shared_prefix_to_the_least_loaded_of_its_holders() -> None:
    """Both prefills cached the same system prompt: the idle one takes the next request with it,
    not always the first in URL order until it is far enough ahead to trip the balance check."""
    s = eps(ep("prefill", 1), ep("prefill", 2), ep("decode", 3))
    index = PrefixIndex(chunk_chars=16)
    system = "You are a helpful assistant. " * 20
    for holder in s.endpoints[:2]:
        index.insert(system + "earlier question", holder)
    busy_first = {"http://10.0.0.1:8000": 60}
    d = decide(
        RouteRequest(endpoints=s, loads=busy_first, policy="cache_aware", prompt_text=system + "new one"),
        prefix=index,
    )
    assert d.pick == "prefix_hit" and d.prefill is not None and d.prefill.host == "10.0.0.2"


def test_prefix_index_is_bounded() -> None:
    index = PrefixIndex(chunk_chars=4, max_entries=10)
    for i in range(20):
        index.insert(f"{i:04d}" * 5, ep("prefill", 1))
    assert len(index) == 10


def test_conditional_disaggregation() -> None:
    assert disaggregation(10, 0) == ("pd", "always")
    assert disaggregation(10, 64) == ("decode_only", "short_prompt")
    assert disaggregation(64, 64) == ("pd", "long_prompt")
    s = eps(ep("prefill", 1), ep("decode", 2))
    d = decide(RouteRequest(endpoints=s, loads={}, prompt_tokens=5, min_prompt_tokens=64))
    assert d.mode == "decode_only" and d.prefill is None and d.reason == "short_prompt"
    # Decode-only still works when there is no prefill at all.
    d2 = decide(RouteRequest(endpoints=eps(ep("decode", 2)), loads={}, prompt_tokens=5, min_prompt_tokens=64))
    assert d2.decode.host == "10.0.0.2"


def test_open_breakers_are_excluded() -> None:
    s = eps(ep("prefill", 1), ep("prefill", 2), ep("decode", 3))
    blocked = frozenset({"http://10.0.0.1:8000"})
    for i in range(10):
        d = decide(RouteRequest(endpoints=s, loads={}, blocked=blocked, policy="round_robin", counter=i))
        assert d.prefill is not None and d.prefill.host == "10.0.0.2"
    out = choose(
        RouteRequest(endpoints=s, loads={}, blocked=frozenset({"http://10.0.0.3:8000"})), random.Random(0)
    )
    assert out == NoRoute("no_decode")
    all_p = frozenset({"http://10.0.0.1:8000", "http://10.0.0.2:8000"})
    assert choose(RouteRequest(endpoints=s, loads={}, blocked=all_p), random.Random(0)) == NoRoute(
        "no_prefill"
    )


def test_avoid_prefers_fresh_endpoints_but_falls_back() -> None:
    s = eps(ep("prefill", 1), ep("prefill", 2), ep("decode", 3))
    avoid = frozenset({"http://10.0.0.1:8000"})
    for i in range(5):
        d = decide(RouteRequest(endpoints=s, loads={}, avoid=avoid, policy="round_robin", counter=i))
        assert d.prefill is not None and d.prefill.host == "10.0.0.2"
    # Everything failed once: reuse rather than refuse.
    d = decide(RouteRequest(endpoints=s, loads={}, avoid=frozenset(e.key for e in s.endpoints)))
    assert d.prefill is not None


def test_no_same_revision_pair_and_health() -> None:
    s = eps(ep("prefill", 1, "a"), ep("decode", 2, "b"))
    assert choose(RouteRequest(endpoints=s, loads={}), random.Random(0)) == NoRoute("no_same_revision_pair")
    ok, reason = usable_pair_exists(s, frozenset())
    assert not ok and "same revision" in reason
    assert usable_pair_exists(eps(ep("prefill", 1), ep("decode", 2)), frozenset()) == (True, "ok")
    assert usable_pair_exists(EndpointSet(), frozenset())[0] is False


def test_readiness_is_degraded_when_only_the_decode_only_path_can_serve() -> None:
    """Conditional disaggregation (vLLM) serves short prompts on a decode alone: without a usable
    pair the proxy is still ready, degraded; without that path, or without a healthy decode, not."""
    decode_only = eps(ep("decode", 2))
    status, reason = readiness(decode_only, frozenset(), decode_only_below=512)
    assert status == "degraded"
    assert reason.startswith("decode-only: no healthy prefill endpoint") and "512 tokens" in reason
    # No decode-only path (off, or SGLang, whose decodes refuse requests without a prefill).
    assert readiness(decode_only, frozenset()) == ("unavailable", "no healthy prefill endpoint")
    # Prefills and decodes of different revisions: no pair, but a decode alone can serve.
    assert readiness(eps(ep("prefill", 1, "a"), ep("decode", 2, "b")), frozenset(), 1)[0] == "degraded"
    # The only decode's breaker is open: nothing can serve.
    both = eps(ep("prefill", 1), ep("decode", 2))
    assert readiness(both, frozenset({ep("decode", 2).key}), 512) == (
        "unavailable",
        "no healthy decode endpoint",
    )
    assert readiness(EndpointSet(), frozenset(), 512) == ("unavailable", "no endpoints discovered")
    # A usable pair: ready, whatever the threshold.
    assert readiness(both, frozenset(), 512) == ("ok", "ok")
    assert readiness(both, frozenset({ep("prefill", 1).key}), 512)[0] == "degraded"


# Endpoints of all three roles, possibly none; one endpoint per (role, n).
mixed_endpoint_lists = st.lists(
    st.tuples(
        st.sampled_from(["prefill", "decode", "both"]), st.integers(1, 40), st.sampled_from(["a", "b", "c"])
    ),
    min_size=0,
    max_size=12,
)


def unique_endpoints(items: list[tuple[str, int, str]]) -> list[Endpoint]:
    """One endpoint per (role, n): a URL is one endpoint."""
    by_url = {
        f"{role}-{n}": Endpoint(f"http://{role}-{n}:1", role, f"{role}-{n}", 1, rev) for role, n, rev in items
    }  # type: ignore[arg-type]
    return list(by_url.values())


@given(
    mixed_endpoint_lists,
    st.integers(0, 1000),
    st.sampled_from(["round_robin", "least_load", "power_of_two", "cache_aware"]),
    st.integers(0, 60),
    st.dictionaries(st.integers(1, 40), st.integers(0, 5), max_size=6),
)
def test_snapshot_grouping_routes_like_filtering_every_request(
    items: list[tuple[str, int, str]], seed: int, policy: str, prompt_tokens: int, load_by_n: dict[int, int]
) -> None:
    # With nothing blocked, `choose` reads the snapshot's cached grouping; blocking an endpoint that does
    # not exist takes the per-request filtering path. Both must decide alike, draw for draw.
    s = EndpointSet(tuple(unique_endpoints(items)))
    loads = {e.key: load_by_n.get(int(e.host.rsplit("-", 1)[1]), 0) for e in s.endpoints}

    def req(blocked: frozenset[str]) -> RouteRequest:
        return RouteRequest(
            endpoints=s,
            loads=loads,
            blocked=blocked,
            policy=policy,  # type: ignore[arg-type]
            prompt_text="x" * 300,
            prompt_tokens=prompt_tokens,
            min_prompt_tokens=30,
            counter=seed,
        )

    fast = choose(req(frozenset()), random.Random(seed), PrefixIndex())
    slow = choose(req(frozenset({"http://nowhere:1"})), random.Random(seed), PrefixIndex())
    assert fast == slow
    assert s.by_revision is s.by_revision  # computed once per snapshot


@given(mixed_endpoint_lists)
def test_grouping_matches_capacity_and_role_filters(items: list[tuple[str, int, str]]) -> None:
    # Oracle: the per-endpoint rules routing always used (a dedicated prefill for P/D,
    # anything that can decode for the decode leg), applied to the raw list.
    endpoints = unique_endpoints(items)
    groups = group_by_revision(endpoints)
    for rev, (prefills, decodes) in groups.items():
        assert list(prefills) == sorted(
            (e for e in endpoints if e.revision == rev and e.role == "prefill"), key=lambda e: e.key
        )
        assert list(decodes) == sorted(
            (e for e in endpoints if e.revision == rev and e.can_decode), key=lambda e: e.key
        )
    assert set(groups) == {e.revision for e in endpoints}
    # Capacity counted endpoint by endpoint, with no grouping.
    revs = {e.revision for e in endpoints}
    n_pre = {r: sum(e.revision == r and e.role == "prefill" for e in endpoints) for r in revs}
    n_dec = {r: sum(e.revision == r and e.can_decode for e in endpoints) for r in revs}
    pd_cap = {r: min(n_pre[r], n_dec[r]) for r in revs if min(n_pre[r], n_dec[r]) > 0}
    assert pd_cap == revision_capacity(endpoints, "pd") == capacity(groups, "pd")
    dec_cap = {r: n for r, n in n_dec.items() if n > 0}
    assert dec_cap == revision_capacity(endpoints, "decode_only") == capacity(groups, "decode_only")


def test_both_role_endpoints_alone_have_no_prefill_for_pd() -> None:
    s = eps(ep("both", 1), ep("both", 2))
    out = choose(RouteRequest(endpoints=s, loads={}), random.Random(0))
    assert out == NoRoute("no_prefill")
    short = choose(
        RouteRequest(endpoints=s, loads={}, prompt_tokens=1, min_prompt_tokens=10), random.Random(0)
    )
    assert isinstance(short, Decision) and short.prefill is None and short.decode.role == "both"
