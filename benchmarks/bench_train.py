"""Training cost of per-pair β, and our trainer against stock TRL, on the same model, data, machine.

    python benchmarks/bench_train.py [--model smollm2|random-smollm2-1.7b|PATH] [--pairs 48] [--steps 6]
                                     [--micro-batch-size 8] [--device cpu|cuda] [--dtype float32|bfloat16]
                                     [--no-gradient-checkpointing] [--no-shared-prompt] [--peak-tflops F]

1. per_pair_overhead: step time of our loop with a [B] β tensor vs one global β, alternating on
   the same batches in one process; the median over rounds of the paired ratio (goal ≤ 1.01:
   β_i costs one [B] multiply).
2. speedup_vs_trl / memory_vs_trl: our trainer (`sp2dpo train`, one Ray Train worker, offline
   reference log-probs, no reference model) vs stock TRL `DPOTrainer` computing reference
   log-probs in the loop — same model, pairs, batch size (TRL's default 8 pairs per device),
   max_length, fp32, fused AdamW, gradient checkpointing on (TRL's DPOConfig default;
   `--no-gradient-checkpointing` turns it off on both sides). Ours lays each pair out as one
   row sharing the prompt's forward (`shared_prompt`, exact; `--no-shared-prompt` gives it TRL's
   two rows per pair, to see what the layout alone is worth). Each runs in its own process; tokens/s
   is the attention-masked tokens over the summed optimizer-step time (counted the same way on both
   sides: prompt + answer, twice per pair), peak memory is that process's peak RSS (`ru_maxrss`) on CPU and
   `torch.cuda.max_memory_allocated` on a GPU, so the runs never share a peak. The one-off
   reference pass is timed and printed separately.

   On CPU our Ray Train worker is given every core (`resources_per_worker`), as TRL's process
   has them: Ray sets a worker's torch threads to its CPU count.

   Our trainer runs twice. `speedup_vs_trl` and `memory_vs_trl` use the settings TRL has
   (global-norm clipping at 1.0, a separate optimizer step): the saving there is the reference
   model's weights and its forward pass. `memory_vs_trl_in_backward` adds
   `optimizer_in_backward` (AdamW stepped per parameter inside backward, each gradient freed at
   once), which needs clipping off; TRL keeps its default clipping, which costs it no
   measurable memory (per-tensor norms only).
3. On a GPU, bf16 (`--dtype bfloat16`, the default there: both sides load the model in bf16, TRL
   with `bf16=True`) and MFU per trainer: model FLOPs per second over the GPU's peak dense bf16
   FLOP/s (`--peak-tflops`, or looked up from the device name for H100/H200/A100). Model FLOPs are
   6 × (parameters, input embedding excluded) per token, with tokens counted as TRL's two-row
   batch holds them on both sides: the same useful work, so MFU ranks the trainers as tokens/s
   does (ours forwards each prompt once, so the FLOPs it spends are fewer than it is credited).
   `--model random-smollm2-1.7b` builds a SmolLM2-1.7B-shaped model (24 layers, hidden 2048,
   SmolLM2's tokenizer) with random weights, as the real 1.7B weights are not bundled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CONTROLS = 3  # students trained on one artifact's reference pass: semantic, global, shuffled
# Peak dense bf16 tensor FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
# SmolLM2-1.7B's shape (its config.json), for a random-weights stand-in of that size.
SMOLLM2_1_7B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                "num_key_value_heads": 32, "max_position_embeddings": 8192, "rope_theta": 130000.0}


def training_flops_per_token(model_path: str) -> float:
    """6 × parameters (the input embedding excluded: a lookup; a tied LM head counted once, as
    the matmul it is) per token: forward 2N, backward 4N."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head_dim = c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    lm_head = c.hidden_size * c.vocab_size
    return 6.0 * (c.num_hidden_layers * (attention + mlp) + lm_head)


def peak_tflops(requested: float | None) -> float | None:
    import torch

    if requested:
        return requested
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def trl_scalar_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=None,
                    *_, **__):
    """TRL 1.16 `DPOTrainer._compute_loss`'s sigmoid loss (reverse KL, no label smoothing) with its
    scalar β, in our loss's output type, so a step of our loop can run it in place of `dpo_loss`."""
    import torch.nn.functional as F

    from sp2dpo.train.loss import DPOLossOutput

    beta = 0.1
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    margins = chosen_rewards - rejected_rewards
    return DPOLossOutput(losses, chosen_rewards, rejected_rewards, margins, (margins > 0).to(losses.dtype))


def per_pair_overhead(model_id: str, pairs: str, artifact: str, steps: int, device: str, batch: int,
                      shared_prompt: bool, dtype: str = "float32") -> dict[str, float]:
    """Per-pair β against TRL's scalar β, where they differ: the loss on the same logits, and our
    whole step with `dpo_loss` (β a [B] tensor) against the same step with TRL's scalar-β loss
    swapped in (`sp2dpo.train.loss.dpo_loss` replaced for that variant), alternating on the same
    batches in one process."""
    import torch

    import sp2dpo.train.loss as loss_module
    from sp2dpo.train.config import TrainConfig
    from sp2dpo.train.data import load_training_table, tokenize_table
    from sp2dpo.train.logps import load_causal_lm, make_collator
    from sp2dpo.train.loss import batch_loss
    from sp2dpo.train.strategy import TorchStrategy

    ours_loss = loss_module.dpo_loss
    # The loss alone on one set of logits, forward and backward, many times (microseconds each).
    gen = torch.Generator().manual_seed(0)
    logps = [(-50 * torch.rand(batch, generator=gen)).to(device).requires_grad_(i < 2) for i in range(4)]
    beta_i = (0.05 + 0.1 * torch.rand(batch, generator=gen)).to(device)
    loss_times: dict[str, list[float]] = {"per_pair": [], "trl": []}
    for r in range(21):
        for variant in ("per_pair", "trl") if r % 2 == 0 else ("trl", "per_pair"):
            fn, beta = (ours_loss, beta_i) if variant == "per_pair" else (trl_scalar_loss, 0.1)
            t0 = time.perf_counter()
            for _ in range(100):
                fn(*logps, beta=beta).losses.mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if r > 0:
                loss_times[variant].append((time.perf_counter() - t0) / 100)

    cfg = TrainConfig(model=model_id, strategy="torch", max_length=512, micro_batch_size=batch, learning_rate=1e-6,
                      use_gpu=device == "cuda", shared_prompt=shared_prompt, dtype=dtype)
    model, tok = load_causal_lm(model_id, dtype=dtype)
    table, _ = load_training_table(artifact, pairs, require_ref=True)
    examples = tokenize_table(table, tok, cfg.max_length)
    collate = make_collator(cfg.shared_prompt, tok.pad_token_id, cfg.max_length)
    strategy = TorchStrategy(cfg, 1, 0, torch.device(device))
    strategy.prepare(model, total_steps=2 * (steps + 1))  # two optimizer steps per round
    times: dict[str, list[float]] = {"per_pair": [], "trl": []}
    try:
        for i in range(steps + 1):
            start = (batch * i) % (len(examples) - batch + 1)
            inputs = {k: v.to(device) for k, v in collate(examples[start: start + batch]).items()}
            for variant in ("per_pair", "trl") if i % 2 == 0 else ("trl", "per_pair"):
                loss_module.dpo_loss = ours_loss if variant == "per_pair" else trl_scalar_loss
                t0 = time.perf_counter()
                strategy.backward(batch_loss(strategy.model, inputs, cfg.loss_type).losses.mean())
                strategy.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i > 0:  # the first round warms up allocator and kernels
                    times[variant].append(time.perf_counter() - t0)
    finally:
        loss_module.dpo_loss = ours_loss
    # Each round runs both variants back to back: the median of the paired ratios cancels the
    # round-to-round spread that a ratio of two medians would keep.
    return {"step_ratio": statistics.median(p / g for p, g in zip(times["per_pair"], times["trl"])),
            "step_per_pair_s": statistics.median(times["per_pair"]), "step_trl_s": statistics.median(times["trl"]),
            "loss_ratio": statistics.median(p / g for p, g in zip(loss_times["per_pair"], loss_times["trl"])),
            "loss_per_pair_us": 1e6 * statistics.median(loss_times["per_pair"]),
            "loss_trl_us": 1e6 * statistics.median(loss_times["trl"])}


# TRL's DPOTrainer, in one of two settings: reference log-probs in the loop (a reference model
# beside the policy), or TRL's leanest offline setting (TRL 1.16 `DPOTrainer.__init__`):
# `precompute_ref_log_probs=True` and no `ref_model`, so the reference log-probs come from the
# policy itself before training, in the trainer's constructor, and no second model is ever
# loaded. TRL recomputes them per trainer; their time is reported as `reference_seconds`.
TRL_CHILD = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from sp2dpo.models import resolve_model
from sp2dpo.train.data import conversation, load_training_table

a = json.loads(sys.argv[1])
table, _ = load_training_table(a["artifact"], a["pairs"])
rows = [conversation(r["prompt"], r["prompt_messages"], r["chosen"], r["rejected"]) for r in table.to_pylist()]
path = resolve_model(a["model"])

class StepTimer(TrainerCallback):
    seconds = 0.0
    def on_step_begin(self, args, state, control, **kw): self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): StepTimer.seconds += time.perf_counter() - self.t0

reference = {"seconds": 0.0}
precompute = DPOTrainer._precompute_ref_logps
def timed_precompute(self, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return precompute(self, *args, **kwargs)
    finally:
        reference["seconds"] += time.perf_counter() - t0
DPOTrainer._precompute_ref_logps = timed_precompute

cuda = a["device"] == "cuda"
dtype = getattr(torch, a["dtype"])
args = DPOConfig(output_dir=a["out"], use_cpu=not cuda, bf16=a["dtype"] == "bfloat16", beta=0.1,
                 per_device_train_batch_size=a["batch"],
                 max_length=512, max_steps=a["steps"], learning_rate=1e-6, precompute_ref_log_probs=a["precompute"],
                 gradient_checkpointing=a["checkpointing"], report_to=[], save_strategy="no", logging_steps=1,
                 dataloader_num_workers=0, seed=0)
ref_model = None if a["precompute"] else AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=dtype), ref_model=ref_model,
                     args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=AutoTokenizer.from_pretrained(path), callbacks=[StepTimer()])
assert not a["precompute"] or trainer.ref_model is None, "TRL kept a reference model"
trainer.train()
tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT_JSON " + json.dumps({"tokens": tokens, "train_seconds": StepTimer.seconds, "peak_mb": peak,
                                   "reference_seconds": reference["seconds"]}))
"""

OURS_CHILD = r"""
import json, sys
from sp2dpo.train.trainer import TrainConfig, train
a = json.loads(sys.argv[1])
cfg = TrainConfig(artifact=a["artifact"], pairs=a["pairs"], model=a["model"], out=a["out"], strategy="torch",
                  max_length=512, micro_batch_size=a["batch"], max_steps=a["steps"], learning_rate=1e-6,
                  checkpoint_every=10**6, tensorboard=False, compute_reference=False, use_gpu=a["device"] == "cuda",
                  gradient_checkpointing=a["checkpointing"], dtype=a["dtype"],
                  shared_prompt=a["shared_prompt"], **a["extra"])
s = train(cfg, show_progress=False)
print("RESULT_JSON " + json.dumps({"tokens": s["tokens"], "train_seconds": s["train_seconds"],
      "peak_mb": s["peak_cuda_mb_rank0"] if cfg.use_gpu else s["peak_rss_mb_rank0"]}))
"""


def run_child(code: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
    raise SystemExit(f"benchmark child failed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per step (TRL's DPOConfig default: 8)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                        help="both trainers keep every activation (TRL's default is to recompute them)")
    parser.add_argument("--skip-overhead", action="store_true",
                        help="only the four trainers (no per_pair_overhead / per_pair_loss_vs_trl_scalar)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="both trainers' dtype (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak dense bf16 TFLOP/s for MFU (default: looked up by device name)")
    parser.add_argument("--no-shared-prompt", dest="shared_prompt", action="store_false",
                        help="our trainer uses TRL's two-row batch layout (prompt forwarded once per answer)")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype == "bfloat16" and device != "cuda":
        raise SystemExit("--dtype bfloat16 needs a GPU: our trainer refuses bf16 on CPU")
    memory = "peak CUDA allocated" if device == "cuda" else "peak RSS"

    from sp2dpo.models import resolve_model, save_random_llama
    from sp2dpo.train.reference import ReferenceConfig, compute_reference
    from sp2dpo.train.sample import build_sample_inputs

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "random-smollm2-1.7b":
            model = str(save_random_llama(Path(tmp) / "model", dtype=dtype, **SMOLLM2_1_7B))
        else:
            model = resolve_model(args.model)  # convert the bundled model once, outside every timing
        flops_per_token = training_flops_per_token(model)
        pairs, artifact = build_sample_inputs(Path(tmp) / "in", limit=args.pairs, max_chars=args.max_chars)
        t0 = time.perf_counter()
        ref = compute_reference(ReferenceConfig(artifact=artifact, pairs=pairs, model=model, max_length=512,
                                                dtype=dtype), show_progress=False)
        ref_s = time.perf_counter() - t0
        print(f"reference pass (once per artifact): {ref['scored_pairs']} pairs in {ref_s:.1f}s")
        pp = None if args.skip_overhead else per_pair_overhead(
            model, pairs, ref["artifact"], args.steps, device, args.micro_batch_size, args.shared_prompt, dtype)
        if pp:
            print(f"loss alone on the same logits (forward + backward, {args.micro_batch_size} pairs): per-pair beta "
                  f"{pp['loss_per_pair_us']:.1f} us, TRL's scalar-beta loss {pp['loss_trl_us']:.1f} us "
                  f"(median of paired ratios {pp['loss_ratio']:.3f})")
            print(f"whole step of our loop: with per-pair beta median {pp['step_per_pair_s']:.3f}s; with TRL's "
                  f"scalar-beta loss median {pp['step_trl_s']:.3f}s (median of paired ratios {pp['step_ratio']:.4f})")
        common = {"artifact": ref["artifact"], "pairs": pairs, "model": model, "steps": args.steps,
                  "device": device, "dtype": dtype,
                  "checkpointing": args.checkpointing, "shared_prompt": args.shared_prompt,
                  "batch": args.micro_batch_size}
        trl = run_child(TRL_CHILD, {**common, "out": str(Path(tmp) / "trl"), "precompute": False})
        trl_pre = run_child(TRL_CHILD, {**common, "out": str(Path(tmp) / "trl_pre"), "precompute": True})
        cores = {} if device == "cuda" else {"resources_per_worker": {"CPU": os.cpu_count()}}
        ours = run_child(OURS_CHILD, {**common, "out": str(Path(tmp) / "ours"), "extra": cores})
        lean = run_child(OURS_CHILD, {**common, "out": str(Path(tmp) / "lean"),
                                      "extra": {**cores, "optimizer_in_backward": True, "max_grad_norm": 0.0}})
    trl_tps = trl["tokens"] / trl["train_seconds"]
    pre_tps = trl_pre["tokens"] / trl_pre["train_seconds"]
    our_tps = ours["tokens"] / ours["train_seconds"]
    lean_tps = lean["tokens"] / lean["train_seconds"]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"device {device}; {dtype}; memory is {memory}; gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}; load average {load}")
    print(f"stock TRL DPOTrainer (reference in the loop):       {trl_tps:8.1f} tokens/s, {trl['peak_mb']:7.0f} MB")
    print(f"TRL precompute_ref_log_probs, no ref_model:         {pre_tps:8.1f} tokens/s, {trl_pre['peak_mb']:7.0f} MB")
    print(f"sp2dpo, offline reference, TRL's settings:           {our_tps:8.1f} tokens/s, {ours['peak_mb']:7.0f} MB")
    print(f"sp2dpo, offline reference, optimizer_in_backward:    {lean_tps:8.1f} tokens/s, {lean['peak_mb']:7.0f} MB")
    # Per student, the one-off reference pass counted in: ours is computed once per artifact and
    # shared by the CONTROLS students trained on it (semantic, global, shuffled); TRL runs its own
    # pass in every trainer.
    ours_total = ours["train_seconds"] + ref_s / CONTROLS
    trl_total = trl_pre["train_seconds"] + trl_pre["reference_seconds"]
    print(f"per student, reference pass included: sp2dpo {ours['train_seconds']:.1f}s train + {ref_s:.1f}s/{CONTROLS} "
          f"reference = {ours_total:.1f}s ({ours['tokens'] / ours_total:.1f} tokens/s); TRL precomputed "
          f"{trl_pre['train_seconds']:.1f}s train + {trl_pre['reference_seconds']:.1f}s reference = {trl_total:.1f}s "
          f"({trl_pre['tokens'] / trl_total:.1f} tokens/s)")
    peak = peak_tflops(args.peak_tflops) if device == "cuda" else None
    if peak:
        for name, tps in (("trl", trl_tps), ("trl_precomputed", pre_tps), ("ours", our_tps),
                          ("ours_in_backward", lean_tps)):
            print(f"RESULT mfu_{name} {tps * flops_per_token / (peak * 1e12):.4f}")
    elif device == "cuda":
        print("MFU not reported: unknown peak FLOP/s for this GPU; pass --peak-tflops")
    if pp:
        print(f"RESULT per_pair_overhead {pp['step_ratio']:.4f}")
        print(f"RESULT per_pair_loss_vs_trl_scalar {pp['loss_ratio']:.3f}")
    print(f"RESULT speedup_vs_trl {our_tps / trl_tps:.3f}")
    print(f"RESULT memory_vs_trl {ours['peak_mb'] / trl['peak_mb']:.3f}")
    print(f"RESULT memory_vs_trl_in_backward {lean['peak_mb'] / trl['peak_mb']:.3f}")
    print(f"RESULT speedup_vs_trl_precomputed {our_tps / pre_tps:.3f}")
    print(f"RESULT memory_vs_trl_precomputed {ours['peak_mb'] / trl_pre['peak_mb']:.3f}")
    print(f"RESULT student_seconds_with_reference_ours {ours_total:.1f}")
    print(f"RESULT student_seconds_with_reference_trl_precomputed {trl_total:.1f}")
    print(f"RESULT speedup_vs_trl_precomputed_with_reference "
          f"{(ours['tokens'] / ours_total) / (trl_pre['tokens'] / trl_total):.3f}")

if __name__ == "__main__":
    main()
