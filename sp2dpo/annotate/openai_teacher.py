"""The OpenAI-compatible teacher engine: any server speaking /v1/chat/completions."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from typing import Any

from sp2dpo.annotate.config import AnnotateConfig
from sp2dpo.annotate.engines import Generation, teacher_schema

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
