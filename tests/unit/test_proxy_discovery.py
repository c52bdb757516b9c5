"""Pod -> endpoint mapping and static URL parsing."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pdorch.proxy.discovery import endpoint_from_pod, endpoints_from_pods, parse_static, static_endpoints
from pdorch.proxy.endpoints import Endpoint

pytestmark = pytest.mark.unit


def pod(
    name: str = "g-prefill-0",
    role: str = "prefill",
    ip: str | None = "10.0.0.7",
    ready: bool = True,
    worker_index: str | None = "0",
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    revision: str = "abc123",
    uid: str | None = None,
) -> dict[str, Any]:
    labels = {
        "pdorch.io/group": "g",
        "pdorch.io/role": role,
        "pdorch.io/role-type": role,
        "pdorch.io/revision": revision,
    }
    if worker_index is not None:
        labels["leaderworkerset.sigs.k8s.io/worker-index"] = worker_index
    md: dict[str, Any] = {"name": name, "namespace": "ns", "labels": labels, "annotations": annotations or {}}
    if uid is not None:
        md["uid"] = uid
    if deleting:
        md["deletionTimestamp"] = "2026-11-27T20:00:00Z"
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": md, "status": status}


def test_ready_leader_maps_with_ports_and_revision() -> None:
    e = endpoint_from_pod(pod(annotations={"pdorch.io/port": "8200", "pdorch.io/bootstrap-port": "8998"}))
    assert e == Endpoint(
        url="http://10.0.0.7:8200",
        role="prefill",
        host="10.0.0.7",
        port=8200,
        revision="abc123",
        bootstrap_port=8998,
        pod="g-prefill-0",
    )
    d = endpoint_from_pod(pod(role="decode", annotations={"pdorch.io/bootstrap-port": "8998"}))
    assert d is not None and d.port == 8000 and d.bootstrap_port is None and d.role == "decode"


@pytest.mark.parametrize(
    "p",
    [
        pod(ready=False),
        pod(ip=None),
        pod(deleting=True),
        pod(worker_index="1"),
        pod(role="proxy"),
        pod(role="worker"),
    ],
    ids=["not-ready", "no-ip", "terminating", "lws-worker", "proxy-role", "worker-role"],
)
def test_excluded_pods(p: dict[str, Any]) -> None:
    assert endpoint_from_pod(p) is None


def test_pod_without_conditions_is_not_ready_and_bad_port_falls_back() -> None:
    p = pod(annotations={"pdorch.io/port": "http"})
    assert endpoint_from_pod(p) is not None and endpoint_from_pod(p).port == 8000  # type: ignore[union-attr]
    bare = copy.deepcopy(pod())
    del bare["status"]["conditions"]
    assert endpoint_from_pod(bare) is None


def test_endpoints_from_pods_sorted_and_ipv6() -> None:
    s = endpoints_from_pods(
        [pod("b", role="decode", ip="10.0.0.9"), pod("a", ip="fd00::5"), pod("c", ready=False, ip="10.0.0.1")]
    )
    assert [e.url for e in s.endpoints] == ["http://10.0.0.9:8000", "http://[fd00::5]:8000"]
    assert s.endpoints[1].host == "fd00::5"


def test_a_pod_reusing_a_deleted_pods_address_is_another_endpoint() -> None:
    """Per-endpoint state (breaker, load, liveness, prefix cache, progress) is keyed by `Endpoint.key`:
    a new pod at the old one's IP and port must not inherit it, the same pod must keep it."""
    old = endpoint_from_pod(pod("g-decode-0", role="decode", uid="uid-old"))
    new = endpoint_from_pod(pod("g-decode-0", role="decode", uid="uid-new"))  # LWS: same name, new UID
    assert old is not None and new is not None
    assert old.key != new.key
    assert old.url == new.url and old.label == new.label == "http://10.0.0.7:8000"
    # The same pod seen again (another discovery refresh, a relabelled revision): the same key.
    again = endpoint_from_pod(pod("g-decode-0", role="decode", uid="uid-old", revision="def456"))
    assert again is not None and again.key == old.key
    # A pod without a UID (not from an apiserver) and a static URL are keyed by their URL.
    bare = endpoint_from_pod(pod("g-decode-0", role="decode"))
    assert bare is not None and bare.key == bare.url
    assert parse_static("http://h:1", "decode").key == "http://h:1"


def test_static_urls() -> None:
    e = parse_static("http://127.0.0.1:9000/#8998", "prefill")
    assert (e.url, e.host, e.port, e.bootstrap_port) == ("http://127.0.0.1:9000", "127.0.0.1", 9000, 8998)
    assert parse_static("http://h:1", "prefill", 7).bootstrap_port == 7
    assert parse_static("http://h:1#9", "decode").bootstrap_port is None
    s = static_endpoints(["http://p:1"], ["http://d:2", "http://d:3"])
    assert [e.role for e in s.endpoints] == ["prefill", "decode", "decode"]
    bad_urls = ("p:1", "ftp://x:1", "http://h:1#abc", "http://h:1#0", "http://h:1#65536", "http://h:x")
    # TLS and a path prefix would hold for the health checks only (the legs are plain HTTP to /v1/...).
    bad_urls += ("https://h:1", "http://h:1/engine-a", "http://h:1/?x=1", "http://h:1?", "http://u:p@h:1")
    for bad in bad_urls:
        with pytest.raises(ValueError) as exc:
            parse_static(bad, "prefill")
        assert str(exc.value).startswith(f"{bad}: ")  # names the URL at fault


def test_kube_discovery_rebuilds_from_the_informer_cache() -> None:
    from types import SimpleNamespace

    from pdorch.proxy.discovery import KubeDiscovery

    seen: list[int] = []
    kd = KubeDiscovery("ns", "g", on_change=lambda s: seen.append(len(s)))
    store = {"ns/a": pod("a"), "ns/b": pod("b", role="decode", ip="10.0.0.8")}
    kd._informer = SimpleNamespace(store=store)
    kd._rebuild("ADDED", store["ns/a"])
    assert [e.role for e in kd.current().endpoints] == ["prefill", "decode"]
    store["ns/a"] = pod("a", deleting=True)
    kd._rebuild("MODIFIED", store["ns/a"])
    kd._rebuild("MODIFIED", store["ns/a"])  # no change: no callback
    assert [e.role for e in kd.current().endpoints] == ["decode"]
    assert seen == [2, 1]


def test_the_proxy_forgets_a_replaced_pod_when_the_watch_says_so() -> None:
    """A departed pod's state (and its idle connections) went only at the next health check, up to
    an interval later; the watch's change now drops it at once."""
    from types import SimpleNamespace

    from pdorch.proxy.config import ProxyConfig
    from pdorch.proxy.discovery import KubeDiscovery
    from pdorch.proxy.server import ProxyServer

    kd = KubeDiscovery("ns", "g")
    px = ProxyServer(ProxyConfig(engine="vllm", host="127.0.0.1", port=0, group="g", namespace="ns"), kd)
    store = {"ns/d": pod("g-decode-0", role="decode", uid="uid-old")}
    kd._informer = SimpleNamespace(store=store)
    kd._rebuild("ADDED", store["ns/d"])
    old = kd.current().endpoints[0]
    px.breakers[old.key] = object()  # type: ignore[assignment]  # any state will do
    store["ns/d"] = pod("g-decode-0", role="decode", uid="uid-new")  # same address, another pod
    kd._rebuild("MODIFIED", store["ns/d"])
    assert old.key not in px.breakers


def test_a_departed_addresss_error_series_go_after_the_ttl_and_come_back_with_it() -> None:
    """Every address a churning fleet used kept its error and retry series for ever."""
    from pdorch.proxy.config import ProxyConfig
    from pdorch.proxy.discovery import StaticDiscovery
    from pdorch.proxy.endpoints import EndpointSet
    from pdorch.proxy.server import DEPARTED_SERIES_TTL_S, ProxyServer

    now = [0.0]
    a, b = "http://127.0.0.1:8001", "http://127.0.0.1:8002"
    px = ProxyServer(
        ProxyConfig(engine="vllm", host="127.0.0.1", port=0, decode=(b,)),
        StaticDiscovery(EndpointSet()),
        clock=lambda: now[0],
    )
    for url in (a, b):
        px.metrics.errors.labels(url, "decode", "reset").inc()
    px.metrics.retries.labels(a, "prefill", "connect").inc()
    only_b = EndpointSet((parse_static(b, "decode"),))
    px._forget_departed(only_b)  # a departs now
    now[0] = DEPARTED_SERIES_TTL_S - 1
    px._forget_departed(only_b)
    assert px.metrics.counted_endpoints() == {a, b}  # kept for the scrapes to see its last values
    now[0] = DEPARTED_SERIES_TTL_S
    px._forget_departed(only_b)
    assert px.metrics.counted_endpoints() == {b}
    px.metrics.errors.labels(a, "decode", "reset").inc()  # a pod is back at the address
    both = EndpointSet((parse_static(a, "decode"), parse_static(b, "decode")))
    px._forget_departed(both)
    now[0] = 10 * DEPARTED_SERIES_TTL_S
    px._forget_departed(both)
    assert px.metrics.counted_endpoints() == {a, b}
    assert px.metrics.errors.labels(a, "decode", "reset")._value.get() == 1
