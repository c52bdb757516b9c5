"""`pdorch render` and `pdorch crds` end to end (in-process, no cluster)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from pdorch.api import commands as crd_commands
from pdorch.api.crdgen import ALL_CRDS
from pdorch.roles import commands as render_commands
from pdorch.roles.commands import KubeYamlDumper

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
EXAMPLE = REPO / "examples" / "sim-pd" / "servinggroup.yaml"


def _run(argv: list[str]) -> int:
    # Only this capability's subcommands: the test must not depend on other packages' CLIs.
    parser = argparse.ArgumentParser(prog="pdorch")
    sub = parser.add_subparsers(dest="command")
    render_commands.add_parser(sub)
    crd_commands.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_render_example_prints_every_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["render", "-f", str(EXAMPLE), "--proxy-image", "local/pdorch:dev"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert ("Service", "sim-pd") in kinds
    assert ("LeaderWorkerSet", "sim-pd-prefill") in kinds
    assert ("LeaderWorkerSet", "sim-pd-decode") in kinds
    proxy = next(
        d for d in docs if d["kind"] == "LeaderWorkerSet" and d["metadata"]["name"] == "sim-pd-proxy"
    )
    image = proxy["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"]
    assert image == "local/pdorch:dev"
    assert all(d["metadata"]["namespace"] == "default" for d in docs)


def test_render_notes_vllm_roles_that_would_abort_their_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["render", "-f", str(EXAMPLE)]) == 0
    assert capsys.readouterr().err == ""  # the example drains
    doc = yaml.safe_load(EXAMPLE.read_text())
    for role in doc["spec"]["roles"]:
        if role["type"] == "decode":
            c = role["workerTemplate"]["spec"]["containers"][0]
            words = " ".join(c.get("command", []) + c.get("args", [])).split()
            assert "--shutdown-timeout" in words  # the example drains, in the flag-then-value form
            i = words.index("--shutdown-timeout")
            c["command"], c["args"] = words[:i] + words[i + 2 :], []
    f = tmp_path / "sg.yaml"
    f.write_text(yaml.safe_dump(doc))
    assert _run(["render", "-f", str(f)]) == 0
    out = capsys.readouterr()
    assert list(yaml.safe_load_all(out.out))  # the objects still print, on stdout
    assert out.err.startswith("note: sim-pd, role decode: vLLM aborts its requests in flight")
    assert "--shutdown-timeout" in out.err and "prefill" not in out.err


def test_render_bad_spec_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["spec"]["roles"][2]["scaling"] = {"mode": "External", "minReplicas": 3, "maxReplicas": 1}
    bad = tmp_path / "sg.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert _run(["render", "-f", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.roles[2].scaling" in captured.err
    assert "minReplicas must be <= scaling.maxReplicas" in captured.err


def test_render_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["render", "-f", "/nonexistent/sg.yaml"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_crds_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crd"
    assert _run(["crds", "--check", "--out", str(out)]) == 1
    assert _run(["crds", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(c.filename for c in ALL_CRDS)
    assert _run(["crds", "--check", "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_committed_crds_pass_check() -> None:
    assert _run(["crds", "--check", "--out", str(REPO / "manifests" / "crd")]) == 0


def test_render_quotes_strings_a_yaml_1_2_reader_would_take_for_numbers() -> None:
    # kubectl (Go, YAML 1.2) reads a plain 24633788e1 as a float; PyYAML would leave it plain.
    out = yaml.dump(
        {"a": "24633788e1", "b": "1.5", "c": "0x1f", "d": "17a412e3dc", "e": 3}, Dumper=KubeYamlDumper
    )
    assert out == 'a: "24633788e1"\nb: "1.5"\nc: "0x1f"\nd: 17a412e3dc\ne: 3\n'
    assert yaml.safe_load(out) == {"a": "24633788e1", "b": "1.5", "c": "0x1f", "d": "17a412e3dc", "e": 3}


@pytest.mark.parametrize("argv", [["crds", "--check"], ["api-docs", "--check"]])
def test_check_defaults_find_the_checkout_from_any_directory(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: relative defaults would find nothing here
    assert _run(argv) == 0
    assert str(REPO.resolve()) in capsys.readouterr().out
