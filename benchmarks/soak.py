"""Soak the ULD server: streaming load with hang-ups and malformed requests, then leak checks.

    python benchmarks/soak.py MODEL ADAPTER [--requests 200] [--concurrency 16]
        [--max-tokens 32] [--cut-fraction 0.3] [--bad-fraction 0.1] [-- SERVE_ARGS...]

Starts ``uld-vllm serve MODEL --uld-adapter ADAPTER SERVE_ARGS`` and sends streaming
``/v1/completions`` requests, each with its own ``uld_alpha`` (the server's, 0, 0.5 or 1);
some clients hang up after a few chunks, some requests are malformed. Exit status 0 only when
every complete request ran ``--max-tokens`` tokens, requests with the same prompt and alpha
got the same greedy text, every malformed one got a 400, and afterwards ``/health`` answers
and ``/metrics`` shows nothing running or waiting and no KV-cache block in use.
``tests/test_server_soak.py`` runs this load at a small size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from uld_vllm.bench.server import leak_check

ALPHAS = (None, 0.0, 0.5, 1.0)
# each must be refused with a 400, also when streaming (before the stream's 200)
BAD = ({"vllm_xargs": {"uld_alpha": -1.0}}, {"vllm_xargs": {"uld_alpha": "half"}},
       {"vllm_xargs": {"uld_beta": 1}}, {"vllm_xargs": {"uld_mode": "sample"}},
       {"max_tokens": -3}, b"{not json")
PROMPTS = ("Hello", "The author wrote", "Question: Where was the poet born? Answer:",
           "In 1907 a quiet librarian studied the history of science and " * 3)


def plan(n: int, cut_fraction: float, bad_fraction: float, seed: int = 0) -> list[dict]:
    """What each request does, fixed by ``seed``; the malformed bodies take turns."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        kind = "bad" if u < bad_fraction else "cut" if u < bad_fraction + cut_fraction else "ok"
        n_bad = sum(r["kind"] == "bad" for r in out)
        out.append({"i": i, "kind": kind, "alpha": rng.choice(ALPHAS), "prompt": i % len(PROMPTS),
                    "cut_after": rng.randint(1, 3), "bad": BAD[n_bad % len(BAD)]})
    return out


async def one(client, url: str, req: dict, model: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPTS[req["prompt"]], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if req["alpha"] is not None:
        body["vllm_xargs"] = {"uld_alpha": req["alpha"]}
    bad = req["bad"] if req["kind"] == "bad" else {}
    kw = {"content": bad, "headers": {"content-type": "application/json"}} \
        if isinstance(bad, bytes) else {"json": {**body, **bad}}
    rec = {**req, "chunks": 0, "text": "", "finish": None, "tokens": None}
    async with client.stream("POST", url, **kw) as r:
        rec["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
        else:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices") or []:
                    rec["text"] += c.get("text") or ""
                    rec["finish"] = c.get("finish_reason") or rec["finish"]
                rec["chunks"] += bool(chunk.get("choices"))
                rec["tokens"] = (chunk.get("usage") or {}).get("completion_tokens",
                                                               rec["tokens"])
                if req["kind"] == "cut" and rec["chunks"] >= req["cut_after"]:
                    break  # leaving the block closes the connection mid-stream
    rec["passed"] = {"ok": rec["status"] == 200 and rec["finish"] == "length"
                     and rec["tokens"] == max_tokens,
                     "cut": rec["status"] == 200, "bad": rec["status"] == 400}[req["kind"]]
    return rec


async def drive(base: str, model: str, reqs: list[dict], max_tokens: int,
                concurrency: int) -> list[dict]:
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def limited(client, req):
        async with sem:
            return await one(client, f"{base}/v1/completions", req, model, max_tokens)

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        return list(await asyncio.gather(*(limited(client, r) for r in reqs)))


def problems(recs: list[dict], leaks: dict) -> list[str]:
    out = [f"request {r['i']} ({r['kind']}, alpha {r['alpha']}): status {r['status']}, "
           f"finish {r['finish']}, {r['tokens']} tokens" for r in recs if not r["passed"]]
    texts = {}
    for r in recs:
        if r["kind"] == "ok" and r["passed"]:
            texts.setdefault((r["prompt"], r["alpha"]), set()).add(r["text"])
    out += [f"prompt {p} at alpha {a}: {len(t)} different greedy texts under load"
            for (p, a), t in texts.items() if len(t) > 1]
    return out + ([] if leaks["idle"] else [f"server not idle afterwards: {leaks}"])


def main(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("adapter")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cut-fraction", type=float, default=0.3)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--log", default="soak_server.log")
    a = p.parse_args(argv)
    from uld_vllm.bench.server import serving

    reqs = plan(a.requests, a.cut_fraction, a.bad_fraction)
    # the load mixes alphas below the served one, which the default request policy refuses
    with serving([a.model, "--uld-adapter", a.adapter, "--served-model-name", "soak",
                  "--uld-request-policy", "any", *extra], a.log) as base:
        t0 = time.perf_counter()
        recs = asyncio.run(drive(base, "soak", reqs, a.max_tokens, a.concurrency))
        wall = time.perf_counter() - t0
        leaks = leak_check(base)
    found = problems(recs, leaks)
    kinds = {k: sum(r["kind"] == k for r in recs) for k in ("ok", "cut", "bad")}
    print(f"{len(recs)} requests ({kinds}) in {wall:.1f} s; after: {leaks}")
    print("\n".join(found) or "passed")
    return 1 if found else 0


if __name__ == "__main__":
    from uld_vllm.errors import exit_status

    sys.exit(exit_status(main, sys.argv[1:]))
