"""One exception type for every user-facing problem.

Its message is a single line that names what is wrong and what to do about it; the CLI prints
it without a traceback and exits with status 2.
"""


class UldError(Exception):
    """A problem with the user's input or setup (not a bug in uld-vllm)."""

    def __init__(self, problem: str, fix: str | None = None):
        text = problem.rstrip(". ")
        if fix:
            text = f"{text}: {fix.rstrip('.')}"
        super().__init__(" ".join(text.split()))
