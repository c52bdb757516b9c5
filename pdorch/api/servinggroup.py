"""`ServingGroup` (pdorch.io/v1alpha1): one P/D-disaggregated serving deployment.

Each role becomes one LeaderWorkerSet; see DESIGN.md "API". Every cross-field rule below is both a
CEL rule in the CRD and a pydantic check, so `kubectl apply` and `pdorch render` agree.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, field_validator

from pdorch.api.base import (
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    PERCENT_CEL,
    ApiModel,
    CelRule,
    FreeForm,
    IntOrString,
    cel_schema,
    enum_field,
)
from pdorch.api.claim_template import ClaimTemplate
from pdorch.api.conditions import CONDITIONS_LIST_EXTRA, Condition
from pdorch.api.pod_template import check_pod_template

GROUP = "pdorch.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ServingGroup"
PLURAL = "servinggroups"
SHORT_NAME = "sg"

# Name budget. pdorch names each role's LWS `<group>-<role>`. LWS then creates a leader StatefulSet
# named like the LWS, and one worker StatefulSet per group named `<lws>-<groupIndex>`; worker pods
# are `<lws>-<groupIndex>-<workerIndex>`. A StatefulSet's name must leave room for its
# `controller-revision-hash` label value `<sts>-<10-char hash>` (<= 63), i.e. <= 52 characters.
# With group <= 28 and role <= 16 the LWS name is <= 45, a worker StatefulSet <= 50 for up to
# 9999 groups, and pod names <= 55 (< 63, so they also fit the `statefulset.kubernetes.io/pod-name`
# label). The group name also names the proxy Service, hence a DNS-1035 label (starts with a letter).
MAX_GROUP_NAME_LENGTH = 28
MAX_ROLE_NAME_LENGTH = 16
MAX_ROLES = 10
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class RoleType(StrEnum):
    """What a role does; prefill, decode and worker roles hold KV cache and define the revision."""

    PROXY = "proxy"
    PREFILL = "prefill"
    DECODE = "decode"
    WORKER = "worker"


KV_ROLE_TYPES = frozenset({RoleType.PREFILL, RoleType.DECODE, RoleType.WORKER})


class ScalingMode(StrEnum):
    """Who sets a role's replicas."""

    STATIC = "Static"
    EXTERNAL = "External"
    BUILTIN = "Builtin"


class RestartPolicy(StrEnum):
    """LWS `leaderWorkerTemplate.restartPolicy` (the deprecated `Default` is not offered)."""

    RECREATE_GROUP_ON_POD_RESTART = "RecreateGroupOnPodRestart"
    RECREATE_GROUP_AFTER_START = "RecreateGroupAfterStart"
    NONE = "None"


class StartupPolicy(StrEnum):
    """LWS `startupPolicy`: when the workers StatefulSet of a group is created."""

    LEADER_CREATED = "LeaderCreated"
    LEADER_READY = "LeaderReady"


class SubGroupPolicyType(StrEnum):
    """LWS `subGroupPolicy.subGroupPolicyType`."""

    LEADER_WORKER = "LeaderWorker"
    LEADER_EXCLUDED = "LeaderExcluded"


class SubdomainPolicy(StrEnum):
    """LWS `networkConfig.subdomainPolicy`."""

    SHARED = "Shared"
    UNIQUE_PER_REPLICA = "UniquePerReplica"


class EngineName(StrEnum):
    """Inference engine; selects the P/D handshake the proxy runs."""

    VLLM = "vllm"
    SGLANG = "sglang"


class RouterPolicy(StrEnum):
    """How the proxy picks prefill/decode endpoints."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    POWER_OF_TWO = "power_of_two"
    CACHE_AWARE = "cache_aware"


class SubGroupPolicy(ApiModel):
    """Passed through to LWS `leaderWorkerTemplate.subGroupPolicy`."""

    sub_group_policy_type: SubGroupPolicyType | None = enum_field(None)
    """LeaderWorker (leader in the first subgroup) or LeaderExcluded."""
    sub_group_size: int = Field(ge=1)
    """Pods per subgroup; size (or size-1) must be divisible by it."""


class NetworkConfig(ApiModel):
    """Passed through to LWS `networkConfig`."""

    subdomain_policy: SubdomainPolicy = enum_field()
    """Shared: one headless Service per role; UniquePerReplica: one per group."""


class ScalingTargets(ApiModel):
    """SLO targets of the built-in autoscaler."""

    ttft_ms: float | None = Field(None, gt=0)
    """Time-to-first-token target in milliseconds (prefill roles)."""
    tpot_ms: float | None = Field(None, gt=0)
    """Time-per-output-token (inter-token latency) target in milliseconds (decode roles)."""


def _min_le_max(s: Scaling) -> bool:
    return s.min_replicas is None or s.max_replicas is None or s.min_replicas <= s.max_replicas


class Scaling(ApiModel):
    """How a role's replica count is decided."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            message="scaling.minReplicas must be <= scaling.maxReplicas",
            check=_min_le_max,
            field_path=".minReplicas",
        ),
    )
    model_config = ConfigDict(json_schema_extra=cel_schema(cel_rules))

    mode: ScalingMode = enum_field(ScalingMode.STATIC)
    """Static (roles[].replicas), External (HPA/KEDA on ServingRoleScaler) or Builtin (SLO autoscaler)."""
    min_replicas: int | None = Field(None, ge=0)
    """Lower bound for External/Builtin scaling."""
    max_replicas: int | None = Field(None, ge=0)
    """Upper bound for External/Builtin scaling (required for Builtin)."""
    targets: ScalingTargets | None = None
    """SLO targets for Builtin: ttftMs for prefill roles, tpotMs for decode roles."""
    scale_up_stabilization_seconds: int = Field(0, ge=0, le=3600)
    """Builtin: use the lowest recommendation of this window before scaling up."""
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=3600)
    """Builtin: use the highest recommendation of this window before scaling down."""
    scale_down_after_miss_seconds: int | None = Field(None, ge=0, le=3600)
    """Builtin: the scale-down window for an hour after the group missed a target, when longer than
    scaleDownStabilizationSeconds (unset: off)."""
    cooldown_seconds: int = Field(60, ge=0, le=3600)
    """Builtin: minimum time between two scaling actions of the role."""

    def clamp(self, replicas: int) -> int:
        """`replicas` within [minReplicas, maxReplicas] (an unset bound does not bind)."""
        if self.max_replicas is not None:
            replicas = min(replicas, self.max_replicas)
        if self.min_replicas is not None:
            replicas = max(replicas, self.min_replicas)
        return replicas


def _scaled(r: Role) -> bool:
    return r.scaling is not None and r.scaling.mode != ScalingMode.STATIC


def _builtin(r: Role) -> bool:
    return r.scaling is not None and r.scaling.mode == ScalingMode.BUILTIN


def _replicas_within_bounds(r: Role) -> bool:
    if not _scaled(r):
        return True
    s = r.scaling
    assert s is not None
    return (s.min_replicas is None or r.replicas >= s.min_replicas) and (
        s.max_replicas is None or r.replicas <= s.max_replicas
    )


_HAS_TEMPLATE = "(has(self.workerTemplate) || has(self.leaderTemplate))"
_SCALED = "(has(self.scaling) && self.scaling.mode != 'Static')"
_BUILTIN = "(has(self.scaling) && self.scaling.mode == 'Builtin')"


def _sub_groups_fit(r: Role) -> bool:
    sg = r.sub_group_policy
    if sg is None:
        return True
    n, k = r.size, sg.sub_group_size
    if k > n:
        return False
    if sg.sub_group_policy_type == SubGroupPolicyType.LEADER_EXCLUDED:
        return (n - 1) % k == 0
    return n % k == 0 or (n - 1) % k == 0


# A role name LWS's own `<lws>-<index>` names could take (RE2 and Python `re` alike).
_NUMBERED_NAME = "^([0-9]+|.*-[0-9]+)$"


# LWS's own webhook rules for subGroupPolicy, checked here so the message names spec.roles[i].
_SUB_GROUPS_CEL = (
    "!has(self.subGroupPolicy) || (self.subGroupPolicy.subGroupSize <= self.size && "
    "((has(self.subGroupPolicy.subGroupPolicyType) && "
    "self.subGroupPolicy.subGroupPolicyType == 'LeaderExcluded') ? "
    "(self.size - 1) % self.subGroupPolicy.subGroupSize == 0 : "
    "(self.size % self.subGroupPolicy.subGroupSize == 0 || "
    "(self.size - 1) % self.subGroupPolicy.subGroupSize == 0)))"
)


class Role(ApiModel):
    """One role of the group, rendered as one LeaderWorkerSet `<group>-<role>`."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            # Transition rule (LWS's webhook refuses these updates of its subGroupPolicy): only the
            # apiserver sees the old object, so the Python mirror passes.
            rule="has(self.subGroupPolicy) == has(oldSelf.subGroupPolicy) && (!has(self.subGroupPolicy) || "
            "self.subGroupPolicy.subGroupSize == oldSelf.subGroupPolicy.subGroupSize)",
            message="roles[].subGroupPolicy cannot be added, removed or resized on an existing role (its "
            "LeaderWorkerSet refuses it); give the role a new name to replace its LeaderWorkerSet",
            check=lambda _: True,
            mirrored=False,
            field_path=".subGroupPolicy",
        ),
        CelRule(
            # Transition rule: a StatefulSet's volumeClaimTemplates are immutable, and LWS's webhook
            # lets the edit through, so every later write of the role's StatefulSets would fail.
            rule="has(self.volumeClaimTemplates) == has(oldSelf.volumeClaimTemplates) && "
            "(!has(self.volumeClaimTemplates) || self.volumeClaimTemplates == oldSelf.volumeClaimTemplates)",
            message="roles[].volumeClaimTemplates cannot be added, removed or changed on an existing role "
            "(its StatefulSets' claim templates are immutable); give the role a new name to replace its "
            "LeaderWorkerSet",
            check=lambda _: True,
            mirrored=False,
            field_path=".volumeClaimTemplates",
        ),
        CelRule(
            # LWS names group i's worker StatefulSet and pods `<lws>-<i>...`: role `prefill-0`
            # (or a group `g-prefill` with role `0`) would take role `prefill`'s names. New roles
            # only (roles are keyed by name): one stored before this rule, which clashes with
            # nothing unless its group has the shorter name too, stays writable; hence no Python
            # mirror, which the controller would apply to stored groups.
            rule=f"oldSelf.hasValue() || !self.name.matches('{_NUMBERED_NAME}')",
            message="roles[].name must not be all digits or end in '-<digits>' (LeaderWorkerSet names "
            "a role's StatefulSets and pods <group>-<role>-<index>, which such a name would clash "
            "with); e.g. use prefill-a, not prefill-0",
            check=lambda _: True,
            mirrored=False,
            field_path=".name",
            optional_old_self=True,
        ),
        CelRule(
            # SGLang's prefill server and its KV bootstrap server cannot both bind one port.
            # A role stored that way before this rule stays writable (it is Invalid to the
            # controller, and says so in its status).
            rule="!has(self.bootstrapPort) || self.bootstrapPort != self.port || (oldSelf.hasValue() && "
            "has(oldSelf.value().bootstrapPort) && oldSelf.value().bootstrapPort == oldSelf.value().port)",
            message="roles[].bootstrapPort must differ from roles[].port (the SGLang prefill server and "
            "its KV bootstrap server each listen on their own port)",
            check=lambda r: r.bootstrap_port is None or r.bootstrap_port != r.port,
            field_path=".bootstrapPort",
            optional_old_self=True,
        ),
        CelRule(
            rule=_SUB_GROUPS_CEL,
            message="roles[].subGroupPolicy.subGroupSize must be at most roles[].size and divide "
            "size or size - 1 (size - 1 with LeaderExcluded)",
            check=_sub_groups_fit,
            field_path=".subGroupPolicy",
        ),
        CelRule(
            rule=f"self.type == 'proxy' || {_HAS_TEMPLATE}",
            message="roles[].workerTemplate is required for prefill, decode and worker roles "
            "(only a proxy role may omit its templates to get the built-in proxy)",
            check=lambda r: r.type == RoleType.PROXY or r.has_template,
        ),
        CelRule(
            rule=f"self.type != 'proxy' || {_HAS_TEMPLATE} || self.size == 1",
            message="roles[].size must be 1 for a proxy role that uses the built-in proxy template",
            check=lambda r: r.type != RoleType.PROXY or r.has_template or r.size == 1,
            field_path=".size",
        ),
        CelRule(
            rule=f"!{_SCALED} || ((!has(self.scaling.minReplicas) || self.replicas >= "
            "self.scaling.minReplicas) && (!has(self.scaling.maxReplicas) || self.replicas <= "
            "self.scaling.maxReplicas))",
            message="roles[].replicas must lie within [scaling.minReplicas, scaling.maxReplicas] "
            "for External and Builtin scaling",
            check=_replicas_within_bounds,
            field_path=".replicas",
        ),
        CelRule(
            rule=f"!{_BUILTIN} || self.type == 'prefill' || self.type == 'decode'",
            message="roles[].scaling.mode Builtin is only for prefill and decode roles; "
            "use Static or External for proxy and worker roles",
            check=lambda r: not _builtin(r) or r.type in (RoleType.PREFILL, RoleType.DECODE),
            field_path=".scaling",
        ),
        CelRule(
            rule=f"!{_BUILTIN} || has(self.scaling.maxReplicas)",
            message="roles[].scaling.maxReplicas is required for Builtin scaling",
            check=lambda r: not _builtin(r) or r.scaling.max_replicas is not None,
            field_path=".scaling",
        ),
        CelRule(
            rule=f"!{_BUILTIN} || ((!has(self.scaling.minReplicas) || self.scaling.minReplicas >= 1) "
            "&& (!has(self.scaling.maxReplicas) || self.scaling.maxReplicas >= 1))",
            message="roles[].scaling.minReplicas and maxReplicas must be >= 1 for Builtin scaling: "
            "the policy reads load from the role's own engines, so at 0 replicas it could never "
            "scale back up (use Static replicas: 0 to switch a role off)",
            check=lambda r: (
                not _builtin(r)
                or (
                    (r.scaling.min_replicas is None or r.scaling.min_replicas >= 1)
                    and (r.scaling.max_replicas is None or r.scaling.max_replicas >= 1)
                )
            ),
            field_path=".scaling",
        ),
        CelRule(
            rule=f"!{_BUILTIN} || self.type != 'prefill' || "
            "(has(self.scaling.targets) && has(self.scaling.targets.ttftMs))",
            message="roles[].scaling.targets.ttftMs is required for Builtin scaling of a prefill role",
            check=lambda r: (
                not _builtin(r)
                or r.type != RoleType.PREFILL
                or (r.scaling.targets is not None and r.scaling.targets.ttft_ms is not None)
            ),
            field_path=".scaling",
        ),
        CelRule(
            rule=f"!{_BUILTIN} || self.type != 'decode' || "
            "(has(self.scaling.targets) && has(self.scaling.targets.tpotMs))",
            message="roles[].scaling.targets.tpotMs is required for Builtin scaling of a decode role",
            check=lambda r: (
                not _builtin(r)
                or r.type != RoleType.DECODE
                or (r.scaling.targets is not None and r.scaling.targets.tpot_ms is not None)
            ),
            field_path=".scaling",
        ),
    )
    model_config = ConfigDict(json_schema_extra=cel_schema(cel_rules))

    name: str = Field(min_length=1, max_length=MAX_ROLE_NAME_LENGTH, pattern=DNS1123_LABEL)
    """Role name (DNS-1123 label, at most 16 characters); the LWS is named <group>-<name>."""
    type: RoleType = enum_field()
    """proxy, prefill, decode or worker."""
    replicas: int = Field(1, ge=0, le=10000)
    """Number of LWS groups (initial value when scaling is External or Builtin)."""
    size: int = Field(1, ge=1, le=1024)
    """Pods per group, leader included (LWS leaderWorkerTemplate.size)."""
    leader_template: FreeForm | None = None
    """PodTemplateSpec of the leader pod (defaults to workerTemplate)."""
    worker_template: FreeForm | None = None
    """PodTemplateSpec of the worker pods (defaults to leaderTemplate)."""
    restart_policy: RestartPolicy | None = enum_field(None)
    """LWS restartPolicy: RecreateGroupOnPodRestart, RecreateGroupAfterStart or None."""
    sub_group_policy: SubGroupPolicy | None = None
    """LWS subGroupPolicy."""
    startup_policy: StartupPolicy | None = enum_field(None)
    """LWS startupPolicy: LeaderCreated or LeaderReady."""
    network_config: NetworkConfig | None = None
    """LWS networkConfig."""
    volume_claim_templates: list[ClaimTemplate] | None = Field(None, max_length=16)
    """LWS volumeClaimTemplates (PVCs: metadata.name, spec.accessModes, spec.resources.requests.storage)."""
    port: int = Field(8000, ge=1, le=65535)
    """Port of the engine's HTTP server on the leader pod."""
    bootstrap_port: int | None = Field(None, ge=1, le=65535)
    """SGLang only: the prefill server's KV bootstrap port."""
    scaling: Scaling | None = None
    """How replicas are decided (default Static)."""

    @field_validator("leader_template", "worker_template")
    @classmethod
    def _pod_template_shape(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # The CRD keeps templates opaque (preserve-unknown-fields): what its schema cannot say is
        # checked here, so the controller marks the group Invalid naming the field.
        return None if v is None else check_pod_template(v)

    @property
    def has_template(self) -> bool:
        """Whether the user gave any pod template for this role."""
        return self.leader_template is not None or self.worker_template is not None

    @property
    def scaling_mode(self) -> ScalingMode:
        """The effective scaling mode (Static when `scaling` is omitted)."""
        return self.scaling.mode if self.scaling is not None else ScalingMode.STATIC


class KVTransfer(ApiModel):
    """The engines' KV-cache transfer settings, as a record: part of the revision (a change rolls the
    KV roles out), not rendered into the pods. Set the engines' own flags in the role templates."""

    connector: str | None = Field(None, max_length=128)
    """vLLM kv_connector (e.g. NixlConnector) or SGLang transfer backend (e.g. nixl, mooncake)."""
    extra: FreeForm | None = None
    """Engine-specific extra KV-transfer configuration, recorded unchanged."""


class Engine(ApiModel):
    """The inference engine all roles run."""

    name: EngineName = enum_field()
    """vllm or sglang."""
    kv_transfer: KVTransfer | None = None
    """KV-transfer settings."""


class Ratio(ApiModel):
    """Declared P:D ratio kept by rollouts and the built-in autoscaler."""

    prefill: int = Field(ge=1, le=1000)
    """Prefill share of the ratio."""
    decode: int = Field(ge=1, le=1000)
    """Decode share of the ratio."""
    tolerance: float | None = Field(None, ge=0, le=1)
    """Allowed relative deviation from the ratio (0..1)."""


def _int_or_percent_rule(field: str) -> str:
    # int-or-string is dynamically typed in CEL: branch on type(); a string must be a percentage
    # (LWS refuses "5"), an int must be >= 0.
    return (
        f"!has(self.{field}) || (type(self.{field}) == string ? "
        f"self.{field}.matches('{PERCENT_CEL}') : int(self.{field}) >= 0)"
    )


_SURGE_OK = _int_or_percent_rule("maxSurge")
_UNAVAIL_OK = _int_or_percent_rule("maxUnavailable")


def _zero_cel(field: str) -> str:
    # By value, so "00%" counts as zero too (the percentage rule allows up to three digits); a
    # malformed string is left to the percentage rule instead of failing evaluation here.
    return (
        f"(type(self.{field}) == string ? (self.{field}.matches('{PERCENT_CEL}') && "
        f"int(self.{field}.replace('%', '')) == 0) : int(self.{field}) == 0)"
    )


def _is_zero(v: int | str | None) -> bool:
    text = str(v).rstrip("%") if v is not None else ""
    return text.isdigit() and int(text) == 0


class RolloutStrategy(ApiModel):
    """How a new revision is rolled out across the KV roles."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=_SURGE_OK,
            message="rolloutStrategy.maxSurge must be a non-negative integer or a percentage like '25%'",
            check=lambda _: True,  # pydantic's IntOrString validator already enforces it
            field_path=".maxSurge",
        ),
        CelRule(
            rule=_UNAVAIL_OK,
            message="rolloutStrategy.maxUnavailable must be a non-negative integer or a percentage "
            "like '25%'",
            check=lambda _: True,
            field_path=".maxUnavailable",
        ),
        CelRule(
            rule="!(has(self.maxSurge) && has(self.maxUnavailable) && "
            f"{_zero_cel('maxSurge')} && {_zero_cel('maxUnavailable')})",
            message="rolloutStrategy.maxSurge and rolloutStrategy.maxUnavailable must not both be 0: "
            "the rollout could never make progress",
            check=lambda s: not (_is_zero(s.max_surge) and _is_zero(s.max_unavailable)),
        ),
    )
    model_config = ConfigDict(json_schema_extra=cel_schema(cel_rules))

    max_surge: IntOrString = "25%"
    """Groups per role that may be added above replicas during a rollout (int or %, rounded up;
    more than replicas acts as replicas: one whole new copy)."""
    max_unavailable: IntOrString = "25%"
    """Groups per role that may be unavailable during a rollout (int or %, rounded down)."""
    ratio_tolerance: float | None = Field(None, ge=0, le=1)
    """Allowed relative P:D ratio deviation of each cohort during a rollout (0..1); unset: the
    smallest deviation the surge/unavailable budgets allow (reported in status)."""
    progress_deadline_seconds: int = Field(600, ge=1, le=86400)
    """No progress for this long sets RolloutStalled."""
    paused: bool = False
    """Stop moving partitions (the current step is held)."""


class ConditionalDisaggregation(ApiModel):
    """Send short prompts to a decode instance only."""

    min_prompt_tokens: int = Field(ge=0)
    """Prompts shorter than this many tokens skip the prefill role."""


class RouterPrefillQueue(ApiModel):
    """Prompts wait in the proxy, not in the prefill engines' queues, and the ones that can still
    meet the TTFT target go first, shortest first."""

    max_inflight_tokens: int = Field(ge=1, le=10_000_000)
    """Estimated prompt tokens (from characters: 4 per token until the engines' counts are learned)
    on the wire to each prefill engine; the rest wait in the proxy. About two of the engine's max_num_batched_tokens keeps it busy."""
    # Integral defaults written as ints: kustomize re-types 2.0 as 2, helm keeps it (packaging test).
    ttft_seconds: float = Field(2, gt=0, le=3600)
    """TTFT target: a waiting prompt that can still get its first token within it goes before
    those that cannot."""
    max_wait_seconds: float = Field(30, gt=0, le=3600)
    """A prompt that has waited this long goes first, whatever its length, so long prompts are
    not starved under sustained overload."""


class RouterTimeouts(ApiModel):
    """Proxy timeouts towards the engines."""

    connect_seconds: float | None = Field(None, gt=0, le=600)
    """TCP connect timeout."""
    first_byte_seconds: float | None = Field(None, gt=0, le=3600)
    """Time allowed until an engine starts answering: the prefill leg, a streamed answer's first
    bytes, and a decode whose progress counters stand still while a non-streamed answer waits on
    it (default 300)."""
    request_seconds: float | None = Field(None, gt=0, le=86400)
    """Whole-request limit, which also bounds a non-streamed answer's decode leg (default 1800)."""
    stream_idle_seconds: float | None = Field(None, gt=0, le=3600)
    """Silence allowed from an engine once its answer is being relayed (default 60)."""


class RouterRetries(ApiModel):
    """Retries before the first byte reached the client, each with a fresh P/D pair."""

    max_retries: int = Field(2, ge=0, le=10)
    """Retries after the first attempt."""


class RouterAuth(ApiModel):
    """Client authentication at the proxy."""

    secret_name: str = Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)
    """Secret in the group's namespace holding accepted API keys."""
    key: str = Field("api-key", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key inside the Secret (letters, digits, '-', '_', '.')."""


class Router(ApiModel):
    """Settings of the group's xPyD proxy."""

    policy: RouterPolicy = enum_field(RouterPolicy.LEAST_LOAD)
    """round_robin, least_load, power_of_two or cache_aware."""
    conditional_disaggregation: ConditionalDisaggregation | None = None
    """Decode-only serving of short prompts."""
    prefill_queue: RouterPrefillQueue | None = None
    """Queue prompts in the proxy and send the ones that can still meet the TTFT first (off when
    absent)."""
    timeouts: RouterTimeouts | None = None
    """Timeouts towards the engines."""
    retries: RouterRetries | None = None
    """Retry budget per request."""
    auth: RouterAuth | None = None
    """API-key authentication."""


def _types(spec: ServingGroupSpec) -> list[RoleType]:
    return [r.type for r in spec.roles]


def _unique_names(spec: ServingGroupSpec) -> bool:
    names = [r.name for r in spec.roles]
    return len(names) == len(set(names))


class ServingGroupSpec(ApiModel):
    """Desired state of a ServingGroup."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.roles.exists(r, r.type == 'prefill')",
            message="spec.roles must contain at least one role of type prefill",
            check=lambda s: RoleType.PREFILL in _types(s),
            field_path=".roles",
        ),
        CelRule(
            rule="self.roles.exists(r, r.type == 'decode')",
            message="spec.roles must contain at least one role of type decode",
            check=lambda s: RoleType.DECODE in _types(s),
            field_path=".roles",
        ),
        CelRule(
            rule="self.roles.filter(r, r.type == 'proxy').size() <= 1",
            message="spec.roles may contain at most one role of type proxy",
            check=lambda s: _types(s).count(RoleType.PROXY) <= 1,
            field_path=".roles",
        ),
        CelRule(
            rule="self.roles.all(a, self.roles.exists_one(b, b.name == a.name))",
            message="spec.roles[].name must be unique within the group",
            check=_unique_names,
            field_path=".roles",
        ),
        CelRule(
            # Groups stored with a router and no proxy role before this rule stay writable (their
            # router has never done anything); no Python mirror, for the same reason.
            rule="!has(self.router) || self.roles.exists(r, r.type == 'proxy') || (oldSelf.hasValue() && "
            "has(oldSelf.value().router) && !oldSelf.value().roles.exists(r, r.type == 'proxy'))",
            message="spec.router configures the group's proxy role, and there is none: add a role of "
            "type proxy or remove spec.router",
            check=lambda _: True,
            mirrored=False,
            field_path=".router",
            optional_old_self=True,
        ),
        CelRule(
            rule="self.engine.name == 'sglang' || self.roles.all(r, !has(r.bootstrapPort))",
            message="spec.roles[].bootstrapPort is only valid with spec.engine.name sglang; remove it",
            check=lambda s: (
                s.engine.name == EngineName.SGLANG or all(r.bootstrap_port is None for r in s.roles)
            ),
            field_path=".roles",
        ),
        CelRule(
            # A real SGLang decode server aborts a request without bootstrap_room (HTTP 400), so
            # prompts cannot skip the prefill role there; vLLM decodes prefill such requests locally.
            rule="self.engine.name != 'sglang' || !has(self.router) || "
            "!has(self.router.conditionalDisaggregation) || "
            "self.router.conditionalDisaggregation.minPromptTokens == 0",
            message="spec.router.conditionalDisaggregation needs spec.engine.name vllm: an SGLang decode "
            "server refuses requests without bootstrap fields (HTTP 400), so no prompt can skip the "
            "prefill role; remove it",
            check=lambda s: (
                s.engine.name != EngineName.SGLANG
                or s.router is None
                or s.router.conditional_disaggregation is None
                or s.router.conditional_disaggregation.min_prompt_tokens == 0
            ),
            field_path=".router",
        ),
    )
    model_config = ConfigDict(json_schema_extra=cel_schema(cel_rules))

    roles: list[Role] = Field(
        min_length=2,
        max_length=MAX_ROLES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """The roles (2..10): at least one prefill and one decode, at most one proxy."""
    engine: Engine
    """Inference engine and KV-transfer settings."""
    ratio: Ratio | None = None
    """Declared P:D ratio (default: the ratio of the roles' replicas)."""
    rollout_strategy: RolloutStrategy | None = None
    """Rollout knobs."""
    router: Router | None = None
    """Settings of the proxy role (required with one), read by `pdorch proxy` from its env."""

    def role(self, name: str) -> Role:
        """The role called `name` (KeyError if absent)."""
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def proxy_role(self) -> Role | None:
        """The proxy role, if the group has one."""
        return next((r for r in self.roles if r.type == RoleType.PROXY), None)


class RoleStatus(ApiModel):
    """Observed state of one role (its LWS)."""

    name: str = Field(max_length=MAX_ROLE_NAME_LENGTH)
    """Role name."""
    type: RoleType = enum_field()
    """Role type."""
    desired_replicas: int | None = Field(None, ge=0)
    """Groups the operator asked for (spec, or the ServingRoleScaler when autoscaled); a rollout's
    surge groups are not counted here (see surgeReplicas)."""
    replicas: int | None = Field(None, ge=0)
    """Groups that exist (LWS status.replicas), surge groups included."""
    ready_replicas: int | None = Field(None, ge=0)
    """Groups that are ready, of any revision, surge groups included."""
    updated_replicas: int | None = Field(None, ge=0)
    """Groups on the update revision, ready or not."""
    updated_ready_replicas: int | None = Field(None, ge=0)
    """Groups on the update revision that are ready."""
    surge_replicas: int | None = Field(None, ge=0)
    """Groups a rollout in progress keeps above desiredReplicas for now (0 otherwise)."""
    partition: int | None = Field(None, ge=0)
    """Current LWS partition (groups below it stay on the old revision)."""


class StatusSummary(ApiModel):
    """Ready/desired groups per role type, e.g. "3/4", and the rollout state, for `kubectl get sg`.

    Ready counts at most the desired groups of each role, so a rollout's surge never shows 5/4."""

    proxy: str | None = Field(None, max_length=32)
    """Proxy groups ready/desired."""
    prefill: str | None = Field(None, max_length=32)
    """Prefill groups ready/desired (all prefill roles summed)."""
    decode: str | None = Field(None, max_length=32)
    """Decode groups ready/desired (all decode roles summed)."""
    worker: str | None = Field(None, max_length=32)
    """Worker groups ready/desired (all worker roles summed)."""
    rollout: str | None = Field(None, max_length=32)
    """Complete, Progressing, Paused, Stalled (RolloutStalled is True), Scaling, ApplyFailed or Invalid."""


class ServingGroupStatus(ApiModel):
    """Observed state of a ServingGroup, written by the controller only."""

    observed_generation: int | None = Field(None, ge=0)
    """The .metadata.generation last acted on."""
    current_revision: str | None = Field(None, max_length=64)
    """Revision all KV roles ran before the rollout in progress (or now)."""
    update_revision: str | None = Field(None, max_length=64)
    """Revision of the current spec."""
    roles: list[RoleStatus] | None = Field(
        None,
        max_length=MAX_ROLES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Per-role observed state."""
    summary: StatusSummary | None = None
    """Printer-column strings."""
    last_progress_time: str | None = Field(None, json_schema_extra={"format": "date-time"})
    """When the rollout in progress last moved (RFC 3339); RolloutStalled counts
    progressDeadlineSeconds from it, also across controller restarts. Absent when no rollout runs."""
    conditions: list[Condition] | None = Field(None, max_length=16, json_schema_extra=CONDITIONS_LIST_EXTRA)
    """Available, Progressing, RolloutStalled, Invalid."""


class ObjectMeta(ApiModel):
    """The parts of metadata pdorch reads; anything else is kept but ignored."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    """Object name."""
    namespace: str | None = None
    """Object namespace."""
    uid: str | None = None
    """Object UID (needed for owner references; absent offline)."""
    generation: int | None = None
    """Spec generation."""
    labels: dict[str, str] | None = None
    """Labels."""
    annotations: dict[str, str] | None = None
    """Annotations."""


def _group_name_ok(sg: ServingGroup) -> bool:
    name = sg.metadata.name or ""
    return len(name) <= MAX_GROUP_NAME_LENGTH and re.match(DNS1035_LABEL, name) is not None


class ServingGroup(ApiModel):
    """A ServingGroup object (apiVersion pdorch.io/v1alpha1, kind ServingGroup)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule=f"self.metadata.name.size() <= {MAX_GROUP_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_GROUP_NAME_LENGTH} characters: pdorch "
            "derives LeaderWorkerSet, StatefulSet and pod names (<name>-<role>-<group>-<worker>) "
            "from it and they must fit Kubernetes name limits",
            check=lambda sg: len(sg.metadata.name or "") <= MAX_GROUP_NAME_LENGTH,
            field_path=".metadata.name",
        ),
        CelRule(
            rule=f"self.metadata.name.matches('{DNS1035_LABEL}')",
            message="metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', "
            "starting with a letter): it also names the group's proxy Service",
            check=_group_name_ok,
            field_path=".metadata.name",
        ),
    )

    api_version: str = Field(API_VERSION, alias="apiVersion")
    """pdorch.io/v1alpha1."""
    kind: str = KIND
    """ServingGroup."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: ServingGroupSpec
    """Desired state."""
    status: ServingGroupStatus | None = None
    """Observed state."""

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v != API_VERSION:
            raise ValueError(f"must be {API_VERSION}")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != KIND:
            raise ValueError(f"must be {KIND}")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_name(cls, v: ObjectMeta) -> ObjectMeta:
        if not v.name:
            raise ValueError("metadata.name is required")
        return v

    @property
    def name(self) -> str:
        """The group's name."""
        assert self.metadata.name is not None
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """The group's namespace (`default` when unset, as kubectl would apply it)."""
        return self.metadata.namespace or "default"


def parse_servinggroup(obj: dict[str, Any]) -> ServingGroup:
    """Validate a ServingGroup given as Kubernetes JSON (raises pydantic.ValidationError)."""
    return ServingGroup.model_validate(obj)
