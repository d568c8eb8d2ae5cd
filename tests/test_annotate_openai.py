"""The `openai` teacher against real OpenAI-compatible HTTP servers on 127.0.0.1.

Two servers, both started here as subprocesses (this module is also their entry point):
- `smollm2`: /v1/chat/completions backed by the real SmolLM2-135M-Instruct through transformers;
- `faulty`: a server that misbehaves on purpose, as hosted APIs and overloaded servers do: junk
  text, fenced JSON, HTTP 500 (transient and permanent), 429, 400, a non-JSON body, and responses
  slower than the client's timeout. What it does is chosen by a `[fault:NAME]` tag in the pair's
  prompt, and it counts attempts and concurrent requests so the tests can check retries and the
  concurrency bound. Its "good" answers are canned: it stands in for a teacher only to exercise
  the client, the real model is the other server's job.
"""


import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import free_port

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"category": "factuality", "magnitude": 2, "confidence": 0.9, "rationale": "Response B gets the date wrong."}


# ----------------------------------------------------------------------------- the servers


def build_app(mode: str, api_key: str | None = None, slow_s: float = 3.0):
    import asyncio
    import threading
    from collections import Counter

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    attempts: Counter[str] = Counter()
    state = {"in_flight": 0, "max_in_flight": 0, "requests": 0}
    model_lock = threading.Lock()
    holder: dict = {}

    def completion(text: str, prompt_tokens: int, completion_tokens: int, model: str) -> dict:
        return {"id": f"cmpl-{state['requests']}", "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def smollm2(messages: list[dict], max_tokens: int) -> tuple[str, int, int]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sp2dpo.models import bundled_model_dir

        with model_lock:
            if not holder:
                holder["tok"] = AutoTokenizer.from_pretrained(bundled_model_dir())
                holder["model"] = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
            tok, model = holder["tok"], holder["model"]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            new = out[0, ids.shape[1]:]
            return tok.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(len(new))

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/stats")
    async def stats():
        return {"attempts": dict(attempts), **state}

    @app.post("/reset")
    async def reset():
        while state["in_flight"] > 0:  # requests a client gave up on may still be sleeping here
            await asyncio.sleep(0.05)
        attempts.clear()
        state.update(max_in_flight=0, requests=0)
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "bad key", "type": "auth"}}, status_code=401)
        body = await request.json()
        state["requests"] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            user = body["messages"][-1]["content"]
            if mode == "smollm2":
                text, p, c = await asyncio.to_thread(smollm2, body["messages"], int(body.get("max_tokens") or 64))
                return completion(text, p, c, body["model"])
            found = re.search(r"\[fault:([a-z0-9-]+)\]", user)
            fault = found.group(1) if found else "ok"
            key = re.search(r"\[id:(\w+)\]", user).group(1)
            attempts[key] += 1
            n = attempts[key]
            await asyncio.sleep(0.3 if fault == "steady" else 0.05)  # service time: requests overlap
            if fault == "junk":
                return completion("Both answers look fine to me, hard to say.", 100, 10, body["model"])
            if fault == "fenced":
                fenced = "Here you go:\n```json\n" + json.dumps(GOOD) + "\n```\nThanks!"
                return completion(fenced, 100, 30, body["model"])
            if fault == "flaky500" and n <= 2:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
            if fault == "always500":
                return JSONResponse({"error": {"message": "broken"}}, status_code=503)
            if fault == "ratelimit" and n == 1:
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
            if fault == "bad-request":
                return JSONResponse({"error": {"message": "schema not supported"}}, status_code=400)
            if fault == "html":
                return PlainTextResponse("<html>gateway error</html>", status_code=200)
            if (fault == "slow-once" and n == 1) or fault == "always-slow":
                await asyncio.sleep(slow_s)
            return completion(json.dumps(GOOD), 100, 25, body["model"])
        finally:
            state["in_flight"] -= 1

    return app


def _start(mode: str, *extra: str):
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, mode, str(port), *extra], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{mode} server did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def faulty_server():
    proc, url = _start("faulty", "--slow-s", "3")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir):
    proc, url = _start("smollm2")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


# ----------------------------------------------------------------------------- tests

FAULTS = ["ok", "junk", "fenced", "flaky500", "always500", "ratelimit", "bad-request", "html", "slow-once",
          "always-slow"]


def _pairs(path: Path, faults: list[str]) -> str:
    rows = [{"pair_id": f"pair{i}", "prompt": f"Question {i} [id:{fault.replace('-', '')}{i}] [fault:{fault}]",
             "chosen": "A good answer.", "rejected": "A worse answer.", "prompt_messages": None, "source": "test",
             "score_chosen": None, "score_rejected": None, "meta": None} for i, fault in enumerate(faults)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _openai_config(url: str, pairs: str, out: str, **kw):
    from sp2dpo.annotate import AnnotateConfig

    openai = {"base_url": f"{url}/v1", "timeout_s": 1.0, "max_retries": 2, "backoff_s": 0.05, "concurrency": 3,
              **kw.pop("openai", {})}
    return AnnotateConfig(pairs=pairs, out=out, teacher="openai", model="teacher-x", openai=openai,
                          pool={"batch_size": 16, **kw.pop("pool", {})}, **kw)


def test_faulty_server_through_ray_never_crashes(ray_local, faulty_server, tmp_path):
    import httpx

    from sp2dpo.annotate import annotate
    from sp2dpo.annotate.store import read_shards

    pairs = _pairs(tmp_path / "pairs.parquet", FAULTS)
    t0 = time.time()
    summary = annotate(_openai_config(faulty_server, pairs, str(tmp_path / "ann")), show_progress=False)
    assert summary["teacher"] == "openai:teacher-x"
    assert (summary["annotated"], summary["failed"], summary["skipped"]) == (5, 5, 0)
    assert summary["repaired"] == 1 and summary["prompt_tokens"] > 0 and summary["tokens_per_s"] > 0
    rows = {r["pair_id"]: r for r in read_shards(str(tmp_path / "ann")).to_pylist()}
    by_fault = {fault: rows[f"pair{i}"] for i, fault in enumerate(FAULTS)}
    for fault in ("ok", "flaky500", "ratelimit", "slow-once"):
        assert by_fault[fault]["status"] == "ok", (fault, by_fault[fault])
        assert by_fault[fault]["category"] == "factuality" and by_fault[fault]["magnitude"] == 2
    assert by_fault["fenced"]["status"] == "repaired" and "removed code fence" in by_fault["fenced"]["repairs"]
    assert by_fault["junk"]["status"] == "failed" and by_fault["junk"]["raw_text"].startswith("Both answers")
    assert "no JSON object" in by_fault["junk"]["repairs"]
    assert "gave up after 3 attempts: HTTP 503" in by_fault["always500"]["repairs"]
    assert "gave up after 3 attempts: timeout after 1s" in by_fault["always-slow"]["repairs"]
    assert "HTTP 400" in by_fault["bad-request"]["repairs"]
    assert by_fault["html"]["status"] == "failed"
    for fault in ("junk", "always500", "always-slow", "bad-request", "html"):
        row = by_fault[fault]
        assert row["category"] is None and row["magnitude"] is None and row["confidence"] is None

    stats = httpx.get(f"{faulty_server}/stats").json()
    attempts = stats["attempts"]
    count = {fault: attempts[f"{fault.replace('-', '')}{i}"] for i, fault in enumerate(FAULTS)}
    assert count["ok"] == 1 and count["junk"] == 1  # a 200 is never re-asked, whatever it says
    assert count["flaky500"] == 3 and count["ratelimit"] == 2 and count["slow-once"] == 2
    assert count["always500"] == 3 and count["always-slow"] == 3  # bounded: 1 + max_retries
    assert count["bad-request"] == 1  # a 4xx other than 408/409/429 is not retried
    assert stats["max_in_flight"] >= 2  # requests overlap (the bound itself: the next test)
    # Three timeouts of 1 s, all in parallel with other work: far less than a serial run would take.
    assert time.time() - t0 < 120

    # --retry-failed asks the five failed pairs again and nothing else.
    again = annotate(_openai_config(faulty_server, pairs, str(tmp_path / "ann"), retry_failed=True),
                     show_progress=False)
    assert (again["skipped"], again["retried"], again["annotated"] + again["failed"]) == (5, 5, 5)
    after = httpx.get(f"{faulty_server}/stats").json()["attempts"]
    assert after["ok0"] == 1 and after["junk1"] == 2


def test_concurrency_is_bounded(faulty_server):
    import httpx

    from sp2dpo.annotate.openai_teacher import OpenAITeacherEngine

    httpx.post(f"{faulty_server}/reset")
    engine = OpenAITeacherEngine(_openai_config(faulty_server, "unused", "unused", openai={"concurrency": 2}))
    t0 = time.perf_counter()
    results = engine.generate([[{"role": "user", "content": f"Q [id:steady{i}] [fault:steady]"}] for i in range(8)])
    seconds = time.perf_counter() - t0
    engine.close()
    assert all(json.loads(r.text) == GOOD for r in results) and engine.retries == 0
    stats = httpx.get(f"{faulty_server}/stats").json()
    assert stats["requests"] == 8 and stats["max_in_flight"] == 2
    assert seconds >= 4 * 0.3  # 8 requests of 0.3 s, two at a time


def test_api_key_comes_from_the_environment(faulty_server, monkeypatch):
    """The key is read from the named environment variable in the process that makes requests."""
    proc, url = _start("faulty", "--api-key", "s3cret")
    try:
        from sp2dpo.annotate.openai_teacher import OpenAITeacherEngine

        msgs = [[{"role": "user", "content": "Q [id:key0] [fault:ok]"}]]
        monkeypatch.setenv("SP2DPO_TEST_TEACHER_KEY", "s3cret")
        cfg = _openai_config(url, "unused", "unused", openai={"api_key_env": "SP2DPO_TEST_TEACHER_KEY"})
        engine = OpenAITeacherEngine(cfg)
        assert json.loads(engine.generate(msgs)[0].text) == GOOD
        engine.close()
        monkeypatch.setenv("SP2DPO_TEST_TEACHER_KEY", "wrong")
        engine = OpenAITeacherEngine(cfg)
        result = engine.generate(msgs)[0]
        engine.close()
        assert result.text is None and result.error.startswith("HTTP 401")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_max_concurrent_batches_is_validated_and_reaches_ray_data():
    from pydantic import ValidationError

    from sp2dpo.annotate import AnnotateConfig
    from sp2dpo.annotate.run import _pool_resources

    with pytest.raises(ValidationError, match="max_concurrent_batches"):
        AnnotateConfig(teacher="vllm", pool={"max_concurrent_batches": 0})
    assert AnnotateConfig(teacher="vllm").pool.max_concurrent_batches == 4
    compute = _pool_resources(AnnotateConfig(teacher="vllm", pool={"max_concurrent_batches": 3}))["compute"]
    assert compute.max_concurrent_calls_per_actor == 3 and compute.enable_true_multi_threading
    one = _pool_resources(AnnotateConfig(teacher="vllm", pool={"max_concurrent_batches": 1}))["compute"]
    assert one.max_concurrent_calls_per_actor == 1 and not one.enable_true_multi_threading


def test_batches_overlap_in_one_actor_under_one_bound(ray_local, faulty_server, tmp_path):
    """One actor, batches of 2 pairs: one batch at a time never has more than 2 requests in
    flight; 4 batches at once fill the engine's bound of 6 (shared, never exceeded), with the
    same rows."""
    import httpx

    from sp2dpo.annotate import annotate
    from sp2dpo.annotate.store import read_shards

    pairs = _pairs(tmp_path / "pairs.parquet", ["steady"] * 24)
    seen = {}
    for k in (1, 4):
        httpx.post(f"{faulty_server}/reset")
        out = str(tmp_path / f"ann{k}")
        cfg = _openai_config(faulty_server, pairs, out, openai={"concurrency": 6},
                             pool={"batch_size": 2, "max_concurrent_batches": k})
        summary = annotate(cfg, show_progress=False)
        assert summary["annotated"] == 24 and summary["failed"] == 0
        stats = httpx.get(f"{faulty_server}/stats").json()
        assert stats["requests"] == 24
        seen[k] = (stats["max_in_flight"], sorted((r["pair_id"], r["raw_text"], r["category"])
                                                  for r in read_shards(out).to_pylist()))
    assert seen[1][0] <= 2 < seen[4][0] <= 6
    assert seen[1][1] == seen[4][1]


@pytest.mark.slow
def test_real_smollm2_server_through_ray(ray_local, smollm2_server, tmp_path):
    """The openai teacher against a server running the real SmolLM2: every pair gets a row
    (ok, repaired or failed with its raw text), with the server's real token counts."""
    from sp2dpo.annotate import annotate
    from sp2dpo.annotate.schema import CATEGORIES
    from sp2dpo.annotate.store import read_shards
    from sp2dpo.data.prepare import DataConfig, prepare

    prepare(DataConfig(inputs=["ultrafeedback-eval"], out=str(tmp_path / "data"), limit=3), show_progress=False)
    cfg = _openai_config(smollm2_server, str(tmp_path / "data"), str(tmp_path / "ann"), limit=3,
                         generation={"max_tokens": 96},
                         openai={"timeout_s": 300, "structured_outputs": "none", "concurrency": 2})
    summary = annotate(cfg, show_progress=False)
    assert summary["annotated"] + summary["failed"] == 3
    assert summary["prompt_tokens"] > 3 * 300 and summary["completion_tokens"] > 0
    for row in read_shards(str(tmp_path / "ann")).to_pylist():
        assert row["raw_text"]  # the model's own words, kept for audit
        if row["status"] != "failed":
            assert row["category"] in CATEGORIES


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["smollm2", "faulty"])
    parser.add_argument("port", type=int)
    parser.add_argument("--api-key")
    parser.add_argument("--slow-s", type=float, default=3.0)
    args = parser.parse_args()
    uvicorn.run(build_app(args.mode, args.api_key, args.slow_s), host="127.0.0.1", port=args.port, log_level="warning")
