"""Strategy objects: the training loop calls `backward`, `step`, `save_checkpoint`, `save_hf` and
reads like single-process PyTorch; the strategy hides DeepSpeed (or plain DDP).

    deepspeed  ZeRO-2 / ZeRO-3 (`zero_stage`), torch AdamW as the client optimizer, so no DeepSpeed
               op has to be compiled for the optimizer (`zero_force_ds_cpu_optimizer: false`).
               Works over gloo on CPU and NCCL on GPUs; extra keys in `deepspeed_config` are merged
               into the generated config.
    torch      plain AdamW (+ DDP when there are several workers): no DeepSpeed at all. DeepSpeed on
               CPU JIT-compiles its shared-memory communication op on first use (minutes, once per
               machine), so the quick tests and laptops default to this.

Both load and save the same things: model weights, optimizer and scheduler state, so a run
resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def warmup_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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
    return _merge(config, cfg.deepspeed_config)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class TorchStrategy:
    def __init__(self, cfg: Any, world_size: int, rank: int, device: torch.device):
        self.cfg, self.world_size, self.rank, self.device = cfg, world_size, rank, device
        self._micro = 0

    def prepare(self, model: torch.nn.Module) -> None:
        model.to(self.device)
        self.module = model
        # Fused AdamW (the HF Trainer default): no param-sized temporaries, so a lower peak.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.learning_rate,
                                           weight_decay=self.cfg.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(self.cfg.warmup_steps))
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.gradient_accumulation_steps).backward()

    def step(self) -> None:
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
                        "scheduler": self.scheduler.state_dict()}, os.path.join(directory, "torch_state.pt"))

    def load_checkpoint(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "torch_state.pt"), map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_hf(self, directory: str, tokenizer: Any) -> None:
        if self.rank == 0:
            _save_hf(self.module, self.module.state_dict(), directory, tokenizer)


class DeepSpeedStrategy:
    TAG = "ckpt"

    def __init__(self, cfg: Any, world_size: int, rank: int, device: torch.device):
        self.cfg, self.world_size, self.rank, self.device = cfg, world_size, rank, device

    def prepare(self, model: torch.nn.Module) -> None:
        import deepspeed

        # Ray Train has already created the process group (gloo on CPU, NCCL on GPUs).
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.module = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.cfg.warmup_steps))
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
