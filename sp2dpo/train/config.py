"""`sp2dpo train` settings: one pydantic object for YAML, `--set`, Python and jobs/train.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sp2dpo.config import StageConfig


class FaultInjection(BaseModel):
    """Test-only: worker `rank` exits abruptly before `step`, once (a marker file records it)."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=1)
    rank: int = 0
    marker: str


class TrainConfig(StageConfig):
    """`sp2dpo train` settings (the same object from YAML, `--set`, Python and jobs/train.py)."""

    artifact: str = "runs/beta.parquet"  # β artifact, ideally with reference log-probs already
    pairs: str = "runs/data/pairs.parquet"
    model: str = "smollm2"  # student to start from: a local HF dir or a bundled name
    reference_model: str | None = None  # default: `model` (standard DPO)
    output_dir: str = "runs/train"  # local path or s3:// / gs:// URI
    storage_path: str | None = None  # Ray Train checkpoints; default OUTPUT_DIR/ray. Shared storage for multi-node.
    name: str = "sp2dpo-train"
    compute_reference: bool = True  # run the reference pass first when the artifact has no log-probs

    # Distribution
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    strategy: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: Literal[0, 1, 2, 3] = 2
    deepspeed_config: dict[str, Any] = Field(default_factory=dict)  # merged into the generated config
    max_failures: int = 2  # worker failures Ray Train recovers from (from the last checkpoint)

    # Optimisation
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description=(
        "probability that a preference label is flipped, for loss_type=robust (rDPO, the same formula as TRL "
        "1.16); refused with other losses, which TRL 1.16 computes without it"))
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description=(
        "learning-rate schedule, by transformers.get_scheduler's name; the default is TRL's and HF Trainer's "
        "(linear decay to 0 after the warm-up)"))
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0 (or use warmup_ratio)")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "warm-up as a fraction of the run's optimizer steps, rounded up (HF Trainer's rule); "
        "0.1 with cosine is the alignment-handbook DPO recipe"))
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    optimizer_in_backward: bool = False  # torch, 1 worker, no clipping/accumulation: one gradient buffer less
    micro_batch_size: int = Field(2, ge=1)  # pairs per worker per forward
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    max_length: int | None = 1024  # tokens per prompt+answer (keep_start truncation, as TRL)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    shared_prompt: bool = True  # one row per pair, the prompt's forward shared by both answers (exact)
    disable_dropout: bool = Field(True, description=(
        "train with dropout off (TRL's default), so the policy at step 0 computes exactly what the reference "
        "pass computed in eval mode and the first margins are 0"))
    seed: int = 0

    # Logging and checkpoints
    log_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    mlflow_tracking_uri: str | None = None  # no-op unless set and mlflow is installed
    wandb_project: str | None = None  # no-op unless set and wandb is installed
    fault_injection: FaultInjection | None = None

    @model_validator(mode="after")
    def _cpu_precision(self) -> TrainConfig:
        if not self.use_gpu and self.dtype != "float32":
            raise ValueError(f"dtype={self.dtype} needs use_gpu=true: on CPU train in float32 (bf16 on CPU is "
                             "slow and DeepSpeed's CPU path does not support it)")
        return self

    @model_validator(mode="after")
    def _label_smoothing_and_schedule(self) -> TrainConfig:
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                f"label_smoothing={self.label_smoothing} with loss_type={self.loss_type}: TRL 1.16 ignores "
                "label_smoothing for this loss (its sigmoid has no conservative-DPO term), so the two training "
                "paths would differ; use loss_type=robust for label-noise-robust DPO, or label_smoothing=0")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both (warmup_steps would win silently)")
        if self.lr_scheduler_type == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError("lr_scheduler_type=constant has no warm-up; use lr_scheduler_type=constant_with_warmup")
        return self

    @model_validator(mode="after")
    def _in_backward_limits(self) -> TrainConfig:
        if not self.optimizer_in_backward:
            return self
        # Each parameter is updated the moment its gradient is ready, so nothing that needs every
        # gradient at once can run: say which setting to change instead of training differently.
        problems = [msg for bad, msg in (
            (self.strategy != "torch", "strategy=torch (DeepSpeed runs its own optimizer step)"),
            (self.num_workers != 1, "num_workers=1 (DDP all-reduces gradients in buckets after backward)"),
            (self.gradient_accumulation_steps != 1, "gradient_accumulation_steps=1 (nothing is accumulated)"),
            (bool(self.max_grad_norm), "max_grad_norm=0 (a global-norm clip needs every gradient at once)"),
        ) if bad]
        if problems:
            raise ValueError("optimizer_in_backward=true needs " + "; ".join(problems))
        return self

    def reference_id(self) -> str:
        return self.reference_model or self.model
