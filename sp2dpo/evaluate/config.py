"""The evaluate stage's config: one object for `sp2dpo evaluate ...`, `jobs/evaluate.py` and Python."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sp2dpo.config import StageConfig


class EvaluateConfig(StageConfig):
    """`sp2dpo evaluate` settings: generate, judge, score and compare."""

    out: str | None = Field(None, description=(
        "Where outputs, annotations and reports are written; None: judge writes beside model_outputs.json, compare "
        "into the current directory."))
    eval_set: str = Field("alpaca-eval", description=(
        "The eval set: the bundled 805 AlpacaEval 2.0 instructions with their reference outputs."))
    limit: int | None = Field(None, ge=1, description=(
        "Only the first N instructions (smoke runs; such scores are not leaderboard-comparable)."))

    endpoint: str | None = Field(None, description=(
        "generate: the student's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."))
    model: str | None = Field(None, description="generate: the model id at the endpoint.")
    name: str | None = Field(None, description="generate: the `generator` written in model_outputs.json; None: the "
                                               "model id.")
    api_key_env: str = Field("OPENAI_API_KEY", description="generate: environment variable holding the endpoint's key.")
    max_tokens: int = Field(2048, ge=1, description="generate: most tokens per answer.")
    temperature: float = Field(0.0, ge=0, description="generate: sampling temperature (0: greedy).")

    judge_endpoint: str | None = Field(None, description=(
        "judge: OpenAI-compatible base URL of a judge that returns top log-probs."))
    judge_model: str | None = Field(None, description="judge: the judge's model id (gpt-4-1106-preview = the "
                                                      "leaderboard's judge).")
    judge_api_key_env: str = Field("OPENAI_API_KEY", description="judge: environment variable holding the judge's key.")
    annotator: str = Field("weighted_alpaca_eval_gpt4_turbo", description=(
        "judge: the evaluator config inside the installed alpaca-eval (prompt, decoding, parser)."))
    seed: int = Field(0, description="judge: seed of the per-instruction output-order randomisation; 0 is "
                                     "alpaca_eval's own.")

    concurrency: int = Field(8, ge=1, description="Requests in flight, for both clients.")
    max_retries: int = Field(5, ge=0, description="Client retries of transient failures, for both clients.")
    request_timeout_s: float = Field(600.0, gt=0, description="Per-request timeout in seconds, for both clients.")

    glm: Literal["length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal"] = Field(
        "length_controlled_v1", description=(
            "score: the length-controlled GLM of alpaca_eval to fit: length_controlled_v1, length_controlled_noreg "
            "or length_controlled_minimal."))
    instruction_difficulty: str | None = Field(None, description=(
        "score: AlpacaEval's official instruction_difficulty.csv, when you have it; None: the hub's (hub_files), "
        "else an offline estimate."))
    df_gamed: str | None = Field(None, description=(
        "score: AlpacaEval's official df_gamed.csv, when you have it; None: the hub's (hub_files), else synthesised "
        "from the official GLM weights."))
    hub_files: bool = Field(True, description=(
        "score: look for df_gamed.csv / instruction_difficulty.csv through huggingface_hub (cache first; a download "
        "only when online and HF_HUB_OFFLINE is unset); false: never look."))
    allow_missing: bool = Field(False, description=(
        "score: score without rows whose preference is missing/NaN (they are counted) instead of refusing."))
    lc_min_instructions: int = Field(50, ge=1, description=(
        "score: with fewer judged instructions, no LC win rate (null, with lc_note saying why)."))

    baseline_run: str | None = Field(None, description=(
        "compare: the run every other run is compared with (paired differences); None: the first."))
    n_resamples: int = Field(2000, ge=100, description=(
        "compare: paired bootstrap resamples and sign-flip permutations per difference."))
    bootstrap_seed: int = Field(0, description="compare: seed of the bootstrap and the permutations.")
