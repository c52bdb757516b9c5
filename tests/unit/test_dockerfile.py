"""The Dockerfile keeps its promises: pinned base, numeric non-root user, read-only-root friendly,
`pdorch` as the entrypoint, and the same user and image the manifests run.

No container runtime exists on the development machines, so the image is never built in tests;
these checks read the Dockerfile itself. Each invariant is also checked against a broken variant,
so the checker cannot pass vacuously.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    return ins[starts[-1] :] if starts else []


def _env(args: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", args))


def violations(text: str) -> list[str]:
    """Every broken image invariant, as messages saying what to fix; empty when all hold."""
    ins = instructions(text)
    problems: list[str] = []
    args = {k: v for word, rest in ins if word == "ARG" and "=" in rest for k, v in [rest.split("=", 1)]}
    for word, rest in ins:
        if word != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if image.startswith("$"):
            problems.append(f"FROM {image}: base image ARG needs a pinned default")
        elif "@sha256:" not in image and (":" not in image or image.endswith(":latest")):
            problems.append(f"FROM {image}: pin the base image by version, never latest or untagged")
        elif not re.search(r":[^:]*\d+\.\d+", image) and "@sha256:" not in image:
            problems.append(f"FROM {image}: the tag must carry a version number")
    final = _final_stage(ins)
    users = [rest for word, rest in final if word == "USER"]
    if not users:
        problems.append("final stage has no USER: the image would run as root")
    else:
        uid, _, gid = users[-1].partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            problems.append(f"USER {users[-1]}: use a numeric uid[:gid] so runAsNonRoot can verify it")
        elif int(uid) == 0 or (gid and int(gid) == 0):
            problems.append(f"USER {users[-1]}: must not be root (0)")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if not entry or json.loads(entry[-1])[:1] != ["pdorch"]:
        problems.append('ENTRYPOINT must be ["pdorch"] (exec form) so args select controller|proxy|sim')
    env: dict[str, str] = {}
    for word, rest in final:
        if word == "ENV":
            env.update(_env(rest))
    if env.get("PYTHONDONTWRITEBYTECODE") != "1":
        problems.append("ENV PYTHONDONTWRITEBYTECODE=1 is needed on a read-only root filesystem")
    for var in ("HOME", "TMPDIR"):
        if not env.get(var, "").startswith("/tmp"):
            problems.append(f"ENV {var} must be under /tmp, the only writable path")
    return problems


def test_the_dockerfile_meets_every_invariant() -> None:
    assert violations(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("USER 65532:65532", "USER 0:0", "must not be root"),
        ("USER 65532:65532", "USER nonroot", "numeric"),
        ("USER 65532:65532", "", "no USER"),
        ("python:3.11.14-slim-bookworm", "python:latest", "never latest"),
        ("python:3.11.14-slim-bookworm", "python", "never latest"),
        ("python:3.11.14-slim-bookworm", "python:slim", "version number"),
        ('ENTRYPOINT ["pdorch"]', 'ENTRYPOINT ["python3"]', "ENTRYPOINT"),
        ("PYTHONDONTWRITEBYTECODE=1 \\\n    PYTHONUNBUFFERED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"),
        ("HOME=/tmp", "HOME=/home/pdorch", "HOME"),
    ],
)
def test_a_broken_dockerfile_is_caught(old: str, new: str, expected: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text, f"test fixture out of date: {old!r} not in the Dockerfile"
    broken = violations(text.replace(old, new))
    assert any(expected in p for p in broken), broken


def test_manifests_run_the_image_as_the_dockerfile_user() -> None:
    """The Deployment runs the image as its own USER, on a read-only root filesystem."""
    final = _final_stage(instructions(DOCKERFILE.read_text()))
    uid, _, gid = next(rest for word, rest in reversed(final) if word == "USER").partition(":")
    deploy = yaml.safe_load((REPO / "manifests" / "base" / "controller" / "deployment.yaml").read_text())
    pod = deploy["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid
    assert str(pod["securityContext"]["runAsGroup"]) == gid
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # ... with a writable /tmp, where the image points HOME and TMPDIR.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    # The args start with a pdorch subcommand: the image's ENTRYPOINT supplies `pdorch` itself.
    assert container["args"][0] == "controller"
