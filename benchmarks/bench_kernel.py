"""Fused ULD kernels vs the torch reference: time and achieved memory bandwidth, one GPU.

    python benchmarks/bench_kernel.py [--dtype bfloat16] [--filter-ratio 0.01] [--out F.json]
    python benchmarks/bench_kernel.py --interpret     # no GPU: a CPU correctness smoke only

For each B in {1, 32, 256} and V in {32000, 128256, 151936} it checks that ``uld_combine``
equals ``uld_logits`` and that greedy ``uld_sample`` equals its argmax, then times both
(CUDA events, median of --iters). Bytes moved are counted as the minimum any implementation
must move: both inputs read once and the fp32 output written once, ``2*B*V*elem + 4*B*V``
(``2*B*V*elem`` for sampling, which writes only ids); the kernel's repeated passes over the
target row for the selection are meant to hit L2, so GB/s near the peak means it does.
Real numbers need CUDA; without it the script says so and, with --interpret, runs a tiny
correctness smoke in the Triton interpreter (no timings: they would mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

BATCHES = (1, 32, 256)
VOCABS = (32000, 128256, 151936)
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--filter-ratio", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--logit-scale", type=float, default=3.0,
                   help="std of the random logits; >= ~1 makes the top-k floor decide (the "
                        "selection's worst case), ~0.05 lets the ratio test decide")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM peak for the %% column (default by GPU name: " +
                        ", ".join(f"{k} {v:g}" for k, v in PEAK_GBPS.items()) + ")")
    p.add_argument("--interpret", action="store_true",
                   help="without CUDA: run a tiny correctness smoke in the Triton interpreter")
    p.add_argument("--out", default="bench_kernel.json")
    return p.parse_args()


def make_inputs(B, V, dtype, scale, device):
    import torch

    g = torch.Generator(device=device).manual_seed(B * 7 + V)
    l = torch.randn(B, V, generator=g, device=device) * scale
    a = torch.randn(B, V, generator=g, device=device) * scale
    return l.to(dtype), a.to(dtype)


def check(l, a, args) -> bool:
    import torch

    from uld_vllm import kernels
    from uld_vllm.core.logits import uld_logits

    kw = dict(alpha=args.alpha, filter_ratio=args.filter_ratio)
    got, want = kernels.uld_combine(l, a, **kw), uld_logits(l, a, **kw)
    same_mask = torch.equal(got == float("-inf"), want == float("-inf"))
    fin = want != float("-inf")
    close = torch.allclose(got[fin], want[fin], atol=1e-5, rtol=1e-5)
    greedy = torch.equal(kernels.uld_sample(l, a, **kw), want.argmax(-1))
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


def timed_ops(t, s, kw, nbytes_io, nbytes_out):
    """op -> (reference, kernel, bytes moved), bound to this shape's inputs."""
    from uld_vllm import kernels
    from uld_vllm.core.logits import uld_logits

    return {"combine": (lambda: uld_logits(t, s, **kw), lambda: kernels.uld_combine(t, s, **kw),
                        nbytes_io + nbytes_out),
            "greedy": (lambda: uld_logits(t, s, **kw).argmax(-1),
                       lambda: kernels.uld_sample(t, s, **kw), nbytes_io)}


def run_cuda(args) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    kw = dict(alpha=args.alpha, filter_ratio=args.filter_ratio)
    print(f"GPU: {name}; dtype {args.dtype}, r = {args.filter_ratio}, alpha = {args.alpha}, "
          f"logit std {args.logit_scale}; peak {peak or '?'} GB/s")
    head = (f"{'op':<8}{'B':>5}{'V':>8}{'ok':>4}{'ref ms':>9}{'kernel ms':>11}{'speedup':>9}"
            f"{'GB/s':>8}{'% peak':>8}")
    print(head)
    print("-" * len(head))
    rows = []
    for V in args.vocabs:
        for B in args.batches:
            t, s = make_inputs(B, V, dtype, args.logit_scale, "cuda")
            ok = check(t, s, args)
            ops = timed_ops(t, s, kw, 2 * B * V * elem, 4 * B * V)
            for op, (ref_fn, kernel_fn, nbytes) in ops.items():
                ref_ms = cuda_time_ms(ref_fn, args.iters)
                k_ms = cuda_time_ms(kernel_fn, args.iters)
                gbps = nbytes / (k_ms * 1e-3) / 1e9
                pct = f"{100 * gbps / peak:.0f}" if peak else "?"
                print(f"{op:<8}{B:>5}{V:>8}{'y' if ok else 'N':>4}{ref_ms:>9.3f}{k_ms:>11.3f}"
                      f"{ref_ms / k_ms:>8.1f}x{gbps:>8.0f}{pct:>8}")
                rows.append(dict(op=op, B=B, V=V, matches_reference=ok, ref_ms=ref_ms,
                                 kernel_ms=k_ms, speedup=ref_ms / k_ms, bytes=nbytes,
                                 kernel_gbps=gbps, peak_gbps=peak,
                                 pct_of_peak=100 * gbps / peak if peak else None))
            del t, s, ops
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=name, dtype=args.dtype, filter_ratio=args.filter_ratio,
                       alpha=args.alpha, logit_scale=args.logit_scale, rows=rows), f, indent=2)
    print(f"wrote {args.out}")
    if not all(r["matches_reference"] for r in rows):
        sys.exit("some shapes did not match the torch reference (column ok = N)")


def run_interpret_smoke(args) -> None:
    import torch

    dtype = getattr(torch, args.dtype)
    print("Triton interpreter smoke (CPU; correctness only, no timings):")
    ok = True
    for B, V in ((3, 1271), (2, 4099)):
        l, a = make_inputs(B, V, dtype, args.logit_scale, "cpu")
        good = check(l, a, args)
        ok &= good
        print(f"  B={B} V={V} {args.dtype} r={args.filter_ratio}: "
              f"{'matches uld_logits' if good else 'MISMATCH'}")
    if not ok:
        sys.exit(1)


def main() -> None:
    args = parse_args()
    if args.interpret:
        # read when the kernels are decorated: must precede the first triton import
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if torch.cuda.is_available() and not args.interpret:
        run_cuda(args)
        return
    print("bench_kernel: no CUDA device, so no timings or GB/s: the kernels' numbers only mean "
          "something on a GPU (run this script on one). On CPU they only run in the Triton "
          "interpreter, whose speed says nothing about the GPU.")
    if args.interpret:
        run_interpret_smoke(args)
    else:
        print("Pass --interpret for a CPU correctness smoke on tiny shapes.")


if __name__ == "__main__":
    main()
