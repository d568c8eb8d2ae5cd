"""`sp2dpo train` settings: one pydantic object for YAML, `--set`, Python and jobs/train.py."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from sp2dpo.config import StageConfig


class FaultInjection(BaseModel):
    """Test-only: worker `rank` exits abruptly before `step`, once (a marker file records it)."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=1, description="The optimizer step before which the worker exits.")
    rank: int = Field(0, description="The rank of the worker that exits.")
    marker: str = Field(description="A file written when the fault fires, so it fires once.")


class TrainConfig(StageConfig):
    """`sp2dpo train` settings (the same object from YAML, `--set`, Python and jobs/train.py)."""

    artifact: str = Field("runs/beta.parquet", description=(
        "the β artifact (Parquet), ideally with reference log-probs already (see compute_reference)"))
    pairs: str = Field("runs/data/pairs.parquet", description="the pairs table the artifact was built for")
    model: str = Field("smollm2", description="the student to start from: a local HF directory or a bundled name")
    reference_model: str | None = Field(None, description=(
        "the model whose log-probs the artifact must hold; default: `model` (standard DPO)"))
    out: str = Field("runs/train", validation_alias=AliasChoices("out", "output_dir"), description=(
        "where the model, summary, metrics, curves and TensorBoard logs go: a local path or an s3:// / gs:// URI "
        "(`output_dir`, the old name, is still read)"))
    storage_path: str | None = Field(None, description=(
        "Ray Train checkpoints, default OUT/ray; shared storage (a URI or a shared mount) for multi-node runs"))
    name: str = Field("sp2dpo-train", description="the run's name in Ray Train, MLflow and W&B")
    compute_reference: bool = Field(True, description=(
        "run the reference pass first when the artifact has no reference log-probs (else refuse it)"))

    # Distribution
    num_workers: int = Field(1, ge=1, description="Ray Train workers, one model replica each")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL between them (gloo on CPU)")
    resources_per_worker: dict[str, float] | None = Field(None, description=(
        "Ray resources each worker reserves (e.g. {CPU: 8, GPU: 1}); default: Ray Train's"))
    strategy: Literal["deepspeed", "torch"] = Field("deepspeed", description=(
        "DeepSpeed ZeRO (zero_stage), or plain AdamW with DDP across workers (no DeepSpeed op to compile)"))
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description=(
        "DeepSpeed ZeRO stage; ZeRO-3 gathers the 16-bit weights to rank 0 for the final save"))
    deepspeed_config: dict[str, Any] = Field(default_factory=dict, description=(
        "merged into the generated DeepSpeed config (offload, buckets, ...), nested keys one by one"))
    max_failures: int = Field(2, description="worker failures Ray Train recovers from, from the last checkpoint")

    # Optimisation
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = Field("sigmoid", description=(
        "the DPO-family loss, each with β_i per pair: sigmoid (DPO), robust (rDPO), hinge or ipo"))
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description=(
        "probability that a preference label is flipped, for loss_type=robust (rDPO, the same formula as TRL "
        "1.16); refused with other losses, which TRL 1.16 computes without it"))
    learning_rate: float = Field(1e-6, gt=0, description="the peak learning rate of AdamW")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description=(
        "learning-rate schedule, by transformers.get_scheduler's name; the default is TRL's and HF Trainer's "
        "(linear decay to 0 after the warm-up)"))
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up from 0 (or use warmup_ratio)")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "warm-up as a fraction of the run's optimizer steps, rounded up (HF Trainer's rule); "
        "0.1 with cosine is the alignment-handbook DPO recipe"))
    weight_decay: float = Field(0.0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, description="clip the global gradient norm to this; 0 turns clipping off")
    optimizer_in_backward: bool = Field(False, description=(
        "step AdamW per parameter inside backward, one gradient buffer less (strategy=torch, 1 worker, "
        "no clipping or accumulation)"))
    micro_batch_size: int = Field(2, ge=1, description="pairs per worker per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: int = Field(1, ge=1, description="passes over the training pairs (max_steps overrides it)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to run; overrides epochs")
    max_length: int | None = Field(1024, description=(
        "tokens per prompt+answer (keep_start truncation, as TRL); must equal the reference pass's"))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "the policy's dtype, which the reference pass must share; bfloat16/float16 need use_gpu"))
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    shared_prompt: bool = Field(True, description=(
        "one row per pair, the prompt's forward shared by both answers (the same log-probs as two rows)"))
    disable_dropout: bool = Field(True, description=(
        "train with dropout off (TRL's default), so the policy at step 0 computes exactly what the reference "
        "pass computed in eval mode and the first margins are 0"))
    seed: int = Field(0, description="seeds the weights' RNG and the per-epoch order of the pairs")

    # Logging and checkpoints
    log_every: int = Field(1, ge=1, description="optimizer steps between logged metric rows")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between Ray Train checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints Ray Train keeps (the newest)")
    tensorboard: bool = Field(True, description="write TensorBoard event files under OUT/tensorboard")
    mlflow_tracking_uri: str | None = Field(None, description="log to MLflow here; used only when mlflow is installed")
    wandb_project: str | None = Field(None, description="log to this W&B project; used only when wandb is installed")
    fault_injection: FaultInjection | None = Field(None, description=(
        "test-only: make one worker exit abruptly before a step, once"))

    @model_validator(mode="before")
    @classmethod
    def _deprecated_output_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and "output_dir" in data:
            warnings.warn("TrainConfig.output_dir is deprecated: use `out`, as every other stage does",
                          DeprecationWarning, stacklevel=2)
        return data

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
