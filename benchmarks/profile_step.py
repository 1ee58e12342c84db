"""Where a decode (or prefill) step's time goes, per op: plain vLLM against the ULD engine.

    # one system per process (run under `taskset -c 0` with OMP_NUM_THREADS=1 for one core)
    python benchmarks/profile_step.py run --system plain --model M --out plain.json
    python benchmarks/profile_step.py run --system uld --model M --uld-adapter A --out uld.json
    # a markdown table: ops by ULD's extra time, then totals and the profiled ratio
    python benchmarks/profile_step.py compare plain.json uld.json [uld_other_commit.json ...]

`run` starts one in-process engine, warms it up, then profiles (torch profiler, self CPU time
per op) a 1-token and an N-token greedy `generate` of the same batch; the difference divided by
N - 1 is one decode step without the prefill. `--step prefill` reports the 1-token `generate`
itself: the batch's prompts in one forward, the LM head on their last rows, one sample.
`--shapes` keys each op by its input shapes too (which GEMM, which batch). The in-process
engine runs the model in this process, so the profiler sees every op of the forward and the
ULD combine. A compiled graph shows as one `Call CompiledFxGraph` op; with
`TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1` in the environment, inductor's CPU kernels show
as ops of their own (`graph_0_cpp_fused_...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def profile_step(llm, prompts, new_tokens: int, step: str = "decode",
                 shapes: bool = False) -> dict[str, list[float]]:
    """op -> [self CPU ms per step, calls per step], for a ``decode`` or ``prefill`` step."""
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    tables = {}
    for n in (1,) if step == "prefill" else (1, new_tokens):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # the same shapes, unprofiled, first
        with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        events = prof.key_averages(group_by_input_shape=shapes)
        tables[n] = {(f"{e.key} {e.input_shapes}" if shapes else e.key):
                     (e.self_cpu_time_total, e.count) for e in events}
    if step == "prefill":
        return {op: [us / 1e3, calls] for op, (us, calls) in tables[1].items()}
    steps = new_tokens - 1
    one = tables[1]
    return {op: [(us - one.get(op, (0, 0))[0]) / steps / 1e3,
                 (calls - one.get(op, (0, 0))[1]) / steps]
            for op, (us, calls) in tables[new_tokens].items()}


def run(args) -> int:
    import torch
    from vllm.inputs import TokensPrompt

    import uld_vllm
    from uld_vllm.bench import common
    from uld_vllm.core.models import resolve_model

    args.model = resolve_model(args.model)
    kw = dict(dtype=args.dtype, enforce_eager=not args.compiled, seed=0,
              max_num_seqs=max(args.batch, 1))
    if args.system == "uld":
        llm = uld_vllm.LLM(args.model, uld_adapter=args.uld_adapter,
                           uld_filter_ratio=args.uld_filter_ratio, **kw)
    else:
        llm = uld_vllm.LLM(args.model, **kw)
    prompts = [TokensPrompt(prompt_token_ids=p)
               for p in common.fixed_prompts(args.model, args.batch, args.prompt_tokens)]
    ops = profile_step(llm, prompts, args.new_tokens, args.step, args.shapes)
    report = {"system": args.system, "model": args.model, "uld_adapter": args.uld_adapter,
              "dtype": args.dtype, "compiled": args.compiled, "batch": args.batch,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "step": args.step, "shapes": args.shapes,
              "torch_threads": torch.get_num_threads(),
              "cpu_affinity": sorted(os.sched_getaffinity(0)), "ops": ops}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.system}: {sum(v[0] for v in ops.values()):.2f} ms self CPU per {args.step} step "
          f"-> {args.out}")
    return 0


def compare_table(plain: dict, others: list[tuple[str, dict]], top: int = 18) -> str:
    """Markdown: the ``top`` ops by the largest extra time of any ULD profile over plain."""
    def ms(rep, op):
        return rep["ops"].get(op, [0.0, 0.0])

    ops = set(plain["ops"]).union(*(r["ops"] for _, r in others))
    ops = sorted(ops, key=lambda op: -max(ms(r, op)[0] - ms(plain, op)[0] for _, r in others))
    names = [name for name, _ in others]
    step = plain.get("step", "decode")
    lines = [f"| op (self CPU ms per {step} step) | plain | " + " | ".join(names)
             + " | calls plain / " + " / ".join(names) + " |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for op in ops[:top]:
        lines.append(f"| `{op}` | {ms(plain, op)[0]:.2f} | "
                     + " | ".join(f"{ms(r, op)[0]:.2f}" for _, r in others)
                     + f" | {ms(plain, op)[1]:.0f} / "
                     + " / ".join(f"{ms(r, op)[1]:.0f}" for _, r in others) + " |")
    total = {name: sum(v[0] for v in r["ops"].values()) for name, r in [("plain", plain), *others]}
    lines.append(f"| all ops | {total['plain']:.1f} | "
                 + " | ".join(f"{total[n]:.1f}" for n in names) + " | |")
    lines.append("| ULD extra over plain | | "
                 + " | ".join(f"{total[n] - total['plain']:.1f}" for n in names) + " | |")
    lines.append("| plain / ULD (profiled) | | "
                 + " | ".join(f"{total['plain'] / total[n]:.3f}" for n in names) + " | |")
    return "\n".join(lines)


def compare(args) -> int:
    reps = []
    for path in args.profiles:
        try:
            reps.append((Path(path).stem, json.loads(Path(path).read_text())))
        except (OSError, ValueError) as e:
            print(f"profile_step: cannot read {path} ({e}); pass files written by "
                  f"`profile_step.py run`", file=sys.stderr)
            return 2
    plain = [r for _, r in reps if r.get("system") == "plain"]
    if len(plain) != 1 or reps[0][1].get("system") != "plain":
        print("profile_step: compare needs the plain profile first and exactly one of it",
              file=sys.stderr)
        return 2
    kinds = {(r.get("step", "decode"), r.get("shapes", False)) for _, r in reps}
    if len(kinds) > 1:
        print("profile_step: compare needs profiles of one kind of step (--step, --shapes the "
              f"same in every run), got {sorted(kinds)}", file=sys.stderr)
        return 2
    print(compare_table(plain[0], reps[1:], args.top))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="profile one system")
    r.add_argument("--system", choices=("plain", "uld"), required=True)
    r.add_argument("--model", required=True, help="HF folder or a built-in name")
    r.add_argument("--uld-adapter", default=None)
    r.add_argument("--uld-filter-ratio", type=float, default=None)
    r.add_argument("--dtype", default="float32")
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--prompt-tokens", type=int, default=32)
    r.add_argument("--new-tokens", type=int, default=None,
                   help="tokens of the decode profile (default 64); not with --step prefill")
    r.add_argument("--compiled", action="store_true", help="enforce_eager=False")
    r.add_argument("--step", choices=("decode", "prefill"), default="decode",
                   help="decode: one step of --new-tokens, without the prefill; prefill: the "
                        "prompts' forward and the first token")
    r.add_argument("--shapes", action="store_true", help="key each op by its input shapes too")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="a markdown table of plain against ULD profiles")
    c.add_argument("profiles", nargs="+", help="plain's JSON first, then ULD's")
    c.add_argument("--top", type=int, default=18)
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.step == "prefill" and args.new_tokens is not None:
            p.error("--new-tokens applies to --step decode only (a prefill profile generates "
                    "one token); drop it")
        if args.step == "decode" and args.new_tokens is None:
            args.new_tokens = 64
        if args.batch < 1 or (args.step == "decode" and args.new_tokens < 2):
            p.error("--batch must be >= 1 and --new-tokens >= 2 (one step beyond the first "
                    "token)")
    if args.cmd == "run" and args.system == "uld" and not args.uld_adapter:
        p.error("--system uld needs --uld-adapter DIR")
    return run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
