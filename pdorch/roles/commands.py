"""`pdorch render`: print every object pdorch would apply for a ServingGroup, offline."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from pdorch.api.errors import SpecError, load_servinggroups
from pdorch.cli_args import namespace_name
from pdorch.roles.context import DEFAULT_PROXY_IMAGE, RenderOptions
from pdorch.roles.drain_advice import roles_without_drain
from pdorch.roles.render import render


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdorch render`."""
    p = subparsers.add_parser(
        "render",
        help="print the objects a ServingGroup becomes (no cluster needed)",
        description="Validate a ServingGroup like the apiserver would (except the rules marked "
        "apiserver only in the API reference) and print, as multi-document YAML, every object "
        "pdorch would server-side apply for it.",
    )
    p.add_argument("-f", "--filename", required=True, help="ServingGroup YAML file, or - for stdin")
    p.add_argument("--proxy-image", default=DEFAULT_PROXY_IMAGE, help="image of the built-in proxy")
    p.add_argument(
        "-n", "--namespace", type=namespace_name, default=None, help="namespace when the file sets none"
    )
    p.set_defaults(func=run)


# Plain scalars that a YAML 1.2 reader (kubectl, Go's sigs.k8s.io/yaml) takes for a number but
# PyYAML's YAML 1.1 resolver does not, e.g. the revision label "24633788e1" (= 2.46e8 in Go).
_YAML12_NUMBER = re.compile(
    r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^0o[0-7]+$|^0x[0-9a-fA-F]+$"
)


class KubeYamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings a YAML 1.2 parser would read as numbers."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if _YAML12_NUMBER.match(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


KubeYamlDumper.add_representer(str, _represent_str)


def run(args: argparse.Namespace) -> int:
    """Execute `pdorch render`; returns the exit code (1 on an invalid spec)."""
    source = args.filename
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        groups = load_servinggroups(text, source)
    except SpecError as exc:
        print(f"error: invalid ServingGroup in {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    options = RenderOptions(proxy_image=args.proxy_image, namespace=args.namespace)
    objects = [obj for sg in groups for obj in render(sg, options)]
    sys.stdout.write(yaml.dump_all(objects, Dumper=KubeYamlDumper, sort_keys=False, explicit_start=True))
    for sg in groups:
        for role in roles_without_drain(sg):
            print(
                f"note: {sg.metadata.name}, role {role}: vLLM aborts its requests in flight when a rollout "
                "or a scale-down deletes the pod, unless it runs with --shutdown-timeout SECONDS (vLLM "
                "0.18+; docs/operations.md, 'Pods that end with requests in flight')",
                file=sys.stderr,
            )
    return 0
