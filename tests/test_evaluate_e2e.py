"""Generation and judging over HTTP with the real `openai` client.

The end-to-end test is all real: SmolLM2 served by our Ray Serve app on 127.0.0.1 answers a few
AlpacaEval instructions, SmolLM2 judges them, and the annotations are scored.

The client-behaviour tests (bounded concurrency, retries, resume, order randomisation) need an
endpoint that fails on purpose and a judge that answers like GPT-4 Turbo, which no real server
here does: they use a small scripted OpenAI-compatible server (FastAPI on 127.0.0.1).
"""

from __future__ import annotations

import json
import threading

import pytest
from local_app import LocalApp
from s3_server import free_port
from typer.testing import CliRunner

from sp2dpo.cli import app
from sp2dpo.evaluate.config import EvaluateConfig
from sp2dpo.evaluate.protocol import is_switched, load_eval_set
from sp2dpo.evaluate.run import generate, judge
from sp2dpo.evaluate.score import score_annotations


def _summary(output: str) -> dict:
    """The --json summary line; Ray may interleave its worker logs into the same stdout."""
    return next(json.loads(line) for line in reversed(output.strip().splitlines()) if line.startswith("{"))


class ScriptedServer(LocalApp):
    """OpenAI chat completions: answers `answer:<first words>`; as a judge, always names the
    output shown second ('M'). `fail_first` requests per prompt get a 503; prompts containing a
    word in `always_fail` always get a 400 (not retried by the client)."""

    def __init__(self, fail_first: int = 0, always_fail: tuple[str, ...] = ()):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        api = FastAPI()

        @api.post("/v1/chat/completions")
        async def chat(body: dict):
            import asyncio

            prompt = body["messages"][-1]["content"]
            with self.lock:
                self.calls[prompt] = self.calls.get(prompt, 0) + 1
                n = self.calls[prompt]
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(0.02)
                if any(word in prompt for word in always_fail):
                    return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
                if n <= fail_first:
                    return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
                logprobs = None
                text = "answer:" + " ".join(prompt.split()[:3])
                if body.get("logprobs"):
                    text = "M"
                    top = [{"token": "M", "logprob": -0.1, "bytes": None},
                           {"token": "m", "logprob": -2.4, "bytes": None}]
                    logprobs = {"content": [{"token": "M", "logprob": -0.1, "bytes": None, "top_logprobs": top}]}
                return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                                     "message": {"role": "assistant", "content": text}}]}
            finally:
                with self.lock:
                    self.in_flight -= 1

        super().__init__(api)


def test_generate_bounded_concurrency_retries_and_resume(tmp_path):
    rows = load_eval_set()[:12]
    victim = rows[4]["instruction"].split()[0]
    cfg = EvaluateConfig(model="student", out=str(tmp_path), limit=12, concurrency=3, max_retries=2)
    with ScriptedServer(fail_first=1, always_fail=(rows[4]["instruction"],)) as srv:
        cfg.endpoint = srv.url
        with pytest.raises(ValueError, match="rerun the same command to resume"):
            generate(cfg, show_progress=False)
        assert srv.max_in_flight <= 3
        # Every prompt was retried after its 503; the 400 was not retried.
        assert all(srv.calls[r["instruction"]] == 2 for r in rows if r["instruction"] != rows[4]["instruction"])
        assert srv.calls[rows[4]["instruction"]] == 1
    partial = [json.loads(line) for line in (tmp_path / "model_outputs.partial.jsonl").read_text().splitlines()]
    assert len(partial) == 11 and not (tmp_path / "model_outputs.json").exists()
    with ScriptedServer() as srv:
        cfg.endpoint = srv.url
        summary = generate(cfg, show_progress=False)
        assert list(srv.calls) == [rows[4]["instruction"]]  # only the missing one is asked again
    assert (summary["n"], summary["generated"], summary["resumed"]) == (12, 1, 11)
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in rows]
    assert all(set(o) == {"instruction", "output", "generator", "dataset"} and o["generator"] == "student"
               for o in outputs)
    assert victim in outputs[4]["output"]


def test_generate_closes_its_client_on_the_loop_it_ran_on(tmp_path, monkeypatch):
    """A client left open is closed later by garbage collection, on whatever loop runs then (the
    next stage's), which fails with "Event loop is closed": generate closes it itself."""
    import sp2dpo.evaluate.run as run

    made = []
    make = run._client
    monkeypatch.setattr(run, "_client", lambda *a: made.append(make(*a)) or made[-1])
    cfg = EvaluateConfig(model="student", out=str(tmp_path), limit=2)
    with ScriptedServer() as srv:
        cfg.endpoint = srv.url
        generate(cfg, show_progress=False)
    assert len(made) == 1 and made[0].is_closed()


def test_judge_unswitches_order_and_labels_non_leaderboard_judge(tmp_path):
    rows = load_eval_set()[:16]
    outputs = [{"instruction": r["instruction"], "output": f"short answer {i}", "generator": "student",
                "dataset": r["dataset"]} for i, r in enumerate(rows)]
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps(outputs))
    with ScriptedServer() as srv:
        cfg = EvaluateConfig(judge_endpoint=srv.url, judge_model="some-open-judge", concurrency=4)
        summary = judge(cfg, str(path), show_progress=False)
        again = judge(cfg, str(path), show_progress=False)
    assert again["resumed"] == 16 and again["judged"] == 0
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    # The judge always picks the second shown output with p = softmax(-0.1, -2.4)[0].
    import math

    p_second = 1 / (1 + math.exp(-2.3))
    for a, r in zip(annotations, rows):
        assert a["output_1"] == r["output"] and a["generator_1"] == "gpt4_1106_preview"
        model_shown_second = not is_switched(r["instruction"])
        assert a["preference"] == pytest.approx(1 + p_second if model_shown_second else 2 - p_second)
    assert {a["is_switched_outputs"] for a in annotations} == {True, False}
    assert summary["annotator"] == "weighted_alpaca_eval_gpt4_turbo:some-open-judge"
    assert not summary["comparable_with_leaderboard"]
    scored = score_annotations(tmp_path / "annotations.json")
    assert not scored["comparable_with_leaderboard"] and "GPT-4 Turbo" in scored["note"]


def test_judge_refuses_mismatched_outputs(tmp_path):
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps([{"instruction": "Not an AlpacaEval instruction", "output": "x", "generator": "s"}]))
    result = CliRunner().invoke(app, ["evaluate", "judge", str(path), "--endpoint", "http://127.0.0.1:9/v1",
                                      "--model", "judge"])
    assert result.exit_code == 2 and "not in the eval set" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["evaluate", "generate", "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "--endpoint" in missing.output


@pytest.mark.slow
def test_end_to_end_smollm2_served_generate_judge_score(tmp_path, smollm2_dir):
    """Real: SmolLM2 behind our Serve app answers 4 instructions, then judges them; scored."""
    from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server

    port = free_port()
    url = start_server(ServeConfig(host="127.0.0.1", port=port,
                                   models=[ModelConfig(id="base", path=None, engine="transformers")]))
    try:
        runner = CliRunner()
        gen = runner.invoke(app, ["evaluate", "generate", "--endpoint", url, "--model", "base", "--limit", "4",
                                  "--max-tokens", "48", "--out", str(tmp_path), "--json"])
        assert gen.exit_code == 0, gen.output
        gsum = _summary(gen.output)
        assert gsum["n"] == 4 and gsum["avg_length"] > 0
        jud = runner.invoke(app, ["evaluate", "judge", str(tmp_path / "model_outputs.json"), "--endpoint", url,
                                  "--model", "base", "--json"])
        assert jud.exit_code == 0, jud.output
        jsum = _summary(jud.output)
    finally:
        stop_server()
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert len(annotations) == 4 and jsum["annotator"] == "weighted_alpaca_eval_gpt4_turbo:base"
    for a in annotations:
        top = a["raw_completion"]["logprobs"]["content"][0]["top_logprobs"]
        assert len(top) == 5
        assert a["preference"] is None or 1.0 <= a["preference"] <= 2.0
    scored = runner.invoke(app, ["evaluate", "score", str(tmp_path / "annotations.json"), "--allow-missing", "--json"])
    if jsum["n_missing"] == 4:
        assert scored.exit_code == 2 and "no row has a preference" in scored.output
        return
    assert scored.exit_code == 0, scored.output
    summary = _summary(scored.output)
    assert summary["n"] + summary["n_missing"] == 4
    assert 0 <= summary["win_rate"] <= 100
    # Four instructions: too few for the LC GLM, so no LC number, and the reason instead.
    assert summary["lc_win_rate"] is None and "lc_min_instructions" in summary["lc_note"]
    assert summary["comparable_with_leaderboard"] is False
