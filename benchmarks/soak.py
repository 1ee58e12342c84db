"""Soak: the ULD server under mixed streaming load with client disconnects and bad requests.

    python benchmarks/soak.py [--requests 200] [--concurrency 16] [--cut-fraction 0.3] ...
    uld-vllm bench soak ...                 # the same program

The logic is in ``uld_vllm/bench/soak.py``; ``--help`` lists every flag. Exit status 0 only
when every uncut request completed in full, every bad one got a 400, and the server was idle
afterwards with no KV-cache blocks in use.
"""

import sys

from uld_vllm.bench import main

if __name__ == "__main__":
    sys.exit(main(["soak", *sys.argv[1:]]))
