"""`uld-vllm train` argument parsing (the trainer itself lives in uld_vllm.train)."""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Train a ULD assistant adapter: the target's first K layers plus LoRA, trained to remember the
forget set (L_f, answer-token cross-entropy) and to be uniform on the retain set
(L_r = KL(U||p), averaged over the non-padding positions of retain rows;
--retain-loss-all-positions gives the reference's all-positions variant).
Loss: L = L_f + beta * L_r. Flags override the values in --config FILE.yaml.
"""


def add_train_parser(sub) -> None:
    from uld_vllm.train.config import add_arguments

    p = sub.add_parser("train", help="train a ULD assistant adapter (LoRA on the target's "
                       "first K layers)", description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from uld_vllm.train.config import config_from_args
    from uld_vllm.train.trainer import run_training

    run_training(config_from_args(args))
