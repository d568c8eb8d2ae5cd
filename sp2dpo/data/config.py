"""The data stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sp2dpo.config import StageConfig


class DataConfig(StageConfig):
    """`sp2dpo data prepare` settings."""

    inputs: list[str] = Field(default_factory=lambda: ["ultrafeedback-sample"])
    out: str = "runs/data"
    # local: in-process; ray: Ray Data over the cluster; auto: ray above `ray_min_bytes` of input.
    engine: Literal["auto", "local", "ray"] = "auto"
    ray_min_bytes: int = 64 << 20
    batch_size: int = 4096
    # Keep at most this many pairs (after validation), for quick runs; None keeps all.
    limit: int | None = None
    # Set aside pairs whose prompt + longer answer exceed this many tokens of `tokenizer`
    # (reason_code `too_long`): a run setting that fits pairs to a student's max_length (leave room
    # for the chat template), not a fault.
    max_tokens: int | None = Field(None, ge=1)
    tokenizer: str = "smollm2"  # a local HF dir or a bundled model name
