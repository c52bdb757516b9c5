"""A test-only admission policy that makes the API refuse chosen writes (a real refusal, not a mock)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightkube import ApiError, Client
from lightkube.resources.admissionregistration_v1 import (
    ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
)


@contextmanager
def refusing(
    kube: Client, name: str, namespace: str, rule: dict[str, Any], allowed: str, message: str
) -> Iterator[Callable[[], None]]:
    """A ValidatingAdmissionPolicy and its binding: in `namespace`, the requests `rule` (a resource
    rule) matches are refused with `message` unless the CEL expression `allowed` holds. Yields a
    function that lifts it early; it is lifted on exit in any case. Policies load asynchronously:
    the caller probes until the API enforces it."""
    kube.create(
        ValidatingAdmissionPolicy.from_dict(
            {
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": [rule]},
                    "validations": [{"expression": allowed, "message": message}],
                },
            }
        )
    )
    kube.create(
        ValidatingAdmissionPolicyBinding.from_dict(
            {
                "metadata": {"name": name},
                "spec": {
                    "policyName": name,
                    "validationActions": ["Deny"],
                    "matchResources": {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                    },
                },
            }
        )
    )

    def lift() -> None:
        for kind in (ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicy):
            try:
                kube.delete(kind, name)
            except ApiError as e:
                if e.status.code != 404:
                    raise

    try:
        yield lift
    finally:
        lift()
