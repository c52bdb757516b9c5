"""Per-role scaling on the dev cluster.

- External: an autoscaling/v2 HPA targets `ServingRoleScaler/<group>-prefill` and the HPA
  controller (kube-controller-manager) reads its `/scale`; `kubectl scale` on the decode scaler
  changes only decode's LeaderWorkerSet.
- Builtin: `pdorch.scaler`'s loop scrapes simulated engines behind the kwok pod IPs and writes
  `/scale`. Longer prompts at the same rate scale prefill up while decode stays; longer outputs
  scale decode up while prefill does not grow; scale-downs drain first, so no request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx2
import pytest
from lightkube import Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler

from pdorch.controller.kubeapi import KubeApi
from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.pod_backends import PodBackends
from pdorch.devcluster.waiting import wait_for, wait_for_async
from pdorch.scaler.loop import BuiltinScaler, ScalerConfig
from pdorch.sim.config import SimConfig
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100
from tests.integration.test_controller import (
    LWS,
    SG,
    SRS,
    example,
    kubectl,
    wait_available,
    without_engine_drain,
)

pytestmark = pytest.mark.e2e

# Generic (dict) events: other controllers' events may carry a null eventTime the typed model refuses.
EVENT = create_namespaced_resource("events.k8s.io", "v1", "Event", "events")
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _scaled_example(name: str, mode: str, scaling: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    # Engines that abort on SIGTERM: a scale-down loses no request only through the scaler's drain.
    doc = without_engine_drain(example(name))
    for role in doc["spec"]["roles"]:
        if role["type"] in ("prefill", "decode"):
            role["replicas"] = 1 if mode == "Builtin" else role["replicas"]
            role["scaling"] = {
                "mode": mode,
                "minReplicas": 1,
                "maxReplicas": 4,
                **(scaling or {}).get(role["type"], {}),
            }
    return doc


def _lws_replicas(kube: Client, namespace: str, group: str, role: str) -> int:
    return int(kube.get(LWS, f"{group}-{role}", namespace=namespace).spec["replicas"])


# ---------------------------------------------------------------------------- External
def test_hpa_reads_the_prefill_scaler_and_kubectl_scale_moves_only_decode(
    kube: Client, namespace: str, controller: ControllerProc, devcluster: ClusterState
) -> None:
    kube.create(SG.from_dict(_scaled_example("ext", "External")), namespace=namespace)
    wait_available(kube, namespace, "ext")
    wait_for(
        lambda: (kube.get(SRS, "ext-prefill", namespace=namespace).status or {}).get("selector"),
        60,
        "ServingRoleScaler ext-prefill status.selector",
    )
    hpa = HorizontalPodAutoscaler.from_dict(
        {
            "metadata": {"name": "ext-prefill"},
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": "pdorch.io/v1alpha1",
                    "kind": "ServingRoleScaler",
                    "name": "ext-prefill",
                },
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 50},
                        },
                    }
                ],
            },
        }
    )
    kube.create(hpa, namespace=namespace)

    def read_scale() -> Any:
        st = kube.get(HorizontalPodAutoscaler, "ext-prefill", namespace=namespace).status
        able = next((c for c in (st.conditions or []) if c.type == "AbleToScale"), None)
        return st if able is not None and able.status == "True" and st.currentReplicas is not None else None

    status = wait_for(read_scale, 90, "the HPA controller reading ServingRoleScaler/ext-prefill/scale")
    # currentReplicas is what the HPA read through the scaler's /scale (its spec.replicas: 2 here).
    assert status.currentReplicas == 2
    able = next(c for c in status.conditions if c.type == "AbleToScale")
    assert able.reason == "SucceededGetScale", able

    kubectl(devcluster, "-n", namespace, "scale", "servingrolescaler/ext-decode", "--replicas=3")
    wait_for(lambda: _lws_replicas(kube, namespace, "ext", "decode") == 3, 60, "decode LWS at 3 replicas")
    # Only decode moved: prefill's LWS and scaler keep their 2.
    time.sleep(3)
    assert _lws_replicas(kube, namespace, "ext", "prefill") == 2
    assert kube.get(SRS, "ext-prefill", namespace=namespace).spec["replicas"] == 2
    wait_for(
        lambda: (kube.get(SRS, "ext-decode", namespace=namespace).status or {}).get("replicas") == 3,
        60,
        "decode scaler status.replicas 3",
    )
    # Beyond maxReplicas (4) a scale is clamped on its way into the LWS.
    kubectl(devcluster, "-n", namespace, "scale", "servingrolescaler/ext-decode", "--replicas=9")
    wait_for(lambda: _lws_replicas(kube, namespace, "ext", "decode") == 4, 60, "decode LWS at its max 4")
    time.sleep(3)
    assert _lws_replicas(kube, namespace, "ext", "decode") == 4
    assert kube.get(SRS, "ext-decode", namespace=namespace).spec["replicas"] == 9


# ---------------------------------------------------------------------------- Builtin
TIME_SCALE = 10.0  # engines 10x slower than the H100 model, so a few req/s are real load
ENGINE = replace(BLIS_LLAMA31_8B_H100, max_num_seqs=32)


def _profile(path: Path) -> str:
    """The capacity profile the scaler plans with: the engines' coefficients in wall-clock time."""
    c = asdict(ENGINE)
    k = TIME_SCALE
    for f in (
        "prefill_a_s",
        "prefill_b_s",
        "prefill_c_s",
        "decode_a_s",
        "decode_beta_s",
        "decode_gamma_s",
        "transfer_tau0_s",
    ):
        c[f] *= k
    c["transfer_bw_bytes_s"] /= k
    c["name"] = "e2e-blis-x10"
    path.write_text(json.dumps(c))
    return str(path)


BUILTIN_SCALING = {
    "prefill": {"targets": {"ttftMs": 5000}, "scaleDownStabilizationSeconds": 15, "cooldownSeconds": 0},
    "decode": {"targets": {"tpotMs": 100}, "scaleDownStabilizationSeconds": 15, "cooldownSeconds": 0},
}


@pytest.fixture
async def builtin(
    devcluster: ClusterState, kube: Client, namespace: str, controller: ControllerProc, tmp_path: Path
) -> AsyncIterator[tuple[str, BuiltinScaler]]:
    kube.create(SG.from_dict(_scaled_example("auto", "Builtin", BUILTIN_SCALING)), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, "auto")
    backends = PodBackends(
        devcluster.kubeconfig,
        namespace,
        "auto",
        sim_config=SimConfig(protocol="vllm", coefficients=ENGINE, time_scale=TIME_SCALE),
        log_dir=tmp_path,
    )
    await backends.start()
    api = KubeApi.from_config(devcluster.kubeconfig, field_manager="pdorch-scaler")
    cfg = ScalerConfig(
        namespace=namespace,
        interval_s=3.0,
        coefficients=_profile(tmp_path / "profile.json"),
        drain_timeout_s=120,
        # kwok pods here are ready within seconds, not the 60 s default: the forecast's lead must
        # match, or it keeps capacity for a minute-long start-up that never happens.
        pod_startup_s=5.0,
    )
    scaler = BuiltinScaler(api, cfg)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        await wait_for_async(
            lambda: backends.by_kind("proxy") and backends.by_kind("decode"), 60, "proxy and engines"
        )
        url = await backends.proxy_url()
        task = asyncio.create_task(scaler.run(stop))
        yield url, scaler
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        await api.close()
        await backends.stop()


class Load:
    """Open-loop traffic at a fixed rate through the proxy; counts every outcome."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self.inflight: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    async def _one(self, c: httpx2.AsyncClient, prompt_words: int, max_tokens: int) -> None:
        body = {
            "model": MODEL,
            "prompt": "word " * prompt_words,
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        try:
            r = await c.post(f"{self.url}/v1/completions", json=body)
        except httpx2.HTTPError as e:
            self.outcomes[f"transport-{type(e).__name__}"] += 1
            return
        if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens:
            self.outcomes["ok"] += 1
        else:
            self.outcomes[f"error-{r.status_code}"] += 1

    def run(self, rate: float, prompt_words: int, max_tokens: int, client: httpx2.AsyncClient) -> None:
        """Switch to a new (rate, prompt, output) shape."""
        if self._runner is not None:
            self._runner.cancel()

        async def loop() -> None:
            while True:
                t = asyncio.create_task(self._one(client, prompt_words, max_tokens))
                self.inflight.add(t)
                t.add_done_callback(self.inflight.discard)
                await asyncio.sleep(1 / rate)

        self._runner = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=120)

    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k != "ok"}


async def test_builtin_scales_prefill_on_prompts_and_decode_on_outputs_and_drains(
    builtin: tuple[str, BuiltinScaler], kube: Client, namespace: str, devcluster: ClusterState
) -> None:
    url, _scaler = builtin

    def srs(role: str) -> int:
        return int(kube.get(SRS, f"auto-{role}", namespace=namespace).spec["replicas"])

    load = Load(url)
    seen: dict[str, list[int]] = {"prefill": [], "decode": []}

    async def watch(phase: str) -> None:
        while True:
            for role in ("prefill", "decode"):
                seen[role].append(await asyncio.to_thread(srs, role))
            await asyncio.sleep(1)

    async with httpx2.AsyncClient(
        trust_env=False, timeout=httpx2.Timeout(180.0), limits=httpx2.Limits(max_connections=500)
    ) as client:
        # Phase 1: long prompts (1500 tokens), short outputs, 4 req/s -> prefill up, decode stays.
        watcher = asyncio.create_task(watch("prompts"))
        load.run(4.0, 1500, 4, client)
        await wait_for_async(
            lambda: seen["prefill"] and seen["prefill"][-1] >= 2, 120, "prefill scaled up by long prompts"
        )
        await asyncio.sleep(10)
        assert max(seen["decode"]) == 1, seen["decode"]
        await asyncio.to_thread(
            wait_for,
            lambda: _lws_replicas(kube, namespace, "auto", "prefill") == srs("prefill"),
            30,
            "prefill LWS follows",
        )

        # Phase 2: short prompts (100 tokens), long outputs (150 tokens), same rate -> decode up,
        # prefill never above its phase-1 peak, and drains back down with no request lost.
        load.run(4.0, 100, 150, client)
        # Phase 1's peak includes what its own traffic still decides: the tick whose window
        # straddles the switch, with the long prompts queued before it (two intervals).
        await asyncio.sleep(2 * 3.0)
        watcher.cancel()
        peak_prefill = max(seen["prefill"])
        seen = {"prefill": [], "decode": []}
        watcher = asyncio.create_task(watch("outputs"))
        await wait_for_async(
            lambda: seen["decode"] and seen["decode"][-1] >= 2, 150, "decode scaled up by long outputs"
        )
        await wait_for_async(
            lambda: seen["prefill"] and seen["prefill"][-1] == 1, 150, "prefill drained back to 1"
        )
        assert max(seen["prefill"]) <= peak_prefill, (seen["prefill"], peak_prefill)
        watcher.cancel()

        # Phase 3: a quarter of the rate, same long outputs -> decode scales down while every
        # decode engine still streams (each request holds its decode ~9 s): the scaler must drain.
        load.run(1.0, 100, 150, client)
        await wait_for_async(lambda: srs("decode") == 1, 150, "decode drained back to 1 under load")
        await load.stop()
        metrics = (await client.get(f"{url}/metrics")).text
    assert load.outcomes["ok"] > 100, load.outcomes
    assert load.errors() == {}, load.outcomes  # scale-downs drained: no request failed
    # Not even hidden by a retry: no prefill or decode leg ever failed, so no engine was removed
    # with work on it.
    retries = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("pdorch_proxy_retries_total")
    )
    assert retries == 0, f"proxy retried {retries:.0f} legs"

    # Why each decision was taken: status and Events on the scalers.
    st = kube.get(SRS, "auto-prefill", namespace=namespace).status
    assert st.get("lastScaleTime") and "prefill" in st.get("lastScaleReason", ""), st
    reasons = {
        e["reason"]
        for e in (o.to_dict() for o in kube.list(EVENT, namespace=namespace))
        if (e.get("regarding") or {}).get("kind") == "ServingRoleScaler"
    }
    assert {"ScaledUp", "ScaledDown"} <= reasons, reasons
    # ... and in kubectl: the reason is a wide column.
    head, row = kubectl(
        devcluster, "get", "servingrolescaler", "auto-prefill", "-n", namespace, "-o", "wide"
    ).splitlines()[:2]
    assert "LAST SCALE" in head and "REASON" in head, head
    assert st["lastScaleReason"][:20] in row, row
