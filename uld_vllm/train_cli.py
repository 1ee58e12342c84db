"""`uld-vllm train` argument parsing (the trainer itself lives in uld_vllm.train)."""

from uld_vllm.errors import UldError


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="(not available yet) train a ULD assistant adapter",
                       add_help=False)
    p.set_defaults(func=_pending)


def _pending(_args) -> None:
    raise UldError("not available yet: `uld-vllm train` arrives with the trainer",
                   "see README.md for what this release provides")
