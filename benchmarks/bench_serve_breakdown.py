"""Where the long streamed case's time goes: the same 8 greedy 512-token chat requests, four ways.

    python benchmarks/bench_serve_breakdown.py [--tokens 512] [--rounds 2] [--torch-threads N] [--stream-interval N]

1. `in-process`: the engine alone in this process (`engine.generate`, token ids only), as in
   bench_serve.py's engine side.
2. `replica`: the engine alone inside a Serve model replica (the same loop, run by a method of the
   replica): what the replica's process costs (Ray's worker, its threads, its priority).
3. `handle`: the replica's whole streaming path (`respond_stream`: chat template, incremental
   detokenisation, SSE lines, Ray Serve's streaming generator) read through a deployment handle
   from this process: no ingress, no proxy, no HTTP.
4. `http`: the real `openai` client over HTTP, through the proxy and the ingress: what a client sees.

Each round runs every side once, alternating the order. Printed: tokens/s per side (all tokens /
all wall time), and each side's time per token over the one before it:

    RESULT serve_breakdown_<side> <tokens/s>
    RESULT serve_breakdown_<side>_vs_<previous side> <ratio>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Both the in-process side and the replicas at the same priority (Ray starts workers at nice 15).
os.environ.setdefault("RAY_worker_niceness", "0")

SIDES = ["in-process", "replica", "handle", "http"]


async def _engine_alone(model, requests: list, max_tokens: int) -> int:
    """Every request's tokens through `engine.generate` at once; returns the tokens produced.
    Written here, not taken from bench_serve.py's engine side: it also runs inside the replica,
    which receives this script's functions by value and cannot import bench_serve."""
    from sp2dpo.serve.protocol import sampling_options

    async def one(req) -> int:
        produced = 0
        async for _ in model.engine.generate(model.chat_prompt_ids(req), sampling_options(req), max_tokens):
            produced += 1
        return produced

    return sum(await asyncio.gather(*(one(r) for r in requests)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None, help="the engine's threads (default: every CPU)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the replica's stream_interval (1: every token)")
    args = parser.parse_args()

    import openai
    from bench_serve import _prompts, chat_body, streamed_tokens
    from ray import serve

    from sp2dpo.serve import ModelConfig, ServeConfig
    from sp2dpo.serve.app import ModelDeployment, OpenAIIngress, deployment_options, key_digest
    from sp2dpo.serve.engines import build_engine
    from sp2dpo.serve.openai_layer import OpenAIModel
    from sp2dpo.serve.protocol import parse_request
    from sp2dpo.utils import init_ray

    threads = args.torch_threads or os.cpu_count() or 1
    model_cfg = ModelConfig(id="bench", num_cpus=1, torch_threads=threads, max_model_len=2048,
                            stream_interval=args.stream_interval)
    prompts = _prompts(8)

    def request(prompt: str, stream: bool = False):
        body = chat_body(prompt, args.tokens)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return parse_request(json.dumps(body).encode(), "chat")

    class BreakdownReplica(ModelDeployment.func_or_class):
        """The served model replica plus one method: its engine alone, driven from inside the replica."""

        async def engine_alone(self, requests: list, max_tokens: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            produced = await _engine_alone(self.model, requests, max_tokens)
            return produced, time.perf_counter() - t0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=max(2, threads))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    replica_app = serve.deployment(BreakdownReplica).options(**deployment_options(model_cfg))
    ingress = OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(
        {"bench": replica_app.bind(model_cfg.model_dump())}, key_digest("bench-key"), ServeConfig().max_request_bytes)
    serve.run(ingress, name="breakdown", route_prefix="/")
    replica = serve.get_deployment_handle(replica_app.name, app_name="breakdown")
    replica_nice = os.getpriority(os.PRIO_PROCESS, replica.load.remote().result()["pid"])
    direct = OpenAIModel("bench", build_engine(model_cfg))

    async def in_process() -> tuple[int, float]:
        t0 = time.perf_counter()
        produced = await _engine_alone(direct, [request(p) for p in prompts], args.tokens)
        return produced, time.perf_counter() - t0

    async def in_replica() -> tuple[int, float]:
        return await replica.engine_alone.remote([request(p) for p in prompts], args.tokens)

    async def via_handle() -> tuple[int, float]:
        async def one(prompt: str) -> int:
            lines = [line async for line in replica.options(stream=True).respond_stream.remote(request(prompt, True))]
            usage = json.loads(lines[-2].removeprefix("data: "))["usage"]  # the last chunk before [DONE]
            return usage["completion_tokens"]

        t0 = time.perf_counter()
        produced = sum(await asyncio.gather(*(one(p) for p in prompts)))
        return produced, time.perf_counter() - t0

    async def via_http() -> tuple[int, float]:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench-key", max_retries=0,
                                    timeout=1800)

        t0 = time.perf_counter()
        produced = sum(await asyncio.gather(*(streamed_tokens(client, p, args.tokens) for p in prompts)))
        await client.close()
        return produced, time.perf_counter() - t0

    calls = {"in-process": in_process, "replica": in_replica, "handle": via_handle, "http": via_http}
    totals = {side: [0, 0.0] for side in SIDES}
    try:
        asyncio.run(_engine_alone(direct, [request(p) for p in prompts[:2]], 8))  # warm both engines
        replica.engine_alone.remote([request(p) for p in prompts[:2]], 8).result()
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                produced, wall = asyncio.run(calls[side]())
                totals[side][0] += produced
                totals[side][1] += wall
                print(f"round {r} {side:<10} {produced / wall:6.1f} tok/s ({produced} tokens, {wall:.1f} s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        serve.shutdown()
        direct.engine.shutdown()

    print(f"8 requests x {args.tokens} tokens, greedy, torch_threads={threads}, rounds={args.rounds}, "
          f"stream_interval={args.stream_interval}; "
          f"nice: replica {replica_nice}, in-process {os.getpriority(os.PRIO_PROCESS, 0)}")
    rates = {side: produced / wall for side, (produced, wall) in totals.items()}
    for i, side in enumerate(SIDES):
        name = side.replace("-", "_")
        print(f"RESULT serve_breakdown_{name} {rates[side]:.1f}")
        if i:
            before = SIDES[i - 1]
            print(f"RESULT serve_breakdown_{name}_vs_{before.replace('-', '_')} {rates[before] / rates[side]:.3f}")


if __name__ == "__main__":
    main()
