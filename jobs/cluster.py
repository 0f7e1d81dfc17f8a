"""KubeRay ``ray.io/v1`` manifests for maskray, rendered from one typed cluster description.

One :class:`ClusterSpec` (image, head, GPU worker group, volumes, secrets) renders the RayCluster, the
RayJobs for ``maskray generate`` and ``maskray evaluate``, and the RayService of the Serve app, so the four
manifests never drift apart. ``infra/cluster.yaml`` holds the defaults we ship and ``infra/manifests/`` their
rendering (a test checks both agree and validate against the KubeRay v1.7.0 CRD schemas).

Choices for scarce GPUs: the head runs no work (``num-cpus: 0``); the worker group autoscales between
``min_workers`` and ``max_workers``, and the head pod tells the jobs so (``MASKRAY_AUTOSCALING_CONFIG``), so
their actor pools start with zero GPU nodes and grow with the group; RayJobs retry on a fresh cluster (``backoffLimit``) and resume from the
completion records under their ``--out`` on object storage; the RayService upgrades with ``NewCluster`` only
for cluster changes (serve-config edits apply in place) and deletes the old cluster after 60 s.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.capacity import ENV as CAPACITY_ENV


class ClusterSpec(BaseModel):
    """What the cluster looks like: image, head, GPU workers, volumes and credentials."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("maskray", description="Name prefix of every resource.")
    namespace: str | None = Field(None, description="Kubernetes namespace (unset: the current one).")
    image: str = Field("ghcr.io/your-org/maskray:0.1.0-cu128", description="Container image built from "
                       "infra/Dockerfile (the project installed, no weights inside).")
    ray_version: str = Field("2.60.0", description="Ray version of the image (must match the pinned ray).")
    head_cpus: int = Field(4, ge=1, description="Head pod CPUs (the head runs no Ray work: num-cpus 0).")
    head_memory: str = Field("16Gi", description="Head pod memory.")
    worker_gpus: int = Field(1, ge=0, description="GPUs per worker pod (nvidia.com/gpu).")
    worker_cpus: int = Field(8, ge=1, description="CPUs per worker pod.")
    worker_memory: str = Field("64Gi", description="Memory per worker pod.")
    min_workers: int = Field(0, ge=0, description="Autoscaling lower bound of the GPU worker group.")
    max_workers: int = Field(8, ge=1, description="Autoscaling upper bound of the GPU worker group.")
    gpu_toleration: bool = Field(True, description="Tolerate the nvidia.com/gpu NoSchedule taint on workers.")
    cache_volume_claim: str | None = Field("maskray-model-cache", description="PersistentVolumeClaim mounted "
                                           "at /models (HF_HOME and MASKRAY_CACHE) so weights download once; "
                                           "unset: an emptyDir per pod.")
    credentials_secret: str | None = Field("maskray-object-store", description="Secret whose keys become "
                                           "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                           "HF_TOKEN, MASKRAY_API_KEY ...); unset: none.")
    job_backoff_limit: int = Field(2, ge=0, description="RayJob retries; each retry is a new cluster that "
                                   "resumes from the output's completion records.")
    job_deadline_seconds: int = Field(86400, ge=60, description="RayJob activeDeadlineSeconds.")
    job_ttl_seconds: int = Field(3600, ge=0, description="Seconds a finished RayJob's cluster is kept.")
    generate_args: list[str] = Field(
        default_factory=lambda: ["--prompts", "s3://your-bucket/prompts/", "--out", "s3://your-bucket/runs/run1",
                                 "--model", "MeissonFlow/Meissonic", "--variant", "fp16", "--dtype", "fp16",
                                 "--generator-gpus", "1", "--batch-size", "8", "--scorer", "hps-v2.1",
                                 "--scorer-gpus", "0.25"],
        description="Arguments of `maskray generate` in the generate RayJob.")
    evaluate_args: list[str] = Field(
        default_factory=lambda: ["--prompts", "s3://your-bucket/prompts/hpdv2/anime.json", "--prompts",
                                 "s3://your-bucket/prompts/hpdv2/photo.json", "--out", "s3://your-bucket/eval/run1",
                                 "--model", "MeissonFlow/Meissonic", "--variant", "fp16", "--dtype", "fp16",
                                 "--candidates", "noise,differential,zsampling", "--generator-gpus", "1",
                                 "--batch-size", "8", "--scorer", "hps-v2.1", "--scorer-gpus", "0.25"],
        description="Arguments of `maskray evaluate` in the evaluate RayJob.")
    serve_config: str = Field("infra/serve_config.yaml", description="Ray Serve config embedded as the "
                              "RayService's serveConfigV2.")


CACHE_ENV = [{"name": "HF_HOME", "value": "/models/hf"}, {"name": "MASKRAY_CACHE", "value": "/models/maskray"}]


def autoscaling_config(spec: ClusterSpec) -> dict[str, Any]:
    """The cluster's node types in Ray's autoscaler-config form, for ``MASKRAY_AUTOSCALING_CONFIG``.

    KubeRay's autoscaler does not publish its node groups to Ray's autoscaler state, so the jobs' drivers
    (on the head) read them from this environment variable to size their actor pools from what the worker
    group can grow to (``pipeline.capacity``). Resources as KubeRay derives them: ``num-cpus 0`` on the head,
    the container limits on the workers.
    """
    return {"head_node_type": "head",
            "available_node_types": {
                "head": {"resources": {"CPU": 0, "GPU": 0}, "max_workers": 0},
                "gpu": {"resources": {"CPU": spec.worker_cpus, "GPU": spec.worker_gpus},
                        "min_workers": spec.min_workers, "max_workers": spec.max_workers}}}


def _container(spec: ClusterSpec, name: str, cpus: int, memory: str, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    env = list(CACHE_ENV)
    if name == "ray-head":
        env.append({"name": CAPACITY_ENV, "value": json.dumps(autoscaling_config(spec), separators=(",", ":"))})
    container: dict[str, Any] = {
        "name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": env, "volumeMounts": [{"name": "model-cache", "mountPath": "/models"}],
    }
    if spec.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.credentials_secret, "optional": True}}]
    if name == "ray-head":
        container["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    return container


def _pod(spec: ClusterSpec, container: dict[str, Any], gpu: bool) -> dict[str, Any]:
    volume = ({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.cache_volume_claim}}
              if spec.cache_volume_claim else {"name": "model-cache", "emptyDir": {}})
    pod: dict[str, Any] = {"containers": [container], "volumes": [volume]}
    if gpu and spec.gpu_toleration:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": pod}


def cluster_spec(spec: ClusterSpec) -> dict[str, Any]:
    """The ``RayClusterSpec`` shared by the RayCluster, the RayJobs and the RayService."""
    return {
        "rayVersion": spec.ray_version,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(spec, _container(spec, "ray-head", spec.head_cpus, spec.head_memory, 0), gpu=False),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu",
            "replicas": spec.min_workers,
            "minReplicas": spec.min_workers,
            "maxReplicas": spec.max_workers,
            "rayStartParams": {},
            "template": _pod(spec, _container(spec, "ray-worker", spec.worker_cpus, spec.worker_memory,
                                              spec.worker_gpus), gpu=spec.worker_gpus > 0),
        }],
    }


def _metadata(spec: ClusterSpec, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "maskray"}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def render_raycluster(spec: ClusterSpec) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(spec, spec.name),
            "spec": cluster_spec(spec)}


def render_rayjob(spec: ClusterSpec, command: str) -> dict[str, Any]:
    """A RayJob running ``maskray <command>`` on its own autoscaling cluster, deleted after it finishes."""
    args = {"generate": spec.generate_args, "evaluate": spec.evaluate_args}[command]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(spec, f"{spec.name}-{command}"),
        "spec": {
            "entrypoint": shlex.join(["maskray", command, *args]),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.job_ttl_seconds,
            "backoffLimit": spec.job_backoff_limit,
            "activeDeadlineSeconds": spec.job_deadline_seconds,
            "rayClusterSpec": cluster_spec(spec),
        },
    }


def render_rayservice(spec: ClusterSpec, root: Path) -> dict[str, Any]:
    """A RayService for the Serve app of ``serve_config``; cluster edits roll out on a new cluster.

    Every pod gets the app's API key from ``credentials_secret`` as a required variable, so a Secret without
    the key stops the pods from starting instead of serving without auth.
    """
    serve_config = (root / spec.serve_config).read_text()
    cluster = cluster_spec(spec.model_copy(update={"min_workers": max(1, spec.min_workers)}))
    key_names = api_key_env_names(yaml.safe_load(serve_config))
    if key_names and not spec.credentials_secret:
        raise ValueError(f"the serve config {spec.serve_config} needs an API key ({', '.join(key_names)}) but "
                         "credentials_secret is unset: name the Secret that holds it, or set allow_unauthenticated "
                         "in the app's args to serve without auth")
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            container["env"] = container["env"] + [
                {"name": name, "valueFrom": {"secretKeyRef": {"name": spec.credentials_secret, "key": name}}}
                for name in key_names]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _metadata(spec, f"{spec.name}-serve"),
        "spec": {
            "serveConfigV2": serve_config,
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterDeletionDelaySeconds": 60,
            "rayClusterConfig": cluster,
        },
    }


def api_key_env_names(serve_config: dict[str, Any]) -> list[str]:
    """The API-key variables (``api_key_env``) of the maskray apps in a Serve config that require a key."""
    from jobs.serve.config import ServeConfig

    names = []
    for application in serve_config.get("applications", []):
        if application.get("import_path") == "jobs.serve.app:build_app":
            config = ServeConfig.model_validate(application.get("args") or {})
            if not config.allow_unauthenticated and config.api_key_env not in names:
                names.append(config.api_key_env)
    return names


def render_all(spec: ClusterSpec, root: Path) -> dict[str, dict[str, Any]]:
    """File name -> manifest for every resource."""
    return {"raycluster.yaml": render_raycluster(spec), "rayjob-generate.yaml": render_rayjob(spec, "generate"),
            "rayjob-evaluate.yaml": render_rayjob(spec, "evaluate"), "rayservice.yaml": render_rayservice(spec, root)}


def to_yaml(manifest: dict[str, Any]) -> str:
    header = "# Rendered by `maskray infra render` from infra/cluster.yaml; edit that file, not this one.\n"
    return header + yaml.safe_dump(manifest, sort_keys=False, width=120)
