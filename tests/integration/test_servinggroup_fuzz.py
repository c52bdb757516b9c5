"""Hypothesis-generated ServingGroups against the real apiserver (pdorch's CRDs) and the controller.

Specs are drawn around the example (role counts and types, names, replicas, sizes, ports, engines,
scaling, broken templates), so many are refused and many are not. For every one:
- refused by the apiserver: a 4xx with a non-empty message, and nothing stored;
- accepted: the controller observes it and either marks it Invalid=True with a message and creates
  no LeaderWorkerSet at all, or creates exactly one LWS per role (never a subset);
- the controller process never dies.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightkube import Client
from lightkube.core.exceptions import ApiError

from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.waiting import wait_for
from tests.integration.test_controller import SG, condition, example, lws_names

pytestmark = pytest.mark.integration

_BASE = example("base")
ENGINE_TEMPLATE = next(r for r in _BASE["spec"]["roles"] if r["type"] == "decode")["workerTemplate"]
_counter = itertools.count()

good_name = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
role_name = st.one_of(good_name, st.sampled_from(["Decode_1", "x" * 17, "-lead", "a.b"]))
role_type = st.sampled_from(["proxy", "prefill", "decode", "worker", "prefill", "decode", "encoder"])


@st.composite
def template(draw: st.DrawFn) -> dict[str, Any] | None:
    kind = draw(st.sampled_from(["ok", "ok", "ok", "none", "port-string", "no-containers"]))
    if kind == "none":
        return None
    t = copy.deepcopy(ENGINE_TEMPLATE)
    if kind == "port-string":
        t["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"  # only LWS's schema refuses it
    elif kind == "no-containers":
        t["spec"]["containers"] = []
    return t


@st.composite
def role(draw: st.DrawFn) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": draw(role_name),
        "type": draw(role_type),
        "replicas": draw(st.integers(-1, 3)),
    }
    if r["type"] != "proxy" or draw(st.booleans()):
        tpl = draw(template())
        if tpl is not None:
            r["workerTemplate"] = tpl
    if draw(st.booleans()):
        r["size"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 4)) == 0:
        r["port"] = draw(st.sampled_from([0, 1, 8000, 65535, 70000]))
    if draw(st.integers(0, 4)) == 0:
        lo, hi = draw(st.integers(0, 4)), draw(st.integers(0, 4))
        r["scaling"] = {
            "mode": draw(st.sampled_from(["External", "Builtin", "Sometimes"])),
            "minReplicas": lo,
            "maxReplicas": hi,
        }
    return r


@st.composite
def serving_group(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(_BASE)
    name = f"fz{next(_counter)}"
    if draw(st.integers(0, 9)) == 0:
        name = name + "x" * 30  # too long for the group's derived names
    doc["metadata"] = {"name": name}
    doc["spec"]["engine"]["name"] = draw(st.sampled_from(["vllm", "vllm", "sglang", "tgi"]))
    if doc["spec"]["engine"]["name"] != "vllm":
        doc["spec"]["engine"].pop("kvTransfer", None)
    base_roles = copy.deepcopy(_BASE["spec"]["roles"])
    mode = draw(st.sampled_from(["example", "mutated", "generated", "lws-refuses"]))
    if mode == "example":
        roles = base_roles
    elif mode == "lws-refuses":
        # Valid for pdorch's schema, refused by LWS's: only the controller's dry run can tell.
        roles = base_roles
        engines = [r for r in roles if "workerTemplate" in r]
        victim = engines[draw(st.integers(0, len(engines) - 1))]
        victim["workerTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"] = draw(
            st.sampled_from(["http", "8000", "port"])
        )
    elif mode == "mutated":
        roles = base_roles
        i = draw(st.integers(0, len(roles) - 1))
        roles[i] = {**roles[i], **{k: v for k, v in draw(role()).items() if k != "type"}}
    else:
        roles = draw(st.lists(role(), min_size=0, max_size=7))
    doc["spec"]["roles"] = roles
    return doc


def _lws_count(kube: Client, namespace: str, group: str) -> int:
    return len(lws_names(kube, namespace, group))


def check_one(kube: Client, namespace: str, ctl: ControllerProc, doc: dict[str, Any]) -> str:
    """Submit ``doc`` and check the outcome; returns "refused", "invalid" or "created"."""
    name = doc["metadata"]["name"]
    try:
        kube.create(SG.from_dict(doc), namespace=namespace)
    except ApiError as exc:
        assert exc.status.code in (400, 422), exc.status
        assert (exc.status.message or "").strip(), "refusal without a message"
        assert name not in {o.metadata.name for o in kube.list(SG, namespace=namespace)}
        assert _lws_count(kube, namespace, name) == 0
        return "refused"
    try:

        def observed() -> Any:
            sg = kube.get(SG, name, namespace=namespace)
            st_ = sg.status or {}
            inv = condition(sg, "Invalid")
            if st_.get("observedGeneration") == sg.metadata.generation and inv is not None:
                return sg
            return None

        sg = wait_for(observed, 30, f"the controller to observe {name}")
        inv = condition(sg, "Invalid")
        assert inv is not None
        if inv["status"] == "True":
            assert inv["message"].strip() and inv["reason"].strip(), inv
            assert _lws_count(kube, namespace, name) == 0, f"Invalid {name} has LeaderWorkerSets"
            return "invalid"
        want = {f"{name}-{r['name']}" for r in doc["spec"]["roles"]}
        wait_for(
            lambda: lws_names(kube, namespace, name) == want, 30, f"{name}: one LWS per role {sorted(want)}"
        )
        return "created"
    finally:
        assert ctl.proc.poll() is None, f"controller died:\n{ctl.log_tail()}"
        kube.delete(SG, name, namespace=namespace)


def test_generated_servinggroups_are_refused_cleanly_or_created_whole(
    kube: Client, namespace: str, controller: ControllerProc
) -> None:
    outcomes: dict[str, int] = {}

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(doc=serving_group())
    def prop(doc: dict[str, Any]) -> None:
        outcome = check_one(kube, namespace, controller, doc)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    prop()
    print(f"[reliability] ServingGroup fuzz outcomes: {outcomes}")
    # The generator must reach all three outcomes, or the property says little.
    assert set(outcomes) == {"refused", "invalid", "created"}, outcomes
