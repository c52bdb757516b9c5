"""Where the Go-built control-plane binaries live, and building them when they are missing.

The build itself is `hack/build-kube.sh` (Go wrapper modules, pinned versions); this module only
finds its output in the versioned cache or runs it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pdorch.cli_errors import CliError

# Pinned versions; keep in step with the defaults in hack/build-kube.sh.
K8S_VERSION = "1.34.4"
ETCD_VERSION = "3.6.16"
LWS_VERSION = "0.9.0"  # the Go module proxy refuses the v0.10.x zips (403); v0.9.0 has DisaggregatedSet
KWOK_VERSION = "0.8.0"

REQUIRED = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "lws-manager",
)


def cache_root() -> Path:
    """Root of pdorch's caches (override with PDORCH_CACHE)."""
    return Path(os.environ.get("PDORCH_CACHE", Path.home() / ".cache" / "pdorch"))


def kube_cache_root() -> Path:
    """Where build-kube.sh puts its versioned output directories."""
    return Path(os.environ.get("PDORCH_KUBE_CACHE", cache_root() / "kube"))


def version_key() -> str:
    return f"k8s{K8S_VERSION}-etcd{ETCD_VERSION}-lws{LWS_VERSION}-kwok{KWOK_VERSION}"


def repo_root() -> Path:
    """The source checkout this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2]


def in_checkout(relative: Path) -> Path:
    """`relative` inside the source checkout when the package runs from one (so the result does not
    depend on the working directory), else `relative` as given (an installed package)."""
    root = repo_root()
    if (root / "pyproject.toml").is_file() and (root / "pdorch" / "__init__.py").is_file():
        return root / relative
    return relative


class BuildError(CliError, RuntimeError):
    """hack/build-kube.sh failed; its own output (on the terminal) says why."""


@dataclass(frozen=True)
class Binaries:
    """A complete, versioned set of binaries plus the data files copied from the modules."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def kwok_stages(self) -> list[Path]:
        return sorted((self.dir / "kwok-stages").glob("*.yaml"))

    @property
    def lws_crds(self) -> list[Path]:
        return sorted((self.dir / "lws-crds").glob("*.yaml"))

    def missing(self) -> list[str]:
        return [n for n in REQUIRED if not os.access(self.dir / n, os.X_OK)]


def locate() -> Binaries | None:
    """The cached binaries for the pinned versions, or None if not built yet."""
    override = os.environ.get("PDORCH_KUBE_BIN")
    d = Path(override) if override else kube_cache_root() / version_key()
    b = Binaries(d)
    if (d / ".complete").exists() and not b.missing():
        return b
    return None


def ensure() -> Binaries:
    """Return the binaries, building them with hack/build-kube.sh if the cache is cold."""
    found = locate()
    if found is not None:
        return found
    script = repo_root() / "hack" / "build-kube.sh"
    if not script.exists():
        raise FileNotFoundError(
            f"control-plane binaries are not built and {script} is missing; run the build from a pdorch checkout"
        )
    env = {
        **os.environ,
        "PDORCH_KUBE_CACHE": str(kube_cache_root()),
        "K8S": K8S_VERSION,
        "ETCD": ETCD_VERSION,
        "LWS": LWS_VERSION,
        "KWOK": KWOK_VERSION,
    }
    try:
        subprocess.run(["bash", str(script)], check=True, env=env)
    except subprocess.CalledProcessError as exc:
        raise BuildError(
            f"building the control-plane binaries failed ({script.name} exited {exc.returncode}; its output is above)",
            "fix what it reports (e.g. install Go and put `go` on PATH), then run `pdorch dev-cluster build`",
        ) from exc
    found = locate()
    if found is None:
        raise RuntimeError(f"{script} finished but {kube_cache_root() / version_key()} is incomplete")
    return found
