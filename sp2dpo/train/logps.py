"""Summed answer log-probs of a pair batch, for the policy and the reference alike.

    model, tokenizer = load_causal_lm("smollm2")          # TRL's fused head + the answer scorer
    collate = make_collator(shared_prompt=True, pad_token_id=tokenizer.pad_token_id, max_length=1024)
    chosen, rejected = batch_logps(model, collate(examples))   # [B] each, in pair order

The two batch layouts: one row per pair (`shared_prompt.SharedPromptCollator`, the prompt
forwarded once) or TRL's two rows (`data.PerPairCollator`, B chosen rows then B rejected). Both
carry the same per-pair [B] columns (`beta`, `ref_*_logps`, `index`); `batch_logps`,
`completion_lengths` and `batch_tokens` read either. The training loop (policy, train mode) and
the reference pass (eval mode, no gradients) call the same functions, so the stored reference
log-probs are what the policy computes at step 0.
"""

from __future__ import annotations

from typing import Any

import torch

from sp2dpo.models import resolve_model
from sp2dpo.train.data import PerPairCollator
from sp2dpo.train.shared_prompt import CHOSEN, REJECTED, SharedPromptCollator, add_answer_scoring, shared_prompt_logps


def load_tokenizer(model_id: str) -> Any:
    """The tokenizer of a local path or bundled name, with a pad token (the eos when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_id: str, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """Model and tokenizer from a local path or a bundled name, with TRL's fused LM head and the
    shared-prompt answer scorer added (both only add keyword arguments to `forward`)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = load_tokenizer(model_id)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_id), dtype=getattr(torch, dtype))
    if device:
        model.to(device)
    add_fused_lm_head(model)
    add_answer_scoring(model)
    return model, tokenizer


def disable_dropout(model: Any) -> None:
    """Dropout off, so a training-mode forward computes what the reference pass (eval mode) did.

    TRL's `disable_dropout_in_model` (what `DPOConfig.disable_dropout` runs) zeroes `nn.Dropout`
    modules; Llama-style attention applies `attention_dropout` functionally in training mode, so
    that rate is zeroed too."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float) and not isinstance(module, torch.nn.Dropout):
            module.attention_dropout = 0.0


def make_collator(shared_prompt: bool, pad_token_id: int, max_length: int | None) -> Any:
    """The batch layout asked for: one row per pair (`shared_prompt`) or TRL's two rows."""
    collator = SharedPromptCollator if shared_prompt else PerPairCollator
    return collator(pad_token_id, max_length=max_length)


def sequence_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a two-row batch: ([B] chosen, [B] rejected).

    `model` carries TRL's fused LM head, which scores the label tokens without building the
    [2B, T, vocab] logits (the largest activation of a small model)."""
    completion_mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(dim=1).chunk(2, dim=0)


def batch_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of a batch in either layout (one row per pair or TRL's two)."""
    return shared_prompt_logps(model, batch) if "segments" in batch else sequence_logps(model, batch)


def completion_lengths(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored answer tokens per pair ([B] chosen, [B] rejected), as IPO normalises by them, in
    either layout (TRL's two rows carry no `segments`: chosen rows first, then rejected)."""
    if "segments" not in batch:
        return batch["completion_mask"].sum(dim=1).chunk(2)
    scored = batch["completion_mask"].bool()
    return ((batch["segments"] == CHOSEN) & scored).sum(dim=1), ((batch["segments"] == REJECTED) & scored).sum(dim=1)


def batch_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Prompt+answer tokens of the pairs in a batch, counted as TRL's two-row batch holds them."""
    return batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum()
