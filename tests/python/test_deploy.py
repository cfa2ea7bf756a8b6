"""The deployment files agree with the gateway: the Kubernetes manifests parse and probe
the real health endpoints on the real ports, drain before SIGTERM, and keep the
registry on a shared volume; the Dockerfile builds with the same script as
scripts/serve.sh and checks readiness on the same endpoint."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import REPO_ROOT

KUBE = REPO_ROOT / "deploy" / "kubernetes"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def manifests() -> dict[str, dict]:
    """The first manifest of each kind (by file name), as in hpa.yaml and deployment.yaml."""
    docs = {}
    for d in all_manifests():
        docs.setdefault(d["kind"], d)
    return docs


def all_manifests() -> list[dict]:
    return [d for f in sorted(KUBE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]


def test_an_hpa_scales_on_queue_depth_through_the_prometheus_adapter() -> None:
    docs = all_manifests()
    hpas = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"modelgate", "modelgate-queue"}
    q = hpas["modelgate-queue"]["spec"]
    assert q["scaleTargetRef"]["name"] == "modelgate"
    (m,) = q["metrics"]
    assert m["type"] == "Pods"
    assert m["pods"]["metric"]["name"] == "modelgate_queue_depth"
    assert float(m["pods"]["target"]["averageValue"]) > 0
    adapter = next(d for d in docs if d["kind"] == "ConfigMap"
                   and d["metadata"]["name"] == "modelgate-prometheus-adapter")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    # The adapter's series is the gauge modelgate exports, under the name the HPA asks for.
    assert "modelgate_queue_depth" in rule["seriesQuery"]
    assert rule["name"]["as"] == "modelgate_queue_depth"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    metrics_rs = (REPO_ROOT / "src" / "metrics.rs").read_text()
    assert 'QUEUE_DEPTH: &str = "modelgate_queue_depth"' in metrics_rs


def test_manifests_cover_a_production_deployment() -> None:
    docs = manifests()
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "PersistentVolumeClaim", "ConfigMap"):
        assert kind in docs, kind
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    # The grace period covers the preStop sleep plus modelgate's drain (30 s).
    assert pod["terminationGracePeriodSeconds"] >= 10 + 30
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["registry"] == "/models"
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]} == PORTS
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "modelgate"
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1


def test_dockerfile_matches_the_scripts() -> None:
    docker = (REPO_ROOT / "Dockerfile").read_text()
    build = re.search(r"^RUN (?:MODELGATE_BUILD_PROFILE=(\w+) )?scripts/build\.sh", docker, re.M)
    assert build, "the image builds with scripts/build.sh"
    profile = build.group(1) or "release"
    # The binary copied is the one that profile builds, and Cargo.toml defines it.
    assert f"COPY --from=build /src/target/{profile}/modelgate " in docker
    assert profile == "release" or f"[profile.{profile}]" in (REPO_ROOT / "Cargo.toml").read_text()
    assert "scripts/build.sh" in (REPO_ROOT / "scripts" / "serve.sh").read_text()
    assert "EXPOSE 8000 8001 8002" in docker
    assert "/v2/health/ready" in docker.split("HEALTHCHECK", 1)[1]
    assert "USER modelgate" in docker and "VOLUME /models" in docker
    assert "STOPSIGNAL SIGTERM" in docker
