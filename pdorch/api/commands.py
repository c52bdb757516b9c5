"""`pdorch crds` and `pdorch api-docs`: write what the API models generate (CRD YAML, the API
reference), or check the committed files for drift."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdorch.api.crdgen import CRD_DIRS, check_crds, write_crds
from pdorch.api.docgen import DEFAULT_OUT as DEFAULT_REFERENCE
from pdorch.api.docgen import check_reference, render_reference
from pdorch.devcluster.binaries import in_checkout


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdorch crds` and `pdorch api-docs`."""
    p = subparsers.add_parser(
        "crds",
        help="generate (or drift-check) the ServingGroup/ServingRoleScaler CRDs",
        description="Write the CRD YAML generated from pdorch.api, or with --check fail when the "
        "committed files differ from what the models generate.",
    )
    p.add_argument(
        "--out",
        type=Path,
        action="append",
        help="directory, repeatable (default: manifests/crd and the Helm chart's crds/ of the source "
        "checkout)",
    )
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the files drifted")
    p.set_defaults(func=run)
    add_api_docs_parser(subparsers)


def run(args: argparse.Namespace) -> int:
    """Execute `pdorch crds`; returns the exit code."""
    outs: list[Path] = args.out or [in_checkout(d) for d in CRD_DIRS]
    if args.check:
        stale = []
        for out in outs:
            diffs = check_crds(out)
            for d in diffs:
                sys.stdout.write(d)
            if diffs:
                stale.append(out)
                print(f"CRDs in {out} are out of date", file=sys.stderr)
            else:
                print(f"CRDs in {out} are up to date")
        if stale:
            print(f"run `pdorch crds{''.join(f' --out {o}' for o in stale)}`", file=sys.stderr)
            return 1
        return 0
    for out in outs:
        for path in write_crds(out):
            print(f"wrote {path}")
    return 0


def add_api_docs_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdorch api-docs`."""
    p = subparsers.add_parser(
        "api-docs",
        help="generate (or drift-check) docs/api-reference.md from the API models",
        description="Write the Markdown API reference generated from pdorch.api, or with --check fail "
        "when the committed file differs from what the models generate.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=in_checkout(DEFAULT_REFERENCE),
        help="file (default docs/api-reference.md of the source checkout)",
    )
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is stale")
    p.set_defaults(func=run_api_docs)


def run_api_docs(args: argparse.Namespace) -> int:
    """Execute `pdorch api-docs`; returns the exit code."""
    if args.check:
        diff = check_reference(args.out)
        if diff:
            sys.stdout.write(diff)
            print(f"{args.out} is out of date; run `pdorch api-docs --out {args.out}`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_reference())
    print(f"wrote {args.out}")
    return 0
