"""Slow and GPU serving tests: the vLLM engine behind the same app, SmolLM2 under load, and the
CLI's blocking serve with a clean Ctrl-C shutdown.

The vLLM tests run real vLLM: vllm-cpu on CPU machines (marked slow) and vLLM on a CUDA GPU
(marked gpu). Both compare the served log-probs with a direct transformers forward pass.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest
from s3_server import free_port
from test_serve import reference_top5

from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server


def _vllm_app_checks(url: str, model_dir) -> None:
    client = openai.OpenAI(base_url=url, max_retries=0, timeout=600, api_key="none")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="base", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content

    judge = client.chat.completions.create(model="base", messages=messages, max_tokens=1, logprobs=True, top_logprobs=5)
    served = [(t.token, t.logprob) for t in judge.choices[0].logprobs.content[0].top_logprobs]
    tokens, values = reference_top5(model_dir, messages)
    assert [t for t, _ in served] == tokens
    for (_, lp), want in zip(served, values):
        assert math.isclose(lp, want, abs_tol=2e-2)  # vLLM's kernels differ slightly from eager torch

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=messages, max_tokens=10**9)
    cut = client.completions.create(model="base", prompt="The capital of France is", max_tokens=8, temperature=0,
                                    stop=["."])
    assert "." not in cut.choices[0].text


def _serve_vllm_and_check(model_dir, **model: object) -> None:
    """Serve one vLLM model as `base` and run the app checks against transformers on `model_dir`."""
    cfg = ServeConfig(port=free_port(), api_key_env="SP2DPO_TEST_NO_KEY", models=[
        ModelConfig(id="base", engine="vllm", num_cpus=1, dtype="float32", **model)])
    url = start_server(cfg)
    try:
        _vllm_app_checks(url, model_dir)
    finally:
        stop_server()


def _check_vllm_cpu_app(model_dir, path: str | None = None) -> None:
    """Serve `path` (None: the bundled model) on vllm-cpu and check it against `model_dir`."""
    # vllm-cpu reads gpu_memory_utilization as the share of RAM for weights + KV cache.
    _serve_vllm_and_check(model_dir, path=path, max_model_len=1024, gpu_memory_utilization=0.12, enforce_eager=True)


@pytest.mark.slow
def test_vllm_engine_on_cpu(ray_local, smollm2_dir):
    pytest.importorskip("vllm")
    _check_vllm_cpu_app(smollm2_dir)


@pytest.mark.slow
def test_vllm_serves_a_student_our_trainer_saved(ray_local, smollm2_dir, tmp_path):
    """The HF directory `sp2dpo train` writes is what vLLM loads: SmolLM2 trained for two steps,
    served by vllm-cpu, gives the same top-5 next-token log-probs as transformers on that directory."""
    pytest.importorskip("vllm")
    from safetensors.torch import load_file

    from sp2dpo.train.reference import ReferenceConfig, compute_reference
    from sp2dpo.train.sample import build_sample_inputs
    from sp2dpo.train.trainer import TrainConfig, train

    pairs, artifact = build_sample_inputs(tmp_path / "in", limit=4, max_chars=200)
    ref = compute_reference(ReferenceConfig(artifact=artifact, pairs=pairs, model="smollm2", max_length=256),
                            show_progress=False)
    summary = train(TrainConfig(artifact=ref["artifact"], pairs=pairs, model="smollm2",
                                output_dir=str(tmp_path / "run"), strategy="torch", max_length=256,
                                learning_rate=1e-5, micro_batch_size=2, max_steps=2, tensorboard=False,
                                compute_reference=False), show_progress=False)
    student = tmp_path / "run" / "model"
    assert summary["steps"] == 2
    trained, base = load_file(student / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert any(not base[k].equal(trained[k]) for k in base)  # a trained checkpoint, not the start
    _check_vllm_cpu_app(student, str(student))


@pytest.mark.gpu
def test_vllm_engine_on_gpu(ray_local, smollm2_dir):
    pytest.importorskip("vllm")
    _serve_vllm_and_check(smollm2_dir, num_gpus=1, max_model_len=2048, gpu_memory_utilization=0.3)


@pytest.mark.slow
def test_smollm2_under_32_concurrent_clients(ray_local):
    """The real model, batched: 32 clients × 3 short requests, no errors, healthy replica after."""
    from ray import serve

    cfg = ServeConfig(port=free_port(), api_key_env="SP2DPO_TEST_NO_KEY", models=[ModelConfig(id="base", num_cpus=1)])
    url = start_server(cfg)
    try:
        async def run():
            client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

            async def one(i):
                for j in range(3):
                    r = await client.completions.create(model="base", prompt=f"{i + j} plus one is", max_tokens=4,
                                                        temperature=0)
                    assert r.usage.completion_tokens <= 4
                return 3
            try:
                return await asyncio.gather(*(one(i) for i in range(32)), return_exceptions=True)
            finally:
                await client.close()

        results = asyncio.run(run())
        assert [r for r in results if isinstance(r, BaseException)] == [] and sum(results) == 96
        app = serve.status().applications["sp2dpo"]
        assert all(d.status == "HEALTHY" for d in app.deployments.values())
    finally:
        stop_server()


@pytest.mark.slow
def test_cli_serves_until_ctrl_c(tiny_model_dir, tmp_path):
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SP2DPO_RAY_OBJECT_STORE_MB": "256"}
    env.pop("SP2DPO_API_KEY", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sp2dpo.cli", "serve", "--model", f"tiny={tiny_model_dir}", "--port", str(port),
         "--api-key-file", str(key_file), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        # The --json summary is printed once the app answers: the command is ready from then on.
        line = ""
        while not line.startswith("{"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-3000:]
        summary = json.loads(line)
        assert summary["models"] == ["tiny"] and summary["auth"] == "bearer"
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="file-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "shutting down" in err
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
