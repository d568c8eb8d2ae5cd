"""The pipeline config: where the run lives, which controls to train, and one section per stage.

Each section is validated by its stage's own config class when the pipeline is planned, so one
YAML file serves `sp2dpo pipeline` and every `sp2dpo <stage> --config same.yaml` command alike.
Paths inside sections (`out`, the inputs a stage reads) are set by the pipeline, not the user.

Two layouts: without `students`, one student (`train.model`) per control, the global arm at
`schedule.beta0`. With `students`, the experiment grid: per student the arms `base`,
`global@β` for each of `global_betas`, `semantic` and `shuffled` (those of `controls`), each
trained once per seed (see sp2dpo/pipeline/grid.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from sp2dpo.config import StageConfig
from sp2dpo.schedule.config import CONTROLS, Control


class Student(StageConfig):
    """One backbone of the grid: its own reference log-probs, arms and served models."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="Names the student's stage dirs and served model ids: letters, digits, "
                                  "`-`, `_`, `.`.")
    model: str = Field(description="A local HF dir, an object-store URI, a bundled name (smollm2, tiny-llama) or a "
                                   "hub id.")


def _section(stage: str) -> Any:
    return Field(default_factory=dict, description=f"The `{stage}` stage's config section (validated by that stage's "
                                                   "config class; paths in it are set by the pipeline).")


class PipelineConfig(StageConfig):
    """`sp2dpo pipeline` settings."""

    run_dir: str = Field("runs/pipeline", description="Local dir or s3:// / gs:// URI; on a multi-node cluster it "
                                                      "must be storage every node reaches.")
    controls: list[Control] = Field(default_factory=lambda: list(CONTROLS), min_length=1,
                                    description="The β artifacts trained: semantic β_i, one global β, β_i shuffled "
                                                "across pairs.")
    until: str | None = Field(None, description="Stop after this stage (e.g. `annotate` to inspect annotations "
                                                "before training).")
    force: list[str] = Field(default_factory=list, description="Rerun these stages even if complete (their "
                                                               "dependents rerun only if their own key changed).")
    teachers: list[dict[str, Any]] = Field(
        default_factory=list, description="Teachers run into the same annotation dir, each a partial `annotate` "
        "section merged over the base one (e.g. [{teacher: ratings}, {teacher: vllm}]); empty = the base section.")
    evaluate_base: bool = Field(True, description="Evaluate the untuned base model too (the `base` row of the "
                                                  "comparison).")
    judge_model: str | None = Field(None, description="Served as `judge` when evaluate.judge_endpoint is empty "
                                                      "(None = the bundled SmolLM2-135M-Instruct).")
    students: list[Student] = Field(
        default_factory=list, description="The experiment grid (empty = one student, train.model): each student's "
        "arms share its reference log-probs; the semantic and shuffled artifacts are shared by every student.")
    global_betas: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1], min_length=1,
                                      description="The grid's global-β sweep; per student the best by LC win rate "
                                                  "is `tuned_global`.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="Training seeds of the grid: each trained arm once per seed (train.seed in "
                                         "the single-student layout).")
    data: dict[str, Any] = _section("data")
    annotate: dict[str, Any] = _section("annotate")
    schedule: dict[str, Any] = _section("schedule")
    reference: dict[str, Any] = _section("reference")
    train: dict[str, Any] = _section("train")
    serve: dict[str, Any] = _section("serve")
    evaluate: dict[str, Any] = _section("evaluate")

    @field_validator("global_betas")
    @classmethod
    def _betas(cls, value: list[float]) -> list[float]:
        bad = [b for b in value if not (0 < b < float("inf"))]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"global_betas must be distinct positive numbers, got {value}")
        return value

    @model_validator(mode="after")
    def _grid(self) -> PipelineConfig:
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"students: names must be unique, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.students:
            # Each student is its own starting point and reference: a single train.model would
            # silently be ignored, so refuse it.
            for key in ("model", "reference_model", "seed"):
                if key in self.train:
                    where = "students[].model" if key != "seed" else "seeds"
                    raise ValueError(f"train.{key} is set, but with `students` each arm's {key} comes from "
                                     f"{where}: remove train.{key}")
        return self
