"""A role's volumeClaimTemplates: the fields a StatefulSet requires, in the CRD and mirrored here.

LWS's admission lets a claim template without a name, an access mode or a storage request through;
the StatefulSet LWS then creates is refused. Since a role's claim templates cannot be changed once
stored (a transition rule: its StatefulSets' are immutable), such a template locked the role: the
apiserver must refuse it before it is stored, so the schema says what the StatefulSet requires.
Everything else in a template stays opaque and kept as written.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema

from pdorch.api.base import DNS1123_LABEL

ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
# A resource quantity as Kubernetes parses it (e.g. 10Gi, 500M, 1e9), above zero, as a claim's size
# must be: the number part has a non-zero digit (RE2, which the apiserver uses, has no lookahead).
_POSITIVE_QUANTITY = (
    r"^\+?(0*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
)


def _open(**schema: Any) -> dict[str, Any]:
    """An object schema that validates the named properties and keeps every other field."""
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True, **schema}


CLAIM_TEMPLATE_SCHEMA: dict[str, Any] = _open(
    required=["metadata", "spec"],
    properties={
        "metadata": _open(
            required=["name"],
            properties={"name": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL}},
        ),
        "spec": _open(
            required=["accessModes", "resources"],
            properties={
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 8,
                    "items": {"type": "string", "enum": list(ACCESS_MODES)},
                },
                "resources": _open(
                    required=["requests"],
                    properties={
                        "requests": _open(
                            required=["storage"],
                            properties={
                                "storage": {
                                    "x-kubernetes-int-or-string": True,
                                    "pattern": _POSITIVE_QUANTITY,
                                    "minimum": 1,  # integers: the pattern checks only strings
                                }
                            },
                        )
                    },
                ),
            },
        ),
    },
)


def _field(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def check_claim_template(template: dict[str, Any]) -> dict[str, Any]:
    """Return `template`, or raise ValueError naming what its StatefulSet would refuse (the Python
    mirror of `CLAIM_TEMPLATE_SCHEMA`, for `pdorch render` and groups stored before it)."""
    name = _field(template, "metadata", "name")
    if not isinstance(name, str) or len(name) > 63 or not re.fullmatch(DNS1123_LABEL, name):
        raise ValueError(
            "metadata.name is required: a DNS label (at most 63 lowercase letters, digits and '-') "
            "that the containers' volumeMounts refer to"
        )
    modes = _field(template, "spec", "accessModes")
    if not isinstance(modes, list) or not modes or not all(m in ACCESS_MODES for m in modes):
        raise ValueError(f"{name}: spec.accessModes needs at least one of {', '.join(ACCESS_MODES)}")
    storage = _field(template, "spec", "resources", "requests", "storage")
    if isinstance(storage, bool) or not (
        (isinstance(storage, int) and storage > 0)
        or (isinstance(storage, str) and re.fullmatch(_POSITIVE_QUANTITY, storage))
    ):
        raise ValueError(f"{name}: spec.resources.requests.storage needs a size above zero, e.g. 100Gi")
    return template


ClaimTemplate = Annotated[
    dict[str, Any],
    WithJsonSchema(CLAIM_TEMPLATE_SCHEMA),
    AfterValidator(check_claim_template),
]
