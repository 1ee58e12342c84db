"""Decode throughput: ULD engine vs plain vLLM on the same locally built model, one run.

    python benchmarks/bench_decode.py [--batch 32] [--new-tokens 64] [--out results.json]

Default model: Llama, hidden 768, 8 layers, vocab 32000 (~96 M parameters), ULD K=2 (K/N=1/4),
random LoRA adapter. Both engines run in this process one after the other with the same
vLLM CPU thread binding, prompts and sampling settings (greedy, ignore_eos), and the ratio is
computed from numbers measured in this run. Printed: tokens/s, ratio, and a per-phase
breakdown of one ULD decode step (torch profiler) showing where the extra time goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def build(workdir: Path, args) -> tuple[Path, Path]:
    from uld_vllm.dev.tiny import make_random_adapter, make_tiny_model

    model = workdir / "model"
    if not (model / "config.json").exists():
        make_tiny_model(model, arch="llama", layers=args.layers, hidden=args.hidden,
                        heads=args.hidden // 64, kv_heads=args.hidden // 64,
                        intermediate=args.intermediate, vocab=args.vocab,
                        tie_embeddings=False, seed=0, init_std=args.init_std)
    adapter = workdir / "adapter"
    if not (adapter / "uld_config.json").exists():
        make_random_adapter(model, adapter, num_layers=args.k, seed=0, scale=0.02,
                            filter_ratio=args.filter_ratio)
    return model, adapter


def measure(llm, prompts, args) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
    t = statistics.median(times)
    return {"seconds": t, "tokens_per_s": len(prompts) * args.new_tokens / t, "runs": times}


def profile_step(llm, prompts, args) -> list[tuple[str, float]]:
    """Top CPU ops of a ULD decode run (in the worker), to show where the time goes."""
    from vllm import SamplingParams

    def run(worker):
        import torch

        worker._uld_prof = torch.profiler.profile(activities=[
            torch.profiler.ProfilerActivity.CPU])
        worker._uld_prof.__enter__()

    def stop(worker):
        p = worker._uld_prof
        p.__exit__(None, None, None)
        rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        return [(e.key, e.self_cpu_time_total / 1e6) for e in rows[:15]]

    llm.collective_rpc(run)
    llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    return llm.collective_rpc(stop)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--filter-ratio", type=float, default=0.1,
                   help="ULD plausibility-filter ratio (0.1: reference default; 0.01: TOFU)")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="weight init std; 0.02 gives near-uniform next-token distributions "
                        "(the filter keeps most of the vocabulary), larger values give "
                        "confident ones like a trained model's")
    p.add_argument("--workdir", default=None, help="reuse built model/adapter here")
    p.add_argument("--profile", action="store_true", help="also profile the ULD engine")
    p.add_argument("--out", default="bench_decode.json")
    args = p.parse_args()

    from vllm import LLM as PlainLLM

    import uld_vllm

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for --profile
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="uld-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, adapter = build(workdir, args)
    words = "the author wrote about a quiet river in the northern sea".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(args.prompt_tokens))
               for i in range(args.batch)]
    kw = dict(dtype="float32", max_model_len=args.prompt_tokens * 4 + args.new_tokens + 64,
              enforce_eager=True, seed=0, max_num_seqs=max(args.batch, 8))
    results = {"config": vars(args), "binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                                "auto (vLLM default)")}
    llm = PlainLLM(str(model), **kw)
    results["plain"] = measure(llm, prompts, args)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    llm = uld_vllm.LLM(str(model), uld_adapter=str(adapter),
                       uld_filter_ratio=args.filter_ratio, **kw)
    results["uld"] = measure(llm, prompts, args)
    results["uld"]["head_paths"] = llm.collective_rpc("uld_combiner_state")[0]["stats"]
    if args.profile:
        results["uld_profile_top_ops"] = profile_step(llm, prompts, args)
    llm.llm_engine.engine_core.shutdown()
    results["ratio_uld_over_plain"] = (results["uld"]["tokens_per_s"]
                                       / results["plain"]["tokens_per_s"])
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nmodel: {model} (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"K={args.k}, init std {args.init_std}); filter ratio {args.filter_ratio}; batch "
          f"{args.batch}, {args.new_tokens} new tokens; binding: {results['binding']}")
    print(f"assistant LM-head calls (dense/sparse): {results['uld']['head_paths']}")
    print(f"{'system':<10}{'tokens/s':>12}{'seconds':>10}")
    for name in ("plain", "uld"):
        r = results[name]
        print(f"{name:<10}{r['tokens_per_s']:>12.1f}{r['seconds']:>10.2f}")
    print(f"ULD / plain decode throughput: {results['ratio_uld_over_plain']:.3f}")
    if args.profile:
        print("\nULD engine, top CPU ops (self time, s):")
        for name, sec in results["uld_profile_top_ops"]:
            print(f"  {sec:8.3f}  {name}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
