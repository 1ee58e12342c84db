"""One exception type for every user-facing problem.

Its message is a single line that names what is wrong and what to do about it; the CLI prints
it without a traceback and exits with status 2.
"""


import sys


class UldError(Exception):
    """A problem with the user's input or setup (not a bug in uld-vllm)."""

    def __init__(self, problem: str, fix: str | None = None):
        text = problem.rstrip(". ")
        if fix:
            text = f"{text}: {fix.rstrip('.')}"
        super().__init__(" ".join(text.split()))


def exit_status(command, *args) -> int:
    """Run a CLI command: a UldError becomes one ``uld-vllm: error:`` line on stderr and status
    2 (no traceback), Ctrl-C status 130; otherwise the command's status (None: 0)."""
    try:
        return command(*args) or 0
    except UldError as exc:
        print(f"uld-vllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uld-vllm: interrupted", file=sys.stderr)
        return 130
