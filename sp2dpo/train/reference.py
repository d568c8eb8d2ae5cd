"""Offline reference log-probs: score every trained pair once with the reference model, store the
result in the β artifact, and train without holding a reference model at all.

    sp2dpo train reference --artifact runs/beta.parquet --pairs runs/data/pairs.parquet \
        --model smollm2 --out runs/beta_ref.parquet [--engine ray --num-workers 4 --num-gpus 1]

The pass is a Ray Data `map_batches` over the training rows with a pool of `ReferenceScorer`
actors (each loads the model once); `engine=local` runs the same scorer in this process. The
output is the input artifact with two columns added — `ref_chosen_logps`, `ref_rejected_logps`,
summed over the completion tokens of the answers *as trained* (after flips), null for dropped
pairs — and its `sp2dpo.*` metadata kept, plus `reference = {model_id, weights_digest, dtype,
tokenizer_hash, max_length, chat_template_hash}`. Training refuses log-probs whose tag does not
match its own reference, naming the setting to change.

The sequences are the ones training sees: same chat template, same tokenization
(`data.tokenize_pair`), same `max_length` truncation, and the same heads and batch layouts the
training loop uses (TRL's fused LM head on two rows per pair, or `shared_prompt`'s one row), so
the stored values equal in-loop reference log-probs (tests check it).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field
from transformers import AutoTokenizer

from sp2dpo.config import StageConfig
from sp2dpo.models import resolve_model
from sp2dpo.schedule.artifact import REF_LOGP_COLUMNS, read_artifact, training_pairs
from sp2dpo.storage import write_parquet
from sp2dpo.train.data import reference_tag, tokenize_table
from sp2dpo.train.logps import batch_logps, load_causal_lm, make_collator
from sp2dpo.utils import progress_bar


class ReferenceConfig(StageConfig):
    """`sp2dpo train reference` settings."""

    artifact: str = Field("runs/beta.parquet", description="The β artifact whose trained pairs are scored.")
    pairs: str = Field("runs/data/pairs.parquet", description="The pairs table the artifact was built from.")
    out: str | None = Field(None, description="Where the artifact with ref_*_logps goes (default: the artifact "
                                              "path with a `.ref` suffix before `.parquet`).")
    model: str = Field("smollm2", description="The reference model: usually the student's starting point.")
    max_length: int | None = Field(1024, description="Tokens per sequence; must equal training's max_length (stored "
                                                     "in the reference tag).")
    batch_size: int = Field(8, ge=1, description="Pairs per forward pass.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Must equal training's dtype (stored in the reference tag).")
    shared_prompt: bool = Field(True, description="Score both answers in one row, the prompt forwarded once (the "
                                                  "same values).")
    engine: Literal["local", "ray"] = Field("local", description="local: in this process; ray: Ray Data batch "
                                                                 "inference over num_workers actors.")
    num_workers: int = Field(1, ge=1, description="Ray Data scorer actors (engine: ray).")
    num_cpus: float = Field(1.0, description="CPUs per scorer actor.")
    num_gpus: float = Field(0.0, description="GPUs per scorer actor; 1 on GPU clusters.")

    def out_path(self) -> str:
        if self.out:
            return self.out
        stem = self.artifact[: -len(".parquet")] if self.artifact.endswith(".parquet") else self.artifact
        return f"{stem}.ref.parquet"


class ReferenceScorer:
    """Ray Data UDF (and the local engine's scorer): training rows → reference log-probs."""

    def __init__(self, model: str, max_length: int | None, dtype: str = "float32", batch_size: int = 8,
                 shared_prompt: bool = True):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_causal_lm(model, dtype, device)
        self.model.eval()
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self.collate = make_collator(shared_prompt, self.tokenizer.pad_token_id, max_length)

    def __call__(self, rows: pa.Table) -> pa.Table:
        examples = tokenize_table(rows, self.tokenizer, self.max_length)
        chosen, rejected = [], []
        with torch.no_grad():
            for start in range(0, len(examples), self.batch_size):
                batch = self.collate(examples[start: start + self.batch_size])
                batch = {k: v.to(self.device) for k, v in batch.items()}
                c, r = batch_logps(self.model, batch)
                chosen += c.float().cpu().tolist()
                rejected += r.float().cpu().tolist()
        return pa.table({"pair_id": rows["pair_id"], "ref_chosen_logps": pa.array(chosen, pa.float64()),
                         "ref_rejected_logps": pa.array(rejected, pa.float64())})


def compute_reference(cfg: ReferenceConfig, show_progress: bool = True) -> dict[str, Any]:
    """Write the artifact with reference log-probs added; return the summary."""
    t0 = time.perf_counter()
    artifact, metadata = read_artifact(cfg.artifact)
    rows = training_pairs(cfg.artifact, cfg.pairs)  # verified: refuses an artifact that does not match
    rows = rows.select(["pair_id", "prompt", "prompt_messages", "chosen", "rejected"])
    if cfg.engine == "ray":
        scores = _score_with_ray(rows, cfg)
    else:
        scorer = ReferenceScorer(cfg.model, cfg.max_length, cfg.dtype, cfg.batch_size, cfg.shared_prompt)
        parts = []
        with progress_bar(rows.num_rows, "reference log-probs", disable=not show_progress) as bar:
            for start in range(0, rows.num_rows, cfg.batch_size):
                part = rows.slice(start, cfg.batch_size)
                parts.append(scorer(part))
                bar.update(part.num_rows)
        scores = pa.concat_tables(parts)
    if scores.num_rows != rows.num_rows:
        raise RuntimeError(f"reference pass scored {scores.num_rows} of {rows.num_rows} pairs")

    # Back onto every artifact row (dropped pairs get nulls), in the artifact's own order.
    artifact = artifact.drop_columns([c for c in REF_LOGP_COLUMNS if c in artifact.column_names])
    where = pc.index_in(artifact["pair_id"], value_set=scores["pair_id"])
    for name in REF_LOGP_COLUMNS:
        artifact = artifact.append_column(name, scores[name].take(where))
    tag = reference_tag(cfg.model, AutoTokenizer.from_pretrained(resolve_model(cfg.model)), cfg.max_length, cfg.dtype)
    out = cfg.out_path()
    write_parquet(artifact, out, {**metadata, "reference": tag})
    seconds = time.perf_counter() - t0
    chosen = scores["ref_chosen_logps"].to_numpy()
    return {
        "artifact": out,
        "scored_pairs": scores.num_rows,
        "reference": tag,
        "engine": cfg.engine,
        "mean_ref_chosen_logps": round(float(chosen.mean()), 4),
        "seconds": round(seconds, 2),
        "pairs_per_s": round(scores.num_rows / seconds, 2),
    }


def _score_with_ray(rows: pa.Table, cfg: ReferenceConfig) -> pa.Table:
    import ray

    from sp2dpo.utils import init_ray

    init_ray()
    ds = ray.data.from_arrow(rows).repartition(max(cfg.num_workers, rows.num_rows // max(cfg.batch_size * 4, 1)) or 1)
    scored = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"model": cfg.model, "max_length": cfg.max_length, "dtype": cfg.dtype,
                               "batch_size": cfg.batch_size, "shared_prompt": cfg.shared_prompt},
        batch_size=cfg.batch_size * 4,
        batch_format="pyarrow",
        concurrency=cfg.num_workers,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )
    return pa.concat_tables([ray.get(ref) for ref in scored.to_arrow_refs()])
