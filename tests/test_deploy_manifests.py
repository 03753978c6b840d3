"""deploy/: the nginx config and the Kubernetes manifest route by the header the client
sends, and the manifest's names fit together (schema-checked separately with
kubernetes-validate --strict; see docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmt_deploy.serving.client import SEQUENCE_HEADER

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HEADER_VARIABLE = "$http_" + SEQUENCE_HEADER.lower().replace("-", "_")  # nginx's name for it


def test_nginx_hashes_on_the_clients_sequence_header():
    config = (DEPLOY / "nginx" / "rmt-triton.conf").read_text()
    assert f"hash {HEADER_VARIABLE} consistent;" in config


def _manifest() -> dict[tuple[str, str], dict]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "rmt-triton.yaml").read_text())}


def test_kubernetes_manifest_fits_together_and_hashes_on_the_sequence_header():
    docs = _manifest()
    deployment, service = docs["Deployment", "rmt-triton"], docs["Service", "rmt-triton"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= named
    for name, port in (("rmt-triton", "http"), ("rmt-triton-grpc", "grpc")):
        ingress = docs["Ingress", name]
        for rule in ingress["spec"]["rules"]:
            backend = rule["http"]["paths"][0]["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] == port
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == HEADER_VARIABLE
    assert service["spec"]["sessionAffinity"] == "ClientIP"


def test_the_grpc_ingress_is_tls_for_its_hosts_with_a_named_secret():
    """ingress-nginx proxies gRPC only over TLS: the gRPC Ingress names its certificate's
    Secret and serves TLS for every host it routes."""
    ingress = _manifest()["Ingress", "rmt-triton-grpc"]
    assert ingress["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"]
    assert {rule["host"] for rule in ingress["spec"]["rules"]} <= set(tls["hosts"])
