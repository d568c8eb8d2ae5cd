"""The pipeline config: where the run lives, which controls to train, and one section per stage.

Each section is validated by its stage's own config class when the pipeline is planned, so one
YAML file serves `sp2dpo pipeline` and every `sp2dpo <stage> --config same.yaml` command alike.
Paths inside sections (`out`, the inputs a stage reads) are set by the pipeline, not the user.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sp2dpo.config import StageConfig

Control = Literal["semantic", "global", "shuffled"]
CONTROLS: tuple[str, ...] = ("semantic", "global", "shuffled")


class PipelineConfig(StageConfig):
    """`sp2dpo pipeline` settings."""

    # Local dir or s3:// / gs:// URI; on a multi-node cluster it must be storage every node reaches.
    run_dir: str = "runs/pipeline"
    # One student per control: semantic beta_i, the tuned global beta, and beta_i shuffled across pairs.
    controls: list[Control] = Field(default_factory=lambda: list(CONTROLS), min_length=1)
    # Stop after this stage (e.g. `annotate` to inspect annotations before training).
    until: str | None = None
    # Rerun these stages even if complete (their dependents re-run only if their own key changed).
    force: list[str] = Field(default_factory=list)
    # Teachers run into the same annotation dir, each a partial `annotate` section merged over
    # the base one (e.g. [{teacher: ratings}, {teacher: vllm}]); empty = the base section alone.
    teachers: list[dict[str, Any]] = Field(default_factory=list)
    # Evaluate the untuned base model too (the `base` row of the comparison).
    evaluate_base: bool = True
    # Served as `judge` when evaluate.judge_endpoint is empty (None = bundled SmolLM2-135M-Instruct).
    judge_model: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    annotate: dict[str, Any] = Field(default_factory=dict)
    schedule: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    serve: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
