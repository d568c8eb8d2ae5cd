"""Serve configuration: YAML → ServeConfig, Ray Serve deployment options, API key sources."""

from __future__ import annotations

import pytest

from sp2dpo.config import load_config
from sp2dpo.serve import ModelConfig, ServeConfig, resolve_api_key

YAML = """
serve:
  port: 9001
  max_request_bytes: 65536
  models:
    - id: base
    - id: sp2dpo
      path: runs/sp2dpo/final
      engine: vllm
      num_gpus: 1
      dtype: bfloat16
      autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}
    - id: dpo-global
      path: runs/global/final
      num_replicas: 2
"""


def test_yaml_section_with_models_and_autoscaling(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(YAML)
    cfg = load_config(ServeConfig, path, ["port=9002"], section="serve")
    assert [m.id for m in cfg.models] == ["base", "sp2dpo", "dpo-global"]
    assert cfg.models[0].path is None and cfg.models[0].engine == "transformers"
    assert cfg.models[1].autoscaling.max_replicas == 4 and cfg.port == 9002
    assert cfg.api_key_env == "SP2DPO_API_KEY"


def test_no_models_means_bundled_base_and_bad_configs_are_refused():
    assert [(m.id, m.path) for m in ServeConfig().models] == [("base", None)]
    with pytest.raises(ValueError, match="unique"):
        ServeConfig(models=[ModelConfig(id="a"), ModelConfig(id="a")])
    with pytest.raises(ValueError, match="min_replicas"):
        ModelConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError):
        ModelConfig(id="bad id with spaces")
    with pytest.raises(ValueError):
        ModelConfig(engine="tensorrt")
    with pytest.raises(ValueError):
        ServeConfig(prot=8000)  # typo in a key


def test_deployment_options_reach_ray_serve(tmp_path):
    from sp2dpo.serve.app import ModelDeployment, deployment_options

    path = tmp_path / "serve.yaml"
    path.write_text(YAML)
    cfg = load_config(ServeConfig, path, section="serve")
    scaled = ModelDeployment.options(**deployment_options(cfg.models[1]))
    auto = scaled._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 8)
    assert scaled.ray_actor_options["num_gpus"] == 1
    fixed = ModelDeployment.options(**deployment_options(cfg.models[2]))
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    assert {scaled.name, fixed.name} == {"model-sp2dpo", "model-dpo-global"}


def test_api_key_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SP2DPO_API_KEY", raising=False)
    assert resolve_api_key(ServeConfig()) is None
    key_file = tmp_path / "key"
    key_file.write_text("  from-file \n")
    assert resolve_api_key(ServeConfig(api_key_file=str(key_file))) == "from-file"
    monkeypatch.setenv("SP2DPO_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig(api_key_file=str(key_file))) == "from-env"
    monkeypatch.delenv("SP2DPO_API_KEY")
    with pytest.raises(FileNotFoundError):
        resolve_api_key(ServeConfig(api_key_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_api_key(ServeConfig(api_key_file=str(tmp_path / "empty")))


def test_missing_model_dir_is_a_clear_error_before_ray_starts(tmp_path):
    from sp2dpo.serve.server import check_model_paths

    with pytest.raises(FileNotFoundError, match="config.json"):
        check_model_paths(ServeConfig(models=[ModelConfig(id="x", path=str(tmp_path / "nope"))]))
