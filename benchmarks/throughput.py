"""Throughput: plain vLLM vs the ULD engine vs the reference-style decoder, one process run.

    python benchmarks/throughput.py [--batches 1 8 32] [--new-tokens 128] [--out DIR] ...
    uld-vllm bench throughput ...           # the same program

The logic is in ``uld_vllm/bench/throughput.py``; ``--help`` lists every flag and
``benchmarks/README.md`` explains the numbers.
"""

import sys

from uld_vllm.bench import main

if __name__ == "__main__":  # vLLM spawns its workers: never run this on import
    sys.exit(main(["throughput", *sys.argv[1:]]))
