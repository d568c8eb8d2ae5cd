"""Generation and judging against OpenAI-compatible endpoints (our Serve app, vLLM, a hosted API).

    sp2dpo evaluate generate --endpoint http://127.0.0.1:8000/v1 --model base --out runs/eval/base
    sp2dpo evaluate judge runs/eval/base/model_outputs.json --endpoint https://api.openai.com/v1 \
        --model gpt-4-1106-preview --out runs/eval/base

Requests run on the async `openai` client with bounded concurrency; the client retries transient
failures (connection errors, 408/409/429/5xx) with exponential backoff. Every finished request is
appended to a `*.partial.jsonl` file beside the output, so a killed or partly failed run resumes
where it stopped when the same command is run again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sp2dpo.evaluate.config import EvaluateConfig
from sp2dpo.evaluate.protocol import (
    BASELINE,
    evaluator_config,
    is_switched,
    judge_messages,
    judge_model_name,
    load_eval_set,
    parse_preference,
    read_json_list,
)
from sp2dpo.storage import absolute, join_uri, local_mirror, parent


def _client(endpoint: str, key_env: str, cfg: EvaluateConfig) -> Any:
    from openai import AsyncOpenAI

    # Local servers started without a key accept any bearer token.
    return AsyncOpenAI(base_url=endpoint, api_key=os.environ.get(key_env) or "EMPTY",
                       max_retries=cfg.max_retries, timeout=cfg.request_timeout_s)


def _read_partial(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: that request is redone
        if isinstance(row, dict) and isinstance(row.get("instruction"), str):
            done[row["instruction"]] = row
    return done


def _run_all(todo: list[Any], call: Callable[[Any], Awaitable[dict]], partial: Path, cfg: EvaluateConfig,
             description: str, show_progress: bool, client: Any) -> list[str]:
    """Run `call` on every item with at most cfg.concurrency in flight; append each result to
    `partial` as it lands. Returns the error messages of the requests that still failed.
    `client` is closed on the loop it ran on: closed later, its connections would be torn down
    on a dead loop ("Event loop is closed")."""
    from sp2dpo.utils import progress_bar

    errors: list[str] = []

    async def main() -> None:
        gate = asyncio.Semaphore(cfg.concurrency)
        with (partial.open("a", encoding="utf-8") as sink,
              progress_bar(len(todo), description, not show_progress) as bar):
            async def one(item: Any) -> None:
                async with gate:
                    try:
                        row = await call(item)
                    except Exception as exc:  # the client already retried; keep going, report at the end
                        errors.append(f"{type(exc).__name__}: {exc}")
                    else:
                        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                        sink.flush()
                    bar.update(1)

            try:
                await asyncio.gather(*(one(item) for item in todo))
            finally:
                await client.close()

    asyncio.run(main())
    return errors


def _run_or_raise(todo: list[Any], call: Callable[[Any], Awaitable[dict]], partial: Path, cfg: EvaluateConfig,
                  description: str, show_progress: bool, client: Any, kept_at: str, requests: str,
                  results: str) -> tuple[dict[str, dict], float]:
    """`_run_all`, then every finished row by instruction and the seconds taken; if requests still
    failed, an error saying how many, that the finished ones are kept (at `kept_at`), and to rerun."""
    t0 = time.perf_counter()
    errors = _run_all(todo, call, partial, cfg, description, show_progress, client)
    seconds = time.perf_counter() - t0
    done = _read_partial(partial)
    if errors:
        raise ValueError(f"{len(errors)} of {len(todo)} {requests} failed after {cfg.max_retries} retries "
                         f"(first: {errors[0]}); {len(done)} finished {results} are kept in {kept_at}: "
                         "rerun the same command to resume")
    return done, seconds


def _write_json_list(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")


def _eval_rows(cfg: EvaluateConfig) -> list[dict]:
    rows = load_eval_set(cfg.eval_set)
    return rows[: cfg.limit] if cfg.limit else rows


def _need(value: Any, flag: str, command: str) -> Any:
    if not value:
        raise ValueError(f"`sp2dpo evaluate {command}` needs {flag}")
    return value


def generate(cfg: EvaluateConfig, show_progress: bool = True) -> dict[str, Any]:
    """Write OUT/model_outputs.json: the model's answer to every eval instruction."""
    endpoint = _need(cfg.endpoint, "--endpoint", "generate")
    model = _need(cfg.model, "--model", "generate")
    out_uri = absolute(_need(cfg.out, "--out", "generate"))
    generator = cfg.name or model
    # Work in a local mirror of OUT (OUT itself when local): what finished is uploaded even on failure.
    with local_mirror(out_uri) as local:
        partial = Path(local) / "model_outputs.partial.jsonl"
        done = _read_partial(partial)
        others = sorted({r.get("generator") for r in done.values()} - {generator})
        if others:
            raise ValueError(f"{join_uri(out_uri, partial.name)} holds outputs of {others}, not {generator!r}: "
                             "use another --out")
        rows = _eval_rows(cfg)
        todo = [r for r in rows if r["instruction"] not in done]
        client = _client(endpoint, cfg.api_key_env, cfg)

        async def call(row: dict) -> dict:
            response = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": row["instruction"]}],
                max_tokens=cfg.max_tokens, temperature=cfg.temperature)
            # alpaca_eval strips outputs before judging (is_strip_output=True).
            text = (response.choices[0].message.content or "").strip()
            return {"instruction": row["instruction"], "output": text, "generator": generator,
                    "dataset": row.get("dataset")}

        done, seconds = _run_or_raise(todo, call, partial, cfg, f"generate {generator}", show_progress, client,
                                      join_uri(out_uri, partial.name), "generation requests", "outputs")
        outputs = [done[r["instruction"]] for r in rows]
        _write_json_list(Path(local) / "model_outputs.json", outputs)
    return {"model_outputs": join_uri(out_uri, "model_outputs.json"), "generator": generator, "n": len(outputs),
            "generated": len(todo), "resumed": len(rows) - len(todo),
            "avg_length": int(sum(len(o["output"]) for o in outputs) / len(outputs)), "seconds": round(seconds, 2)}


def annotator_label(cfg: EvaluateConfig, judge_model: str) -> str:
    """The annotator name written in each row: the leaderboard's name only for its own judge."""
    return cfg.annotator if judge_model == judge_model_name(cfg.annotator) else f"{cfg.annotator}:{judge_model}"


def load_model_outputs(path: str | Path, eval_rows: list[dict]) -> list[dict]:
    """model_outputs.json, checked against the eval set (every instruction known, none repeated)."""
    rows = read_json_list(path, "model outputs file")
    known = {r["instruction"] for r in eval_rows}
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ValueError(f"{path}: item {i} needs 'instruction' and 'output' strings")
        if r["instruction"] not in known:
            raise ValueError(f"{path}: item {i} has an instruction that is not in the eval set: "
                             f"{r['instruction'][:80]!r}")
        if r["instruction"] in seen:
            raise ValueError(f"{path}: item {i} repeats an earlier instruction")
        seen.add(r["instruction"])
    if not rows:
        raise ValueError(f"{path}: no model outputs")
    generators = sorted({str(r.get("generator")) for r in rows})
    if len(generators) != 1:
        raise ValueError(f"{path}: several generators in one file: {generators[:5]}")
    return rows


def judge(cfg: EvaluateConfig, model_outputs: str, show_progress: bool = True) -> dict[str, Any]:
    """Write OUT/annotations.json: the judge's preference of each model output over the reference."""
    endpoint = _need(cfg.judge_endpoint, "--endpoint", "judge")
    judge_model = _need(cfg.judge_model, "--model", "judge")
    out_uri = absolute(cfg.out) if cfg.out else parent(absolute(model_outputs))
    eval_rows = load_eval_set(cfg.eval_set)
    reference = {r["instruction"]: r for r in eval_rows}
    outputs = load_model_outputs(model_outputs, eval_rows)
    if cfg.limit:
        outputs = outputs[: cfg.limit]
    settings = dict(evaluator_config(cfg.annotator)["completions_kwargs"])
    settings.pop("model_name", None)
    settings.pop("requires_chatml", None)
    label = annotator_label(cfg, judge_model)
    wanted = {o["instruction"]: o["output"] for o in outputs}
    with local_mirror(out_uri) as local:
        partial = Path(local) / "annotations.partial.jsonl"
        # A cached judgment counts only for the same output, judge and order seed.
        done = {k: v for k, v in _read_partial(partial).items()
                if k in wanted and wanted[k] == v.get("output_2") and v.get("annotator") == label
                and v.get("seed") == cfg.seed}
        todo = [o for o in outputs if o["instruction"] not in done]
        client = _client(endpoint, cfg.judge_api_key_env, cfg)

        async def call(row: dict) -> dict:
            ref = reference[row["instruction"]]
            switched = is_switched(row["instruction"], cfg.seed)
            first, second = (row["output"], ref["output"]) if switched else (ref["output"], row["output"])
            response = await client.chat.completions.create(
                model=judge_model, messages=judge_messages(row["instruction"], first, second, cfg.annotator),
                **settings)
            completion = response.choices[0].model_dump()
            preference = parse_preference(completion, switched, cfg.annotator)
            return {"instruction": row["instruction"], "output_1": ref["output"],
                    "generator_1": ref.get("generator", BASELINE), "dataset": ref.get("dataset"),
                    "output_2": row["output"], "generator_2": row.get("generator"),
                    "annotator": label, "preference": None if math.isnan(preference) else preference,
                    "is_switched_outputs": switched, "seed": cfg.seed, "raw_completion": completion}

        cached, seconds = _run_or_raise(todo, call, partial, cfg, f"judge {judge_model}", show_progress, client,
                                        join_uri(out_uri, partial.name), "judge requests", "judgments")
        annotations = [cached[o["instruction"]] for o in outputs]
        _write_json_list(Path(local) / "annotations.json", annotations)
    prefs = [a["preference"] for a in annotations if a["preference"] is not None]
    return {"annotations": join_uri(out_uri, "annotations.json"), "annotator": label, "n": len(annotations),
            "judged": len(todo), "resumed": len(outputs) - len(todo), "n_missing": len(annotations) - len(prefs),
            "win_rate": round(100 * sum(p - 1 for p in prefs) / len(prefs), 4) if prefs else None,
            "comparable_with_leaderboard": label == cfg.annotator and not cfg.limit and len(outputs) == len(eval_rows),
            "seconds": round(seconds, 2)}
