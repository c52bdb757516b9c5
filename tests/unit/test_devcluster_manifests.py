"""Pure builders of the dev cluster: configs, webhook rewriting, nodes, PKI."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from pdorch.devcluster import manifests, pki

pytestmark = pytest.mark.unit

# A trimmed copy of the shape of LWS's config/webhook files (structure only, our own text).
WEBHOOK_MANIFESTS = """
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: mutating-webhook-configuration}
webhooks:
- name: mleaderworkerset.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-lws}}
  rules: [{apiGroups: [leaderworkerset.x-k8s.io], apiVersions: [v1], operations: [CREATE], resources: [leaderworkersets]}]
  admissionReviewVersions: [v1]
  sideEffects: None
- name: mpod.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
  admissionReviewVersions: [v1]
  sideEffects: None
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: validating-webhook-configuration}
webhooks:
- name: vleaderworkerset.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /validate-lws}}
  admissionReviewVersions: [v1]
  sideEffects: None
"""
MUTATING_PATCH = """
- op: replace
  path: /webhooks/1
  value:
    name: mpod.kb.io
    clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
    objectSelector: {matchExpressions: [{key: leaderworkerset.sigs.k8s.io/name, operator: Exists}]}
    admissionReviewVersions: [v1]
    sideEffects: None
"""


@pytest.fixture
def webhook_dir(tmp_path: Path) -> Path:
    (tmp_path / "manifests.yaml").write_text(WEBHOOK_MANIFESTS)
    (tmp_path / "mutating-patch.yaml").write_text(MUTATING_PATCH)
    return tmp_path


def test_webhooks_point_at_loopback_with_ca_and_keep_pod_selector(webhook_dir: Path) -> None:
    docs = manifests.lws_webhook_configurations(webhook_dir, 9443, b"PEM")
    by_kind = {d["kind"]: d for d in docs}
    mut = by_kind["MutatingWebhookConfiguration"]
    assert mut["metadata"]["name"] == "lws-mutating-webhook-configuration"
    for wh in mut["webhooks"] + by_kind["ValidatingWebhookConfiguration"]["webhooks"]:
        assert "service" not in wh["clientConfig"]
        assert wh["clientConfig"]["url"].startswith("https://127.0.0.1:9443/")
        assert base64.b64decode(wh["clientConfig"]["caBundle"]) == b"PEM"
    pod_hook = next(w for w in mut["webhooks"] if w["name"] == "mpod.kb.io")
    # Without this selector every pod create in the cluster would go through LWS (failurePolicy Fail).
    assert pod_hook["objectSelector"]["matchExpressions"][0]["key"] == "leaderworkerset.sigs.k8s.io/name"
    assert pod_hook["clientConfig"]["url"].endswith("/mutate--v1-pod")


def test_unsupported_patch_op_is_refused(webhook_dir: Path) -> None:
    (webhook_dir / "mutating-patch.yaml").write_text("- {op: add, path: /webhooks/0, value: {}}\n")
    with pytest.raises(ValueError, match="unsupported patch op"):
        manifests.lws_webhook_configurations(webhook_dir, 9443, b"PEM")


def test_kwok_config_uses_loopback_cidr_and_carries_stages(tmp_path: Path) -> None:
    stage = tmp_path / "pod-ready.yaml"
    stage.write_text("apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Stage\nmetadata: {name: pod-ready}\n")
    docs = list(yaml.safe_load_all(manifests.kwok_config([stage])))
    assert docs[0]["kind"] == "KwokConfiguration"
    cidr = ipaddress.ip_network(docs[0]["options"]["cidr"])
    assert cidr.subnet_of(ipaddress.ip_network("127.0.0.0/8"))  # never kwok's private default
    assert docs[1]["metadata"]["name"] == "pod-ready"


def test_lws_config_binds_loopback_only(tmp_path: Path) -> None:
    cfg = yaml.safe_load(manifests.lws_config(9443, 8081, tmp_path))
    assert cfg["webhook"]["host"] == "127.0.0.1"
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:8081"
    assert cfg["metrics"]["bindAddress"] == "0"
    assert cfg["leaderElection"]["leaderElect"] is False
    assert cfg["internalCertManagement"]["enable"] is False


def test_node_advertises_gpus_and_is_selected_by_kwok() -> None:
    n = manifests.node("kwok-node-0", 4)
    assert n["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert n["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert "taints" not in n["spec"]


def test_pki_serving_certs_chain_to_the_ca_with_loopback_sans(tmp_path: Path) -> None:
    paths = pki.PkiPaths(tmp_path)
    token = pki.generate(paths)
    assert len(token) == 32
    assert paths.tokens_csv.read_text().strip().endswith(",admin,admin,system:masters")
    ca = x509.load_pem_x509_certificate(paths.ca_crt.read_bytes())
    for crt in (paths.apiserver_crt, paths.webhook_dir / "tls.crt"):
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        assert cert.issuer == ca.subject
        ca.public_key().verify(  # type: ignore[union-attr]
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert oct(paths.ca_key.stat().st_mode & 0o777) == "0o600"


def test_kwok_pod_delete_stage_keeps_a_termination_window(tmp_path: Path) -> None:
    stage = tmp_path / "pod-delete.yaml"
    stage.write_text(
        "apiVersion: kwok.x-k8s.io/v1alpha1\nkind: Stage\nmetadata: {name: pod-delete}\n"
        "spec: {resourceRef: {apiGroup: v1, kind: Pod}, next: {delete: true}}\n"
    )
    docs = list(yaml.safe_load_all(manifests.kwok_config([stage])))
    assert docs[1]["spec"]["delay"]["durationMilliseconds"] == manifests.POD_TERMINATION_MS > 0
    assert docs[1]["spec"]["next"] == {"delete": True}


def test_default_and_pytest_clusters_get_different_pod_cidrs() -> None:
    assert manifests.pod_cidr_for("default") == "127.1.0.0/16"
    assert manifests.pod_cidr_for("pytest") == "127.2.0.0/16"


def test_every_pod_cidr_is_loopback_and_never_holds_127_0_0_1() -> None:
    loopback = ipaddress.ip_network("127.0.0.0/8")
    names = ["default", "pytest", *(f"c{i}" for i in range(2000))]
    for name in names:
        net = ipaddress.ip_network(manifests.pod_cidr_for(name))
        assert net.subnet_of(loopback) and net.prefixlen == 16, name
        assert ipaddress.ip_address("127.0.0.1") not in net, name
        assert 1 <= net.network_address.packed[1] <= 250, name


def test_service_ips_are_loopback_apart_from_every_pod_range_and_a_san_of_the_apiserver(
    tmp_path: Path,
) -> None:
    services = ipaddress.ip_network(manifests.SERVICE_CIDR)
    assert services.subnet_of(ipaddress.ip_network("127.0.0.0/8"))
    taken = [manifests.pod_cidr_for("default"), manifests.pod_cidr_for("pytest")]
    while len(taken) < manifests.LAST_POD_OCTET:  # every range a cluster can get
        taken.append(manifests.pod_cidr_for("c", taken))
    assert not any(ipaddress.ip_network(cidr).overlaps(services) for cidr in taken)
    pki.generate(pki.PkiPaths(tmp_path))
    cert = x509.load_pem_x509_certificate(pki.PkiPaths(tmp_path).apiserver_crt.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert next(services.hosts()) in sans.get_values_for_type(x509.IPAddress)


def test_a_pod_cidr_held_by_another_cluster_is_never_chosen() -> None:
    for name in ("default", "pytest", "demo", "bench"):
        first = manifests.pod_cidr_for(name)
        second = manifests.pod_cidr_for(name, [first])
        assert second != first
        assert manifests.pod_cidr_for(name, [first, second]) not in (first, second)
    taken = [f"127.{o}.0.0/16" for o in range(1, 250)]
    assert manifests.pod_cidr_for("x", taken) == "127.250.0.0/16"
    with pytest.raises(RuntimeError, match="no free loopback"):
        manifests.pod_cidr_for("x", [*taken, "127.250.0.0/16"])


def test_names_that_used_to_collide_now_get_distinct_ranges() -> None:
    # With one hash per name, two of these clusters shared a range; taken ranges are now skipped.
    chosen: list[str] = []
    for i in range(60):
        chosen.append(manifests.pod_cidr_for(f"n{i}", chosen))
    assert len(set(chosen)) == len(chosen)
