"""The data stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sp2dpo.config import StageConfig


class DataConfig(StageConfig):
    """`sp2dpo data prepare` settings."""

    inputs: list[str] = Field(default_factory=lambda: ["ultrafeedback-sample"], description=(
        "JSONL/JSON/Parquet files, directories of them, saved HF dataset dirs, or bundled names."))
    out: str = Field("runs/data", description="Output directory (local path or s3://, gs://).")
    engine: Literal["auto", "local", "ray"] = Field("auto", description=(
        "local: in-process; ray: Ray Data over the cluster; auto: ray above `ray_min_bytes` of input."))
    # 1 GiB: the local engine streams too (flat memory), and at UltraFeedback's size (~200 MB of JSONL)
    # it took 6.5 s where Ray Data took 13.7 s (benchmarks/bench_scale.py); Ray Data pays off when the
    # input is large enough that reading it in parallel across nodes beats its start-up and transfers.
    ray_min_bytes: int = Field(1 << 30, description="Input size from which `engine: auto` uses Ray Data.")
    batch_size: int = Field(4096, description="Rows validated and written to pairs.parquet per batch.")
    limit: int | None = Field(None, description="Keep at most this many pairs (after validation), for quick runs; "
                                                "None keeps all.")
    max_tokens: int | None = Field(None, ge=1, description=(
        "Set aside pairs whose prompt + longer answer exceed this many tokens of `tokenizer` (reason_code "
        "`too_long`), to fit pairs to a student's max_length; None: no limit."))
    tokenizer: str = Field("smollm2", description="Tokenizer for max_tokens: a local HF dir or a bundled model name.")
