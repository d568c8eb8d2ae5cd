"""Per-pair DPO training on Ray Train: one `TorchTrainer`, any number of workers and nodes.

    sp2dpo train --config train.yaml [--set num_workers=4 --set use_gpu=true] [--json]
    ray job submit --working-dir . -- python jobs/train.py --config train.yaml

The loop (`train_loop_per_worker`) reads top to bottom like single-process PyTorch:

    policy log-probs of chosen and rejected (`shared_prompt`: one row per pair, the prompt
      forwarded once, only answer tokens through the LM head; or TRL's two rows and fused head)
    → loss.batch_loss: dpo_loss with β_i and the *offline* reference log-probs of each pair (no
      reference model), both read from the batch
    → strategy.backward / strategy.step (DeepSpeed ZeRO-2/3, or plain AdamW/DDP; the learning
      rate from transformers.get_scheduler, as TRL builds it)
    → metrics all-reduced across workers, overall and per semantic category
    → ray.train.report(metrics, checkpoint) every `checkpoint_every` steps

Before any worker starts, the driver tokenizes the training pairs once into a cache beside the
artifact (`tokens.py`; reused while the tokenizer, max_length and rows are unchanged), and each
worker reads only its own shard of it, a contiguous range of the pairs, as numpy arrays.
The driver also refuses an artifact that does not cover the pairs exactly
(`training_pairs`), or whose reference log-probs were made by another model, weights, dtype,
tokenizer, chat template or max_length. When the artifact has no reference log-probs yet and
`compute_reference` is on, the driver first runs the Ray Data reference pass (`reference.py`) with
training's model, dtype and max_length. Dropout is off (`disable_dropout`, TRL's default), so at
step 0 the policy computes the stored reference log-probs exactly and every margin is 0.

A worker that dies (`FailureConfig(max_failures)`) makes Ray Train restart the group, which
resumes from the last checkpoint: model, optimizer and scheduler state, the step, the metric
history. The data order is a pure function of (seed, epoch, step), so the resumed run sees the
same batches the uninterrupted run would have.

Outputs in `out`: `model/` (HF safetensors + tokenizer; ZeRO-3 weights gathered on rank 0),
`training_summary.json`, `metrics.jsonl`, `training_curves.png`, `tensorboard/`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
from transformers import AutoTokenizer

from sp2dpo.models import resolve_model
from sp2dpo.schedule.artifact import REF_LOGP_COLUMNS, ArtifactError
from sp2dpo.storage import absolute, is_uri, join_uri, read_json, read_sp2dpo_metadata, upload_dir, write_json
from sp2dpo.train.config import TrainConfig
from sp2dpo.train.data import check_reference, load_training_table, reference_tag
from sp2dpo.train.logps import batch_tokens, disable_dropout, load_causal_lm, load_tokenizer, make_collator
from sp2dpo.train.loss import batch_loss
from sp2dpo.train.metrics import OTHER, Loggers, MetricSums, category_slots, training_summary, write_outputs
from sp2dpo.train.reference import ReferenceConfig, compute_reference
from sp2dpo.train.strategy import make_strategy
from sp2dpo.train.tokens import read_shard, tokenize_once
from sp2dpo.utils import init_ray, progress_bar


def load_student(cfg: TrainConfig) -> tuple[Any, Any]:
    """The policy as the loop trains it: `cfg.dtype`, dropout off unless asked, checkpointing."""
    model, tokenizer = load_causal_lm(cfg.model, cfg.dtype)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


class StepPlan:
    """Which pairs each worker sees at each (step, micro-step). Worker `rank` owns a contiguous
    shard of the pairs (`shard`), so it loads only those; each epoch it walks a seeded permutation
    of its shard, micro × accumulation pairs per step, and the steps stop where the smallest shard
    runs out (the incomplete tail dropped). With one worker the shard is every pair and this is a
    seeded permutation of the whole table cut into global batches."""

    def __init__(self, n_pairs: int, cfg: TrainConfig, world_size: int):
        self.cfg, self.world = cfg, world_size
        self.global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size
        self.steps_per_epoch = n_pairs // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_pairs} training pairs are fewer than one global batch "
                             f"(micro_batch_size × gradient_accumulation_steps × num_workers = {self.global_batch})")
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.n_pairs = n_pairs

    def shard(self, rank: int) -> range:
        """The pairs worker `rank` trains on: disjoint across ranks, together every pair."""
        return range(rank * self.n_pairs // self.world, (rank + 1) * self.n_pairs // self.world)

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        shard = self.shard(rank)
        # floor(n / world) // per-worker batch == n // global batch: every shard lasts the epoch.
        order = np.random.default_rng(self.cfg.seed + epoch).permutation(len(shard))
        m = self.cfg.micro_batch_size
        start = (within * self.cfg.gradient_accumulation_steps + micro) * m
        return (shard.start + order[start: start + m]).tolist()



# ----------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = TrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if cfg.use_gpu else torch.device("cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_student(cfg)
    tokens = loop_config["tokens"]
    plan = StepPlan(tokens["tag"]["rows"], cfg, world)
    pairs = read_shard(tokens, plan.shard(rank), tokenizer)
    categories = category_slots()
    slot = {name: i for i, name in enumerate(categories)}
    category_ids = [slot.get(c, slot[OTHER]) for c in pairs.category]
    collate = make_collator(cfg.shared_prompt, tokenizer.pad_token_id, cfg.max_length)
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
    local_out = tempfile.mkdtemp(prefix="sp2dpo-out-") if is_uri(cfg.out) else cfg.out
    loggers = Loggers(cfg, local_out) if rank == 0 else None
    strategy.model.train()
    window = MetricSums(len(categories))
    with progress_bar(plan.total_steps, "train", disable=rank != 0 or not loop_config.get("show_progress")) as bar:
        bar.update(state["step"])
        while state["step"] < plan.total_steps:
            step = state["step"]
            _maybe_fail(cfg, step, rank)
            # The step's micro-batches are collated first (a dataloader's job); the clock times the compute.
            plans = [plan.indices(step, micro, rank) for micro in range(cfg.gradient_accumulation_steps)]
            micro_batches = [(idx, collate([pairs.example(i) for i in idx])) for idx in plans]
            t0 = time.perf_counter()
            step_sums = MetricSums(len(categories))
            for idx, cpu_batch in micro_batches:
                batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
                out = batch_loss(strategy.model, batch, cfg.loss_type, cfg.label_smoothing)
                strategy.backward(out.losses.mean())
                strategy.step()
                step_sums.add(out, batch["beta"], [category_ids[i - pairs.start] for i in idx], batch_tokens(batch))
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
        write_outputs(local_out, state["history"])
        if loggers:
            loggers.close()
        if local_out != cfg.out:
            upload_dir(local_out, cfg.out)
        # Written last: a run's outputs are complete once its summary is there.
        write_json(join_uri(cfg.out, "training_summary.json"),
                   training_summary(cfg, state, run_totals, categories, plan, world))
    if local_out != cfg.out:
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
    with tempfile.TemporaryDirectory(prefix="sp2dpo-ckpt-") as directory:
        strategy.save_checkpoint(directory)
        if rank == 0:
            Path(directory, "trainer_state.json").write_text(json.dumps(state))
        # DeepSpeed: every rank holds a shard of the state; plain torch: rank 0 holds it all.
        keep = rank == 0 or strategy.__class__.__name__ == "DeepSpeedStrategy"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if keep else None,
                         checkpoint_dir_name=f"step_{state['step']:07d}")


# ----------------------------------------------------------------------------- the driver


def reference_config(cfg: TrainConfig) -> Any:
    """The reference pass `sp2dpo train` runs itself: training's reference model, max_length,
    dtype and batch layout, so the stored log-probs are what the policy computes at step 0."""
    return ReferenceConfig(artifact=cfg.artifact, pairs=cfg.pairs, model=cfg.reference_id(), max_length=cfg.max_length,
                           dtype=cfg.dtype, out=join_uri(cfg.out, "beta_ref.parquet"),
                           engine="ray" if (cfg.num_workers > 1 or cfg.use_gpu) else "local",
                           num_workers=cfg.num_workers, num_gpus=1.0 if cfg.use_gpu else 0.0,
                           shared_prompt=cfg.shared_prompt)


def prepare_artifact(cfg: TrainConfig, show_progress: bool = True) -> tuple[TrainConfig, dict[str, Any]]:
    """Check the artifact against the pairs and the reference model (computing the reference
    log-probs first when missing and allowed) and tokenize its pairs once (`tokens.tokenize_once`);
    return the config pointing at the checked artifact, and the tokenized pairs {path, tag, reused}."""
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
    # Before any worker starts, every CPU of the cluster is free to tokenize.
    tasks = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return cfg, tokenize_once(table, load_tokenizer(cfg.model), cfg.max_length, cfg.artifact, tasks=tasks,
                              show_progress=show_progress)


def train(cfg: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run training on Ray Train; return the training summary."""
    t0 = time.perf_counter()
    # Ray Train workers run in their own working directory: local paths must be absolute.
    paths = ("artifact", "pairs", "out")
    local = {k: absolute(v) for k in (*paths, "model", "reference_model")
             if (v := getattr(cfg, k)) and not is_uri(v) and (k in paths or os.path.exists(v))}
    cfg = cfg.model_copy(update=local)
    init_ray()
    cfg, tokens = prepare_artifact(cfg, show_progress)
    storage = absolute(cfg.storage_path or join_uri(cfg.out, "ray"))
    # Hub access is the cluster's setting: pass the driver's choice through, never force one.
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "tokens": tokens, "show_progress": show_progress},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
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
    summary = read_json(join_uri(cfg.out, "training_summary.json"))
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and is_uri(storage):  # pyarrow paths carry no scheme
        checkpoint = f"{storage.split('://', 1)[0]}://{checkpoint}"
    summary.update({"artifact": cfg.artifact, "reference": read_sp2dpo_metadata(cfg.artifact).get("reference"),
                    "checkpoint": checkpoint, "token_cache": tokens["path"], "token_cache_reused": tokens["reused"],
                    "out": cfg.out, "wall_seconds": round(time.perf_counter() - t0, 2)})
    return summary
