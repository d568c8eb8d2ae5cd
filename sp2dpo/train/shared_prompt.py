"""Score a pair's two answers in one row that runs the prompt through the model once.

TRL's preference collator gives each pair two rows, prompt+chosen and prompt+rejected, so every
prompt token goes through the model twice (and, in TRL, through the reference model twice more).
Here a pair is one row:

    tokens     prompt[:-1]  | p  chosen          | p  rejected           (p: the prompt's last token)
    segment    0            | 1  1 ... 1         | 2  2 ... 2
    position   0 .. P-2     | P-1 .. P-1+C       | P-1 .. P-1+R

and a [B, 1, T, T] attention mask lets a token see the earlier tokens of its own segment and of
the shared prompt (segment 0), never the other answer. So each answer is computed from exactly
the tokens, at exactly the positions, it has in its own row: the log-probs are the same numbers
up to float rounding (tests compare values and gradients with the two-row batch). `p` is
written twice so every scored token is predicted by the position just before it, which is what
TRL's fused LM head (shifted labels) scores: the row goes through `model(..., fused_lm_head=True)`
unchanged, and through DDP / DeepSpeed wrappers like any other batch.

Only the answer tokens are projected through the LM head (`add_answer_scoring`): TRL's fused
head does that on GPUs, but on CPU it projects every position (prompt and padding included) and
masks afterwards. The head itself is TRL's chunked log-prob kernel (no [N, vocab] logits). Under
DeepSpeed ZeRO-3, whose sharded head only TRL's own forward knows how to gather, the row goes
through TRL's fused head instead; the log-probs are the same either way.

A pair costs P + C + R + 1 token positions instead of 2P + C + R, and the batch has B rows
padded to the longest pair instead of 2B rows padded to the longest answer. Truncation is TRL's
`keep_start` (prompt + answer cut at `max_length`); the prompt itself is never cut
(`data.tokenize_table` refuses prompts that fill `max_length`), so both answers share it whole.
The attention implementation must take a custom 4D mask: `sdpa` (the default) or `eager`.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from sp2dpo.train.data import per_pair_tensors

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
MASKABLE_ATTENTION = ("sdpa", "eager")


class SharedPromptCollator:
    """Examples (`data.tokenize_table`) → one row per pair: `input_ids`, `position_ids`,
    `segments`, `completion_mask` (the answer tokens that are scored); for the answer scorer the
    flat positions that predict them (`score_index`), the tokens (`score_targets`) and where each
    log-prob is summed (`score_slot`: pair b's chosen → b, its rejected → B + b); `num_tokens`
    (the tokens the two-row batch would hold, so tokens/s means the same on both layouts); and
    the per-pair [B] columns of `data.PerPairCollator`."""

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._row(ex) for ex in examples]
        width = max(len(ids) for ids, *_ in rows)

        def padded(column: int, value: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([r[column] + [value] * (width - len(r[column])) for r in rows], dtype=dtype)

        batch = {
            "input_ids": padded(0, self.pad_token_id, torch.long),
            "segments": padded(1, PAD, torch.int8),
            "position_ids": padded(2, 0, torch.long),
            "completion_mask": padded(3, 0, torch.long),
            "num_tokens": torch.tensor(sum(r[4] for r in rows), dtype=torch.long),
        }
        # Position t predicts token t + 1: score the positions just before each answer token.
        ids, segments = batch["input_ids"], batch["segments"]
        pair, col = batch["completion_mask"][:, 1:].nonzero(as_tuple=True)
        batch["score_index"] = pair * width + col
        batch["score_targets"] = ids[pair, col + 1]
        batch["score_slot"] = pair + len(examples) * (segments[pair, col + 1] == REJECTED)
        batch.update(per_pair_tensors(examples))
        return batch

    def _row(self, ex: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int], int]:
        prompt = ex["prompt_ids"]
        n = len(prompt)
        room = None if self.max_length is None else self.max_length - n
        if n == 0 or (room is not None and room <= 0):
            raise ValueError(f"a prompt of {n} tokens leaves no room for an answer (max_length={self.max_length})")
        chosen, rejected = ex["chosen_ids"][:room], ex["rejected_ids"][:room]  # keep_start, as TRL truncates
        p = prompt[-1]
        ids = prompt[:-1] + [p] + chosen + [p] + rejected
        segments = [PROMPT] * (n - 1) + [CHOSEN] * (1 + len(chosen)) + [REJECTED] * (1 + len(rejected))
        positions = [*range(n - 1), *range(n - 1, n + len(chosen)), *range(n - 1, n + len(rejected))]
        scored = [0] * n + [1] * len(chosen) + [0] + [1] * len(rejected)
        return ids, segments, positions, scored, 2 * n + len(chosen) + len(rejected)


def attention_mask_4d(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] mask from [B, T] segment ids: causal, within a segment or onto the prompt.

    `sdpa` takes a boolean mask (True = attend), `eager` an additive one. A padding position
    sees only itself, so no softmax row is empty (an empty row gives NaN, and NaN times a zero
    gradient is still NaN in the weight gradients)."""
    if implementation not in MASKABLE_ATTENTION:
        raise ValueError(f"shared_prompt needs an attention implementation that takes a 4D mask "
                         f"({', '.join(MASKABLE_ATTENTION)}), not {implementation!r}; set shared_prompt=false")
    width = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((key == PROMPT) | (key == query)) & (key != PAD) & (query != PAD)
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


# Logit scalings TRL's fused head knows about. The answer scorer applies `final_logit_softcapping`
# and `logit_scale` (Gemma, Cohere) and refuses these rarer ones rather than score them wrongly.
_UNSUPPORTED_HEAD_SCALING = ("output_multiplier", "lm_head_multiplier", "logits_scaling")
VOCAB_TILE = 32768  # vocabulary columns per LM-head tile (TRL's fused head uses the same)


def add_answer_scoring(model: Any) -> None:
    """`model(..., score_index=[N], score_targets=[N])` returns the [N] log-probs of `score_targets`
    from the hidden states at flat positions `score_index` (row * width + column), projecting only
    those N positions. Without `score_index` the forward is unchanged (TRL's fused head, generate)."""
    from trl.kernels import ChunkedLogProbFunction

    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    logit_scale = getattr(text_config, "logit_scale", None)
    logit_scale = 1.0 if logit_scale is None else logit_scale
    unsupported = [k for k in _UNSUPPORTED_HEAD_SCALING if getattr(text_config, k, None) is not None]
    inner_forward = model.forward

    def forward(self: Any, *args: Any, score_index: Any = None, score_targets: Any = None, **kwargs: Any) -> Any:
        if score_index is None:
            return inner_forward(*args, **kwargs)
        if unsupported:
            raise ValueError(f"this model scales its logits ({', '.join(unsupported)}); set shared_prompt=false")
        hidden = self.base_model(*args, use_cache=False, **kwargs).last_hidden_state
        hidden = hidden.flatten(0, 1).index_select(0, score_index)
        head = self.get_output_embeddings()
        log_probs, *_ = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, score_targets, 1.0, VOCAB_TILE,
                                                     softcap, logit_scale, ("log_probs",))
        return log_probs

    model.forward = types.MethodType(forward, model)


def _zero3_sharded(model: Any) -> bool:
    module = getattr(model, "module", model)
    return hasattr(module.get_output_embeddings().weight, "ds_id")


def attention_implementation(model: Any) -> str:
    module = getattr(model, "module", model)  # DDP and DeepSpeed wrap the HF model as `.module`
    return getattr(module.config, "_attn_implementation", None) or "sdpa"


def shared_prompt_logps(model: Any, batch: dict[str, Any],
                        answer_scorer: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a shared-prompt batch: ([B] chosen, [B] rejected).

    `model` comes from `logps.load_causal_lm` (TRL's fused head and `add_answer_scoring`).
    `answer_scorer` picks the head; by default the answer scorer, or TRL's fused head when the
    head is sharded by ZeRO-3."""
    segments, completion = batch["segments"], batch["completion_mask"]
    dtype = next(getattr(model, "module", model).parameters()).dtype
    mask = attention_mask_4d(segments, attention_implementation(model), dtype)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    if answer_scorer if answer_scorer is not None else not _zero3_sharded(model):
        log_probs = model(**inputs, score_index=batch["score_index"], score_targets=batch["score_targets"])
        n_pairs = segments.shape[0]
        sums = log_probs.new_zeros(2 * n_pairs).index_add(0, batch["score_slot"], log_probs)
        return sums[:n_pairs], sums[n_pairs:]
    labels = batch["input_ids"].masked_fill(completion == 0, -100)
    out = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
    log_probs = out.log_probs  # [B, T-1]: log p(token t+1 | ...), zero where not scored
    answer = segments[:, 1:]
    chosen = (log_probs * (answer == CHOSEN)).sum(dim=1)
    rejected = (log_probs * (answer == REJECTED)).sum(dim=1)
    return chosen, rejected
