"""The OpenAI-compatible Ray Serve app, exercised with the real `openai` client on 127.0.0.1.

One app for the module: the bundled SmolLM2-135M-Instruct as `base` and a tiny random model as
`sp2dpo` (a second model id that loads in a second), behind a bearer key. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest
from s3_server import free_port

from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server
from sp2dpo.serve.protocol import APIError, parse_request, sampling_options

API_KEY = "test-key-0123456789"
TINY_CONTEXT = 256
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, smollm2_dir):
    cfg = ServeConfig(
        port=free_port(),
        max_request_bytes=MAX_REQUEST_BYTES,
        models=[
            ModelConfig(id="base", num_cpus=0.5),
            ModelConfig(id="sp2dpo", path=str(tiny_model_dir), num_cpus=0.5, max_model_len=TINY_CONTEXT),
        ],
    )
    url = start_server(cfg, api_key=API_KEY)
    yield url
    stop_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=300)


def _post(server: str, path: str, body, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = json.dumps(body) if isinstance(body, dict) else body  # bytes, or a generator (sent chunked)
    return httpx.post(server + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=300, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def _replicas_healthy() -> bool:
    from ray import serve

    app = serve.status().applications["sp2dpo"]
    return app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())


# ----------------------------------------------------------------------------- pure validation


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": "hello"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_schema_errors_name_the_field(body, param):
    with pytest.raises(APIError) as err:
        parse_request(json.dumps(body).encode(), "chat")
    assert err.value.status == 400 and err.value.param == param


def test_cross_field_checks_and_unknown_fields():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "some_vendor_field": {"a": 1}}
    body = {**base, "max_tokens": 7, "stop": "##", "logprobs": True, "top_logprobs": 3}
    req = parse_request(json.dumps(body).encode(), "chat")
    opts = sampling_options(req)
    assert (opts.max_tokens, opts.stop, opts.top_logprobs) == (7, ["##"], 3)
    for extra, param in [({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
                         ({"top_logprobs": 3}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
                         ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]:
        with pytest.raises(APIError) as err:
            sampling_options(parse_request(json.dumps({**base, **extra}).encode(), "chat"))
        assert err.value.param == param
    with pytest.raises(APIError, match="not valid JSON"):
        parse_request(b"{not json", "chat")


# ----------------------------------------------------------------------------- through the app


def test_chat_and_models(client):
    listed = sorted(m.id for m in client.models.list().data)
    assert listed == ["base", "sp2dpo"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="base", messages=question,
                                       max_tokens=12, temperature=0)
    assert r.model == "base" and r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.choices[0].finish_reason in ("stop", "length")


def test_two_model_ids_route_to_different_models(client):
    messages = [{"role": "user", "content": "Say hello."}]
    answers = {mid: client.chat.completions.create(model=mid, messages=messages, max_tokens=1, temperature=0,
                                                   logprobs=True, top_logprobs=5) for mid in ("base", "sp2dpo")}
    assert {mid: a.model for mid, a in answers.items()} == {"base": "base", "sp2dpo": "sp2dpo"}
    top = {mid: [t.logprob for t in a.choices[0].logprobs.content[0].top_logprobs] for mid, a in answers.items()}
    # The random tiny model is nearly uniform over 49k tokens; SmolLM2 is confident.
    assert top["base"][0] > -3 and top["sp2dpo"][0] < -8


def reference_top5(model_dir, messages) -> tuple[list[str], list[float]]:
    """The top-5 next tokens (decoded) and their log-softmax log-probs from a float32 transformers
    forward pass: what a served model's top_logprobs must match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    values, top = torch.topk(logprobs, 5)
    return [tokenizer.decode([i]) for i in top.tolist()], values.tolist()


def test_logprobs_are_the_models_log_softmax(client, smollm2_dir):
    messages = [{"role": "user", "content": "Which is better, output (m) or output (M)? Answer with one letter."}]
    r = client.chat.completions.create(model="base", messages=messages, max_tokens=1, temperature=1,
                                       logprobs=True, top_logprobs=5)
    entry = r.choices[0].logprobs.content[0]
    served = [(t.token, t.logprob) for t in entry.top_logprobs]
    assert len(served) == 5 and [lp for _, lp in served] == sorted((lp for _, lp in served), reverse=True)
    assert entry.token in [t for t, _ in served] or entry.logprob <= served[-1][1]

    tokens, values = reference_top5(smollm2_dir, messages)
    assert [t for t, _ in served] == tokens
    for (_, lp), want in zip(served, values):
        assert math.isclose(lp, want, abs_tol=1e-3)
    assert sum(math.exp(lp) for _, lp in served) <= 1 + 1e-6


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model="base", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=16,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really incremental
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_requests_joining_a_running_batch_decode_as_if_alone(server, client):
    """Continuous batching: rows that join mid-decode (left-padded, merged KV cache) and rows
    that leave early give exactly the greedy text they give alone."""
    prompts = ["What is the capital of France?", "Write a haiku about autumn leaves on a quiet pond.",
               "Name two colours."]
    lengths = [12, 10, 6]
    alone = [client.completions.create(model="base", prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in zip(prompts, lengths)]

    async def staggered() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=300)

        async def one(i: int) -> str:
            await asyncio.sleep(0.4 * i)
            r = await aclient.completions.create(model="base", prompt=prompts[i], max_tokens=lengths[i], temperature=0)
            return r.choices[0].text
        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        finally:
            await aclient.close()

    assert asyncio.run(staggered()) == alone


def test_completions_stop_and_stream(client):
    prompt = "The three primary colours are"
    free = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert free.object == "text_completion" and len(text) > 6
    stop = text[3:6]
    cut = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                         stream=True, logprobs=2)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == cut.choices[0].text
    assert all(len(top) == 2 for p in pieces if p.choices[0].logprobs for top in p.choices[0].logprobs.top_logprobs)


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model="base", prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.95)
    a = client.completions.create(**kwargs, seed=7).choices[0].text
    b = client.completions.create(**kwargs, seed=7).choices[0].text
    assert a == b


def test_api_key_required(server, client):
    wrong = openai.OpenAI(base_url=server, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    hello = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    missing = _post(server, "/chat/completions", hello, key=None)
    _assert_openai_error(missing, 401)
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200  # probes need no key


def test_bad_requests_get_400_and_the_replica_survives(server, client):
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        ({"model": "sp2dpo", "messages": msg, "max_tokens": "abc"}, "max_tokens"),
        ({"model": "sp2dpo", "messages": msg, "max_tokens": -5}, "max_tokens"),
        ({"model": "sp2dpo", "messages": msg, "max_tokens": 10**12}, "max_tokens"),
        ({"model": "sp2dpo", "messages": msg, "max_tokens": 10**12, "stream": True}, "max_tokens"),
        ({"model": "sp2dpo", "messages": [{"role": "user", "content": "word " * (2 * TINY_CONTEXT)}]}, "messages"),
        ({"model": "sp2dpo", "messages": [{"role": "user", "content": ["not a part"]}]}, None),
        ({"model": "sp2dpo"}, "messages"),
        ({"model": 5, "messages": msg}, "model"),
    ]
    for body, param in cases:
        _assert_openai_error(_post(server, "/chat/completions", body), 400, param)
    _assert_openai_error(_post(server, "/completions", {"model": "sp2dpo", "prompt": [10**9]}), 400, "prompt")
    _assert_openai_error(_post(server, "/chat/completions", b"{broken"), 400)
    _assert_openai_error(_post(server, "/chat/completions", b"[1, 2]"), 400)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="sp2dpo", messages=[{"role": "user", "content": "x " * 600}], max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    # Unknown fields are tolerated.
    ok = client.chat.completions.create(model="sp2dpo", messages=msg, max_tokens=2,
                                        extra_body={"repetition_penalty": 1.1, "anything": {"nested": True}})
    assert ok.choices[0].message.content is not None
    assert _replicas_healthy()


def test_unknown_model_and_route_404(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert err.value.code == "model_not_found"
    _assert_openai_error(_post(server, "/completions", {"model": "gpt-17", "prompt": "x"}), 404, "model")
    _assert_openai_error(httpx.get(server + "/nothing-here", timeout=30), 404)


def test_request_size_limit_413(server):
    big = {"model": "sp2dpo", "messages": [{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]}
    _assert_openai_error(_post(server, "/chat/completions", big), 413)
    payload = json.dumps(big).encode()
    chunked = (payload[i:i + 8192] for i in range(0, len(payload), 8192))  # no Content-Length header
    _assert_openai_error(_post(server, "/chat/completions", chunked), 413)


def test_load_32_concurrent_clients(server):
    """32 clients × 4 requests each (chat, streamed chat, completion, chat): no errors, replicas healthy."""
    async def one_client(i: int, aclient: openai.AsyncOpenAI) -> int:
        done = 0
        for j in range(4):
            content = f"client {i} request {j}: say a number"
            if j == 1:
                messages = [{"role": "user", "content": content}]
                stream = await aclient.chat.completions.create(model="sp2dpo", messages=messages, max_tokens=4,
                                                               stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                assert isinstance(text, str)
            elif j == 2:
                r = await aclient.completions.create(model="sp2dpo", prompt=content, max_tokens=4)
                assert r.choices[0].finish_reason in ("stop", "length")
            else:
                messages = [{"role": "user", "content": content}]
                r = await aclient.chat.completions.create(model="sp2dpo", messages=messages, max_tokens=4, seed=i)
                assert r.usage.completion_tokens <= 4
            done += 1
        return done

    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one_client(i, aclient) for i in range(32)), return_exceptions=True)
        finally:
            await aclient.close()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert sum(results) == 128
    assert _replicas_healthy()
    hello = {"model": "sp2dpo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    after = _post(server, "/chat/completions", hello)
    assert after.status_code == 200
