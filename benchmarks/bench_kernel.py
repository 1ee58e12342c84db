"""Fused ULD kernels vs the torch reference: time and achieved memory bandwidth, one GPU.

    python benchmarks/bench_kernel.py [--dtype bfloat16] [--filter-ratio 0.01] [--out F.json]
    python benchmarks/bench_kernel.py --variant split --split-programs 8   # one variant
    python benchmarks/bench_kernel.py --rule gated    # the gate + above-uniform penalty
    python benchmarks/bench_kernel.py --interpret     # no GPU: a CPU correctness smoke only

For each B in {1, 32, 256} and V in {32000, 128256, 151936} and each launch variant
(``--variant``: ``row`` = one program per row, ``split`` = several programs per row, ``auto``
= what the kernels pick by shape; default ``all`` = row and split) it checks that
``uld_combine`` equals ``uld_logits`` and that greedy ``uld_sample`` equals its argmax, then
times both (CUDA events, median of --iters; the torch reference once per shape). Bytes moved
are counted as the minimum any implementation must move: both inputs read once and the fp32
output written once, ``2*B*V*elem + 4*B*V`` (``2*B*V*elem`` for sampling, which writes only
ids); the kernels' repeated passes over the target row for the selection are extra traffic
(or L2 hits), so GB/s near the peak means they cost little. GB/s and % of HBM peak are
reported per variant (the ``variant`` column shows what ran: ``row`` or ``split/S``).
``--rule`` picks the decoding rule: ``reference`` (the paper's, the default) or ``gated`` (the
confidence gate and the above-uniform penalty at ``uld_vllm.core.logits``'s defaults), which
adds the kernels' reduction of the assistant row to what is timed; the bytes counted stay the
same minimum.
Real numbers need CUDA; without it the script exits with status 2 saying so, unless
--interpret asks for a tiny correctness smoke in the Triton interpreter (no timings: they
would mean nothing there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

BATCHES = (1, 32, 256)
VOCABS = (32000, 128256, 151936)
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}
VARIANTS = ("row", "split", "auto", "all")
RULES = ("reference", "gated")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--filter-ratio", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--rule", choices=RULES, default="reference",
                   help="decoding rule: reference = the paper's (default), gated = the "
                        "confidence gate and the above-uniform penalty at the library's "
                        "defaults (random logits have KL(p_a || U) ~ std^2 / 2 nats: the "
                        "default --logit-scale opens the gate; the kernels do the same work "
                        "at any weight)")
    p.add_argument("--logit-scale", type=float, default=3.0,
                   help="std of the random logits; >= ~1 makes the top-k floor decide (the "
                        "selection's worst case), ~0.05 lets the ratio test decide")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--variant", choices=VARIANTS, default="all",
                   help="launch variant: row = one program per row, split = several per row, "
                        "auto = chosen by shape, all = row and split (default)")
    p.add_argument("--split-programs", type=int, default=None, metavar="S",
                   help="programs per row for the split variant (default: the automatic count)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM peak for the %% column (default by GPU name: " +
                        ", ".join(f"{k} {v:g}" for k, v in PEAK_GBPS.items()) + ")")
    p.add_argument("--interpret", action="store_true",
                   help="without CUDA: run a tiny correctness smoke in the Triton interpreter")
    p.add_argument("--out", default="bench_kernel.json")
    args = p.parse_args(argv)
    if args.split_programs is not None and args.split_programs < 1:
        p.error("--split-programs must be >= 1")
    if args.iters < 1:
        p.error("--iters must be >= 1")
    return args


def variant_splits(args) -> dict:
    """variant name -> the ``split`` argument of the kernels."""
    split = {"row": False, "split": args.split_programs or True, "auto": None}
    names = ("row", "split") if args.variant == "all" else (args.variant,)
    return {name: split[name] for name in names}


def launched_as(B, V, device, split) -> str:
    """What the kernels run for ``split`` at this shape: ``row`` or ``split/S``."""
    from uld_vllm import kernels

    plan = kernels.split_plan(B, V, device, split)
    return "row" if plan is None else f"split/{plan[0]}"


def make_inputs(B, V, dtype, scale, device):
    import torch

    g = torch.Generator(device=device).manual_seed(B * 7 + V)
    l = torch.randn(B, V, generator=g, device=device) * scale
    a = torch.randn(B, V, generator=g, device=device) * scale
    return l.to(dtype), a.to(dtype)


def rule_kw(args) -> dict:
    """The ``uld_logits`` / kernel keywords of ``--rule`` (none for the paper's rule: it is
    their default)."""
    if args.rule == "reference":
        return {}
    from uld_vllm.core.logits import DEFAULT_GATE, DEFAULT_PENALTY

    return dict(penalty=DEFAULT_PENALTY, gate=DEFAULT_GATE)


def check(l, a, args, split=None) -> bool:
    import torch

    from uld_vllm import kernels
    from uld_vllm.core.logits import uld_logits

    kw = dict(alpha=args.alpha, filter_ratio=args.filter_ratio, **rule_kw(args))
    got, want = kernels.uld_combine(l, a, split=split, **kw), uld_logits(l, a, **kw)
    same_mask = torch.equal(got == float("-inf"), want == float("-inf"))
    fin = want != float("-inf")
    close = torch.allclose(got[fin], want[fin], atol=1e-5, rtol=1e-5)
    greedy = torch.equal(kernels.uld_sample(l, a, split=split, **kw), want.argmax(-1))
    return bool(same_mask and close and greedy)


def cuda_time_ms(fn, iters) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_ops(t, s, kw, nbytes_io, nbytes_out, split=None):
    """op -> (reference, kernel, bytes moved), bound to this shape's inputs."""
    from uld_vllm import kernels
    from uld_vllm.core.logits import uld_logits

    return {"combine": (lambda: uld_logits(t, s, **kw),
                        lambda: kernels.uld_combine(t, s, split=split, **kw),
                        nbytes_io + nbytes_out),
            "greedy": (lambda: uld_logits(t, s, **kw).argmax(-1),
                       lambda: kernels.uld_sample(t, s, split=split, **kw), nbytes_io)}


def run_cuda(args) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    kw = dict(alpha=args.alpha, filter_ratio=args.filter_ratio, **rule_kw(args))
    variants = variant_splits(args)
    device = torch.device("cuda")
    print(f"GPU: {name}; dtype {args.dtype}, r = {args.filter_ratio}, alpha = {args.alpha}, "
          f"rule {args.rule}, logit std {args.logit_scale}; peak {peak or '?'} GB/s; variants "
          f"{', '.join(variants)}")
    head = (f"{'op':<8}{'variant':>10}{'B':>5}{'V':>8}{'ok':>4}{'ref ms':>9}{'kernel ms':>11}"
            f"{'speedup':>9}{'GB/s':>8}{'% peak':>8}")
    print(head)
    print("-" * len(head))
    rows = []
    for V in args.vocabs:
        for B in args.batches:
            t, s = make_inputs(B, V, dtype, args.logit_scale, "cuda")
            ref_ops = timed_ops(t, s, kw, 2 * B * V * elem, 4 * B * V)
            ref_ms = {op: cuda_time_ms(fns[0], args.iters) for op, fns in ref_ops.items()}
            for variant, split in variants.items():
                ok = check(t, s, args, split)
                ran = launched_as(B, V, device, split)
                ops = timed_ops(t, s, kw, 2 * B * V * elem, 4 * B * V, split)
                for op, (_, kernel_fn, nbytes) in ops.items():
                    k_ms = cuda_time_ms(kernel_fn, args.iters)
                    gbps = nbytes / (k_ms * 1e-3) / 1e9
                    pct = f"{100 * gbps / peak:.0f}" if peak else "?"
                    print(f"{op:<8}{ran:>10}{B:>5}{V:>8}{'y' if ok else 'N':>4}"
                          f"{ref_ms[op]:>9.3f}{k_ms:>11.3f}{ref_ms[op] / k_ms:>8.1f}x"
                          f"{gbps:>8.0f}{pct:>8}")
                    rows.append(dict(op=op, variant=variant, launched=ran, B=B, V=V,
                                     matches_reference=ok, ref_ms=ref_ms[op], kernel_ms=k_ms,
                                     speedup=ref_ms[op] / k_ms, bytes=nbytes, kernel_gbps=gbps,
                                     peak_gbps=peak,
                                     pct_of_peak=100 * gbps / peak if peak else None))
                del ops
            del t, s, ref_ops
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=name, dtype=args.dtype, filter_ratio=args.filter_ratio,
                       alpha=args.alpha, rule=args.rule,
                       penalty=rule_kw(args).get("penalty", "logit"),
                       gate=rule_kw(args).get("gate"),
                       logit_scale=args.logit_scale, variant=args.variant,
                       split_programs=args.split_programs, command=" ".join(sys.argv),
                       date=datetime.date.today().isoformat(), rows=rows), f, indent=2)
    print(f"wrote {args.out}")
    if not all(r["matches_reference"] for r in rows):
        sys.exit("some shapes did not match the torch reference (column ok = N)")


def run_interpret_smoke(args) -> None:
    import torch

    dtype = getattr(torch, args.dtype)
    print("Triton interpreter smoke (CPU; correctness only, no timings):")
    ok = True
    for variant, split in variant_splits(args).items():
        for B, V in ((3, 1271), (2, 4099)):
            l, a = make_inputs(B, V, dtype, args.logit_scale, "cpu")
            # the automatic count splits these short rows too little to show: 3 per row
            split_here = 3 if split is True else split
            good = check(l, a, args, split_here)
            ok &= good
            ran = launched_as(B, V, torch.device("cpu"), split_here)
            print(f"  {variant} ({ran}) B={B} V={V} {args.dtype} r={args.filter_ratio} "
                  f"rule={args.rule}: "
                  f"{'matches uld_logits' if good else 'MISMATCH'}")
    if not ok:
        sys.exit(1)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.interpret:
        # read when the kernels are decorated: must precede the first triton import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if torch.cuda.is_available() and not args.interpret:
        run_cuda(args)
        return
    if args.interpret:
        print("bench_kernel: --interpret: no timings or GB/s (the interpreter's speed says "
              "nothing about a GPU)")
        run_interpret_smoke(args)
        return
    print("bench_kernel: no CUDA device, so nothing to time: the kernels' ms, GB/s and % of "
          "HBM peak only mean something on a GPU (run this script on one). For a CPU "
          "correctness smoke in the Triton interpreter pass --interpret.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
