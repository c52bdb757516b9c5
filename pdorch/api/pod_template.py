"""Checks of a role's pod template that the CRD cannot express (it keeps templates opaque).

LWS's own admission only checks the template's structure; what it lets through is refused later,
by the StatefulSet LWS creates, where no ServingGroup condition reports it. These checks turn the
common mistakes into a message naming the field instead.
"""

from __future__ import annotations

import re
from typing import Any

from pdorch.api.base import DNS1123_LABEL, DNS1123_SUBDOMAIN

_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_SUBDOMAIN = re.compile(DNS1123_SUBDOMAIN)
_CONTAINER_NAME = re.compile(DNS1123_LABEL)


def _qualified_name_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return "its prefix must be a DNS subdomain (lowercase letters, digits, '-', '.')"
    if not name or len(name) > 63 or not _NAME.match(name):
        return "its name must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _string_map(meta: dict[str, Any], field: str, check_values: bool) -> None:
    value = meta.get(field)
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"metadata.{field} must be a map of strings, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValueError(f"metadata.{field}[{k!r}] must be a string, got {type(v).__name__}")
        problem = _qualified_name_problem(k)
        if problem:
            raise ValueError(f"metadata.{field} key {k!r} is not a valid Kubernetes key: {problem}")
        if check_values and v and (len(v) > 63 or not _NAME.match(v)):
            raise ValueError(
                f"metadata.{field}[{k!r}] = {v!r} is not a valid label value: at most 63 letters, "
                "digits, '-', '_' or '.', starting and ending alphanumeric"
            )


def check_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """Return `template` (without a null `metadata`) or raise ValueError naming what to fix."""
    if "metadata" in template and template["metadata"] is None:
        template = {k: v for k, v in template.items() if k != "metadata"}
    meta = template.get("metadata", {})
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be an object, got {type(meta).__name__}")
    _string_map(meta, "labels", check_values=True)
    _string_map(meta, "annotations", check_values=False)
    spec = template.get("spec")
    containers = spec.get("containers") if isinstance(spec, dict) else None
    if not isinstance(containers, list) or not containers:
        raise ValueError("must be a PodTemplateSpec with a non-empty spec.containers list")
    seen: set[str] = set()
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            raise ValueError("every entry of spec.containers needs a name")
        name = c["name"]
        if not isinstance(name, str) or len(name) > 63 or not _CONTAINER_NAME.match(name):
            raise ValueError(
                f"spec.containers[{i}].name {name!r} must be a DNS label "
                "(at most 63 lowercase letters, digits and '-')"
            )
        if name in seen:
            raise ValueError(f"spec.containers[{i}].name {name!r} is used twice")
        seen.add(name)
        image = c.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"spec.containers[{i}] ({name}) needs an image")
    # Pod validation refuses these; the dry-run PodTemplate the controller sends does not check them,
    # so they would pass until the StatefulSet creates pods, mid-rollout.
    for field in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(field) or []):
            image = c.get("image") if isinstance(c, dict) else None
            if isinstance(image, str) and image != image.strip():
                raise ValueError(
                    f"spec.{field}[{i}].image {image!r} has leading or trailing whitespace (remove it)"
                )
    # The pods are a StatefulSet's (LWS creates one per group), whose validation, unlike a pod's,
    # allows only these.
    if spec.get("restartPolicy") not in (None, "Always"):
        raise ValueError(
            f"spec.restartPolicy {spec['restartPolicy']!r} is not allowed: LeaderWorkerSet pods are "
            "StatefulSet pods, which only restart Always (omit it)"
        )
    if spec.get("activeDeadlineSeconds") is not None:
        raise ValueError("spec.activeDeadlineSeconds is not allowed in a StatefulSet's pods (omit it)")
    return template
