"""The cluster configs in cluster/: Ray's own validation for the launcher YAML, a JSON schema of the
KubeRay v1 CRD fields for the manifests, Ray's Serve/LLM/runtime_env models for what they embed."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
MANIFESTS = {kind: CLUSTER / "kuberay" / f"{kind.lower()}.yaml" for kind in ("RayCluster", "RayJob", "RayService")}
WORKDIR_PLACEHOLDER = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before it contacts the cloud provider."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _kuberay_schema() -> dict:
    schema = json.loads((CLUSTER / "kuberay" / "kuberay-v1.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _images(cluster_spec: dict) -> list[str]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


# ----------------------------------------------------------------------------- launcher YAML


def test_launcher_yaml_passes_ray_validation():
    config = _yaml(LAUNCHER)
    prepared = _ray_up_checks(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    gpu_groups = {name: t for name, t in types.items() if name != "head"}
    assert set(gpu_groups) == {"gpu_annotate", "gpu_train"}
    for name, node_type in gpu_groups.items():
        assert node_type["min_workers"] == 0, f"{name} must scale to zero"
        assert node_type["max_workers"] >= 1
    assert sum(t["max_workers"] for t in gpu_groups.values()) <= prepared["max_workers"]
    # The image's Ray is the Ray the package pins, or jobs fail on a version mismatch.
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert any('sp2dpo[gpu]' in cmd and "pip install" in cmd for cmd in prepared["setup_commands"])
    for remote, local in config["file_mounts"].items():
        assert (REPO / local).resolve() == REPO, "the repository root is what gets installed"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["available_node_types"]["gpu_train"].update(min_worker=0), "Additional properties"),
    (lambda c: c["available_node_types"]["gpu_annotate"]["resources"].update(GPU=0.5), "is not of type 'integer'"),
    (lambda c: c.update(idle_timeout_minute=5), "Additional properties"),
    (lambda c: c.update(head_node_type="cpu_head"), "head_node_type"),
])
def test_ray_validation_rejects_broken_launcher_yaml(mutate, message):
    config = _yaml(LAUNCHER)
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        _ray_up_checks(config)


# ----------------------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_matches_kuberay_schema(kind):
    doc = _yaml(MANIFESTS[kind])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    jsonschema.validate(doc, _kuberay_schema())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
    (lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(minReplica=0), "minReplica"),
    (lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(minReplicas=-1), "minimum"),
    (lambda d: _cluster_spec(d)["autoscalerOptions"].update(upscalingMode="Fast"), "Fast"),
    (lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"), "image"),
])
def test_schema_rejects_broken_manifests(mutate, message):
    schema = _kuberay_schema()
    for path in MANIFESTS.values():
        doc = _yaml(path)
        mutate(doc)
        with pytest.raises(jsonschema.ValidationError, match=message):
            jsonschema.validate(doc, schema)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_versions_and_autoscaling(kind):
    spec = _cluster_spec(_yaml(MANIFESTS[kind]))
    assert spec["rayVersion"] == ray.__version__
    for image in _images(spec):
        tag = image.rsplit(":", 1)[1]
        assert tag.startswith(f"{ray.__version__}-"), f"{image} does not match rayVersion {spec['rayVersion']}"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def _check_runtime_env(env: dict, needs_working_dir_zip: bool) -> None:
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own field validation (URIs, pip spec)
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert any(p.startswith(WORKDIR_PLACEHOLDER) for p in packages), "the runtime_env must install the package"
    if needs_working_dir_zip:
        assert env["working_dir"].endswith(".zip")


def test_rayjob_entrypoint_runtime_env_and_cluster():
    doc = _yaml(MANIFESTS["RayJob"])
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file(), argv
    config_path = REPO / argv[argv.index("--config") + 1]
    from sp2dpo.pipeline.config import PipelineConfig

    PipelineConfig.model_validate(_yaml(config_path))
    _check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), needs_working_dir_zip=True)
    # One cluster definition: the RayJob's is the RayCluster's.
    assert spec["rayClusterSpec"] == _yaml(MANIFESTS["RayCluster"])["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec.get("entrypointNumGpus", 0) == 0


def _serve_config() -> dict:
    return yaml.safe_load(_yaml(MANIFESTS["RayService"])["spec"]["serveConfigV2"])


def test_rayservice_serve_config_validates_with_ray_serve():
    import importlib.util

    from ray.serve.schema import ServeDeploySchema

    serve_config = _serve_config()
    ServeDeploySchema.model_validate(serve_config)
    for app in serve_config["applications"]:
        # Importing ray.serve.llm imports vLLM (about a minute here): find the builder in its source.
        module, _, attr = app["import_path"].partition(":")
        source = Path(importlib.util.find_spec(module).origin).read_text()
        assert re.search(rf"^def {attr}\(", source, re.MULTILINE), app["import_path"]
        _check_runtime_env(app["runtime_env"], needs_working_dir_zip=True)
        assert app["args"]["llm_configs"], "nothing to serve"


@pytest.mark.slow
def test_rayservice_llm_configs_validate_with_ray_serve_llm():
    from ray.serve.llm import LLMConfig, build_openai_app

    for app in _serve_config()["applications"]:
        assert app["import_path"] == f"{build_openai_app.__module__.split('.')[0]}.serve.llm:build_openai_app"
        for llm in app["args"]["llm_configs"]:
            cfg = LLMConfig.model_validate(llm)
            assert cfg.model_loading_config.model_id == "sp2dpo-student"
            with pytest.raises(ValueError, match="Extra inputs"):
                LLMConfig.model_validate({**llm, "acelerator_type": "H100"})


def test_job_runtime_env_file():
    _check_runtime_env(_yaml(CLUSTER / "runtime_env.yaml"), needs_working_dir_zip=False)


def test_cluster_recipe_validates_for_every_installed_stage():
    from sp2dpo.pipeline.config import PipelineConfig
    from sp2dpo.pipeline.runner import Stage, StageUnavailable, _section_config
    from sp2dpo.pipeline.stages import default_stages

    config = PipelineConfig.model_validate(_yaml(REPO / "sp2dpo" / "configs" / "ultrafeedback-8b.yaml"))
    assert config.controls == ["semantic", "global", "shuffled"] and "://" in config.run_dir
    checked = []
    for stage in default_stages(config):
        try:
            _section_config(stage, config)
        except StageUnavailable:
            continue  # that stage is not in this installation: nothing to validate against
        checked.append(stage.section)
    from sp2dpo.pipeline.stages import run_evaluate

    SERVE_CONFIG = "sp2dpo.serve.config:ServeConfig"

    try:  # the evaluate stages read the serve section too
        _section_config(Stage("serve", run_evaluate, "serve", SERVE_CONFIG), config)
        checked.append("serve")
    except StageUnavailable:
        pass
    assert {"data", "annotate", "schedule", "reference", "train", "evaluate"} <= set(checked), checked


def test_docs_commands_name_existing_files():
    docs = (REPO / "docs" / "cluster.md").read_text()
    for command in ("ray up cluster/ray-cluster.aws.yaml", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                    "kubectl apply -f cluster/kuberay/rayjob.yaml", "kubectl apply -f cluster/kuberay/rayservice.yaml",
                    "ray job submit"):
        assert command in docs, command
    for path in set(re.findall(r"\b(?:cluster|jobs)/[\w./-]+\.(?:yaml|py|json)", docs)):
        assert (REPO / path).is_file(), f"docs/cluster.md names {path}, which does not exist"
