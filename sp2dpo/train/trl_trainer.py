"""Per-pair β on top of TRL's `DPOTrainer` (trl==1.16.0): drop it into an existing TRL script.

    from sp2dpo.train.trl_trainer import PerPairBetaDPOTrainer
    # train_dataset: prompt / chosen / rejected (text or conversational) + a float `beta` column
    trainer = PerPairBetaDPOTrainer(model=model, ref_model=ref, args=DPOConfig(...),
                                    train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

How β travels, and what stock TRL would do without each step:
1. `_set_signature_columns_if_needed` keeps the `beta` column (Trainer's
   `remove_unused_columns` would drop it before the collator).
2. The collator gets `PerPairCollator` around it: `batch["beta"]` is a [B] tensor in the order of
   the pairs, aligned with TRL's `chosen_logps.chunk(2)` halves.
3. `_compute_loss` pops `beta` (TRL forwards unknown keys to `model(**kwargs)`) and, for that one
   call, makes `self.beta` the [B] tensor. Every `self.beta * delta` in TRL's loss and reward
   metrics then broadcasts per pair: TRL's loss code runs unchanged, nothing is copied.

Features that would put a β on the wrong pair are refused at construction: losses that sort the
batch (`aot`, `aot_unpaired`), the Liger kernel (its β is fixed when the kernel is built), and
vision datasets (their collator does not carry extra columns). So is `label_smoothing` with a loss
that TRL 1.16 computes without it (`sigmoid`, `hinge`, `ipo`: the setting would do nothing).

`dpo_config(train_config, output_dir)` turns an `sp2dpo train` config into the `DPOConfig` with
the same optimisation: learning rate and its schedule (`lr_scheduler_type`, warm-up), dropout,
loss, clipping, batch sizes, precision. With `disable_dropout` the trainer also zeroes the
attention dropout rate Llama-style models apply functionally (TRL's own helper zeroes only
`nn.Dropout` modules), as the own loop does.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

from sp2dpo.train.data import PerPairCollator
from sp2dpo.train.logps import disable_dropout

# Losses that sort or otherwise reorder pairs inside the batch before applying β.
REORDERING_LOSSES = {"aot": "sorts the log-ratios across the batch",
                     "aot_unpaired": "sorts the log-ratios across the batch"}


def check_per_pair_compatible(args: Any) -> None:
    """Raise ValueError for DPOConfig settings that cannot carry a per-pair β."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("per-pair beta cannot use use_liger_kernel=True: Liger's fused DPO loss fixes beta "
                         "when the kernel is built; turn use_liger_kernel off")
    bad = [t for t in args.loss_type if t in REORDERING_LOSSES]
    if bad:
        raise ValueError(f"per-pair beta cannot use loss_type {bad}: it {REORDERING_LOSSES[bad[0]]}, so beta_i "
                         "would no longer meet its own pair; use sigmoid, ipo, hinge or robust")
    ignored = [t for t in args.loss_type if t in ("sigmoid", "hinge", "ipo")]
    if args.label_smoothing and ignored:
        raise ValueError(f"label_smoothing={args.label_smoothing} has no effect on loss_type {ignored} in TRL 1.16 "
                         "(its sigmoid has no conservative-DPO term); use loss_type=robust, or label_smoothing=0")


def dpo_config(cfg: Any, output_dir: str, **overrides: Any) -> Any:
    """The `DPOConfig` that trains like `sp2dpo train` with TrainConfig `cfg` (same schedule,
    dropout, loss and batch); `overrides` are further DPOConfig fields."""
    from trl import DPOConfig

    kwargs = {
        "output_dir": output_dir, "learning_rate": cfg.learning_rate, "lr_scheduler_type": cfg.lr_scheduler_type,
        # transformers 5: warmup_steps < 1 is a ratio of the training steps, rounded up.
        "warmup_steps": cfg.warmup_steps or cfg.warmup_ratio, "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm, "disable_dropout": cfg.disable_dropout, "loss_type": [cfg.loss_type],
        "label_smoothing": cfg.label_smoothing, "per_device_train_batch_size": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps or -1, "max_length": cfg.max_length, "seed": cfg.seed,
        "bf16": cfg.dtype == "bfloat16", "fp16": cfg.dtype == "float16",
        "gradient_checkpointing": cfg.gradient_checkpointing, "use_cpu": not cfg.use_gpu, "report_to": [],
    }
    return DPOConfig(**{**kwargs, **overrides})


class PerPairBetaDPOTrainer(DPOTrainer):
    """`DPOTrainer` whose β is read per pair from the dataset's `beta` column."""

    _tag_names = ["trl", "dpo", "sp2dpo"]

    def __init__(self, *args: Any, **kwargs: Any):
        dpo_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        train_dataset = kwargs["train_dataset"] if "train_dataset" in kwargs else (args[4] if len(args) > 4 else None)
        if dpo_args is not None:
            check_per_pair_compatible(dpo_args)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", kwargs.get("eval_dataset"))):
            if dataset is None or isinstance(dataset, dict):
                continue
            columns = dataset.column_names or list(next(iter(dataset)).keys())
            if "beta" not in columns:
                raise ValueError(f"{name} has no 'beta' column: per-pair DPO needs one beta per pair "
                                 f"(columns: {columns})")
            if "image" in columns or "images" in columns:
                raise ValueError("per-pair beta does not support vision datasets: their collator drops extra columns")
        self._batch_beta: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        if self.args.disable_dropout:
            for model in (self.model, self.ref_model):
                if model is not None:
                    disable_dropout(model)
        if self.args.loss_type and set(self.args.loss_type) == {"sft"}:
            raise ValueError("loss_type=['sft'] ignores beta: there is nothing per-pair to train")
        # After TRL's __init__: its reference precompute (if any) used the plain collator, whose
        # batches must not contain `beta` (compute_ref_log_probs forwards unknown keys to the model).
        self.data_collator = PerPairCollator(pad_token_id=self._tokenizer.pad_token_id, inner=self.data_collator)

    # TRL assigns `self.beta = args.beta` in __init__ and reads `self.beta` in the loss: the setter
    # keeps that scalar, the getter hands out the current batch's [B] tensor while one is active.
    @property
    def beta(self) -> float | torch.Tensor:
        return self._batch_beta if self._batch_beta is not None else self._base_beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._base_beta = value

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "beta" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "beta"]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        inputs = dict(inputs)
        beta = inputs.pop("beta", None)
        inputs.pop("index", None)
        if beta is None:
            raise ValueError("this batch has no 'beta': build it with PerPairCollator from a dataset with a beta "
                             "column")
        self._batch_beta = beta.to(device=self.accelerator.device, dtype=torch.float32)
        try:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["beta/mean"].append(self.accelerator.gather(self._batch_beta).mean().item())
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self._batch_beta = None

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in inputs.items() if k not in ("beta", "index")}
        return super().compute_ref_log_probs(model, inputs)
