"""Deciding whether a desired object (an SSA intent) needs applying. Pure functions.

The controller stamps each applied intent's hash into an annotation and remembers the object's
generation (or resourceVersion) after its own apply. If both still match, the live object is what
we last applied and nothing needs writing: an idle cluster costs zero writes. A hand edit changes
generation/resourceVersion and is restored on the next pass. Metadata edits move no generation,
so the labels, annotations and owner references we set are compared with the live ones each time.
"""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal
from typing import Any

import msgspec

HASH_ANNOTATION = "pdorch.io/intent-hash"
_SORTED = msgspec.json.Encoder(order="sorted")  # canonical: key order never changes the hash


def intent_hash(intent: dict[str, Any]) -> str:
    """A stable hash of an intent, ignoring our own hash annotation."""
    md = intent.get("metadata", {})
    ann = md.get("annotations")
    if ann and HASH_ANNOTATION in ann:
        rest = {k: v for k, v in ann.items() if k != HASH_ANNOTATION}
        md = {**md, "annotations": rest} if rest else {k: v for k, v in md.items() if k != "annotations"}
        intent = {**intent, "metadata": md}
    return hashlib.sha256(_SORTED.encode(intent)).hexdigest()[:16]


def stamp(intent: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Return a copy of `intent` carrying its hash annotation, and the hash."""
    h = intent_hash(intent)
    md = intent.get("metadata", {})
    annotations = {**(md.get("annotations") or {}), HASH_ANNOTATION: h}
    return {**intent, "metadata": {**md, "annotations": annotations}}, h


def version_marker(live: dict[str, Any]) -> str:
    """What changes when someone else edits the object: generation if it has one, else resourceVersion."""
    md = live.get("metadata", {})
    gen = md.get("generation")
    return f"g{gen}" if gen is not None else f"rv{md.get('resourceVersion', '')}"


def changed_by_others(intent_h: str, live: dict[str, Any] | None, last_marker: str | None) -> bool:
    """Whether someone else changed the object since our own last apply of this same intent:
    it still carries our hash, but its generation (or resourceVersion) moved past the one our
    apply returned. Unknown after a restart (no marker): False."""
    if live is None or last_marker is None:
        return False
    ann = (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return ann == intent_h and version_marker(live) != last_marker


# A Kubernetes resource quantity: a number with an optional SI or binary suffix or exponent.
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_SUFFIX = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10**3),
    "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
    "E": Decimal(10**18), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
    "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def _quantity(v: Any) -> Decimal | None:
    """The value of a number or quantity string (`0.5`, `"500m"`, `"1Gi"`), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return Decimal(str(v))
    if not isinstance(v, str) or not (m := _QUANTITY.match(v)):
        return None
    number, suffix = m.group(1), m.group(2) or ""
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return Decimal(number + suffix)
    return Decimal(number) * _SUFFIX[suffix]


def same_values(a: Any, b: Any) -> bool:
    """Whether two API objects (or parts) hold the same values, counting a number and a quantity
    string of the same value as equal: the API stores a template's `nvidia.com/gpu: 1` as `"1"`
    and `cpu: 0.5` as `"500m"`, and our next apply writes the number back, which changes no value
    anyone reads."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float | str) and isinstance(b, int | float | str) and type(a) is not type(b):
        qa, qb = _quantity(a), _quantity(b)
        return qa is not None and qa == qb
    return a == b


def is_subset(intent: Any, live: Any) -> bool:
    """True if every field of `intent` is present in `live` with the same value.

    Lists must have the same length and match element-wise. Used after a restart, when we no
    longer know the version we last applied; a false negative only costs one idempotent apply.
    """
    if isinstance(intent, dict):
        if not isinstance(live, dict):
            return False
        return all(k in live and is_subset(v, live[k]) for k, v in intent.items())
    if isinstance(intent, list):
        if not isinstance(live, list) or len(intent) != len(live):
            return False
        return all(is_subset(a, b) for a, b in zip(intent, live, strict=True))
    if isinstance(intent, bool) or isinstance(live, bool):
        return intent is live
    if isinstance(intent, int | float) and isinstance(live, int | float):
        return intent == live
    return intent == live or str(intent) == str(live)


def needs_apply(
    intent_h: str, live: dict[str, Any] | None, last_marker: str | None, intent: dict[str, Any]
) -> bool:
    """Whether to send an apply for an intent with hash `intent_h` given the cached live object."""
    if live is None:
        return True
    ann = (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    if ann != intent_h:
        return True
    if not _metadata_kept(intent.get("metadata") or {}, live.get("metadata") or {}):
        return True
    if last_marker is not None:
        return version_marker(live) != last_marker
    md_free = {k: v for k, v in intent.items() if k not in ("metadata", "apiVersion", "kind")}
    return not is_subset(md_free, live)


def _metadata_kept(intent_md: dict[str, Any], live_md: dict[str, Any]) -> bool:
    """Whether the live object still carries our labels, annotations and owner references (others
    may add theirs). A label or owner reference removed by hand is what the group's watches and
    garbage collection rest on, and no generation moves with it."""
    for key in ("labels", "annotations"):
        live_map = live_md.get(key) or {}
        if any(live_map.get(k) != v for k, v in (intent_md.get(key) or {}).items()):
            return False
    live_refs = {r.get("uid"): r for r in live_md.get("ownerReferences") or []}
    return all(
        (live := live_refs.get(ref.get("uid"))) is not None and is_subset(ref, live)
        for ref in intent_md.get("ownerReferences") or []
    )
