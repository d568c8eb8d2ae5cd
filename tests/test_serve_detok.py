"""Incremental detokenisation in the OpenAI layer: streamed text equals the whole decode, multi-byte
characters included, and each token costs a short decode, not one of the whole text.

The real SmolLM2 tokenizer and the real `OpenAIModel`; the engine is a token source that replays
fixed ids (the text must hold characters split across byte-level tokens, which a random tiny
model produces only by chance).
"""

from __future__ import annotations

import asyncio
import random

import pytest
from transformers import AutoTokenizer

from sp2dpo.serve.engines import TokenStep
from sp2dpo.serve.openai_layer import IncrementalDecoder, OpenAIModel
from sp2dpo.serve.protocol import parse_request

TEXTS = [
    "Héllo wörld — 日本語のテキスト 🙂🎉 naïve café",
    " leading space\n\nnew lines\tand tabs  double  spaces",
    "emoji 👩\u200d👩\u200d👧 family ∑∫√ and a stop: END here",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class Replay:
    """The engine interface (`tokenizer`, `max_model_len`, `eos_token_ids`, `generate`) over fixed ids."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, ids
        self.max_model_len, self.eos_token_ids = 4096, {tokenizer.eos_token_id}

    async def generate(self, prompt_ids, options, max_tokens):
        for token in self.ids[:max_tokens]:
            await asyncio.sleep(0)
            yield TokenStep(token)


def _split_characters(tokenizer, text: str) -> bool:
    """Whether some token of `text` decodes to half a character (U+FFFD) on its own."""
    return any("\ufffd" in tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"])


def test_incremental_decode_equals_the_whole_decode(tokenizer):
    assert any(_split_characters(tokenizer, t) for t in TEXTS)  # the texts do split characters
    rng = random.Random(0)
    cases = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 48))] for _ in range(100)]
    for ids in cases:
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.add(i) for i in ids]
        assert "".join(deltas) + decoder.flush() == tokenizer.decode(ids, skip_special_tokens=True), ids
        assert not any(d.endswith("\ufffd") for d in deltas)  # half characters are never emitted


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer):
        self.tokenizer, self.windows = tokenizer, []

    def decode(self, ids, **kwargs):
        self.windows.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_each_token_decodes_a_short_window(tokenizer):
    ids = tokenizer(" ".join(TEXTS * 20), add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(tokenizer)
    model = OpenAIModel("m", Replay(counting, ids))
    response = asyncio.run(model.respond(_request("completion", False)))
    assert response["choices"][0]["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    # Two decodes per token, each of a few tokens: linear in the length, not quadratic.
    assert len(ids) > 500 and max(counting.windows) <= 16 and sum(counting.windows) <= 12 * len(ids)


def _request(kind: str, stream: bool, **extra):
    import json

    body = {"model": "m", "max_tokens": 4000, "stream": stream, "temperature": 0, **extra}
    body.update({"messages": [{"role": "user", "content": "x"}]} if kind == "chat" else {"prompt": "x"})
    return parse_request(json.dumps(body).encode(), kind)


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_non_streamed_text(tokenizer, kind, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = OpenAIModel("m", Replay(tokenizer, ids))

    async def both(**extra):
        whole = await model.respond(_request(kind, False, **extra))
        chunks = [c async for c in model.respond_stream(_request(kind, True, **extra))]
        if kind == "chat":
            streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            return whole["choices"][0]["message"]["content"], streamed, chunks
        return whole["choices"][0]["text"], "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks

    whole, streamed, chunks = asyncio.run(both())
    assert whole == streamed == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(chunks) > 3 and not any("\ufffd" in str(c) for c in chunks)
    # A stop string is cut the same way in both, and never streamed.
    whole, streamed, _ = asyncio.run(both(stop=["END"]))
    assert whole == streamed == text.split("END")[0]


@pytest.mark.parametrize("interval", [1, 3, 8])
def test_stream_interval_sends_the_same_text_in_fewer_chunks(tokenizer, interval):
    """`stream_interval=N` (vLLM's --stream-interval): the first text at once, then one chunk per N
    tokens, the last with the rest; text and log-probs equal interval 1's, stop strings still cut."""
    text = " ".join(TEXTS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = OpenAIModel("m", Replay(tokenizer, ids + [tokenizer.eos_token_id]), stream_interval=interval)

    def stream(**extra):
        async def run():
            return [c async for c in model.respond_stream(_request("completion", True, **extra))]
        return asyncio.run(run())

    chunks = stream(logprobs=1, stream_options={"include_usage": True})
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == text
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == len(ids) + 1  # every token's log-prob, the end-of-sequence one included
    assert len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) <= 2  # the first text goes out at once
    sizes = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"]]
    # One chunk per `interval` tokens (a character split across tokens can stretch one by a token or two).
    assert all(s <= interval + 2 for s in sizes)
    assert len(sizes) <= 2 + (len(ids) + 1) // interval and (interval == 1 or len(sizes) < len(ids) // 2)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids) + 1
    assert "".join(c["choices"][0]["text"] for c in stream(stop=["END"]) if c["choices"]) == text.split("END")[0]
