"""Where the ULD engine's greedy output leaves the reference decoder's, and why.

    python benchmarks/greedy_divergence.py --model M --uld-adapter A --dtype bfloat16 --out d.json

Greedy ULD tokens of the engine and of the two-model reference decoder (`ReferenceDecoder`,
static batches of 1 and of 4, in ``--dtype``, and in float32), compared prompt by prompt, and
plain vLLM's greedy tokens against HF transformers' (the target alone, no ULD); then,
at each prompt's first token where the engine and the batch-1 reference differ, where the two
tokens sit against the plausibility filter: their rank in the target's logits, their distance
to the filter's threshold, whether each is kept and its ULD score, computed once in
``--dtype`` and once in float32 on the same prefix. The prompts are the throughput
benchmark's decode prompts (`fixed_prompts`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def filter_position(decoder, ids: list[int], tokens: dict[str, int]) -> dict:
    """The target's and the assistant's last-position logits for ``ids`` (one full forward,
    no cache), and for each named token: its rank among the target's logits, its distance to
    the plausibility threshold, and its ULD score when kept (None when filtered out)."""
    import torch

    from uld_vllm.core.logits import plausibility_threshold

    x = torch.tensor([ids])
    with torch.inference_mode():
        lt = decoder.target(input_ids=x).logits[0, -1].float()
        la = decoder.assistant(input_ids=x).logits[0, -1].float()
    k = max(1, math.floor(decoder.filter_ratio * lt.numel()))
    kth = torch.topk(lt, k).values[-1]
    threshold = float(plausibility_threshold(kth, lt.max(), decoder.filter_ratio))
    out = {"k": k, "values_tied_at_kth": int((lt == kth).sum())}
    for name, tok in tokens.items():
        kept = bool(lt[tok] >= threshold)
        out[name] = {"token": tok, "rank": int((lt > lt[tok]).sum()),
                     "logit_minus_threshold": round(float(lt[tok]) - threshold, 4),
                     "kept": kept,
                     "score": round(float(lt[tok] - decoder.alpha * la[tok]), 4) if kept else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder or a built-in name")
    p.add_argument("--uld-adapter", required=True)
    p.add_argument("--uld-filter-ratio", type=float, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch", type=int, default=32, help="prompts")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.batch < 1 or args.new_tokens < 1 or args.prompt_tokens < 1:
        p.error("--batch, --prompt-tokens and --new-tokens must be >= 1")

    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import uld_vllm
    from uld_vllm.bench import common
    from uld_vllm.core.models import resolve_model
    from uld_vllm.core.reference import ReferenceDecoder

    model = resolve_model(args.model)
    prompts = common.fixed_prompts(model, args.batch, args.prompt_tokens)
    llm = uld_vllm.LLM(model, uld_adapter=args.uld_adapter,
                       uld_filter_ratio=args.uld_filter_ratio, dtype=args.dtype,
                       enforce_eager=True, seed=0,
                       max_model_len=args.prompt_tokens + args.new_tokens + 8)
    outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in prompts],
                        SamplingParams(max_tokens=args.new_tokens, temperature=0.0,
                                       ignore_eos=True), use_tqdm=False)
    greedy = {"engine": [list(o.outputs[0].token_ids) for o in outs]}
    del llm
    # the same comparison without ULD: plain vLLM against HF transformers decoding the target
    plain = uld_vllm.LLM(model, dtype=args.dtype, enforce_eager=True, seed=0,
                         max_model_len=args.prompt_tokens + args.new_tokens + 8)
    outs = plain.generate([TokensPrompt(prompt_token_ids=x) for x in prompts],
                          SamplingParams(max_tokens=args.new_tokens, temperature=0.0,
                                         ignore_eos=True), use_tqdm=False)
    plain_greedy = [list(o.outputs[0].token_ids) for o in outs]
    del plain
    dtype = getattr(torch, args.dtype)
    decoders = {d: ReferenceDecoder.load(model, args.uld_adapter,
                                         filter_ratio=args.uld_filter_ratio, dtype=d)
                for d in dict.fromkeys((dtype, torch.float32))}
    short = {dtype: args.dtype, torch.float32: "float32"}
    for d, batch in ((dtype, 1), (dtype, 4), (torch.float32, 4)):
        name = f"reference_{short[d]}_b{batch}"
        if name not in greedy:
            greedy[name] = [list(o.token_ids) for o in decoders[d].generate(
                prompts, max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=batch)]
    names = list(greedy)
    agreement = {f"{a} vs {b}": common.same_fraction(greedy[a], greedy[b])
                 for i, a in enumerate(names) for b in names[i + 1:]}
    target_alone = ReferenceDecoder.load(model, dtype=dtype)  # no adapter: the target's argmax
    hf_plain = [list(o.token_ids) for o in target_alone.generate(
        prompts, max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=1)]
    agreement["plain vLLM vs HF target alone, batch 1"] = common.same_fraction(plain_greedy,
                                                                              hf_plain)
    del target_alone
    ref = f"reference_{args.dtype}_b1"
    divergences = []
    for i, (p_ids, e, r) in enumerate(zip(prompts, greedy["engine"], greedy[ref])):
        t = first_difference(e, r)
        if t is None:
            continue
        ids = p_ids + e[:t]  # the engine's and the reference's common prefix
        divergences.append({
            "prompt": i, "step": t,
            **{short[d]: filter_position(dec, ids, {"engine": e[t], "reference": r[t]})
               for d, dec in decoders.items()}})
    report = {"benchmark": "greedy_divergence", "model": model, "uld_adapter": args.uld_adapter,
              "dtype": args.dtype, "prompts": len(prompts), "distinct_prompts":
              len({tuple(x) for x in prompts}), "new_tokens": args.new_tokens,
              "alpha": decoders[dtype].alpha, "filter_ratio": decoders[dtype].filter_ratio,
              "agreement": agreement, "divergences": divergences, "config": vars(args)}
    common.write_json(Path(args.out), report)
    for pair, frac in agreement.items():
        print(f"{pair}: {frac:.0%} of prompts token-identical")
    near = [abs(d["float32"][who]["logit_minus_threshold"]) for d in divergences
            for who in ("engine", "reference")]
    if divergences:
        closest = [min(abs(d["float32"]["engine"]["logit_minus_threshold"]),
                       abs(d["float32"]["reference"]["logit_minus_threshold"]))
                   for d in divergences]
        print(f"{len(divergences)} first divergences; the token nearer the filter threshold "
              f"(float32 logits) was {min(closest):.3f}-{max(closest):.3f} from it "
              f"(both tokens: {min(near):.3f}-{max(near):.3f})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
