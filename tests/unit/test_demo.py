"""The demo's pure parts: trace sampling, prompt sizing, sliding-window stats, the view."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
from pathlib import Path

import httpx2
import pytest

from pdorch import cli
from pdorch.cli_errors import CliError
from pdorch.demo import run
from pdorch.demo.traffic import Sample, Stats, one_request, prompt_of, trace_lengths
from pdorch.demo.view import render_view
from pdorch.devcluster.cluster import ClusterState, DevCluster, default_state_dir
from pdorch.sim.tokens import count_tokens

pytestmark = pytest.mark.unit


def test_trace_lengths_come_from_the_shipped_sample_and_are_capped() -> None:
    lengths = trace_lengths(max_prompt=2048, max_output=128)
    assert len(lengths) == 400
    assert all(1 <= o <= 128 and 0 < p <= 2048 for p, o in lengths)
    assert len({p for p, _ in lengths}) > 100  # real variety, not a constant


def test_prompt_size_matches_the_sims_token_count() -> None:
    rng = random.Random(1)
    for tokens in (10, 300, 2000):
        n = count_tokens(prompt_of(tokens, rng))
        assert n == tokens


def test_stats_window_and_percentiles() -> None:
    s = Stats(window=10)
    for i in range(100):
        s.add(Sample(at=float(i), ok=True, ttft=0.001 * (i + 1), tpot=0.002))
    s.add(Sample(at=100.0, ok=False), "HTTP 503")
    snap = s.snapshot(100.0)
    assert snap["ttft_p50_ms"] == pytest.approx(96, abs=1.5)  # only the last 10 s count
    assert snap["tpot_p99_ms"] == pytest.approx(2.0)
    assert s.total_ok == 100 and s.total_failed == 1 and s.errors == {"HTTP 503": 1}


def test_view_shows_roles_traffic_and_events() -> None:
    group = {
        "status": {
            "updateRevision": "abc123",
            "conditions": [{"type": "Available", "status": "True", "reason": "AllRolesReady"}],
            "roles": [
                {
                    "name": "prefill",
                    "type": "prefill",
                    "desiredReplicas": 2,
                    "readyReplicas": 2,
                    "updatedReplicas": 2,
                }
            ],
        }
    }
    screen = render_view(
        group, {"rps": 3.5, "ttft_p50_ms": 120.0}, {"ok": 7, "failed": 0, "errors": {}}, ["Created: x"], 12
    )
    assert "abc123" in screen and "Available=True" in screen
    assert "prefill" in screen and "3.5" in screen and "120 ms" in screen and "Created: x" in screen


class FakeCluster:
    """Stands in for DevCluster: records whether the demo started or stopped it."""

    def __init__(self, running: bool) -> None:
        self.running = running
        self.calls: list[str] = []
        self.st = ClusterState(dir="/nonexistent/demo", bin_dir="/b", ports={}, token="t")
        self.state_dir = Path(self.st.dir)

    def exists(self) -> bool:
        return self.running

    def is_up(self) -> bool:
        return self.running

    def state(self) -> ClusterState | None:
        return self.st if self.running else None

    def up(self) -> ClusterState:
        self.calls.append("up")
        self.running = True
        return self.st

    def down(self) -> list[str]:
        self.calls.append("down")
        return []

    def held_by_one(self, on_busy: object) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@pytest.mark.parametrize("running", [True, False])
def test_demo_stops_only_a_cluster_it_started(monkeypatch: pytest.MonkeyPatch, running: bool) -> None:
    fake = FakeCluster(running)
    deleted: list[bool] = []
    monkeypatch.setattr(run, "DevCluster", lambda *a, **k: fake)
    monkeypatch.setattr(ClusterState, "client", lambda self: None)  # no API server here
    monkeypatch.setattr(run, "_namespace_exists", lambda st, ns: False)
    monkeypatch.setattr(run, "_delete_demo_objects", lambda st, namespace: deleted.append(namespace))

    def no_crds(*a: object) -> None:
        raise RuntimeError("stop after the cluster step")

    monkeypatch.setattr(run, "install_pdorch_crds", no_crds)
    with pytest.raises(RuntimeError, match="stop after"):
        asyncio.run(run.demo(1, 1.0, "demo"))
    if running:
        assert fake.calls == []  # reused: left running, not stopped
        assert deleted == [True]  # the demo namespace it created is removed
    else:
        assert fake.calls == ["up", "down"]
        assert deleted == []


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        (b'data: {"id": 1}\n\ndata: {"id": 2}\n\ndata: [DONE]\n\n', None),
        (b'data: {"id": 1}\n\ndata: {"error": {"message": "decode failed"}}\n\n', "stream error event"),
        (b"", "empty stream"),
        (b'data: {"id": 1}\n\n', "stream cut before [DONE]"),
    ],
)
def test_a_200_stream_that_failed_counts_as_failed(body: bytes, outcome: str | None) -> None:
    """A stream the proxy ended with an error event (its mid-stream failure), an empty 200, or one
    cut before [DONE] counted as ok, which hid interrupted requests during a rollout."""

    async def go() -> Stats:
        stats = Stats()
        transport = httpx2.MockTransport(lambda _: httpx2.Response(200, content=body))
        async with httpx2.AsyncClient(transport=transport) as client:
            await one_request(client, "http://127.0.0.1:1", "p", 4, stats)
        return stats

    stats = asyncio.run(go())
    if outcome is None:
        assert (stats.total_ok, stats.total_failed) == (1, 0)
    else:
        assert (stats.total_ok, stats.total_failed, stats.errors) == (0, 1, {outcome: 1})


def test_lifetime_ttft_counts_every_success() -> None:
    s = Stats(window=1)
    for i in range(10):
        s.add(Sample(at=float(i * 10), ok=True, ttft=0.010 * (i + 1)))
    assert s.lifetime_ttft_ms(0.5) == pytest.approx(50, abs=10) and s.lifetime_ttft_ms(0.99) == pytest.approx(
        100
    )


def test_a_failure_whose_logs_cannot_be_copied_still_removes_the_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Copying the logs out (disk full) raised before the cluster was taken down, which leaked it;
    a bare assertion crashed the error line with an IndexError."""
    fake = FakeCluster(False)
    monkeypatch.setattr(run, "DevCluster", lambda *a, **k: fake)
    monkeypatch.setattr(ClusterState, "client", lambda self: None)

    def bare_assert(*a: object) -> None:
        raise AssertionError

    def disk_full(_: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "install_pdorch_crds", bare_assert)
    monkeypatch.setattr(run, "_keep_logs", disk_full)
    with pytest.raises(CliError, match="AssertionError"):
        asyncio.run(run.demo(1, 1.0, "demo"))
    assert fake.calls == ["up", "down"]


def test_a_second_demo_on_the_same_cluster_is_refused_before_it_touches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two demos on one cluster name collided: the second's engines could not bind the pods'
    addresses, and the first took the cluster down under the second when it stopped."""
    monkeypatch.setenv("PDORCH_DEVCLUSTER_DIR", str(tmp_path))
    touched: list[str] = []
    monkeypatch.setattr(DevCluster, "exists", lambda self: touched.append("exists") or False)

    def up(self: DevCluster, *a: object) -> None:
        touched.append("up")
        raise RuntimeError("stop after up")

    monkeypatch.setattr(DevCluster, "up", up)
    with DevCluster(default_state_dir("shared")).held_by_one(lambda: None):  # the first demo
        assert cli.main(["demo", "--cluster-name", "shared", "--duration", "1"]) == 1
    err = capsys.readouterr().err
    assert "another `pdorch demo` is running on the dev cluster 'shared'" in err and "--cluster-name" in err
    assert touched == []
    # Once the first is gone, the next demo gets past the lock (and here stops at the fake `up`).
    with pytest.raises(RuntimeError, match="stop after up"):
        asyncio.run(run.demo(1, 1.0, "shared"))
    assert touched == ["exists", "up"]


def test_info_log_lines_go_to_the_file_and_warnings_stay_on_the_terminal(tmp_path: Path) -> None:
    """The in-process engines' INFO lines broke up the live view (it redraws every second)."""
    root = logging.getLogger()
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with run._info_logs_to(tmp_path / "logs" / "demo-engines.log"):
            logging.getLogger("pdorch.sim.server").info("engine listening")
            logging.getLogger("pdorch.sim.server").warning("engine slow")
        logging.getLogger("pdorch.sim.server").info("after the demo")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    in_file = (tmp_path / "logs" / "demo-engines.log").read_text()
    assert "engine listening" in in_file and "engine slow" in in_file and "after the demo" not in in_file
    assert terminal.getvalue().splitlines() == ["engine slow", "after the demo"]


class _ReadyController:
    def __init__(self, *a: object, **k: object) -> None:
        self.stopped = False

    def is_ready(self) -> bool:
        return True

    def stop(self) -> None:
        self.stopped = True


class _BrokenBackends:
    """Engines that fail to start, and fail again when stopped."""

    def __init__(self, *a: object, **k: object) -> None:
        pass

    async def start(self) -> None:
        raise RuntimeError("engines failed to start")

    async def stop(self) -> None:
        raise RuntimeError("engines failed to stop")


def test_a_failing_cleanup_step_neither_skips_the_rest_nor_keeps_the_logs_redirected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine stop that raised skipped the controller's stop, left the terminal's log handlers
    at WARNING with the file handler attached, and left a cluster the demo started running."""
    fake = FakeCluster(False)
    fake.st = ClusterState(dir=str(tmp_path), bin_dir="/b", ports={}, token="t")
    monkeypatch.setattr(run, "DevCluster", lambda *a, **k: fake)
    monkeypatch.setattr(ClusterState, "client", lambda self: None)
    monkeypatch.setattr(run, "install_pdorch_crds", lambda *a: None)
    controllers: list[_ReadyController] = []
    monkeypatch.setattr(
        run, "ControllerProc", lambda *a, **k: controllers.append(_ReadyController()) or controllers[-1]
    )
    monkeypatch.setattr(run, "_apply_example", lambda *a: None)
    monkeypatch.setattr(run, "_available", lambda *a: True)
    monkeypatch.setattr(run, "PodBackends", _BrokenBackends)
    monkeypatch.setattr(run, "_keep_logs", lambda _: None)
    root = logging.getLogger()
    terminal = logging.StreamHandler(io.StringIO())
    root.addHandler(terminal)
    try:
        with pytest.raises(RuntimeError, match="failed to start"):
            asyncio.run(run.demo(1, 1.0, "demo"))
        assert terminal.level == logging.NOTSET
        assert not [h for h in root.handlers if getattr(h, "baseFilename", "").endswith("demo-engines.log")]
    finally:
        root.removeHandler(terminal)
    assert controllers[0].stopped and fake.calls == ["up", "down"]


def test_an_error_inside_the_demo_is_not_blamed_on_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's hold on its cluster turned any permission error inside it (an unreadable file)
    into "cannot write the dev cluster state ... set PDORCH_DEVCLUSTER_DIR"."""
    monkeypatch.setenv("PDORCH_DEVCLUSTER_DIR", str(tmp_path))
    monkeypatch.setattr(DevCluster, "exists", lambda self: False)
    monkeypatch.setattr(
        DevCluster,
        "up",
        lambda self, *a: ClusterState(dir=str(tmp_path / "d"), bin_dir="/b", ports={}, token="t"),
    )
    monkeypatch.setattr(DevCluster, "down", lambda self, *a: [])
    monkeypatch.setattr(ClusterState, "client", lambda self: None)

    def unreadable(*a: object) -> None:
        raise PermissionError(13, "Permission denied", "/somewhere/crd.yaml")

    monkeypatch.setattr(run, "install_pdorch_crds", unreadable)
    monkeypatch.setattr(run, "_keep_logs", lambda _: None)
    with pytest.raises(PermissionError, match=r"crd\.yaml"):
        asyncio.run(run.demo(1, 1.0, "demo"))


def test_an_apiserver_gone_mid_demo_points_at_the_kept_logs_not_at_the_removed_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo copied the logs out and removed its cluster, then ended with "cannot reach the
    Kubernetes API server ... check that the cluster is up (`pdorch dev-cluster status`)"."""
    fake = FakeCluster(False)
    monkeypatch.setattr(run, "DevCluster", lambda *a, **k: fake)
    monkeypatch.setattr(ClusterState, "client", lambda self: None)

    def apiserver_gone(*a: object) -> None:
        raise httpx2.ConnectError(
            "[Errno 111] Connection refused", request=httpx2.Request("GET", "https://127.0.0.1:6443/apis")
        )

    monkeypatch.setattr(run, "install_pdorch_crds", apiserver_gone)
    monkeypatch.setattr(run, "_keep_logs", lambda _: Path("/kept/demo-logs-20250101-000000"))
    assert cli.main(["demo", "--duration", "1"]) == 1
    assert fake.calls == ["up", "down"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the Kubernetes API server at https://127.0.0.1:6443")
    assert "/kept/demo-logs-20250101-000000" in last and "dev-cluster status" not in last


def test_a_demo_refused_on_a_cluster_that_is_not_up_says_only_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster that exists but is not up is refused before anything starts; the demo still said
    "stopping: traffic, engines, proxy, controller" and "cleaned up" (helper-83)."""
    fake = FakeCluster(False)
    fake.exists = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(run, "DevCluster", lambda *a, **k: fake)
    with pytest.raises(CliError, match=r"exists at .* but is not up"):
        asyncio.run(run.demo(1, 60.0, "demo"))
    out = capsys.readouterr()
    assert "stopping" not in out.out + out.err and "cleaned up" not in out.out + out.err, out
    assert fake.calls == []
