"""Requests/s and p50/p95 latency: the Ray Serve endpoint vs the same vLLM engine in-process.

Both sides use the embedded default policy, AsyncLLM in fp32, the same prompts, sampling settings
and client concurrency. The Serve side goes through HTTP on 127.0.0.1 with the Serve settings a run
gets (cluster.SERVE_ENV): once to the replica's own port (Ray Serve's direct ingress: the replica
with vLLM's OpenAI layer, the engine) and once through Serve's proxy in front of it. The direct side
calls AsyncLLM.generate in this process, once per engine thread count (1 .. cores), and the best of
those is the reference for the ratios.
Run: .venv/bin/python bench/serve_vs_direct.py [--requests 256 --concurrency 16 --out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import time


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def figures(latencies: list[float], wall: float) -> dict:
    return {"req_s": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * percentile(latencies, 0.95)}


async def drive(one, prompts: list[str], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def task(i, p):
        async with sem:
            t = time.perf_counter()
            await one(i, p)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*[task(i, p) for i, p in enumerate(prompts)])
    return figures(latencies, time.perf_counter() - start)


async def bench_serve(url: str, prompts, args) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def one(i, prompt):
            body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": i}
            async with session.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
        await drive(one, prompts[: args.concurrency], args.concurrency)  # warm-up
        return await drive(one, prompts, args.concurrency)


async def bench_direct(model: str, prompts, args, threads: int) -> dict:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    torch_threads(threads)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, dtype="float32", enforce_eager=True))
    tok = engine.get_tokenizer()

    async def one(i, prompt):
        from vllm import TokensPrompt
        params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i)
        ids = tok(prompt)["input_ids"]  # the server tokenizes too
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"r{i}-{time.time()}"):
            pass
    try:
        await drive(one, prompts[: args.concurrency], args.concurrency)  # warm-up
        return await drive(one, prompts, args.concurrency)
    finally:
        engine.shutdown()


def torch_threads(n: int) -> None:
    os.environ.update({"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--serve-only", action="store_true", help="measure the Serve side only (for tuning)")
    args = parser.parse_args()

    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"})
    from online_dpo.embedded import EMBEDDED, embedded_prompts, resolve_model

    model = resolve_model(EMBEDDED)
    base = embedded_prompts("heldout")
    prompts = [base[i % len(base)] for i in range(args.requests)]

    from online_dpo.cluster import serve_defaults, use_loopback
    use_loopback()
    serve_defaults()
    import ray

    from online_dpo.plan import serve_plan
    from online_dpo.serve import app as serving
    from online_dpo.config import ServeConfig

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(port=port, dtype="float32", num_cpus=os.cpu_count(), max_ongoing_requests=256)
    plan = serve_plan(cfg, model, "reviews")
    spec, options = plan.spec, plan.options   # plan.app_name: an app of its own
    proxy_url = serving.deploy(spec, options, "127.0.0.1", port, "/", plan.app_name)
    (replica_url,) = serving.replica_urls("/", plan.app_name)
    serve = {"replica": asyncio.run(bench_serve(replica_url, prompts, args)),
             "proxy": asyncio.run(bench_serve(proxy_url, prompts, args))}
    serving.undeploy(plan.app_name)
    ray.shutdown()
    if args.serve_only:
        print(json.dumps({"serve": serve}))
        return
    directs = {n: asyncio.run(bench_direct(model, prompts, args, n)) for n in range(1, os.cpu_count() + 1)}
    best = max(directs, key=lambda n: directs[n]["req_s"])
    ref = directs[best]

    print(f"{args.requests} requests, {args.concurrency} concurrent clients, max_tokens {args.max_tokens}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'':30}{'req/s':>8}{'p50 ms':>10}{'p95 ms':>10}{'ratio':>8}")
    rows = [("Ray Serve, replica's own port", serve["replica"]), ("Ray Serve, through its proxy", serve["proxy"])]
    rows += [(f"vLLM in-process, {n} thread(s)", f) for n, f in directs.items()]
    for name, f in rows:
        print(f"{name:30}{f['req_s']:8.1f}{f['p50_ms']:10.1f}{f['p95_ms']:10.1f}{f['req_s'] / ref['req_s']:8.2f}")
    result = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "cores": os.cpu_count(), "serve": serve, "direct_best_threads": best,
              "direct": {str(n): f for n, f in directs.items()},
              "ratio_req_s": {k: f["req_s"] / ref["req_s"] for k, f in serve.items()}}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
