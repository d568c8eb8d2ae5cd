"""Strategy objects: the training loop calls `backward`, `step`, `save_checkpoint`, `save_hf` and
reads like single-process PyTorch; the strategy hides DeepSpeed (or plain DDP).

    deepspeed  ZeRO-2 / ZeRO-3 (`zero_stage`), torch AdamW as the client optimizer, so no DeepSpeed
               op has to be compiled for the optimizer (`zero_force_ds_cpu_optimizer: false`).
               Works over gloo on CPU and NCCL on GPUs; extra keys in `deepspeed_config` are merged
               into the generated config.
    torch      plain AdamW (+ DDP when there are several workers): no DeepSpeed at all. DeepSpeed on
               CPU JIT-compiles its shared-memory communication op on first use (minutes, once per
               machine), so the quick tests and laptops default to this. With
               `optimizer_in_backward` (one worker) each parameter's AdamW step runs inside the
               backward pass and its gradient is freed at once (`InBackwardAdamW`).

Both load and save the same things: model weights, optimizer and scheduler state, so a run
resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from sp2dpo.utils import deep_merge


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """Warm-up length as `TrainingArguments.get_warmup_steps` computes it: `warmup_steps`, or
    ceil(total_steps × warmup_ratio)."""
    return cfg.warmup_steps if cfg.warmup_steps else math.ceil(total_steps * cfg.warmup_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> Any:
    """`transformers.get_scheduler(cfg.lr_scheduler_type)`, the schedule HF Trainer and TRL build
    from the same settings; stepped once per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config a TrainConfig asks for (pure: tests read it without DeepSpeed)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            # ZeRO-3 shards the weights; gather them to rank 0 so the final HF directory is whole.
            **({"stage3_gather_16bit_weights_on_model_save": True} if cfg.zero_stage == 3 else {}),
        },
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, cfg.deepspeed_config)


class InBackwardAdamW:
    """AdamW fused into the backward pass: one AdamW per parameter, stepped from that parameter's
    post-accumulate-grad hook, which then frees the gradient. No full set of gradients ever exists,
    so the peak holds one gradient-sized buffer less (the technique of torchtune's
    `optimizer_in_bwd` and PyTorch's "fuse the optimizer step into backward" recipe).

    The update equals a plain AdamW step on the same gradients, because every hook fires after
    its parameter's gradient is complete and autograd no longer reads that parameter (an in-place
    change to a tensor backward still needs would raise a version-counter error). What cannot
    work is anything needing all gradients at once: a global-norm clip, accumulation over
    micro-batches, DDP's bucketed all-reduce; TrainConfig refuses those combinations.

    The learning-rate schedule is `make_scheduler`'s, run on a one-parameter stand-in optimizer
    whose rate is copied to every per-parameter optimizer after each step; `param_groups`
    exposes the first one's groups for logging."""

    def __init__(self, model: torch.nn.Module, cfg: Any, total_steps: int):
        self.steps = 0
        self._clock = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
        self.schedule = make_scheduler(self._clock, cfg, total_steps)
        lr = self.schedule.get_last_lr()[0]
        self.optimizers: dict[str, torch.optim.AdamW] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.optimizers[name] = torch.optim.AdamW([p], lr=lr, weight_decay=cfg.weight_decay, fused=True)
                p.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str):
        def step_and_free(param: torch.Tensor) -> None:
            optimizer = self.optimizers[name]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    @property
    def param_groups(self) -> list[dict]:
        return next(iter(self.optimizers.values())).param_groups

    def advance(self) -> None:
        """One optimizer step done (the updates already happened in backward): move the schedule."""
        self.steps += 1
        self.schedule.step()
        self._set_lr()

    def _set_lr(self) -> None:
        lr = self.schedule.get_last_lr()[0]
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "schedule": self.schedule.state_dict(),
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.steps = state["steps"]
        self.schedule.load_state_dict(state["schedule"])
        self._set_lr()


class TorchStrategy:
    def __init__(self, cfg: Any, world_size: int, rank: int, device: torch.device):
        self.cfg, self.world_size, self.rank, self.device = cfg, world_size, rank, device
        self._micro = 0

    def prepare(self, model: torch.nn.Module, total_steps: int) -> None:
        model.to(self.device)
        self.module = model
        if self.cfg.optimizer_in_backward:
            self.optimizer = InBackwardAdamW(model, self.cfg, total_steps)
            self.scheduler = None
            self.model = model  # one worker (TrainConfig checks): no DDP
            return
        # Fused AdamW (the HF Trainer default): no param-sized temporaries, so a lower peak.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.learning_rate,
                                           weight_decay=self.cfg.weight_decay, fused=True)
        self.scheduler = make_scheduler(self.optimizer, self.cfg, total_steps)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.gradient_accumulation_steps).backward()

    def step(self) -> None:
        if isinstance(self.optimizer, InBackwardAdamW):  # every parameter already stepped in backward
            self.optimizer.advance()
            return
        self._micro += 1
        if self._micro % self.cfg.gradient_accumulation_steps:
            return
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(self, directory: str) -> None:
        if self.rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict() if self.scheduler else None},
                       os.path.join(directory, "torch_state.pt"))

    def needs_file(self, name: str) -> bool:
        """Whether resuming reads checkpoint file `name`: every rank loads rank 0's whole state."""
        return True

    def load_checkpoint(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "torch_state.pt"), map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])

    def save_hf(self, directory: str, tokenizer: Any) -> None:
        if self.rank == 0:
            _save_hf(self.module, self.module.state_dict(), directory, tokenizer)


class DeepSpeedStrategy:
    TAG = "ckpt"

    def __init__(self, cfg: Any, world_size: int, rank: int, device: torch.device):
        self.cfg, self.world_size, self.rank, self.device = cfg, world_size, rank, device

    def prepare(self, model: torch.nn.Module, total_steps: int) -> None:
        import deepspeed

        # Ray Train has already created the process group (gloo on CPU, NCCL on GPUs).
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.module = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        scheduler = make_scheduler(optimizer, self.cfg, total_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.world_size),
        )

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self) -> None:
        self.model.step()  # optimizer + scheduler only at accumulation boundaries

    def save_checkpoint(self, directory: str) -> None:
        # Every rank writes its own ZeRO shard; Ray Train merges the workers' directories.
        self.model.save_checkpoint(directory, tag=self.TAG)

    def needs_file(self, name: str) -> bool:
        """Whether resuming reads checkpoint file `name`: the shared files and this rank's own ZeRO
        shards (`[bf16_]zero_pp_rank_<dp rank>_mp_rank_..`), not the other ranks'. No model
        parallelism here, so the dp rank is the rank."""
        # An elastic ZeRO checkpoint is re-partitioned on load: every rank reads every shard.
        elastic = self.cfg.deepspeed_config.get("zero_optimization", {}).get("elastic_checkpoint", False)
        shard = re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_", os.path.basename(name))
        return elastic or shard is None or int(shard.group(1)) == self.rank

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.model.load_checkpoint(directory, tag=self.TAG)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def save_hf(self, directory: str, tokenizer: Any) -> None:
        if self.cfg.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        else:
            state = self.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            _save_hf(self.module, state, directory, tokenizer)


def _save_hf(module: torch.nn.Module, state_dict: dict, directory: str, tokenizer: Any) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if getattr(module, "generation_config", None) is not None:
        module.generation_config.save_pretrained(directory)


def make_strategy(cfg: Any, world_size: int, rank: int, device: torch.device) -> TorchStrategy | DeepSpeedStrategy:
    return (DeepSpeedStrategy if cfg.strategy == "deepspeed" else TorchStrategy)(cfg, world_size, rank, device)
