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


def test_kubernetes_manifest_fits_together_and_hashes_on_the_sequence_header():
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "rmt-triton.yaml").read_text())}
    deployment, service, ingress = docs["Deployment"], docs["Service"], docs["Ingress"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    named = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= named
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    hash_by = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
    assert hash_by == HEADER_VARIABLE
    assert service["spec"]["sessionAffinity"] == "ClientIP"
