import sys

from uld_vllm.cli.main import main

sys.exit(main())
