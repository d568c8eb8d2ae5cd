"""The transformers engine: a Hugging Face causal LM behind a batching decode loop on one thread.

`sample_token` is the sampling rule, a pure function of one row's logits; the rest is batching:
requests are prefilled as left-padded batches, decoded step by step with a shared KV cache, and
rows join and leave between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from sp2dpo.serve.config import ModelConfig
from sp2dpo.serve.engines import TokenStep, eos_ids
from sp2dpo.serve.protocol import SamplingOptions

log = logging.getLogger(__name__)


def sample_token(logits: Any, options: SamplingOptions, generator: Any = None) -> TokenStep:
    """One token from one row's next-token logits (a float [vocab] tensor): greedy at temperature
    0, else softmax(logits / temperature) cut to the top-p mass and drawn with `generator`. The
    log-probs reported are the raw log-softmax of `logits`, before temperature or top-p."""
    import torch

    if options.temperature == 0:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / options.temperature, dim=-1)
        if options.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (the best token always stays).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= options.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=generator))
    step = TokenStep(token)
    if options.top_logprobs is not None:
        logprobs = torch.log_softmax(logits, dim=-1)
        step.logprob = float(logprobs[token])
        step.top = []
        if options.top_logprobs:
            values, ids = torch.topk(logprobs, options.top_logprobs)
            step.top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return step


_DONE = object()


class _Job:
    def __init__(self, prompt_ids: list[int], options: SamplingOptions, max_tokens: int,
                 emit: Callable[[Any], None]):
        self.prompt_ids, self.options, self.max_tokens, self.emit = prompt_ids, options, max_tokens, emit
        self.cancelled = False



class _Batch:
    """Rows decoding together: their jobs, KV cache, attention mask, last positions and logits."""

    def __init__(self, jobs: list[_Job], cache: Any, mask: Any, positions: Any, logits: Any, generators: list[Any]):
        from transformers.cache_utils import DynamicLayer

        self.jobs, self.cache, self.mask, self.positions, self.logits = jobs, cache, mask, positions, logits
        self.generators, self.produced = generators, [0] * len(jobs)
        # Rows can join a running batch only when every layer is a plain growing cache.
        self.mergeable = all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

    def select(self, rows: list[int]) -> None:
        import torch

        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        self.jobs = [self.jobs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.produced = [self.produced[r] for r in rows]

    def merge(self, other: _Batch) -> _Batch:
        """Append `other`'s rows; the shorter side is left-padded (masked) to a common length."""
        import torch
        import torch.nn.functional as F

        width = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: Any, dim: int) -> Any:
            missing = width - t.shape[dim]
            if not missing:
                return t
            pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
            return F.pad(t, pad)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)], dim=0)
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)], dim=0)
        self.positions = torch.cat([self.positions, other.positions], dim=0)
        self.logits = torch.cat([self.logits, other.logits], dim=0)
        self.jobs, self.generators = self.jobs + other.jobs, self.generators + other.generators
        self.produced = self.produced + other.produced
        return self


class TransformersEngine:
    """A Hugging Face causal LM with a batching decode loop on one worker thread.

    Continuous batching, HF-cache style: requests that arrive together (each within `batch_wait_ms`
    of the one before, up to `batch_wait_max_ms` after the first) are prefilled as one left-padded
    batch and decoded step by step with a shared KV cache; requests arriving while it runs are
    prefilled between two steps and join it; finished rows leave at once. Each row keeps its own
    temperature, top-p, seed and length. The event loop never runs torch, so a replica keeps
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
        self.eos_token_ids = eos_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_token_ids or {0})
        self.max_batch_size, self.batch_wait_s = cfg.max_batch_size, cfg.batch_wait_ms / 1000
        self.batch_wait_max_s = max(cfg.batch_wait_max_ms, cfg.batch_wait_ms) / 1000
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="sp2dpo-decode", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    async def generate(self, prompt_ids: list[int], options: SamplingOptions,
                       max_tokens: int) -> AsyncIterator[TokenStep]:
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
        batch: _Batch | None = None
        while True:
            jobs = self._take(batch)
            if jobs is None:
                return
            try:
                if jobs:
                    joined = self._prefill(jobs)
                    batch = joined if batch is None else batch.merge(joined)
                    if not any(batch.produced) and not self._jobs.empty():
                        # Requests that arrived during this prefill join before the first step, so a
                        # burst spread over a prefill decodes as one batch instead of one step apart.
                        continue
                if batch is not None:
                    batch = self._step(batch)
            except Exception as exc:  # one bad batch must not take the replica down
                log.exception("generation failed")
                error = RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
                for job in {id(j): j for j in (batch.jobs if batch else []) + jobs}.values():
                    job.emit(error)
                batch = None

    def _take(self, batch: _Batch | None) -> list[_Job] | None:
        """New jobs to start now (None = shut down). Idle: block for one, then gather arrivals until
        none has come for `batch_wait_s`, and for `batch_wait_max_s` after the first at most. Busy:
        only what is already queued, so running rows never wait."""
        room = self.max_batch_size - (len(batch.jobs) if batch else 0)
        if batch is not None and not batch.mergeable:
            room = 0
        jobs: list[_Job] = []
        if batch is None:
            first = self._jobs.get()
            if first is None:
                return None
            jobs.append(first)
        # Idle, each arrival extends the wait: clients behind HTTP and a proxy reach the replica spread
        # over tens of ms, and a burst prefilled in two parts costs a whole extra forward pass. The
        # cap bounds what the first request of a steady stream can wait.
        wait, wait_max = (self.batch_wait_s, self.batch_wait_max_s) if batch is None else (0, 0)
        cap = time.monotonic() + wait_max
        deadline = min(time.monotonic() + wait, cap)
        while len(jobs) < room:
            remaining = deadline - time.monotonic()
            try:
                job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return None
            jobs.append(job)
            deadline = min(time.monotonic() + wait, cap)
        return [j for j in jobs if not j.cancelled]

    def _prefill(self, jobs: list[_Job]) -> _Batch:
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
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return _Batch(jobs, out.past_key_values, mask, positions[:, -1:], out.logits[:, -1, :],
                      [self._generator(j.options.seed) for j in jobs])

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token for every row, retire finished rows, run the next forward pass."""
        import torch

        with torch.inference_mode():
            logits = batch.logits.float()
            steps = [sample_token(logits[row], job.options, generator)
                     for row, (job, generator) in enumerate(zip(batch.jobs, batch.generators))]
            keep = []
            for row, (job, step) in enumerate(zip(batch.jobs, steps)):
                if job.cancelled:
                    continue
                job.emit(step)
                batch.produced[row] += 1
                if step.token_id in self.eos_token_ids or batch.produced[row] >= job.max_tokens:
                    job.emit(_DONE)
                else:
                    keep.append(row)
            if not keep:
                return None
            if len(keep) < len(batch.jobs):
                batch.select(keep)
            next_ids = torch.tensor([[steps[row].token_id] for row in keep], device=self.device)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(keep), 1))], dim=1)
            batch.positions = batch.positions + 1
            out = self.model(input_ids=next_ids, attention_mask=batch.mask, position_ids=batch.positions,
                             past_key_values=batch.cache, use_cache=True)
            batch.cache, batch.logits = out.past_key_values, out.logits[:, -1, :]
        return batch

    def _generator(self, seed: int | None) -> Any:
        import torch

        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)
