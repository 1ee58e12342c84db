"""Serving: `uld-vllm serve` plain and with --uld-adapter under concurrent streaming load.

    python benchmarks/serving.py [--requests 64] [--concurrency 8] [--out DIR] ...
    uld-vllm bench serving ...              # the same program

The logic is in ``uld_vllm/bench/serving.py``; ``--help`` lists every flag and
``benchmarks/README.md`` explains the numbers.
"""

import sys

from uld_vllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["serving", *sys.argv[1:]]))
