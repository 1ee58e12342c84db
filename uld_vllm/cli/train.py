"""`uld-vllm train`: flags and --config YAML through HfArgumentParser (uld_vllm.train.config)."""

from __future__ import annotations

DESCRIPTION = """\
Train a ULD assistant adapter: the target's first K layers plus LoRA, trained to remember the
forget set (L_f, answer-token cross-entropy) and to be uniform on the retain set
(L_r = KL(U||p) at the retain rows' answer positions; --retain-positions picks others).
Loss: L = L_f + beta * L_r. Every Hugging Face TrainingArguments option works too; flags
override the values in --config FILE.yaml.
"""

HELP = "train a ULD assistant adapter (LoRA on the target's first K layers)"


def main(argv: list[str]) -> None:
    import argparse

    from uld_vllm.train.config import build_parser, parse_args
    from uld_vllm.train.trainer import run_training

    parser = build_parser(description=DESCRIPTION)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    run_training(parse_args(argv, parser))
