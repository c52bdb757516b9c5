"""Every example under examples/ is accepted by the real apiserver (server-side dry run), and so is
everything pdorch renders from it; the overlays install; `kubectl explain` shows the API docs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pdorch.api.errors import load_servinggroups
from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.waiting import wait_for
from pdorch.roles.commands import KubeYamlDumper
from pdorch.roles.context import RenderOptions
from pdorch.roles.render import render

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*/servinggroup.yaml"))


def test_every_example_directory_has_a_servinggroup_and_a_readme() -> None:
    dirs = sorted(p for p in (REPO / "examples").iterdir() if p.is_dir())
    assert {d.name for d in dirs} >= {"sim-pd", "vllm-pd", "sglang-pd"}
    for d in dirs:
        assert (d / "servinggroup.yaml").is_file(), d
        assert (d / "README.md").is_file(), d


def dry_run_apply(devcluster: ClusterState, namespace: str, path: Path) -> subprocess.CompletedProcess[str]:
    return devcluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=pdorch-test",
        "-n",
        namespace,
        "-f",
        str(path),
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_is_accepted_by_a_server_side_dry_run(
    devcluster: ClusterState, pdorch_crds: list[str], namespace: str, example: Path
) -> None:
    out = dry_run_apply(devcluster, namespace, example)
    assert out.returncode == 0, out.stderr
    name = yaml.safe_load(example.read_text())["metadata"]["name"]
    assert f"servinggroup.pdorch.io/{name} serverside-applied (server dry run)" in out.stdout
    assert "Warning" not in out.stderr, out.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
def test_what_pdorch_renders_from_the_example_is_accepted_too(
    devcluster: ClusterState, pdorch_crds: list[str], namespace: str, example: Path, tmp_path: Path
) -> None:
    """The pod templates are opaque to the CRD; the LWS webhook and Pod validation see them here."""
    (sg,) = load_servinggroups(example.read_text(), str(example))
    objs = render(sg, RenderOptions(namespace=namespace))
    assert {o["kind"] for o in objs} >= {"LeaderWorkerSet"}
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.dump_all(objs, Dumper=KubeYamlDumper))
    out = dry_run_apply(devcluster, namespace, rendered)
    assert out.returncode == 0, out.stderr
    for role in sg.spec.roles:
        assert (
            f"leaderworkerset.leaderworkerset.x-k8s.io/{sg.name}-{role.name} serverside-applied" in out.stdout
        )


def test_the_dry_run_refuses_a_broken_example(
    devcluster: ClusterState, pdorch_crds: list[str], namespace: str, tmp_path: Path
) -> None:
    """The check above can fail: a vLLM group with an SGLang-only field is refused by the CRD's CEL."""
    doc = yaml.safe_load((REPO / "examples" / "sglang-pd" / "servinggroup.yaml").read_text())
    doc["spec"]["engine"]["name"] = "vllm"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    out = dry_run_apply(devcluster, namespace, broken)
    assert out.returncode != 0
    assert "bootstrapPort is only valid with spec.engine.name sglang" in out.stderr


@pytest.mark.parametrize("overlay", ["manifests/overlays/dev", "manifests/overlays/production"])
def test_overlay_is_accepted_by_a_server_side_dry_run(
    devcluster: ClusterState, pdorch_crds: list[str], overlay: str
) -> None:
    out = devcluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "--force-conflicts", "-k", str(REPO / overlay)
    )
    assert out.returncode == 0, out.stderr
    assert "deployment.apps/pdorch-controller serverside-applied (server dry run)" in out.stdout
    assert "PodSecurity" not in out.stderr, out.stderr


def test_kubectl_explain_prints_the_roles_field_docs(
    devcluster: ClusterState, pdorch_crds: list[str]
) -> None:
    def explained() -> str | None:
        # The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
        out = devcluster.kubectl("explain", "servinggroup.spec.roles")
        return out.stdout if out.returncode == 0 else None

    text = wait_for(explained, 60, "`kubectl explain servinggroup.spec.roles` to answer")
    assert "GROUP:      pdorch.io" in text and "KIND:       ServingGroup" in text
    # Docstrings of the pydantic models, carried into the CRD as descriptions.
    assert "at least one prefill and one decode, at most one proxy" in text
    assert "Pods per group, leader included" in text
    assert "SGLang only: the prefill server's KV bootstrap port" in text
    nested = devcluster.kubectl("explain", "servinggroup.spec.roles.scaling.mode")
    assert nested.returncode == 0, nested.stderr
    assert "Static (roles[].replicas), External (HPA/KEDA on ServingRoleScaler)" in nested.stdout


def test_quickstart_kind_variant_of_sim_pd_is_accepted(
    devcluster: ClusterState, pdorch_crds: list[str], namespace: str, tmp_path: Path
) -> None:
    """docs/quickstart.md rewrites examples/sim-pd for clusters without GPUs; run its exact command."""
    line = next(
        ln for ln in (REPO / "docs" / "quickstart.md").read_text().splitlines() if ln.startswith("sed -e")
    )
    command, _, consumer = line.partition("|")
    assert consumer.strip() == "kubectl apply -f -"
    out = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "nvidia.com/gpu" not in out.stdout and "ghcr.io/pdorch/pdorch:0.1.0" in out.stdout
    variant = tmp_path / "sim-pd-kind.yaml"
    variant.write_text(out.stdout)
    applied = dry_run_apply(devcluster, namespace, variant)
    assert applied.returncode == 0, applied.stderr
    (sg,) = load_servinggroups(out.stdout, str(variant))
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.dump_all(render(sg, RenderOptions(namespace=namespace)), Dumper=KubeYamlDumper))
    applied = dry_run_apply(devcluster, namespace, rendered)
    assert applied.returncode == 0, applied.stderr
