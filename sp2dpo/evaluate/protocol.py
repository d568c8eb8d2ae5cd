"""The AlpacaEval 2.0 protocol, read from the installed `alpaca-eval==0.6.6` package.

The judge prompt, decoding settings, answer parser and output-order randomisation are the
package's own (never retyped here), so a judged file means what the leaderboard's files mean.
Only modules that import offline are used: the evaluator YAML and prompt are read by path, and
`alpaca_eval.utils` / `alpaca_eval.completion_parsers` are plain Python.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sp2dpo.data.bundled import resolve_input

DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
BASELINE = "gpt4_1106_preview"
# Seed of alpaca_eval's PairwiseAnnotator: with it our order randomisation is the official one
# (checked against the raw completions in the leaderboard's own annotation files).
OFFICIAL_SEED = 0
_SWITCH_COLUMN = "is_switched_outputs"


def evaluators_dir() -> Path:
    return Path(str(resources.files("alpaca_eval") / "evaluators_configs"))


@cache
def evaluator_config(annotator: str = DEFAULT_ANNOTATOR) -> dict[str, Any]:
    """The annotator's configs.yaml entry, with `prompt_template` replaced by the template's text."""
    path = evaluators_dir() / annotator / "configs.yaml"
    if not path.exists():
        known = sorted(p.parent.name for p in evaluators_dir().glob("*/configs.yaml"))
        raise ValueError(f"unknown AlpacaEval annotator {annotator!r}; the installed alpaca-eval has {known}")
    cfg = dict(yaml.safe_load(path.read_text())[annotator])
    if cfg.get("fn_completion_parser") != "logprob_parser":
        raise ValueError(f"annotator {annotator!r} does not use the log-prob parser; "
                         "only weighted (log-prob) judges are supported")
    cfg["prompt_template"] = (evaluators_dir() / cfg["prompt_template"]).read_text()
    return cfg


def judge_model_name(annotator: str = DEFAULT_ANNOTATOR) -> str:
    """The model the leaderboard used for this annotator (gpt-4-1106-preview for the default)."""
    return evaluator_config(annotator)["completions_kwargs"]["model_name"]


def judge_messages(instruction: str, output_1: str, output_2: str, annotator: str = DEFAULT_ANNOTATOR) -> list[dict]:
    """Chat messages for one comparison, built by alpaca_eval's own prompt formatter."""
    import pandas as pd
    from alpaca_eval.utils import make_prompts, prompt_to_chatml

    row = pd.DataFrame([{"instruction": instruction, "output_1": output_1, "output_2": output_2}])
    prompts, _ = make_prompts(row, evaluator_config(annotator)["prompt_template"])
    return prompt_to_chatml(prompts[0])


def is_switched(instruction: str, seed: int = OFFICIAL_SEED) -> bool:
    """Whether the model's output is shown first for this instruction (seeded on the instruction)."""
    from alpaca_eval.utils import random_seeded_choice

    return random_seeded_choice(seed=_SWITCH_COLUMN + instruction + str(seed), choices=[False, True])


def parse_preference(completion: dict, switched: bool, annotator: str = DEFAULT_ANNOTATOR) -> float:
    """Preference in [1, 2] (2 = the model wins) from the judge's top log-probs; NaN when neither
    answer token is among them. `completion` is one chat choice as a dict (OpenAI layout)."""
    import logging

    from alpaca_eval.completion_parsers import logprob_parser

    logprobs = completion.get("logprobs") or {}
    if not logprobs.get("content") or not all("top_logprobs" in c for c in logprobs["content"]):
        return float("nan")
    # alpaca_eval logs a warning per missing answer; we count them in the summary instead.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        value = logprob_parser(completion, **evaluator_config(annotator)["completion_parser_kwargs"])[0]
    finally:
        logger.setLevel(level)
    value = float(value)
    return 3.0 - value if switched and value == value else value


def load_eval_set(name_or_path: str = "alpaca-eval") -> list[dict]:
    """The AlpacaEval instructions with reference outputs: a list of {dataset, instruction, output, generator}."""
    path = resolve_input(name_or_path)
    rows = read_json_list(path, "eval set")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"{path}: item {i} has no 'instruction' string")
    instructions = [r["instruction"] for r in rows]
    if len(set(instructions)) != len(instructions):
        raise ValueError(f"{path}: instructions are not unique")
    return rows


def read_json_list(path: str | Path, what: str) -> list:
    """A JSON array file (optionally .gz), with a clear error for anything else."""
    import gzip

    from sp2dpo import storage

    path = str(path)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        body = storage.read_bytes(path)
        data = json.loads(gzip.decompress(body) if path.endswith(".gz") else body)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: the {what} must be a JSON list of objects, got {type(data).__name__}")
    return data
