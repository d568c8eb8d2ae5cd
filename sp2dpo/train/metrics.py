"""What a training run reports: per-pair sums reduced across workers (`MetricSums`), overall and
per semantic category; the training summary; metrics.jsonl and the curves; the loggers
(TensorBoard, and MLflow / W&B when configured)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sp2dpo.annotate.schema import CATEGORIES
from sp2dpo.schedule.beta import UNANNOTATED
from sp2dpo.storage import join_uri
from sp2dpo.train.config import TrainConfig
from sp2dpo.train.strategy import warmup_steps

OTHER = "other"


def category_slots() -> tuple[str, ...]:
    """Categories that get their own metrics: the annotation categories, `unannotated`, `other`."""
    return (*CATEGORIES, UNANNOTATED, OTHER)


class MetricSums:
    """Sums over a window of steps, reduced across workers in one all_reduce."""

    FIELDS = ("pairs", "loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "beta", "tokens")

    def __init__(self, n_categories: int):
        self.total = torch.zeros(len(self.FIELDS), dtype=torch.float64)
        self.by_category = torch.zeros(n_categories, 3, dtype=torch.float64)  # pairs, margin, accuracy

    def add(self, out: Any, beta: Any, category_ids: list[int], tokens: Any) -> None:
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


def training_summary(cfg: TrainConfig, state: dict, run: MetricSums, categories: tuple[str, ...], plan: Any,
                     world: int) -> dict[str, Any]:
    """training_summary.json: the run's totals, means, per-category figures and settings."""
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
        "model_dir": join_uri(cfg.out, "model"),
        "config_hash": cfg.config_hash(),
    }


def _peak_cuda_mb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def write_outputs(directory: str, history: list[dict]) -> None:
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


class Loggers:
    """TensorBoard (default), and MLflow / W&B when configured and installed; rank 0 only."""

    def __init__(self, cfg: TrainConfig, local_out: str):
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
