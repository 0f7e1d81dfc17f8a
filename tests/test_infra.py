"""KubeRay manifests validate against the v1.7.0 CRD schemas and match their spec; the Dockerfile's pins match."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.cli import main
from jobs.cluster import ClusterSpec, render_all, to_yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}


@pytest.fixture(scope="module")
def schemas(fixtures_dir):
    crd_dir = fixtures_dir / "kuberay-crds"
    out = {}
    for kind, file in CRDS.items():
        crd = yaml.safe_load((crd_dir / file).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert version["served"]
        out[kind] = version["schema"]["openAPIV3Schema"]
    return out


def committed_manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "infra" / "manifests").glob("*.yaml"))}


def test_committed_manifests_are_the_rendering_of_cluster_yaml():
    spec = ClusterSpec.model_validate(yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text()))
    rendered = render_all(spec, ROOT)
    assert set(rendered) == set(committed_manifests())
    for name, manifest in rendered.items():
        assert (ROOT / "infra" / "manifests" / name).read_text() == to_yaml(manifest), f"{name} drifted: re-render"


@pytest.mark.parametrize("name", sorted(committed_manifests()))
def test_manifest_validates_against_the_kuberay_crd(schemas, name):
    manifest = committed_manifests()[name]
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, schemas[manifest["kind"]])


def test_schema_validation_catches_a_bad_field(schemas):
    manifest = committed_manifests()["rayjob-generate.yaml"]
    manifest["spec"]["backoffLimit"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="backoffLimit|'two'"):
        jsonschema.validate(manifest, schemas["RayJob"])


def test_rayjob_resumes_on_object_storage_and_cleans_up():
    job = committed_manifests()["rayjob-generate.yaml"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert re.search(r"--out s3://", job["entrypoint"])
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["minReplicas"] <= workers["maxReplicas"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_rayservice_embeds_the_serve_config():
    service = committed_manifests()["rayservice.yaml"]["spec"]
    assert yaml.safe_load(service["serveConfigV2"]) == yaml.safe_load((ROOT / "infra" / "serve_config.yaml").read_text())
    assert service["upgradeStrategy"]["type"] == "NewCluster"


def test_render_command_with_overrides(tmp_path, schemas):
    assert main(["infra", "render", "--config", str(ROOT / "infra" / "cluster.yaml"), "--root", str(ROOT),
                 "--out", str(tmp_path), "--max-workers", "32", "--image", "registry.local/maskray:dev"]) == 0
    cluster = yaml.safe_load((tmp_path / "raycluster.yaml").read_text())
    jsonschema.validate(cluster, schemas["RayCluster"])
    assert cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 32
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/maskray:dev"


def test_dockerfile_pins_agree_with_pyproject():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    pins = {re.split(r"[=\[]", dep)[0]: dep.split("==")[1] for dep in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if "==" in dep}
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.MULTILINE))
    assert args["RAY_VERSION"] == pins["ray"] == ClusterSpec().ray_version
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert "pip install" in dockerfile and "HF_HOME" in dockerfile and "COPY" in dockerfile
    assert ".git" in (ROOT / ".dockerignore").read_text()


def dockerfile_instructions(build_args: dict[str, str]) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of infra/Dockerfile with ``${NAME}`` expanded as ``docker build --build-arg``
    does: an ARG declared before FROM is seen by FROM only, and below FROM only by a re-declared ARG."""
    text = re.sub(r"\\\n", "", (ROOT / "infra" / "Dockerfile").read_text())
    before_from, stage, instructions = {}, None, []
    for line in (line.strip() for line in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "ARG":
            name, _, default = rest.partition("=")
            inherited = before_from.get(name, "") if stage is not None else ""
            (before_from if stage is None else stage)[name] = build_args.get(name, default or inherited)
            continue
        scope = before_from if word == "FROM" else stage
        instructions.append((word, re.sub(r"\$\{(\w+)\}", lambda match, scope=scope: scope.get(match[1], ""), rest)))
        if word == "FROM":
            stage = {}
    return instructions


@pytest.mark.parametrize("build_args, tag", [({}, "cu128"), ({"CUDA_TAG": "cu121"}, "cu121")])
def test_dockerfile_installs_torch_built_for_its_cuda_tag(build_args, tag):
    instructions = dockerfile_instructions(build_args)
    (base,) = [text for word, text in instructions if word == "FROM"]
    assert base.endswith(f"-{tag}"), base
    (torch_install,) = [text for word, text in instructions if word == "RUN" and "torch==" in text]
    assert f'--index-url "https://download.pytorch.org/whl/{tag}"' in torch_install, torch_install
    assert "torchvision==" in torch_install
    (check,) = [text for word, text in instructions if word == "RUN" and "torch.version.cuda" in text]
    assert f"== '{tag}'" in check and check.index("pip install --no-cache-dir .") < check.index("torch.version.cuda")
