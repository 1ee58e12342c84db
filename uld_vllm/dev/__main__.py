"""`python -m uld_vllm.dev`: developer tools, off the user CLI.

``make-tiny-model DIR`` builds a random local model with a BPE tokenizer (a normal HF folder
that transformers and vLLM load; same seed, same files); ``make-random-adapter MODEL DIR``
writes a ULD adapter with random non-zero LoRA (smoke tests and benchmarks).
"""

from __future__ import annotations

import argparse
import sys

from uld_vllm.errors import exit_status


def _add_tiny_model(sub) -> None:
    p = sub.add_parser("make-tiny-model", help="build a random local model with a BPE tokenizer")
    p.add_argument("out_dir", help="folder to write (a normal HF model folder)")
    p.add_argument("--arch", choices=["llama", "mistral", "qwen2"], default="llama")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--intermediate", type=int, default=None, help="default: 3 * hidden")
    p.add_argument("--vocab", type=int, default=1024)
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tie-embeddings", dest="tie", action="store_true", default=None)
    tie.add_argument("--no-tie-embeddings", dest="tie", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.02,
                   help="weight init std; larger values give peakier (less flat) logits")
    p.add_argument("--corpus", default=None, help="text file to train the tokenizer on")
    p.set_defaults(func=_run_tiny_model)


def _run_tiny_model(a) -> None:
    from uld_vllm.dev.tiny import make_tiny_model

    out = make_tiny_model(a.out_dir, arch=a.arch, layers=a.layers, hidden=a.hidden,
                          heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate,
                          vocab=a.vocab, tie_embeddings=a.tie, seed=a.seed,
                          init_std=a.init_std, corpus_file=a.corpus)
    print(f"wrote {a.arch} model to {out}")


def _add_random_adapter(sub) -> None:
    p = sub.add_parser("make-random-adapter",
                       help="a ULD adapter with random LoRA weights (for smoke tests)")
    p.add_argument("model", help="target model folder or hub id")
    p.add_argument("out_dir")
    p.add_argument("--num-layers", type=int, default=1, help="K, assistant layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=0.05, help="std of the random LoRA weights")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_random_adapter)


def _run_random_adapter(a) -> None:
    from uld_vllm.dev.tiny import make_random_adapter

    ad = make_random_adapter(a.model, a.out_dir, num_layers=a.num_layers, seed=a.seed,
                             scale=a.scale, overwrite=a.overwrite)
    print(f"wrote ULD adapter (K={ad.config.num_layers}) to {ad.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uld_vllm.dev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_tiny_model(sub)
    _add_random_adapter(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # the same one-line errors as the user CLI (its prefix included: tests read it)
    return exit_status(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
