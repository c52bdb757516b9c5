"""The dev cluster's state directory: names, what `down` may delete, `up`'s bookkeeping on failure.

No process is started: the component steps are replaced, everything lives in tmp dirs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pdorch import cli
from pdorch.devcluster import binaries, cluster, manifests, pki
from pdorch.devcluster.cluster import (
    MARKER,
    ClusterState,
    DevCluster,
    NotADevClusterError,
    default_state_dir,
    validate_name,
)
from pdorch.devcluster.commands import cluster_flags, not_up_hint
from pdorch.devcluster.controller_process import controller_log_dir
from pdorch.devcluster.process import Managed, StartupError

pytestmark = pytest.mark.unit


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "devcluster"
    root.mkdir()
    monkeypatch.setenv("PDORCH_DEVCLUSTER_DIR", str(root))
    return root


@pytest.fixture
def no_components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`up` without binaries, certificates or processes; the returned list says what ran."""
    ran: list[str] = []
    monkeypatch.setattr(binaries, "ensure", lambda: binaries.Binaries(tmp_path / "bins"))
    monkeypatch.setattr(pki, "generate", lambda paths: "token")
    monkeypatch.setattr(DevCluster, "_start_all", lambda self, *a: ran.append(str(self.state_dir)))
    return ran


@pytest.mark.parametrize("name", ["default", "pytest", "fix1", "bench-rollout", "a" * 63, "0"])
def test_plain_names_are_valid(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "/abs/path", "a/b", "Up", "-x", "a_b", "a" * 64, "a\n"]
)
def test_names_that_are_not_one_plain_path_component_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid dev cluster name"):
        default_state_dir(name)


def test_the_cli_refuses_a_bad_name_before_doing_anything(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["dev-cluster", "--name", "..", "down"])
    assert exc.value.code == 2
    assert "invalid dev cluster name '..'" in capsys.readouterr().err
    assert state_root.exists()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--cluster-name", "/tmp"])


def test_down_refuses_a_directory_pdorch_did_not_create(tmp_path: Path) -> None:
    data = tmp_path / "precious"
    data.mkdir()
    (data / "file.txt").write_text("keep me")
    with pytest.raises(NotADevClusterError):
        DevCluster(data).down()
    assert (data / "file.txt").read_text() == "keep me"


def test_down_of_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    assert DevCluster(tmp_path / "absent").down() == []


@pytest.mark.parametrize("mark", [MARKER, "state.json"])
def test_down_removes_a_state_directory_it_recognises(tmp_path: Path, mark: str) -> None:
    d = tmp_path / "c"
    d.mkdir()
    content = json.dumps({"dir": str(d), "bin_dir": "/b", "ports": {}, "token": "t"})
    (d / mark).write_text(content)
    assert DevCluster(d).down() == []
    assert not d.exists()


def test_cli_down_of_an_unknown_name_fails_and_lists_the_clusters(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (state_root / "real").mkdir()
    (state_root / "real" / MARKER).write_text("")
    (state_root / "notacluster").mkdir()
    assert cli.main(["dev-cluster", "--name", "raal", "down"]) == 1
    err = capsys.readouterr().err
    assert "no dev cluster named 'raal'" in err and "existing dev clusters: real" in err
    assert (state_root / "notacluster").exists()


def test_cli_down_refuses_a_cluster_a_demo_holds_unless_forced(
    state_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`down` took the cluster away under a running demo, whose requests then all failed."""
    (state_root / "shared").mkdir()
    (state_root / "shared" / MARKER).write_text("")
    c = DevCluster(default_state_dir("shared"))
    with c.held_by_one(lambda: None):  # a demo runs on it
        assert c.held()
        assert cli.main(["dev-cluster", "--name", "shared", "down"]) == 1
        err = capsys.readouterr().err
        assert "a `pdorch demo` is running" in err and "--name shared down --force" in err
        assert (state_root / "shared").exists()
        assert cli.main(["dev-cluster", "--name", "shared", "down", "--force"]) == 0
    assert not (state_root / "shared").exists() and not c.held()


def test_cli_down_with_a_state_dir_that_is_not_a_cluster_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("x")
    assert cli.main(["dev-cluster", "--state-dir", str(tmp_path), "down"]) == 1
    assert "no dev cluster state at" in capsys.readouterr().err
    assert (tmp_path / "f").exists()


def test_cli_down_with_a_state_dir_that_is_not_a_cluster_lists_the_clusters(
    state_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--name listed the existing clusters when nothing was there; --state-dir did not."""
    (state_root / "real").mkdir()
    (state_root / "real" / MARKER).write_text("")
    (tmp_path / "x").mkdir()
    assert cli.main(["dev-cluster", "--state-dir", str(tmp_path / "x"), "down"]) == 1
    err = capsys.readouterr().err
    assert f"no dev cluster state at {tmp_path / 'x'}; nothing removed" in err
    assert f"dev clusters under {state_root}: real" in err
    (state_root / "real" / MARKER).unlink()
    assert cli.main(["dev-cluster", "--state-dir", str(tmp_path / "x"), "down"]) == 1
    assert f"no dev clusters under {state_root}" in capsys.readouterr().err


def test_up_refuses_to_adopt_a_foreign_directory(tmp_path: Path, no_components: list[str]) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADevClusterError):
        DevCluster(tmp_path).up()
    assert no_components == [] and not (tmp_path / MARKER).exists()


def test_up_marks_its_directory_and_records_a_free_pod_cidr(
    state_root: Path, no_components: list[str]
) -> None:
    other = state_root / "pytest"
    other.mkdir()
    (other / "state.json").write_text(
        json.dumps(
            {"dir": str(other), "bin_dir": "/b", "ports": {}, "token": "t", "pod_network": "127.1.0.0/16"}
        )
    )
    st = DevCluster(default_state_dir("default")).up()
    assert (Path(st.dir) / MARKER).is_file()
    assert st.pod_cidr != "127.1.0.0/16"  # `default` prefers it, but another cluster holds it
    saved = ClusterState.load(Path(st.dir))
    assert saved is not None and saved.pod_cidr == st.pod_cidr


def test_ctrl_c_during_up_leaves_no_state(
    state_root: Path, monkeypatch: pytest.MonkeyPatch, no_components: list[str]
) -> None:
    def interrupted(self: DevCluster, *a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(DevCluster, "_start_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DevCluster(default_state_dir("fix1")).up()
    assert not (state_root / "fix1").exists()


def test_failed_up_keeps_the_logs_and_names_the_cluster_in_the_hint(
    state_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_components: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    def failing(self: DevCluster, *a: object) -> None:
        raise StartupError("etcd", "the process exited", "boom")

    monkeypatch.setattr(DevCluster, "_start_all", failing)
    assert cli.main(["dev-cluster", "--name", "fix1", "up"]) == 1
    assert "run `pdorch dev-cluster --name fix1 down` to clean up" in capsys.readouterr().err
    assert (state_root / "fix1" / "state.json").exists()


def test_cluster_flags_repeat_how_the_cluster_was_named() -> None:
    def ns(name: str = "default", state_dir: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(name=name, state_dir=state_dir)

    assert cluster_flags(ns()) == ""
    assert cluster_flags(ns("fix1")) == " --name fix1"
    assert cluster_flags(ns(state_dir="/tmp/my dir")) == " --state-dir '/tmp/my dir'"


def test_state_files_written_before_the_pod_cidr_was_recorded_still_load(tmp_path: Path) -> None:
    d = tmp_path / "pytest"
    d.mkdir()
    proc = {"name": "etcd", "pid": 1, "binary": "/b/etcd", "log": "/l", "argv": ["/b/etcd"]}
    (d / "state.json").write_text(
        json.dumps({"dir": str(d), "bin_dir": "/b", "ports": {}, "token": "t", "processes": [proc]})
    )
    st = ClusterState.load(d)
    assert st is not None
    assert st.pod_cidr == "127.1.0.0/16"  # what such a cluster's kwok was started with
    assert st.processes[0].start_time == 0
    assert cluster.is_cluster_dir(d)


def test_controller_logs_go_to_the_clusters_logs_dir(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / MARKER).write_text("")
    assert controller_log_dir(str(d / "kubeconfig")) == (d / "logs", False)
    # Any other kubeconfig: the temp dir, and the log is removed after a clean exit.
    assert controller_log_dir(str(tmp_path / "kubeconfig")) == (Path(tempfile.gettempdir()), True)
    assert controller_log_dir(str(tmp_path / "kubeconfig"), tmp_path / "mine") == (tmp_path / "mine", False)


def test_two_ups_at_once_record_different_pod_ranges(
    state_root: Path, monkeypatch: pytest.MonkeyPatch, no_components: list[str]
) -> None:
    # Two names whose preferred range is the same: only the other's record tells them apart.
    by_range: dict[str, str] = {}
    a = b = ""
    for i in range(10_000):
        name = f"c{i}"
        cidr = manifests.pod_cidr_for(name, [])
        if cidr in by_range:
            a, b = by_range[cidr], name
            break
        by_range[cidr] = name
    assert a and b
    choose = manifests.pod_cidr_for

    def slow_choice(name: str, taken: object) -> str:
        got = choose(name, taken)  # type: ignore[arg-type]
        time.sleep(0.2)  # both `up`s are between choosing and recording
        return got

    monkeypatch.setattr(manifests, "pod_cidr_for", slow_choice)
    states: dict[str, str] = {}

    def up(name: str) -> None:
        states[name] = DevCluster(default_state_dir(name)).up().pod_cidr

    threads = [threading.Thread(target=up, args=(n,)) for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert set(states) == {a, b}
    assert states[a] != states[b]


def test_a_state_being_saved_is_never_read_half_written(tmp_path: Path) -> None:
    """Another `up` reads every cluster's state.json while choosing its pod range; a state rewritten
    at that moment (a cluster saving its processes) must read whole, or its range would look free
    (the cause of a failure of the test above under load)."""
    st = ClusterState(
        dir=str(tmp_path), bin_dir="/bin", ports={"apiserver": 1}, token="t", pod_network="127.9.0.0/16"
    )
    st.processes = []
    st.save()
    stop = threading.Event()

    def keep_saving() -> None:
        while not stop.is_set():
            st.save()

    writer = threading.Thread(target=keep_saving)
    writer.start()
    try:
        seen = [ClusterState.load(tmp_path) for _ in range(3000)]
    finally:
        stop.set()
        writer.join()
    assert all(s is not None and s.pod_cidr == "127.9.0.0/16" for s in seen)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def _one_live_component(delay: float, starts: list[str]) -> object:
    """A `_start_all` that records one running process (this test's own) after `delay` seconds."""

    def start_all(self: DevCluster, st: ClusterState, *a: object) -> None:
        starts.append(st.dir)
        time.sleep(delay)
        me = os.path.realpath(f"/proc/{os.getpid()}/exe")
        st.processes.append(Managed("kwok", os.getpid(), me, str(Path(st.dir) / "kwok.log")))
        st.save()

    return start_all


def test_a_start_cut_short_is_not_up(
    state_root: Path, monkeypatch: pytest.MonkeyPatch, no_components: list[str]
) -> None:
    """`status` said UP for a cluster whose `up` was killed after its first components started
    (only those were checked), and `up` then called it 'already up'."""
    monkeypatch.setattr(DevCluster, "_start_all", _one_live_component(0.0, []))
    c = DevCluster(default_state_dir("cut"))
    c.up()
    assert c.is_up() and c.status()["complete"]
    st = c.state()
    assert st is not None
    st.up_seconds = 0.0  # as left by an `up` killed mid-start
    st.save()
    status = c.status()
    assert not status["up"] and not status["complete"]
    assert "INCOMPLETE" in cluster.format_status(status)


def test_status_of_a_partly_stopped_cluster_says_up_starts_a_fresh_one(
    state_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_components: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`status` said 'start it with ... up' where `up` removes the cluster (etcd data too) first."""
    monkeypatch.setattr(DevCluster, "_start_all", _one_live_component(0.0, []))
    c = DevCluster(default_state_dir("part"))
    c.up()
    st = c.state()
    assert st is not None
    st.up_seconds = 0.0
    st.save()
    hint = not_up_hint(c.status(), " --name part")
    assert "--name part up` removes this partly stopped cluster and starts a fresh one" in hint
    assert "objects are lost" in hint
    assert cli.main(["dev-cluster", "--name", "nothere", "status"]) == 1
    assert "start it with `pdorch dev-cluster --name nothere up`" in capsys.readouterr().err


def test_a_second_up_of_the_same_name_waits_for_the_first(
    state_root: Path, monkeypatch: pytest.MonkeyPatch, no_components: list[str]
) -> None:
    """A second `up` 0.3 s after the first took the half-started state for a stale one (or said
    'already up' before it was); it now waits, then finds the cluster up and starts nothing."""
    starts: list[str] = []
    monkeypatch.setattr(DevCluster, "_start_all", _one_live_component(0.5, starts))
    first = threading.Thread(target=lambda: DevCluster(default_state_dir("twice")).up())
    first.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    said: list[str] = []
    second = DevCluster(default_state_dir("twice"), progress=said.append)
    st = second.up()
    first.join(timeout=10)
    assert len(starts) == 1 and second.is_up() and st.up_seconds > 0
    assert time.monotonic() - t0 >= 0.2  # it waited for the first
    assert "waiting for it" in said[0]  # and said so


def test_a_state_root_that_cannot_be_written_is_one_clear_error(
    state_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_components: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A read-only or full state directory gave an OSError traceback."""

    def full(self: DevCluster, *a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DevCluster, "_start_all", full)
    assert cli.main(["dev-cluster", "--name", "full", "up"]) == 1
    err = capsys.readouterr().err
    assert "cannot write the dev cluster state" in err and "PDORCH_DEVCLUSTER_DIR" in err
    assert "Traceback" not in err
