"""The Kubernetes manifests (deploy/kubernetes): validated offline against Kubernetes 1.30's API
schemas (kubernetes-validate) and against what a GPU worker needs. No cluster runs them here."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from vggish_pipeline.core.message import QUEUE

K8S_VERSION = "1.30.0"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def manifests(worker: Path = DEPLOY / "worker.yaml") -> list[dict]:
    """The set applied together: a worker Deployment (the shared-volume one, or bucket/'s) and the rest of DEPLOY."""
    paths = [worker, *(p for p in sorted(DEPLOY.glob("*.yaml")) if p.name != "worker.yaml")]
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def problems(docs: list[dict]) -> list[str]:
    """What is wrong with a set of manifests: the API schema's errors for built-in kinds, and the
    rules a vggish worker Deployment and its KEDA ScaledObject must keep."""
    import kubernetes_validate

    found = []
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema offline; the rules below check it
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            found.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        if pod.get("terminationGracePeriodSeconds", 30) < 600:
            found.append(f"{name}: terminationGracePeriodSeconds under 600 s cuts a warm stop short")
        for c in pod["containers"]:
            resources = c.get("resources", {})
            limits, requests = resources.get("limits", {}), resources.get("requests", {})
            if "nvidia.com/gpu" not in limits:
                found.append(f"{name}/{c['name']}: nvidia.com/gpu must be in limits (an extended resource is not requested alone)")
            elif "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != limits["nvidia.com/gpu"]:
                found.append(f"{name}/{c['name']}: nvidia.com/gpu's request must equal its limit")
            if c.get("readinessProbe", {}).get("exec", {}).get("command") != ["worker", "ping"]:
                found.append(f"{name}/{c['name']}: readiness must come from `worker ping`")
            env = {e["name"]: e for e in c.get("env", [])}
            if "VGGISH_BROKER_URL" in env and ":" in env["VGGISH_BROKER_URL"].get("value", "").split("@")[0].split("//")[-1]:
                found.append(f"{name}/{c['name']}: the broker password belongs in a Secret, not in the URL")
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if key in env and "value" in env[key]:
                    found.append(f"{name}/{c['name']}: {key} belongs in a Secret, not in the manifest")
            mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
            for root in re.split(r":(?!//)", env.get("VGGISH_DATA_ROOTS", {}).get("value", "")):  # as settings splits it
                if root.startswith("/") and not any(root == m or root.startswith(m + "/") for m in mounted):
                    found.append(f"{name}/{c['name']}: data root {root} is on no volume the pod mounts")
    for s in (d for d in docs if d["kind"] == "ScaledObject"):
        spec = s["spec"]
        if spec["scaleTargetRef"]["name"] not in deployments:
            found.append(f"ScaledObject/{s['metadata']['name']}: scales {spec['scaleTargetRef']['name']}, which is not a Deployment here")
        if spec.get("minReplicaCount", 1) != 0:
            found.append(f"ScaledObject/{s['metadata']['name']}: minReplicaCount must be 0 (no GPU held while nothing is queued)")
        for t in spec["triggers"]:
            if t["type"] == "redis" and (t["metadata"].get("listName") != QUEUE or "activationListLength" not in t["metadata"]):
                found.append(f"ScaledObject/{s['metadata']['name']}: the redis trigger must watch list {QUEUE!r} with an activationListLength")
            if t["type"] == "prometheus" and "vggish_backlog_chunks" not in t["metadata"].get("query", ""):
                found.append(f"ScaledObject/{s['metadata']['name']}: the prometheus trigger must query vggish_backlog_chunks")
    return found


def test_the_manifests_validate_against_the_api_and_the_workers_needs():
    for worker in (DEPLOY / "worker.yaml", DEPLOY / "bucket" / "worker.yaml"):
        docs = manifests(worker)
        assert {d["kind"] for d in docs} == {"Deployment", "ScaledObject", "TriggerAuthentication"}
        assert problems(docs) == [], worker
    bucket = next(d for d in manifests(DEPLOY / "bucket" / "worker.yaml") if d["kind"] == "Deployment")
    pod = bucket["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["VGGISH_DATA_ROOTS"]["value"].startswith("s3://") and env["VGGISH_CHECKPOINT"]["value"].startswith("s3://")
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])  # nothing but the broker and the bucket


def test_a_gpu_in_requests_only_or_a_schema_error_is_caught_by_the_same_check():
    docs = manifests()
    gpu_in_requests = copy.deepcopy(docs)
    worker = next(d for d in gpu_in_requests if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    worker["resources"]["requests"]["nvidia.com/gpu"] = worker["resources"]["limits"].pop("nvidia.com/gpu")
    assert any("nvidia.com/gpu must be in limits" in p for p in problems(gpu_in_requests))

    bad_schema = copy.deepcopy(docs)
    next(d for d in bad_schema if d["kind"] == "Deployment")["spec"]["replicas"] = "two"
    assert any(p.startswith("Deployment/vggish-worker:") for p in problems(bad_schema))

    literal = manifests(DEPLOY / "bucket" / "worker.yaml")
    env = next(d for d in literal if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "AWS_SECRET_ACCESS_KEY").update(value="written-into-the-manifest")
    assert any("AWS_SECRET_ACCESS_KEY belongs in a Secret" in p for p in problems(literal))

    no_zero = copy.deepcopy(docs)
    next(d for d in no_zero if d["kind"] == "ScaledObject")["spec"]["minReplicaCount"] = 1
    assert any("minReplicaCount must be 0" in p for p in problems(no_zero))
