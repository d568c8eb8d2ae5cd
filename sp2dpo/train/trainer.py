"""Per-pair DPO training on Ray Train: one `TorchTrainer`, any number of workers and nodes.

    sp2dpo train --config train.yaml [--set num_workers=4 --set use_gpu=true] [--json]
    ray job submit --working-dir . -- python jobs/train.py --config train.yaml

The loop (`train_loop_per_worker`) reads top to bottom like single-process PyTorch:

    policy log-probs of chosen and rejected (`shared_prompt`: one row per pair, the prompt
      forwarded once, only answer tokens through the LM head; or TRL's two rows and fused head)
    → dpo_loss with β_i and the *offline* reference log-probs of each pair (no reference model)
    → strategy.backward / strategy.step (DeepSpeed ZeRO-2/3, or plain AdamW/DDP; the learning
      rate from transformers.get_scheduler, as TRL builds it)
    → metrics all-reduced across workers, overall and per semantic category
    → ray.train.report(metrics, checkpoint) every `checkpoint_every` steps

Before any worker starts, the driver refuses an artifact that does not cover the pairs exactly
(`training_pairs`), or whose reference log-probs were made by another model, weights, dtype,
tokenizer, chat template or max_length. When the artifact has no reference log-probs yet and
`compute_reference` is on, the driver first runs the Ray Data reference pass (`reference.py`) with
training's model, dtype and max_length. Dropout is off (`disable_dropout`, TRL's default), so at
step 0 the policy computes the stored reference log-probs exactly and every margin is 0.

A worker that dies (`FailureConfig(max_failures)`) makes Ray Train restart the group, which
resumes from the last checkpoint: model, optimizer and scheduler state, the step, the metric
history. The data order is a pure function of (seed, epoch, step), so the resumed run sees the
same batches the uninterrupted run would have.

Outputs in `output_dir`: `model/` (HF safetensors + tokenizer; ZeRO-3 weights gathered on rank 0),
`training_summary.json`, `metrics.jsonl`, `training_curves.png`, `tensorboard/`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sp2dpo.config import StageConfig
from sp2dpo.storage import absolute, is_uri, join_uri, read_json, read_sp2dpo_metadata, upload_dir, write_json

OTHER = "other"


def category_slots() -> tuple[str, ...]:
    """Categories that get their own metrics: the annotation categories, `unannotated`, `other`."""
    from sp2dpo.annotate.schema import CATEGORIES
    from sp2dpo.schedule.beta import UNANNOTATED

    return (*CATEGORIES, UNANNOTATED, OTHER)


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
    def _cpu_precision(self) -> "TrainConfig":
        if not self.use_gpu and self.dtype != "float32":
            raise ValueError(f"dtype={self.dtype} needs use_gpu=true: on CPU train in float32 (bf16 on CPU is "
                             "slow and DeepSpeed's CPU path does not support it)")
        return self

    @model_validator(mode="after")
    def _label_smoothing_and_schedule(self) -> "TrainConfig":
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
    def _in_backward_limits(self) -> "TrainConfig":
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


def load_student(cfg: TrainConfig) -> tuple[Any, Any]:
    """The policy as the loop trains it: `cfg.dtype`, dropout off unless asked, checkpointing."""
    from sp2dpo.train.reference import disable_dropout, load_causal_lm

    model, tokenizer = load_causal_lm(cfg.model, cfg.dtype)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


# ----------------------------------------------------------------------------- the loss on one batch


def batch_loss(model: Any, batch: dict[str, Any], cfg: TrainConfig) -> Any:
    """Per-pair DPO outputs for one collated batch, reading β and reference log-probs from it."""
    from sp2dpo.train.loss import dpo_loss
    from sp2dpo.train.reference import batch_logps
    from sp2dpo.train.shared_prompt import completion_lengths

    chosen, rejected = batch_logps(model, batch)
    lengths = (None, None)
    if cfg.loss_type == "ipo":
        lengths = tuple(n.to(chosen.dtype) for n in completion_lengths(batch))
    return dpo_loss(chosen, rejected, batch["ref_chosen_logps"].to(chosen.dtype), batch["ref_rejected_logps"].to(chosen.dtype),
                    batch["beta"], cfg.loss_type, cfg.label_smoothing, lengths[0], lengths[1])


def make_collator(cfg: TrainConfig, pad_token_id: int) -> Any:
    """The batch layout the config asks for: one row per pair (`shared_prompt`) or TRL's two."""
    from sp2dpo.train import shared_prompt

    return shared_prompt.make_collator(cfg.shared_prompt, pad_token_id, cfg.max_length)


def batch_tokens(batch: dict[str, Any]) -> Any:
    """Prompt+answer tokens of the pairs in a batch, counted as TRL's two-row batch holds them."""
    return batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum()


class StepPlan:
    """Which pairs each worker sees at each (step, micro-step): a seeded permutation per epoch,
    cut into global batches of micro × accumulation × workers pairs (the incomplete tail dropped)."""

    def __init__(self, n_pairs: int, cfg: TrainConfig, world_size: int):
        self.cfg, self.world = cfg, world_size
        self.global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size
        self.steps_per_epoch = n_pairs // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_pairs} training pairs are fewer than one global batch "
                             f"(micro_batch_size × gradient_accumulation_steps × num_workers = {self.global_batch})")
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.n_pairs = n_pairs

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        import numpy as np

        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(self.cfg.seed + epoch).permutation(self.n_pairs)
        m = self.cfg.micro_batch_size
        start = within * self.global_batch + (micro * self.world + rank) * m
        return order[start: start + m].tolist()


class MetricSums:
    """Sums over a window of steps, reduced across workers in one all_reduce."""

    FIELDS = ("pairs", "loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "beta", "tokens")

    def __init__(self, n_categories: int):
        import torch

        self.total = torch.zeros(len(self.FIELDS), dtype=torch.float64)
        self.by_category = torch.zeros(n_categories, 3, dtype=torch.float64)  # pairs, margin, accuracy

    def add(self, out: Any, beta: Any, category_ids: list[int], tokens: Any) -> None:
        import torch

        # One device→host copy per micro-batch: on a GPU each .cpu() is a sync that stalls the step.
        n = len(category_ids)
        per_pair = torch.stack([out.losses.detach(), out.margins.detach(), out.accuracies.detach(),
                                out.chosen_rewards.detach(), out.rejected_rewards.detach(),
                                beta.to(out.losses.device, out.losses.dtype)]).double()
        host = torch.cat([per_pair.flatten(), tokens.to(per_pair.device).double().view(1)]).cpu()
        per_pair, tokens = host[:-1].view(6, n), host[-1]
        losses, margins, acc, chosen, rejected, betas = per_pair
        self.total += torch.stack([torch.tensor(float(n), dtype=torch.float64), losses.sum(), margins.sum(), acc.sum(),
                                   chosen.sum(), rejected.sum(), betas.sum(), tokens])
        index = torch.tensor(category_ids)
        self.by_category.index_add_(0, index, torch.stack([torch.ones(n, dtype=torch.float64), margins, acc], dim=1))

    def reduce(self) -> None:
        import torch
        import torch.distributed as dist

        # At world size 1 too: one code path, which a single-GPU NCCL test exercises.
        if dist.is_available() and dist.is_initialized():
            # NCCL reduces only CUDA tensors, gloo CPU ones; the sums live on the host between steps.
            device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
            flat = torch.cat([self.total, self.by_category.flatten()]).to(device)
            dist.all_reduce(flat)
            flat = flat.cpu()
            self.total = flat[: len(self.FIELDS)]
            self.by_category = flat[len(self.FIELDS):].view_as(self.by_category)

    def metrics(self, categories: tuple[str, ...]) -> dict[str, float]:
        t = dict(zip(self.FIELDS, self.total.tolist()))
        n = max(t["pairs"], 1.0)
        out = {"loss": t["loss"] / n, "rewards/margins": t["margin"] / n, "rewards/accuracies": t["accuracy"] / n,
               "rewards/chosen": t["chosen_reward"] / n, "rewards/rejected": t["rejected_reward"] / n,
               "beta/mean": t["beta"] / n, "pairs": t["pairs"], "tokens": t["tokens"]}
        for name, (count, margin, acc) in zip(categories, self.by_category.tolist()):
            if count:
                out[f"margins/{name}"] = margin / count
                out[f"accuracy/{name}"] = acc / count
                out[f"pairs/{name}"] = count
        return out


# ----------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from sp2dpo.train.data import load_training_table, tokenize_table
    from sp2dpo.train.strategy import make_strategy
    from sp2dpo.utils import progress_bar

    cfg = TrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.use_gpu else torch.device("cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_student(cfg)
    table, _ = load_training_table(cfg.artifact, cfg.pairs, require_ref=True)
    examples = tokenize_table(table, tokenizer, cfg.max_length)
    categories = category_slots()
    slot = {name: i for i, name in enumerate(categories)}
    category_ids = [slot.get(c, slot[OTHER]) for c in table["category"].to_pylist()]
    collate = make_collator(cfg, tokenizer.pad_token_id)
    plan = StepPlan(len(examples), cfg, world)
    strategy = make_strategy(cfg, world, rank, device)
    strategy.prepare(model, plan.total_steps)

    state: dict[str, Any] = {"step": 0, "history": [], "totals": None, "resumed_from": [], "train_seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with rank_checkpoint_dir(checkpoint, strategy.needs_file) as directory:
            strategy.load_checkpoint(directory)
            state = json.loads(Path(directory, "trainer_state.json").read_text())
        state["resumed_from"].append(state["step"])
    run_totals = MetricSums(len(categories))
    if state["totals"]:
        run_totals.total = torch.tensor(state["totals"]["total"], dtype=torch.float64)
        run_totals.by_category = torch.tensor(state["totals"]["by_category"], dtype=torch.float64)

    # Libraries write plain files: on object storage the outputs are made here and uploaded at the end.
    local_out = tempfile.mkdtemp(prefix="sp2dpo-out-") if is_uri(cfg.output_dir) else cfg.output_dir
    loggers = _Loggers(cfg, local_out) if rank == 0 else None
    strategy.model.train()
    window = MetricSums(len(categories))
    with progress_bar(plan.total_steps, "train", disable=rank != 0 or not loop_config.get("show_progress")) as bar:
        bar.update(state["step"])
        while state["step"] < plan.total_steps:
            step = state["step"]
            _maybe_fail(cfg, step, rank)
            # The step's micro-batches are collated first (a dataloader's job); the clock times the compute.
            micro_batches = [(idx, collate([examples[i] for i in idx]))
                             for idx in (plan.indices(step, micro, rank) for micro in range(cfg.gradient_accumulation_steps))]
            t0 = time.perf_counter()
            step_sums = MetricSums(len(categories))
            for idx, cpu_batch in micro_batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
                out = batch_loss(strategy.model, batch, cfg)
                strategy.backward(out.losses.mean())
                strategy.step()
                step_sums.add(out, batch["beta"], [category_ids[i] for i in idx], batch_tokens(batch))
            step_sums.reduce()
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            state["step"] = step + 1
            for acc in (window, run_totals):
                acc.total += step_sums.total
                acc.by_category += step_sums.by_category
            metrics = {"step": state["step"], **window.metrics(categories), "lr": _lr(strategy),
                       "tokens_per_s": step_sums.total[-1].item() / max(seconds, 1e-9)}
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}")
            last = state["step"] == plan.total_steps
            due_log = state["step"] % cfg.log_every == 0 or last
            due_ckpt = state["step"] % cfg.checkpoint_every == 0 or last
            if due_log:
                state["history"].append(metrics)
                if loggers:
                    loggers.log(metrics, state["step"])
                window = MetricSums(len(categories))
            state["totals"] = {"total": run_totals.total.tolist(), "by_category": run_totals.by_category.tolist()}
            if due_ckpt:
                _report_with_checkpoint(strategy, state, metrics, rank)
            elif due_log:
                ray.train.report(metrics)

    # The final model: a plain HF directory (ZeRO-3 gathers the shards to rank 0 here).
    strategy.save_hf(os.path.join(local_out, "model"), tokenizer)
    if rank == 0:
        _write_outputs(local_out, state["history"])
        if loggers:
            loggers.close()
        if local_out != cfg.output_dir:
            upload_dir(local_out, cfg.output_dir)
        # Written last: a run's outputs are complete once its summary is there.
        write_json(join_uri(cfg.output_dir, "training_summary.json"),
                   _summary(cfg, state, run_totals, categories, plan, world))
    if local_out != cfg.output_dir:
        shutil.rmtree(local_out, ignore_errors=True)


def _lr(strategy: Any) -> float:
    return float(strategy.optimizer.param_groups[0]["lr"])


def _maybe_fail(cfg: TrainConfig, step: int, rank: int) -> None:
    fault = cfg.fault_injection
    if fault and step == fault.step and rank == fault.rank and not os.path.exists(fault.marker):
        Path(fault.marker).write_text(f"worker {rank} killed before step {step}\n")
        os._exit(1)  # no cleanup, no exception: as if the process were killed


@contextmanager
def rank_checkpoint_dir(checkpoint: Any, needed: Callable[[str], bool]) -> Iterator[str]:
    """A local directory holding the checkpoint files this rank loads (`needed(relative_path)`).

    On object storage only those files are fetched: a ZeRO rank reads its own shards, while
    `checkpoint.as_directory()` would download every rank's to every worker. A checkpoint on a
    local or shared disk is read in place."""
    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        yield root
        return
    local = pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="sp2dpo-resume-") as directory:
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            relative = f.path[len(root) + 1:]
            if f.type == pafs.FileType.File and needed(relative):
                target = os.path.join(directory, relative)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                pafs.copy_files(f.path, target, source_filesystem=fs, destination_filesystem=local)
        yield directory


def _report_with_checkpoint(strategy: Any, state: dict, metrics: dict, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="sp2dpo-ckpt-") as directory:
        strategy.save_checkpoint(directory)
        if rank == 0:
            Path(directory, "trainer_state.json").write_text(json.dumps(state))
        # DeepSpeed: every rank holds a shard of the state; plain torch: rank 0 holds it all.
        keep = rank == 0 or strategy.__class__.__name__ == "DeepSpeedStrategy"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if keep else None,
                         checkpoint_dir_name=f"step_{state['step']:07d}")


def _summary(cfg: TrainConfig, state: dict, run: MetricSums, categories: tuple[str, ...], plan: StepPlan,
             world: int) -> dict[str, Any]:
    from sp2dpo.train.strategy import warmup_steps

    history = state["history"]
    t = dict(zip(MetricSums.FIELDS, run.total.tolist()))
    means = {k: v for k, v in run.metrics(categories).items()
             if k not in ("pairs", "tokens") and not k.startswith(("margins/", "accuracy/", "pairs/"))}
    per_category = {name: {"pairs": int(count), "margin": margin / count, "accuracy": acc / count}
                    for name, (count, margin, acc) in zip(categories, run.by_category.tolist()) if count}
    return {
        "steps": state["step"],
        "pairs_trained": int(t["pairs"]),
        "epochs": round(state["step"] / plan.steps_per_epoch, 3),
        "num_workers": world,
        "strategy": cfg.strategy + (f"-zero{cfg.zero_stage}" if cfg.strategy == "deepspeed" else ""),
        "lr_schedule": {"type": cfg.lr_scheduler_type, "peak": cfg.learning_rate,
                        "warmup_steps": warmup_steps(cfg, plan.total_steps)},
        "dropout": "off" if cfg.disable_dropout else "model's",
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "run_means": means,
        "per_category": per_category,
        "tokens": int(t["tokens"]),
        "train_seconds": round(state["train_seconds"], 3),
        "tokens_per_s": round(t["tokens"] / max(state["train_seconds"], 1e-9), 2),
        "resumed_from_steps": state["resumed_from"],
        "peak_rss_mb_rank0": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_cuda_mb_rank0": _peak_cuda_mb() if cfg.use_gpu else None,
        "model_dir": join_uri(cfg.output_dir, "model"),
        "config_hash": cfg.config_hash(),
    }


def _peak_cuda_mb() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _write_outputs(directory: str, history: list[dict]) -> None:
    """metrics.jsonl and the curves, in a local directory (`directory` is never a URI)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory, "metrics.jsonl"), "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    plot_curves(history, os.path.join(directory, "training_curves.png"))


def plot_curves(history: list[dict], path: str) -> None:
    """Loss and reward margins over steps, overall and per category (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_margin) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [h["loss"] for h in history], marker=".")
    ax_loss.set(title="DPO loss", xlabel="step", ylabel="loss")
    ax_margin.plot(steps, [h["rewards/margins"] for h in history], color="black", linewidth=2, label="all pairs")
    names = sorted({k[len("margins/"):] for h in history for k in h if k.startswith("margins/")})
    for name in names:
        points = [(h["step"], h[f"margins/{name}"]) for h in history if f"margins/{name}" in h]
        ax_margin.plot(*zip(*points), marker=".", linewidth=1, label=name)
    ax_margin.set(title="reward margin β_i·h_i by category", xlabel="step", ylabel="margin")
    ax_margin.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Loggers:
    """TensorBoard (default), and MLflow / W&B when configured and installed; rank 0 only."""

    def __init__(self, cfg: TrainConfig, local_out: str):
        import importlib.util

        self.tb = self.mlflow = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(local_out, "tensorboard"))
        if cfg.mlflow_tracking_uri and importlib.util.find_spec("mlflow"):
            import mlflow

            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
            mlflow.start_run(run_name=cfg.name)
            mlflow.log_params({k: v for k, v in cfg.model_dump().items() if isinstance(v, (int, float, str, bool))})
            self.mlflow = mlflow
        if cfg.wandb_project and importlib.util.find_spec("wandb"):
            import wandb

            wandb.init(project=cfg.wandb_project, name=cfg.name, config=cfg.model_dump())
            self.wandb = wandb

    def log(self, metrics: dict[str, float], step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.mlflow:
            self.mlflow.end_run()
        if self.wandb:
            self.wandb.finish()


# ----------------------------------------------------------------------------- the driver


def reference_config(cfg: TrainConfig) -> Any:
    """The reference pass `sp2dpo train` runs itself: training's reference model, max_length,
    dtype and batch layout, so the stored log-probs are what the policy computes at step 0."""
    from sp2dpo.train.reference import ReferenceConfig

    return ReferenceConfig(artifact=cfg.artifact, pairs=cfg.pairs, model=cfg.reference_id(), max_length=cfg.max_length,
                           dtype=cfg.dtype, out=join_uri(cfg.output_dir, "beta_ref.parquet"),
                           engine="ray" if (cfg.num_workers > 1 or cfg.use_gpu) else "local",
                           num_workers=cfg.num_workers, num_gpus=1.0 if cfg.use_gpu else 0.0,
                           shared_prompt=cfg.shared_prompt)


def prepare_artifact(cfg: TrainConfig, show_progress: bool = True) -> TrainConfig:
    """Check the artifact against the pairs and the reference model (computing the reference
    log-probs first when missing and allowed); return the config pointing at the checked artifact."""
    from transformers import AutoTokenizer

    from sp2dpo.models import resolve_model
    from sp2dpo.schedule.artifact import REF_LOGP_COLUMNS, ArtifactError
    from sp2dpo.train.data import check_reference, load_training_table, reference_tag
    from sp2dpo.train.reference import compute_reference

    table, metadata = load_training_table(cfg.artifact, cfg.pairs)
    if not all(c in table.column_names for c in REF_LOGP_COLUMNS):
        if not cfg.compute_reference:
            raise ArtifactError(f"{cfg.artifact} has no reference log-probs: run `sp2dpo train reference` "
                                "or set compute_reference=true")
        cfg = cfg.model_copy(update={"artifact": compute_reference(reference_config(cfg), show_progress)["artifact"]})
        table, metadata = load_training_table(cfg.artifact, cfg.pairs)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.reference_id()))
    check_reference(metadata, reference_tag(cfg.reference_id(), tokenizer, cfg.max_length, cfg.dtype), cfg.artifact)
    StepPlan(table.num_rows, cfg, cfg.num_workers)  # refuses fewer pairs than one global batch
    return cfg


def train(cfg: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run training on Ray Train; return the training summary."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from sp2dpo.utils import init_ray

    t0 = time.perf_counter()
    # Ray Train workers run in their own working directory: local paths must be absolute.
    local = {k: absolute(v) for k in ("artifact", "pairs", "output_dir", "model", "reference_model")
             if (v := getattr(cfg, k)) and not is_uri(v) and (k in ("artifact", "pairs", "output_dir") or os.path.exists(v))}
    cfg = cfg.model_copy(update=local)
    cfg = prepare_artifact(cfg, show_progress)
    init_ray()
    storage = absolute(cfg.storage_path or join_uri(cfg.output_dir, "ray"))
    # Hub access is the cluster's setting: pass the driver's choice through, never force one.
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "show_progress": show_progress},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=cfg.resources_per_worker),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    summary = read_json(join_uri(cfg.output_dir, "training_summary.json"))
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and is_uri(storage):  # pyarrow paths carry no scheme
        checkpoint = f"{storage.split('://', 1)[0]}://{checkpoint}"
    summary.update({"artifact": cfg.artifact, "reference": read_sp2dpo_metadata(cfg.artifact).get("reference"),
                    "checkpoint": checkpoint,
                    "output_dir": cfg.output_dir, "wall_seconds": round(time.perf_counter() - t0, 2)})
    return summary
