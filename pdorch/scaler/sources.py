"""Where the built-in scaler gets engine metrics (the I/O edge of `pdorch.scaler`).

- `DirectScrape`: GET `/metrics` from each ready leader pod of the role (pod IP + engine port,
  the same endpoints the proxy routes to).
- `PrometheusQuery`: the same metrics through a Prometheus server's HTTP API (`/api/v1/query`),
  for clusters where pods are not reachable from the scaler; over TLS with a CA of one's own and
  a bearer token (a Thanos querier or Prometheus behind kube-rbac-proxy asks for both).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import httpx2

from pdorch.proxy.endpoints import Endpoint
from pdorch.scaler.scrape import (
    SGLANG_PER_RANK,
    SGLANG_RANK_LABELS,
    VLLM_KV_INFO,
    EngineSample,
    MetricsParseError,
    parse_engine_metrics,
    read_series,
)

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 3.0


class MetricsSource(Protocol):
    """Samples of the given leader endpoints, in their order; None for one that could not be read.
    A source whose samples carry their scrape time (`EngineSample.at`) sets `dates_samples = True`:
    one of its samples without a time is then of unknown age. Without it, samples are read at the
    call."""

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]: ...


class DirectScrape:
    """Scrape every endpoint's `/metrics` concurrently."""

    dates_samples = False

    def __init__(self, http: httpx2.AsyncClient | None = None) -> None:
        self.http = http or httpx2.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False)

    async def _one(self, ep: Endpoint) -> EngineSample | None:
        try:
            # The client's timeout is per socket operation; a /metrics that trickles bytes must
            # not hold the whole tick, so the scrape as a whole has the same deadline.
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                r = await self.http.get(f"{ep.url}/metrics")
            r.raise_for_status()
            return parse_engine_metrics(r.text)
        except (httpx2.HTTPError, MetricsParseError, TimeoutError) as e:
            log.warning("scrape %s (%s) failed: %s", ep.url, ep.pod, str(e) or "timed out")
            return None
        except Exception:
            # One odd pod must not cost the whole group its tick: it counts as unreadable.
            log.exception("scrape %s (%s) failed unexpectedly", ep.url, ep.pod)
            return None

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]:
        return list(await asyncio.gather(*(self._one(ep) for ep in endpoints)))

    async def close(self) -> None:
        await self.http.aclose()


# Series the scaler reads, with the family type the text parser needs to group them.
_SERIES = read_series()


# Series whose labels carry what is read, and those labels.
_VALUE_LABELS = {
    VLLM_KV_INFO: ("num_gpu_blocks", "block_size", "engine"),
    **dict.fromkeys(SGLANG_PER_RANK, SGLANG_RANK_LABELS),
}


def _family(series: str, kind: str) -> str:
    # The text parser groups a counter by a TYPE line naming the `_total` series itself.
    for suffix in ("_sum", "_count"):
        if kind == "histogram" and series.endswith(suffix):
            return series[: -len(suffix)]
    return series


# The query's second part: per scrape target, when Prometheus last scraped it (`timestamp(up)`),
# marked with this label so that it can be told from the engines' series and never matches one.
_SCRAPE_LABEL = ("pdorch", "scrape_time")


def _labels(item: dict) -> dict[str, str]:
    return item.get("metric") or {}


def _escaped(value: str) -> str:
    """A label value as the text exposition format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _is_scrape_time(item: dict) -> bool:
    return _labels(item).get(_SCRAPE_LABEL[0]) == _SCRAPE_LABEL[1]


def _pod_series(result: Sequence[dict], by_pod: str) -> tuple[list[dict], float | None]:
    """One pod's series and when they were scraped (None when the result does not say).

    When two scrape jobs collect the same pod (a PodMonitor and an annotation-based job, say), only
    the first job's are kept: summing both would double its load. Within it, only the instance
    scraped last: a pod recreated under the same name (LWS does, on every rollout step) is a new
    scrape target, and the old one's series linger until Prometheus marks them stale. Jobs and
    instances are chosen among the targets that export engine series only: another port of the pod
    (a sidecar, a second endpoint) has its own `up` and nothing to read.
    """
    mine = [i for i in result if _labels(i).get("pod") == by_pod]
    engine = {(_labels(i).get("job", ""), _labels(i).get("instance")) for i in mine if not _is_scrape_time(i)}
    job = min((j for j, _ in engine), default="")
    mine = [i for i in mine if _labels(i).get("job", "") == job]
    times = [
        (float(i["value"][1]), instance)
        for i in mine
        if _is_scrape_time(i) and (job, instance := _labels(i).get("instance")) in engine
    ]
    if not times:
        return [i for i in mine if not _is_scrape_time(i)], None
    at, instance = max(times, key=lambda t: t[0])
    keep = [i for i in mine if not _is_scrape_time(i) and _labels(i).get("instance") in (instance, None)]
    return keep, at


def prometheus_scrape_time(result: Sequence[dict], by_pod: str) -> float | None:
    """When Prometheus last scraped the pod's engine (pure; None when the result does not say)."""
    return _pod_series(result, by_pod)[1]


def prometheus_vector_to_text(result: Sequence[dict], by_pod: str) -> str:
    """Exposition text for one pod from a Prometheus instant-vector result (pure)."""
    lines: dict[str, list[str]] = {}
    for item in _pod_series(result, by_pod)[0]:
        name = _labels(item).get("__name__", "")
        kind = _SERIES.get(name)
        if kind is None:
            continue
        fam = _family(name, kind)
        # Series are written without labels (their sums are what is read), except those whose
        # labels are needed to read them: the KV cache sizes (see `parse_engine_metrics`).
        kept = {k: v for k, v in _labels(item).items() if k in _VALUE_LABELS.get(name, ())}
        labels = "{" + ",".join(f'{k}="{_escaped(v)}"' for k, v in kept.items()) + "}" if kept else ""
        lines.setdefault(f"# TYPE {fam} {kind}", []).append(f"{name}{labels} {float(item['value'][1])!r}")
    out = []
    for header, body in lines.items():
        out.append(header)
        if header.endswith(" histogram"):  # the parser wants a +Inf bucket to accept a histogram
            fam = header.split()[2]
            count = next((b for b in body if b.startswith(fam + "_count ")), None)
            if count:
                out.append(f'{fam}_bucket{{le="+Inf"}} {count.split()[1]}')
        out.extend(body)
    return "\n".join(out) + "\n"


def prometheus_query(namespace: str, pods: Sequence[str]) -> str:
    """The PromQL the source sends (pure): the engine series of these pods, and per scrape target
    the time of its last scrape. One query, so both come from the same state of the database.

    An instant vector, not a range: series of a target that stopped answering (or was removed) are
    marked stale by Prometheus and drop out, so such a pod reads as unread and scale-down holds."""
    names = "|".join(n.replace(":", "\\\\:") for n in _SERIES)
    where = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    label, value = _SCRAPE_LABEL
    return f'{{__name__=~"{names}",{where}}} or label_replace(timestamp(up{{{where}}}), "{label}", "{value}", "", "")'


class PrometheusQuery:
    """Read the series above for the role's leader pods from a Prometheus HTTP API.

    Each pod's sample carries the time Prometheus scraped it (`EngineSample.at`), not the query's
    evaluation time: the scaler divides counter changes by the time between two scrapes of that
    engine, whatever Prometheus's scrape interval is. A pod whose `up` series lacks its namespace
    and pod labels gives no scrape time: its sample is of unknown age, which a drain cannot take
    for idle (such drains end at their timeout); a warning says so once per pod."""

    dates_samples = True

    def __init__(
        self,
        base_url: str,
        http: httpx2.AsyncClient | None = None,
        ca_file: str | None = None,
        token_file: str | None = None,
    ) -> None:
        """`ca_file`: PEM bundle that verifies an https Prometheus (default: the system's).
        `token_file`: sent as `Authorization: Bearer`, read again for every query (projected
        ServiceAccount tokens rotate). Both are read once here, so a wrong path fails at start."""
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        plain = self.base_url.startswith("http://")
        if token_file is not None:
            self._token()
            if plain:
                log.warning("the Prometheus token goes over plain http to %s: use https", self.base_url)
        verify: ssl.SSLContext | bool = True
        if ca_file:
            if plain:
                log.warning("--prometheus-ca-file is unused: %s is plain http", self.base_url)
            try:
                verify = ssl.create_default_context(cafile=ca_file)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise ValueError(f"--prometheus-ca-file {ca_file}: {e}") from None
        self.http = http or httpx2.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False, verify=verify)
        self._undated: set[tuple[str, str]] = set()  # pods warned about (no scrape time)

    def _token(self) -> str:
        """The bearer token, read now (never logged)."""
        assert self.token_file is not None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, ValueError) as e:
            raise ValueError(f"--prometheus-token-file {self.token_file}: {e}") from None
        if not token:
            raise ValueError(f"--prometheus-token-file {self.token_file}: the file is empty")
        if any(not c.isprintable() or c.isspace() for c in token):
            raise ValueError(
                f"--prometheus-token-file {self.token_file}: the token holds whitespace or control "
                "characters (one token, nothing else, is expected)"
            )
        return token

    async def samples(self, namespace: str, endpoints: Sequence[Endpoint]) -> list[EngineSample | None]:
        pods = [ep.pod for ep in endpoints if ep.pod]
        if not pods:
            return [None] * len(endpoints)
        query = prometheus_query(namespace, pods)
        try:
            headers = {"Authorization": f"Bearer {self._token()}"} if self.token_file else {}
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                r = await self.http.get(
                    f"{self.base_url}/api/v1/query", params={"query": query}, headers=headers
                )
            r.raise_for_status()
            result = r.json()["data"]["result"]
        except (httpx2.HTTPError, KeyError, ValueError, TimeoutError) as e:
            # ValueError includes a token file missing mid-rotation; the next tick rereads it.
            log.warning("prometheus query failed: %s", str(e) or type(e).__name__)
            return [None] * len(endpoints)
        out: list[EngineSample | None] = []
        for ep in endpoints:
            if not ep.pod:
                out.append(None)
                continue
            try:
                sample = parse_engine_metrics(prometheus_vector_to_text(result, ep.pod))
                at = prometheus_scrape_time(result, ep.pod)
                if at is None and (namespace, ep.pod) not in self._undated:
                    self._undated.add((namespace, ep.pod))
                    log.warning(
                        "prometheus gives no scrape time for pod %s/%s (no up series with its namespace "
                        "and pod labels): its samples cannot show a drain ended, so scale-downs of its "
                        "role wait for --drain-timeout; label the scrape target, not the metrics",
                        namespace,
                        ep.pod,
                    )
                out.append(replace(sample, at=at))
            except MetricsParseError as e:
                # Typical right after a scale-up: Prometheus has not scraped the new pod yet.
                log.warning("prometheus has no usable engine series for pod %s/%s: %s", namespace, ep.pod, e)
                out.append(None)
        return out

    async def close(self) -> None:
        await self.http.aclose()
