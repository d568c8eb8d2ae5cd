"""Throughput and p50/p99 latency at concurrency 1, 8 and 32: through Ray Serve vs. in-process.

    python benchmarks/bench_serve.py [--engine transformers|vllm] [--max-tokens 8] [--rounds 5] [--model PATH]
                                     [--short-rounds 12] [--long-tokens 512] [--long-rounds 3]
                                     [--torch-threads N] [--stream-interval N] [--batch-wait-ms MS]

Baseline in the same run: the very engine and OpenAI layer a Serve replica runs
(`OpenAIModel.respond`), called directly from an asyncio loop in this process with the same
prompts, the same concurrency and greedy decoding (so both sides generate the same tokens).
Each level runs several rounds per side, alternating which side goes first.
The Serve side goes through everything a client sees: the real `openai` client, HTTP, the proxy,
the ingress (auth, validation, routing) and a deployment handle.

    RESULT serve_overhead_c8 <time per request through Serve / in-process, at concurrency 8>

Then the same requests against the engine alone (`engine.generate`, token ids only: no chat
layer, no detokenisation, no HTTP), at concurrency 8, short (`--max-tokens`) and long
(`--long-tokens`, 512, streamed): what everything above the engine costs, and whether streaming
a long answer stays linear in its length (each streamed piece is decoded incrementally):

    RESULT serve_vs_engine_c8_short <time per request through Serve / engine alone>
    RESULT serve_vs_engine_c8_long <the same, streamed, --long-tokens>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LEVELS = {1: 2, 8: 8, 32: 32}  # concurrency → requests per round; each side runs --rounds rounds


def _prompts(n: int) -> list[str]:
    from sp2dpo.data.bundled import bundled_path

    rows = [json.loads(line)["prompt"] for line in bundled_path("ultrafeedback-eval").read_text().splitlines()]
    short = [p for p in rows if len(p) < 200]
    return [short[i % len(short)] for i in range(n)]


def _stats(runs: list[tuple[list[float], float, int]]) -> dict[str, float]:
    """Pool rounds: throughput = all requests / all wall time; percentiles over every request."""
    ordered = sorted(x for latencies, _, _ in runs for x in latencies)
    wall, tokens = sum(w for _, w, _ in runs), sum(t for _, _, t in runs)
    return {"req_per_s": len(ordered) / wall, "tok_per_s": tokens / wall, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def chat_body(prompt: str, max_tokens: int) -> dict:
    """The benchmark's request: one user turn, greedy, so every side generates the same tokens."""
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}


async def streamed_tokens(client, prompt: str, max_tokens: int) -> int:
    """One streamed chat request through the `openai` client, read to the end; the completion
    tokens its usage chunk reports."""
    stream = await client.chat.completions.create(**chat_body(prompt, max_tokens), stream=True,
                                                  stream_options={"include_usage": True})
    produced = 0
    async for chunk in stream:
        if chunk.usage is not None:
            produced = chunk.usage.completion_tokens
    return produced


async def _drive(call, prompts: list[str], concurrency: int) -> tuple[list[float], float, int]:
    """`concurrency` closed-loop clients share the prompt list; each call returns its token count."""
    queue = list(enumerate(prompts))
    latencies, tokens = [], 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            _, prompt = queue.pop(0)
            t0 = time.perf_counter()
            produced = await call(prompt)  # not `tokens += await ...`: that reads tokens before awaiting
            tokens += produced
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--model", default=None, help="HF model dir (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long-tokens", type=int, default=512, help="the long, streamed case (0 skips it)")
    parser.add_argument("--short-rounds", type=int, default=12,
                        help="rounds of the short case against the engine alone (a round is about 3 s a side)")
    parser.add_argument("--long-rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="the engine's torch threads on both sides (default: every CPU); fewer leaves CPUs to "
                             "the serving processes, as on a GPU node, where the engine does not compute on them")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the served model's stream_interval (tokens per streamed chunk; 1 = every token)")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="the served model's batch_wait_ms (transformers engine; default: the config's)")
    parser.add_argument("--only-vs-engine", action="store_true",
                        help="skip the concurrency levels against in-process (serve_overhead_c8)")
    args = parser.parse_args()

    import openai
    from ray import serve

    from sp2dpo.serve import ModelConfig, ServeConfig, start_server, stop_server
    from sp2dpo.serve.app import deployment_name
    from sp2dpo.serve.engines import build_engine
    from sp2dpo.serve.openai_layer import OpenAIModel
    from sp2dpo.serve.protocol import parse_request, sampling_options
    from sp2dpo.utils import init_ray

    threads = args.torch_threads or os.cpu_count() or 1
    # Same threads on both sides: Ray would otherwise pin the replica's torch to its num_cpus.
    model_cfg = ModelConfig(id="bench", path=args.model, engine=args.engine, num_cpus=1, torch_threads=threads,
                            max_model_len=2048, gpu_memory_utilization=0.12 if args.engine == "vllm" else 0.9,
                            stream_interval=args.stream_interval,
                            **({} if args.batch_wait_ms is None else {"batch_wait_ms": args.batch_wait_ms}))

    def body(prompt: str, max_tokens: int | None = None) -> dict:
        return chat_body(prompt, max_tokens or args.max_tokens)

    direct = OpenAIModel("bench", build_engine(model_cfg), model_cfg.default_max_tokens)

    async def call_direct(prompt: str) -> int:
        response = await direct.respond(parse_request(json.dumps(body(prompt)).encode(), "chat"))
        return response["usage"]["completion_tokens"]

    def engine_call(max_tokens: int):
        async def call_engine(prompt: str) -> int:
            # The same prompt ids and greedy options the layer would hand the engine; nothing else.
            req = parse_request(json.dumps(body(prompt, max_tokens)).encode(), "chat")
            produced = 0
            async for _ in direct.engine.generate(direct.chat_prompt_ids(req), sampling_options(req), max_tokens):
                produced += 1
            return produced
        return call_engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray starts its workers at nice 15, so a Serve replica yields the CPU to any normal process: on
    # this machine to the benchmark's own client, and the in-process baseline, which runs at nice 0
    # in this process, would win on priority, not on code. Both sides run at the same priority (a
    # local instance reads this; a running cluster keeps its own, printed below).
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(num_cpus=max(2, threads))
    serve_cfg = ServeConfig(port=port, models=[model_cfg])
    url = start_server(serve_cfg, api_key="bench-key")
    results: dict[str, dict[int, dict[str, float]]] = {"in-process": {}, "serve": {}}
    vs_engine: dict[str, dict[str, dict[str, float]]] = {}
    try:
        replica = serve.get_deployment_handle(deployment_name(model_cfg.id), app_name=serve_cfg.app_name)
        replica_nice = os.getpriority(os.PRIO_PROCESS, replica.load.remote().result()["pid"])

        async def run_all() -> None:
            client = openai.AsyncOpenAI(base_url=url, api_key="bench-key", max_retries=0, timeout=600)

            async def call_serve(prompt: str) -> int:
                response = await client.chat.completions.create(**body(prompt))
                return response.usage.completion_tokens

            async def call_serve_stream(prompt: str) -> int:
                return await streamed_tokens(client, prompt, args.long_tokens)

            # A round of 8 on each side first: a replica's first batch of a new shape runs several times
            # slower (one such round read 14 s against 3 s), and 3 rounds cannot absorb that.
            warm = _prompts(8)
            for call in (call_direct, call_serve, engine_call(args.max_tokens)):
                await _drive(call, warm, 8)
            for concurrency, n in ({} if args.only_vs_engine else LEVELS).items():
                prompts = _prompts(n)
                runs: dict[str, list] = {"in-process": [], "serve": []}
                for r in range(args.rounds):
                    # Alternate which side goes first, so drifting machine load hits both alike.
                    order = [("in-process", call_direct), ("serve", call_serve)]
                    for side, call in order if r % 2 == 0 else order[::-1]:
                        runs[side].append(await _drive(call, prompts, concurrency))
                for side in runs:
                    results[side][concurrency] = _stats(runs[side])
            cases = [("short", engine_call(args.max_tokens), call_serve, args.short_rounds)]
            if args.long_tokens:
                cases.append(("long", engine_call(args.long_tokens), call_serve_stream, args.long_rounds))
            for case, call_engine, call_via_serve, rounds in cases:
                prompts = _prompts(8)
                runs = {"engine": [], "serve": []}
                for r in range(rounds):
                    order = [("engine", call_engine), ("serve", call_via_serve)]
                    for side, call in order if r % 2 == 0 else order[::-1]:
                        runs[side].append(await _drive(call, prompts, 8))
                vs_engine[case] = {side: _stats(runs[side]) for side in runs}
            await client.close()

        asyncio.run(run_all())
    finally:
        stop_server()
        direct.engine.shutdown()

    print(f"engine={args.engine} max_tokens={args.max_tokens} torch_threads={threads} rounds={args.rounds} "
          f"short_rounds={args.short_rounds} long_rounds={args.long_rounds} stream_interval={args.stream_interval} "
          f"batch_wait_ms={model_cfg.batch_wait_ms} "
          f"requests/round={LEVELS} (greedy, chat); load average {os.getloadavg()[0]:.1f} on {threads} cores; "
          f"nice: replica {replica_nice}, in-process {os.getpriority(os.PRIO_PROCESS, 0)}")
    print(f"{'side':<11} {'conc':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7}")
    for side, levels in results.items():
        for concurrency, r in levels.items():
            print(f"{side:<11} {concurrency:>4} {r['req_per_s']:>7.2f} {r['tok_per_s']:>7.1f} {r['p50_s']:>7.2f} "
                  f"{r['p99_s']:>7.2f}")
    for concurrency in results["serve"]:
        ratio = results["in-process"][concurrency]["req_per_s"] / results["serve"][concurrency]["req_per_s"]
        p50 = results["serve"][concurrency]["p50_s"] / results["in-process"][concurrency]["p50_s"]
        print(f"concurrency {concurrency}: time per request via Serve / in-process = {ratio:.3f} (p50 ratio {p50:.3f})")
    if 8 in results["serve"]:
        overhead = results["in-process"][8]["req_per_s"] / results["serve"][8]["req_per_s"]
        print(f"RESULT serve_overhead_c8 {overhead:.3f}")
    for case, sides in vs_engine.items():
        tokens = f"--max-tokens {args.max_tokens}" if case == "short" else f"--long-tokens {args.long_tokens}, streamed"
        for side, r in sides.items():
            print(f"{case:<6} {side:<7} c8 {r['req_per_s']:>7.3f} req/s {r['tok_per_s']:>7.1f} tok/s "
                  f"p50 {r['p50_s']:.2f} s ({tokens})")
        ratio = sides["engine"]["req_per_s"] / sides["serve"]["req_per_s"]
        print(f"RESULT serve_vs_engine_c8_{case} {ratio:.3f}")


if __name__ == "__main__":
    main()
