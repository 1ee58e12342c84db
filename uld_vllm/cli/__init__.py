"""``uld-vllm`` command line: one console script (``main``), one subcommand per job."""

from uld_vllm.cli.main import main

__all__ = ["main"]
