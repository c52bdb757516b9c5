"""`pdorch crds`: write the CRD YAML generated from the API models, or check it for drift."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdorch.api.crdgen import DEFAULT_OUT_DIR, check_crds, write_crds


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdorch crds`."""
    p = subparsers.add_parser(
        "crds",
        help="generate (or drift-check) the ServingGroup/ServingRoleScaler CRDs",
        description="Write the CRD YAML generated from pdorch.api, or with --check fail when the "
        "committed files differ from what the models generate.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="directory (default manifests/crd)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the files drifted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute `pdorch crds`; returns the exit code."""
    if args.check:
        diffs = check_crds(args.out)
        for d in diffs:
            sys.stdout.write(d)
        if diffs:
            print(f"CRDs in {args.out} are out of date; run `pdorch crds --out {args.out}`", file=sys.stderr)
            return 1
        print(f"CRDs in {args.out} are up to date")
        return 0
    for path in write_crds(args.out):
        print(f"wrote {path}")
    return 0
