"""Plain data: one engine endpoint and an immutable snapshot of all endpoints the proxy may use."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

EndpointRole = Literal["prefill", "decode", "both"]


@dataclass(frozen=True)
class Endpoint:
    """One engine instance the proxy can send a leg to (for multi-host groups: the leader)."""

    url: str  # base URL, e.g. http://10.0.0.5:8000 (no trailing slash)
    role: EndpointRole
    host: str
    port: int
    revision: str = ""
    bootstrap_port: int | None = None  # SGLang prefill bootstrap server
    pod: str | None = None
    # Identity of what serves `url` (a pod's metadata.uid; None for static URLs): a new pod that
    # reuses a deleted pod's IP and port is another endpoint, not the old one back.
    uid: str | None = None

    @cached_property
    def key(self) -> str:
        """Identity for per-endpoint state (load, breaker, liveness, prefix cache, progress): the URL,
        plus the pod UID when discovery knows it. Stable for one pod across discovery refreshes;
        a new pod at the same address starts clean. Cached: routing reads it many times a request."""
        return self.url if self.uid is None else f"{self.url}#{self.uid}"

    @property
    def label(self) -> str:
        """The ``endpoint`` label of its metric series: the URL, which successive pods at one
        address share (pod UIDs would only add churn to the series)."""
        return self.url

    @property
    def can_prefill(self) -> bool:
        """True if this endpoint may run a prefill leg."""
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        """True if this endpoint may run a decode leg."""
        return self.role in ("decode", "both")


@dataclass(frozen=True)
class EndpointSet:
    """An immutable snapshot of the usable endpoints (discovery replaces it wholesale)."""

    endpoints: tuple[Endpoint, ...] = field(default_factory=tuple)

    def prefills(self) -> list[Endpoint]:
        """Endpoints able to prefill."""
        return [e for e in self.endpoints if e.can_prefill]

    def decodes(self) -> list[Endpoint]:
        """Endpoints able to decode."""
        return [e for e in self.endpoints if e.can_decode]

    @cached_property
    def by_revision(self) -> dict[str, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]]:
        """revision -> (prefill-role endpoints, decode-capable endpoints), each sorted by key.

        Computed once per snapshot: routing reads it on every request, and the snapshot never changes
        (discovery replaces it wholesale)."""
        return group_by_revision(self.endpoints)

    def revisions(self) -> list[str]:
        """Distinct revisions, sorted."""
        return sorted({e.revision for e in self.endpoints})

    def __len__(self) -> int:
        return len(self.endpoints)


def group_by_revision(
    endpoints: tuple[Endpoint, ...] | list[Endpoint],
) -> dict[str, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]]:
    """revision -> (endpoints whose role is prefill, endpoints able to decode), each sorted by key.

    A ``both`` endpoint counts as a decode only: P/D pairs a dedicated prefill with a decode."""
    pre: dict[str, list[Endpoint]] = {}
    dec: dict[str, list[Endpoint]] = {}
    for e in sorted(endpoints, key=lambda e: e.key):
        pre.setdefault(e.revision, [])
        dec.setdefault(e.revision, [])
        if e.role == "prefill":
            pre[e.revision].append(e)
        if e.can_decode:
            dec[e.revision].append(e)
    return {r: (tuple(pre[r]), tuple(dec[r])) for r in pre}
