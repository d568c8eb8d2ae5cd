"""The evaluate stage's config: one object for `sp2dpo evaluate ...`, `jobs/evaluate.py` and Python."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sp2dpo.config import StageConfig


class EvaluateConfig(StageConfig):
    # Where outputs, annotations and reports are written (a local directory).
    out: str | None = None
    # The eval set: the bundled 805 AlpacaEval 2.0 instructions with their reference outputs.
    eval_set: str = "alpaca-eval"
    # Only the first N instructions (smoke runs; such scores are not leaderboard-comparable).
    limit: int | None = Field(None, ge=1)

    # generate: the student behind any OpenAI-compatible endpoint.
    endpoint: str | None = None
    model: str | None = None
    # `generator` written in model_outputs.json; defaults to the model id.
    name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = Field(2048, ge=1)
    temperature: float = Field(0.0, ge=0)

    # judge: any OpenAI-compatible endpoint + model id returning top log-probs.
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"
    # The evaluator config inside the installed alpaca-eval (prompt, decoding, parser).
    annotator: str = "weighted_alpaca_eval_gpt4_turbo"
    # Seed of the per-instruction output-order randomisation; 0 is alpaca_eval's own.
    seed: int = 0

    # both clients
    concurrency: int = Field(8, ge=1)
    max_retries: int = Field(5, ge=0)
    request_timeout_s: float = Field(600.0, gt=0)

    # score
    glm: Literal["length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal"] = "length_controlled_v1"
    # AlpacaEval's official hub files, when the user has them (else the offline estimate).
    instruction_difficulty: str | None = None
    df_gamed: str | None = None
    # Look for AlpacaEval's df_gamed.csv / instruction_difficulty.csv through huggingface_hub (its
    # cache first; a download only when online and HF_HUB_OFFLINE is unset); false: never look.
    hub_files: bool = True
    # Score without rows whose preference is missing/NaN (they are counted) instead of refusing.
    allow_missing: bool = False
    # Fewer judged instructions than this: no LC win rate (null, with lc_note saying why).
    lc_min_instructions: int = Field(50, ge=1)

    # compare: the run every other run is compared with (paired differences); default the first.
    baseline_run: str | None = None
    # Paired bootstrap resamples and sign-flip permutations per difference, and their seed.
    n_resamples: int = Field(2000, ge=100)
    bootstrap_seed: int = 0
