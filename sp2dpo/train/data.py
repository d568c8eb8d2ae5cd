"""From the β artifact to padded batches: conversations, tokens, and a collator that carries β.

Training rows come from `sp2dpo.schedule.artifact.training_pairs` (verified against the pairs
table, drops and flips applied). Each row becomes a conversation in TRL's format — the prompt as
chat messages, each answer as one assistant message — tokenized through the tokenizer's chat
template exactly as TRL 1.16's `DPOTrainer` does, so our loop, the TRL route and the offline
reference pass all score the same token sequences.

The collator is TRL's `DataCollatorForPreference` (2B rows: B chosen then B rejected) plus the
per-pair columns, each of shape [B] and in the same order as the pairs: `beta`,
`ref_chosen_logps` / `ref_rejected_logps` when present, and `index` (the row in the table, which
the loop uses for per-category metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa

from sp2dpo.schedule.artifact import REF_LOGP_COLUMNS, ArtifactError, read_artifact, training_pairs

PER_PAIR_KEYS = ("beta", "ref_chosen_logps", "ref_rejected_logps", "index")


def conversation(prompt: str, prompt_messages: str | None, chosen: str, rejected: str) -> dict[str, list]:
    """One pair in TRL's conversational preference format."""
    messages = json.loads(prompt_messages) if prompt_messages else [{"role": "user", "content": prompt}]
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer: Any, conv: dict[str, list]) -> dict[str, list[int]]:
    """prompt_ids / chosen_ids / rejected_ids, as TRL 1.16 `DPOTrainer._prepare_dataset` makes them
    (the completion starts where prompt and prompt+completion diverge). tests/test_train_trl.py
    checks the two agree token for token."""

    def ids(messages: list, **kw: Any) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=None, **kw)["input_ids"])

    prompt_ids = ids(conv["prompt"], add_generation_prompt=True)
    chosen_full = ids(conv["prompt"] + conv["chosen"])
    rejected_full = ids(conv["prompt"] + conv["rejected"])
    n = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen_full[n:], "rejected_ids": rejected_full[n:]}


def tokenize_table(table: pa.Table, tokenizer: Any, max_length: int | None) -> list[dict[str, Any]]:
    """Examples for the collator, in table order. Pairs whose prompt alone fills `max_length` are
    refused rather than skipped: they would have no completion token left to learn from, and a
    silently shorter dataset would no longer match the artifact."""
    examples = []
    cols = {name: table[name].to_pylist() for name in table.column_names}
    for i in range(table.num_rows):
        conv = conversation(cols["prompt"][i], cols["prompt_messages"][i], cols["chosen"][i], cols["rejected"][i])
        example = tokenize_pair(tokenizer, conv)
        if max_length is not None and len(example["prompt_ids"]) >= max_length:
            raise ValueError(
                f"pair {cols['pair_id'][i]}: its prompt alone has {len(example['prompt_ids'])} tokens, "
                f">= max_length={max_length}; raise max_length or drop the pair in the artifact"
            )
        if "beta" in cols:
            example["beta"] = float(cols["beta"][i])
        example["index"] = i
        for name in REF_LOGP_COLUMNS:
            if name in cols:
                example[name] = cols[name][i]
        examples.append(example)
    return examples


class PerPairCollator:
    """TRL's preference collator plus the per-pair columns ([B] tensors, pair order)."""

    def __init__(self, pad_token_id: int, max_length: int | None = None, truncation_mode: str = "keep_start",
                 inner: Any = None):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.inner = inner or DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length,
                                                        truncation_mode=truncation_mode)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # The inner collator sees only token columns: TRL's would also stack ref_*_logps, which we
        # do ourselves so a missing value is an error instead of a crash deep in torch.
        token_keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        batch = dict(self.inner([{k: ex[k] for k in token_keys} for ex in examples]))
        batch.update(per_pair_tensors(examples))
        return batch


def per_pair_tensors(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-pair columns present in the examples, as [B] tensors in pair order."""
    import torch

    out = {}
    for key in PER_PAIR_KEYS:
        if key in examples[0]:
            values = [ex[key] for ex in examples]
            if any(v is None for v in values):
                raise ValueError(f"a pair in this batch has no {key}")
            out[key] = torch.tensor(values, dtype=torch.long if key == "index" else torch.float32)
    return out


# ----------------------------------------------------------------------------- reference tag


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with the same hash give the same ids."""
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map,
         "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def reference_tag(model_id: str, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """What the offline reference log-probs depend on; stored in the artifact, checked at training."""
    template = tokenizer.chat_template or ""
    # A local path is stored absolute, so `./m` and `/abs/m` (as Ray workers see it) match.
    if os.path.exists(model_id):
        model_id = os.path.abspath(model_id)
    return {
        "model_id": model_id,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "max_length": max_length,
        "chat_template_hash": hashlib.sha256(template.encode()).hexdigest()[:16],
    }


def check_reference(metadata: dict[str, Any], expected: dict[str, Any], artifact_path: str) -> None:
    """Refuse reference log-probs computed for another model, tokenizer, template or max_length."""
    found = metadata.get("reference")
    if not found:
        raise ArtifactError(f"{artifact_path} has reference log-probs but no `reference` tag saying which model made them")
    diffs = [f"{k}: artifact {found.get(k)!r} vs training {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ArtifactError(
            f"{artifact_path}: its reference log-probs belong to another reference ({'; '.join(diffs)}); "
            "recompute them with `sp2dpo train reference`"
        )


def load_training_table(artifact_path: str, pairs_path: str, require_ref: bool = False) -> tuple[pa.Table, dict]:
    """Verified training rows and the artifact metadata."""
    table = training_pairs(artifact_path, pairs_path)
    _, metadata = read_artifact(artifact_path)
    if table.num_rows == 0:
        raise ArtifactError(f"{artifact_path}: every pair is dropped, nothing to train on")
    has_ref = all(name in table.column_names for name in REF_LOGP_COLUMNS)
    if require_ref and not has_ref:
        raise ArtifactError(f"{artifact_path} has no reference log-probs: run `sp2dpo train reference` first")
    if has_ref:
        for name in REF_LOGP_COLUMNS:
            if table[name].null_count:
                raise ArtifactError(f"{artifact_path}: {table[name].null_count} trained pairs have a null {name}")
    return table, metadata
