"""One served model speaking OpenAI chat/completions over any engine (no Ray here).

    model = OpenAIModel("base", build_engine(ModelConfig()))
    response = await model.respond(parse_request(body, "chat"))        # a chat.completion dict
    async for chunk in model.respond_stream(request): ...               # chat.completion.chunk dicts

This is the code path of a Serve replica and of the in-process baseline in
`benchmarks/bench_serve.py` alike. It renders chat templates, checks the prompt against the
context window, turns engine tokens into text (whole UTF-8 characters only; stop strings cut
and never streamed), and formats log-probs the way OpenAI does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sp2dpo.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingOptions,
    bad_request,
    chat_messages,
    sampling_options,
)


@dataclass
class Piece:
    """A stretch of generated text, the log-prob entries of its tokens, how it ended, and the
    tokens generated up to its end."""

    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


async def every_n_tokens(pieces: AsyncGenerator[Piece, None], interval: int) -> AsyncIterator[Piece]:
    """`pieces` joined so that one goes out per `interval` tokens, the first and the last at once
    (vLLM's stream_interval): the same text and log-probs in fewer, larger pieces."""
    held: Piece | None = None
    sent = -1  # tokens covered by what has gone out; -1 until the first piece has
    try:
        async for piece in pieces:
            if held is not None:
                piece = Piece(held.text + piece.text, held.logprobs + piece.logprobs, piece.finish_reason,
                              piece.completion_tokens)
            if sent < 0 or piece.finish_reason is not None or piece.completion_tokens - sent >= interval:
                yield piece
                held, sent = None, piece.completion_tokens
            else:
                held = piece
    finally:
        await pieces.aclose()  # a client gone mid-stream cancels the engine's request now


class IncrementalDecoder:
    """Text of a growing token sequence, one token at a time, without decoding it all again.

    Each step decodes only a short window: the tokens since the last emitted boundary, with the
    window before it as context (so a tokenizer that drops a leading space, or merges bytes of one
    character across tokens, sees what it would see in the whole sequence). A window that ends in
    half a UTF-8 character waits for the next token. The joined deltas equal
    `tokenizer.decode(ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: context already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """The new text `token_id` completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever the last tokens hold that no `add` returned (an incomplete character)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class OpenAIModel:
    def __init__(self, model_id: str, engine: Any, default_max_tokens: int = 512, stream_interval: int = 1):
        self.model_id, self.engine, self.default_max_tokens = model_id, engine, default_max_tokens
        self.stream_interval = stream_interval
        self.tokenizer = engine.tokenizer
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)

    # ------------------------------------------------------------------ prompts

    def chat_prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        messages = chat_messages(req)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may refuse e.g. roles out of order
            raise bad_request(f"messages do not fit the model's chat template: {exc}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            vocab = len(self.tokenizer)
            if any(not 0 <= p < vocab for p in prompt):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise bad_request("prompt is empty", param="prompt")
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def budget(self, prompt_ids: list[int], opts: SamplingOptions) -> int:
        """max_tokens for this prompt, or a 400 when prompt + completion cannot fit the context."""
        if not prompt_ids:
            raise bad_request("prompt is empty", param="prompt")
        room = self.engine.max_model_len - len(prompt_ids)
        if room < 1:
            raise bad_request(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.engine.max_model_len}",
                param="messages", code="context_length_exceeded")
        if opts.max_tokens is None:
            return min(self.default_max_tokens, room)
        if opts.max_tokens > room:
            raise bad_request(
                f"max_tokens={opts.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds this model's "
                f"context of {self.engine.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        return opts.max_tokens

    # ------------------------------------------------------------------ generation

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprob_entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        def item(tid: int, lp: float) -> dict[str, Any]:
            text = self._token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**item(token_id, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}

    async def generate(self, prompt_ids: list[int], opts: SamplingOptions, max_tokens: int) -> AsyncIterator[Piece]:
        """Engine tokens → text pieces, each with the tokens generated so far; the last carries finish_reason."""
        detok = IncrementalDecoder(self.tokenizer)
        text, emitted, pending, produced = "", 0, [], 0
        finish, cut = "length", False
        # Hold back the tail that could still grow into a stop string, so none is ever streamed.
        hold = max((len(s) for s in opts.stop), default=1) - 1
        steps = self.engine.generate(prompt_ids, opts, max_tokens)
        try:
            async for step in steps:
                produced += 1
                if opts.top_logprobs is not None:
                    pending.append(self._logprob_entry(step.token_id, step.logprob, step.top or []))
                if step.token_id in self.engine.eos_token_ids:
                    finish = "stop"
                    break
                delta = detok.add(step.token_id)
                if not delta:  # half of a multi-byte character, or a special token
                    continue
                # A stop string not in the text before must end inside the new delta.
                start = max(0, len(text) - hold)
                text += delta
                cuts = [i for i in (text.find(s, start) for s in opts.stop) if i >= 0]
                if cuts:
                    text, finish, cut = text[:max(min(cuts), emitted)], "stop", True
                    break
                safe = len(text) - hold
                if safe > emitted:
                    yield Piece(text[emitted:safe], pending, completion_tokens=produced)
                    emitted, pending = safe, []
        finally:
            await steps.aclose()
        if not cut:
            text += detok.flush()  # a character cut in half by the end decodes as U+FFFD, as in decode()
        yield Piece(text[emitted:], pending, finish, produced)

    # ------------------------------------------------------------------ responses

    async def respond(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        opts = sampling_options(req)
        if isinstance(req, ChatCompletionRequest):
            prompt_ids = self.chat_prompt_ids(req)
            max_tokens = self.budget(prompt_ids, opts)
            pieces = [p async for p in self.generate(prompt_ids, opts, max_tokens)]
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(p.text for p in pieces)},
                "logprobs": ({"content": [e for p in pieces for e in p.logprobs]} if opts.top_logprobs is not None
                             else None),
                "finish_reason": pieces[-1].finish_reason,
            }
            return self._envelope("chat.completion", "chatcmpl", [choice],
                                  self._usage(len(prompt_ids), pieces[-1].completion_tokens))
        prompts = self.completion_prompts(req)
        budgets = [self.budget(p, opts) for p in prompts]

        async def one(index: int) -> tuple[dict[str, Any], int]:
            pieces = [p async for p in self.generate(prompts[index], opts, budgets[index])]
            text = "".join(p.text for p in pieces)
            entries = [e for p in pieces for e in p.logprobs]
            choice = {"index": index, "text": text, "finish_reason": pieces[-1].finish_reason,
                      "logprobs": self._completion_logprobs(entries) if opts.top_logprobs is not None else None}
            return choice, pieces[-1].completion_tokens

        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        usage = self._usage(sum(len(p) for p in prompts), sum(n for _, n in results))
        return self._envelope("text_completion", "cmpl", [c for c, _ in results], usage)

    async def respond_stream(self, req: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streamed response; a bad request raises before the first chunk."""
        opts = sampling_options(req)
        chat = isinstance(req, ChatCompletionRequest)
        if chat:
            prompt_ids = self.chat_prompt_ids(req)
        else:
            prompts = self.completion_prompts(req)
            if len(prompts) != 1:
                raise bad_request("streaming takes a single prompt", param="prompt")
            prompt_ids = prompts[0]
        max_tokens = self.budget(prompt_ids, opts)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        rid, created = self._id("chatcmpl" if chat else "cmpl"), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
            body = {"id": rid, "object": kind, "created": created, "model": self.model_id, "choices": choices}
            if include_usage:
                body["usage"] = usage
            return body

        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        pieces = self.generate(prompt_ids, opts, max_tokens)
        if self.stream_interval > 1:
            pieces = every_n_tokens(pieces, self.stream_interval)
        async for piece in pieces:
            if not piece.text and not piece.logprobs and piece.finish_reason is None:
                continue
            if chat:
                logprobs = {"content": piece.logprobs} if opts.top_logprobs is not None else None
                delta = {"content": piece.text} if piece.text or piece.logprobs else {}
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": piece.finish_reason}
            else:
                logprobs = self._completion_logprobs(piece.logprobs) if opts.top_logprobs is not None else None
                choice = {"index": 0, "text": piece.text, "logprobs": logprobs, "finish_reason": piece.finish_reason}
            yield chunk([choice])
            if piece.finish_reason is not None and include_usage:
                yield chunk([], self._usage(len(prompt_ids), piece.completion_tokens))

    @staticmethod
    def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
        """The legacy completions layout: parallel lists, top alternatives as {token: logprob}."""
        offsets, position = [], 0
        for e in entries:
            offsets.append(position)
            position += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    @staticmethod
    def _id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _envelope(self, kind: str, prefix: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self._id(prefix), "object": kind, "created": int(time.time()), "model": self.model_id,
                "choices": choices, "usage": usage}
