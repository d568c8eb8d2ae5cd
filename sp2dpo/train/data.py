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
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=None, **kw)
        return list(encoded["input_ids"])

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
    """Hash of everything that turns text into ids: vocabulary, special tokens, and the tokenizer's
    pipeline (normalizer, pre-tokenizer, BPE merges, post-processor, added tokens). Two tokenizers
    with the same vocabulary but other merges or another normalizer split text differently."""
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map,
         "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pipeline": _tokenizer_pipeline(tokenizer)},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tokenizer_pipeline(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding and truncation are call-time settings a library may change; they split nothing.
        return {k: v for k, v in spec.items() if k not in ("truncation", "padding")}
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None:  # slow SentencePiece tokenizers: the model proto holds pieces and normalizer
        return hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()
    ranks = getattr(tokenizer, "bpe_ranks", None)  # slow BPE tokenizers
    return sorted((" ".join(pair), rank) for pair, rank in ranks.items()) if ranks else None


# Bytes read per tensor for the weights digest: a window at the start, middle and end of each.
DIGEST_WINDOW_BYTES = 4096


def weights_digest(model_id: str) -> str:
    """A cheap fingerprint of a model's weights: a few MB read however large the model is.

    Per weights file (the `*.safetensors` files, or the `*.bin` files when there are none; sorted
    by name): its name and size, the safetensors header (tensor names, dtypes, shapes, offsets),
    and for every tensor DIGEST_WINDOW_BYTES at the start, middle and end of its data (a `.bin`
    file: 64 windows spread over the file). Fine-tuning, or merging an adapter, changes whole
    weight matrices, so every changed tensor changes the digest although names, shapes and sizes
    agree; an edit confined to a few elements between the windows is not seen. A hub id that is
    not a local directory is fingerprinted by the commit of its cached snapshot
    (`hub:<id>@<commit>`)."""
    from sp2dpo.models import resolve_model

    path = resolve_model(model_id)
    if not os.path.isdir(path):
        return _hub_revision(path)
    names = os.listdir(path)
    files = sorted(f for f in names if f.endswith(".safetensors")) or sorted(f for f in names if f.endswith(".bin"))
    if not files:
        raise ArtifactError(f"{path} holds no weights file (*.safetensors, *.bin): cannot fingerprint the reference")
    h = hashlib.sha256()
    for name in files:
        with open(os.path.join(path, name), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{name}:{size}".encode())
            if name.endswith(".safetensors"):
                header_len = int.from_bytes(f.read(8), "little")
                header = f.read(header_len)
                h.update(header)
                spans = [(8 + header_len + info["data_offsets"][0], 8 + header_len + info["data_offsets"][1])
                         for key, info in sorted(json.loads(header).items()) if key != "__metadata__"]
            else:
                spans = [(size * i // 64, size * (i + 1) // 64) for i in range(64)]
            for begin, stop in spans:
                w = min(DIGEST_WINDOW_BYTES, stop - begin)
                for offset in sorted({begin, begin + (stop - begin - w) // 2, stop - w}):
                    f.seek(offset)
                    h.update(f.read(w))
    return h.hexdigest()[:16]


def _hub_revision(model_id: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(cached, str):
        raise ArtifactError(f"reference model {model_id!r} is neither a local directory nor in the hub cache: "
                            "download it first (or pass a local path) so its weights can be fingerprinted")
    return f"hub:{model_id}@{os.path.basename(os.path.dirname(cached))}"


def reference_tag(model_id: str, tokenizer: Any, max_length: int | None, dtype: str = "float32") -> dict[str, Any]:
    """What the offline reference log-probs depend on; stored in the artifact, checked at training."""
    template = tokenizer.chat_template or ""
    digest = weights_digest(model_id)
    # A local path is stored absolute, so `./m` and `/abs/m` (as Ray workers see it) match.
    if os.path.exists(model_id):
        model_id = os.path.abspath(model_id)
    return {
        "model_id": model_id,
        "weights_digest": digest,
        "dtype": dtype,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "max_length": max_length,
        "chat_template_hash": hashlib.sha256(template.encode()).hexdigest()[:16],
    }


# For each tag field, what to change when the artifact's value differs from training's.
TAG_FIXES = {
    "model_id": "set reference_model (or model) to the artifact's reference, or recompute",
    "weights_digest": "the reference model's weights are not the ones scored; recompute",
    "dtype": "set dtype to the artifact's, or recompute with `--set dtype=<training's dtype>`",
    "tokenizer_hash": "the tokenizer (vocabulary, merges, normalizer or special tokens) changed; recompute",
    "max_length": "set max_length to the artifact's, or recompute with training's max_length",
    "chat_template_hash": "the chat template changed; recompute",
}


def check_reference(metadata: dict[str, Any], expected: dict[str, Any], artifact_path: str) -> None:
    """Refuse reference log-probs computed for another model, weights, dtype, tokenizer, template
    or max_length, naming the setting to change for each difference."""
    found = metadata.get("reference")
    if not found:
        raise ArtifactError(f"{artifact_path} has reference log-probs but no `reference` tag saying which model "
                            "made them")
    diffs = [f"{k}: artifact {found.get(k)!r} vs training {v!r} ({TAG_FIXES.get(k, 'recompute')})"
             for k, v in expected.items() if found.get(k) != v]
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
