"""`uld-vllm bench {throughput,ab,serving,soak} ...`: the benchmark programs.

The logic lives here (so the installed console script runs it from anywhere); the scripts in
``benchmarks/`` are thin wrappers around :func:`main`.
"""

from __future__ import annotations

import sys

from uld_vllm.errors import UldError, exit_status

BENCHMARKS = {
    "throughput": "offline tokens/s: plain vLLM vs the ULD engine vs the reference decoder",
    "ab": "two engine variants (plain/uld, environment) taking turns on the same decode",
    "serving": "OpenAI server under concurrent streaming load: plain vs --uld-adapter",
    "soak": "ULD server under mixed load with disconnects and bad requests; leak checks",
}
USAGE = "usage: uld-vllm bench {throughput,ab,serving,soak} [ARGS...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        for name, what in BENCHMARKS.items():
            print(f"  {name:<12}{what}", file=sys.stdout if argv else sys.stderr)
        print("`uld-vllm bench NAME --help` lists a benchmark's flags.",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return exit_status(_run, argv[0], argv[1:])


def _run(name: str, rest: list[str]) -> int:
    if name == "throughput":
        from uld_vllm.bench.throughput import main as run
    elif name == "ab":
        from uld_vllm.bench.ab import main as run
    elif name == "serving":
        from uld_vllm.bench.serving import main as run
    elif name == "soak":
        from uld_vllm.bench.soak import main as run
    else:
        raise UldError(f"unknown benchmark {name!r}", "choose throughput, ab, serving or soak")
    return run(rest)
