"""A/B: two engine variants alive together, taking turns on the same decode, one process run.

    python benchmarks/ab.py --a "uld ULD_NATIVE=0" --b uld [--batches 1 32] [--out DIR] ...
    uld-vllm bench ab ...                   # the same program

The logic is in ``uld_vllm/bench/ab.py``; ``--help`` lists every flag and
``benchmarks/README.md`` shows the A/Bs measured with it.
"""

import sys

from uld_vllm.bench import main

if __name__ == "__main__":  # vLLM spawns its workers: never run this on import
    sys.exit(main(["ab", *sys.argv[1:]]))
