"""Safe defaults of the serving app: no open endpoint beyond loopback, nothing descriptive without
the key, and no request larger than a replica's limits.

The refusals run before Ray starts (plain Python, the CLI, `jobs/serve.py`); the app checks run a
real Ray Serve app with the tiny model on 127.0.0.1 and the real `openai` client.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from s3_server import free_port
from typer.testing import CliRunner

from sp2dpo.config import load_config, packaged_config_path
from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server
from sp2dpo.serve.server import check_exposure, is_loopback

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "safety-key-5f1c"
MAX_PROMPTS = 8
MAX_ONGOING = 2


# ----------------------------------------------------------------------------- no open endpoint


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.53", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.7", False), ("192.168.1.5", False),
    ("my-host.internal", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_without_key_is_refused_with_the_fix_in_the_message():
    cfg = ServeConfig(host="0.0.0.0")
    with pytest.raises(ValueError) as info:
        check_exposure(cfg, None)
    message = str(info.value)
    assert "0.0.0.0" in message and "$SP2DPO_API_KEY" in message and "--insecure-no-auth" in message
    assert "insecure_no_auth" in message and "127.0.0.1" in message
    check_exposure(cfg, "a-key")                     # a key: fine
    check_exposure(ServeConfig(), None)              # loopback without a key: fine (tests, the demo)


def test_insecure_no_auth_serves_open_but_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="sp2dpo.serve.server"):
        check_exposure(ServeConfig(host="0.0.0.0", port=8123, insecure_no_auth=True), None)
    assert any("no API key" in r.getMessage() and "0.0.0.0:8123" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sp2dpo.serve.server"):
        check_exposure(ServeConfig(host="0.0.0.0", insecure_no_auth=True), "a-key")
    assert not caplog.records  # with a key there is nothing to warn about


def test_start_server_refuses_before_ray_starts(monkeypatch):
    import ray

    monkeypatch.delenv("SP2DPO_API_KEY", raising=False)
    was_running = ray.is_initialized()
    with pytest.raises(ValueError, match="--insecure-no-auth"):
        start_server(ServeConfig(host="0.0.0.0", port=free_port()))
    assert ray.is_initialized() == was_running


def test_cli_refuses_all_interfaces_without_a_key(monkeypatch):
    from sp2dpo.cli import app

    monkeypatch.delenv("SP2DPO_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", str(free_port())])
    assert result.exit_code == 2, result.output
    assert "--insecure-no-auth" in result.output and "SP2DPO_API_KEY" in result.output


def test_ray_job_entrypoint_refuses_all_interfaces_without_a_key():
    """jobs/serve.py as `ray job submit` runs it: the refusal comes before it reaches the cluster."""
    env = {k: v for k, v in os.environ.items() if k != "SP2DPO_API_KEY"}
    env["RAY_ADDRESS"] = "127.0.0.1:1"  # nothing listens there: reaching Ray would fail differently
    proc = subprocess.run([sys.executable, "jobs/serve.py", "--host", "0.0.0.0"], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--insecure-no-auth" in proc.stderr and "no API key is set" in proc.stderr


@pytest.mark.parametrize("name", ["demo", "ultrafeedback-mini", "ultrafeedback-8b"])
def test_packaged_configs_never_serve_open_beyond_loopback(name):
    """Each recipe's serve section either binds loopback or is refused without a key."""
    cfg = load_config(ServeConfig, str(packaged_config_path(name)), section="serve")
    assert not cfg.insecure_no_auth
    if is_loopback(cfg.host):
        check_exposure(cfg, None)
    else:
        with pytest.raises(ValueError):
            check_exposure(cfg, None)
    exposed = load_config(ServeConfig, str(packaged_config_path(name)), ["host=0.0.0.0"], section="serve")
    with pytest.raises(ValueError, match="insecure_no_auth"):
        check_exposure(exposed, None)


def test_rayservice_builder_takes_no_insecure_switch():
    sys.path.insert(0, str(ROOT / "cluster"))
    try:
        import sp2dpo_rayservice
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="insecure_no_auth"):
        sp2dpo_rayservice.build({"insecure_no_auth": True, "models": [{"id": "m"}]})


# ----------------------------------------------------------------------------- the live app


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir):
    cfg = ServeConfig(port=free_port(), max_prompts_per_request=MAX_PROMPTS, models=[
        ModelConfig(id="tiny", path=str(tiny_model_dir), num_cpus=0.5, max_model_len=256,
                    max_ongoing_requests=MAX_ONGOING)])
    url = start_server(cfg, api_key=API_KEY)
    yield url
    stop_server()


def _replica_load() -> dict[str, int]:
    from ray import serve

    return serve.get_deployment_handle("model-tiny", app_name="sp2dpo").load.remote().result()


def test_health_is_open_but_says_nothing_about_the_models(server):
    root = server.removesuffix("/v1")
    health = httpx.get(root + "/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert "tiny" not in health.text
    assert httpx.get(server + "/models", timeout=30).status_code == 401
    listed = httpx.get(server + "/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert [m["id"] for m in listed.json()["data"]] == ["tiny"]


def test_too_many_prompts_is_a_400_naming_the_setting(server):
    response = httpx.post(server + "/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny", "prompt": ["x"] * (MAX_PROMPTS + 1), "max_tokens": 1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "max_prompts_per_request" in error["message"]
    assert str(MAX_PROMPTS) in error["message"]


def test_each_prompt_counts_against_the_replica_limit(server):
    """Eight prompts in one request on a replica that holds two requests: never more than two at once,
    and the answer is what eight single-prompt requests give."""
    client = openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=300)
    prompts = [f"Count to {i}:" for i in range(MAX_PROMPTS)]
    before = _replica_load()["prompts_peak"]
    batched = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0)
    peak = _replica_load()["prompts_peak"]
    assert max(before, 1) <= peak <= MAX_ONGOING
    assert [c.index for c in batched.choices] == list(range(MAX_PROMPTS))
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0) for p in prompts]
    assert [c.text for c in batched.choices] == [a.choices[0].text for a in alone]
    assert batched.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batched.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    # A refusal of one prompt refuses the request, as it did before the prompts were split.
    bad = httpx.post(server + "/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": "tiny", "prompt": ["hi", "word " * 400], "max_tokens": 4})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "context_length_exceeded"
    assert _replica_load()["prompts_now"] == 0
