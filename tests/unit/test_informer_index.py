"""The informer's index by group label: the same answers as a scan of the whole cache, through
a list and watch events that add, relabel and delete objects (HTTP layer only, no cluster)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest

from pdorch.controller.informer import Informer, LabelIndex
from pdorch.controller.kubeapi import LWS, KubeApi

pytestmark = pytest.mark.unit

G = "pdorch.io/group"


def _obj(ns: str, name: str, rv: int, **labels: str) -> dict[str, Any]:
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": str(rv), "labels": labels}}


def _scan(inf: Informer, ns: str, labels: dict[str, str]) -> list[str]:
    return sorted(
        o["metadata"]["name"]
        for o in inf.store.values()
        if o["metadata"]["namespace"] == ns
        and all(o["metadata"]["labels"].get(k) == v for k, v in labels.items())
    )


async def test_indexed_list_matches_a_scan_through_relabels_and_deletes() -> None:
    listed = [
        _obj("a", "one", 1, **{G: "x"}),
        _obj("a", "two", 2, **{G: "y"}),
        _obj("b", "one", 3, **{G: "x"}),
    ]
    events = [
        ("MODIFIED", _obj("a", "two", 4, **{G: "x", "role": "decode"})),  # moved from y to x
        ("DELETED", _obj("a", "one", 5, **{G: "x"})),
        ("ADDED", _obj("a", "three", 6, **{G: "y"})),
        ("ADDED", _obj("a", "bare", 7)),  # no group label: listed by scans only
        ("MODIFIED", _obj("b", "one", 8)),  # its label removed
    ]
    watched = asyncio.Event()

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.params.get("watch"):
            if watched.is_set():
                return httpx2.Response(500, content=b"")  # after the one stream: back off
            watched.set()
            body = "".join(json.dumps({"type": t, "object": o}) + "\n" for t, o in events)
            return httpx2.Response(200, content=body.encode())
        return httpx2.Response(200, json={"metadata": {"resourceVersion": "3"}, "items": listed})

    api = KubeApi(httpx2.AsyncClient(transport=httpx2.MockTransport(handler), base_url="http://k8s.invalid"))
    inf = Informer(api, LWS, None, index_label=G)
    task = asyncio.create_task(inf.run())
    await asyncio.wait_for(watched.wait(), 5)
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await api.close()

    assert set(inf.store) == {"a/two", "a/three", "a/bare", "b/one"}
    for ns, labels in [
        ("a", {G: "x"}),
        ("a", {G: "y"}),
        ("b", {G: "x"}),
        ("a", {G: "x", "role": "decode"}),
        ("a", {G: "x", "role": "prefill"}),
        ("a", {"role": "decode"}),  # not the indexed label: a scan
    ]:
        got = sorted(o["metadata"]["name"] for o in inf.list(ns, labels))
        assert got == _scan(inf, ns, labels), (ns, labels)
    assert [o["metadata"]["name"] for o in inf.list("a", {G: "x"})] == ["two"]
    assert sorted(o["metadata"]["name"] for o in inf.list("a", {G: "y"})) == ["three"]
    assert inf.list("b", {G: "x"}) == []


def test_label_index_drops_empty_buckets() -> None:
    idx = LabelIndex(G)
    o = _obj("a", "one", 1, **{G: "x"})
    idx.add("a/one", o)
    assert idx.get("a", "x") == [o]
    idx.remove("a/one", o)
    assert idx.get("a", "x") == []
    assert not idx._buckets  # a churning fleet's departed groups leave nothing behind
