"""The GPU check: the ULD engine on a CUDA vLLM, one PASS/FAIL/SKIP line per check.

    make gpu-check                                    # on a GPU machine (GPU_PYTHON=...)
    python benchmarks/gpu_check.py --out gpu_check_out [--require-cuda] [--checks ...]

The logic is in ``uld_vllm/bench/gpu_check.py``; ``--help`` lists every flag and
``benchmarks/README.md`` ("GPU check") says what it checks and how to run it offline.
"""

import sys

from uld_vllm.bench.gpu_check import main

if __name__ == "__main__":  # vLLM spawns its workers: never run this on import
    sys.exit(main())
