"""`uld-vllm baseline {ga,gd,npo}`: one weight-editing unlearning baseline on a model folder.

Defaults are OpenUnlearning's TOFU recipe as its configs state it
(``configs/experiment/unlearn/tofu/default.yaml``, ``configs/trainer/finetune.yaml``,
``GradDiff.yaml``, ``NPO.yaml``): lr 1e-5, 10 epochs, effective batch 32 (8 x 4), weight decay
0.01, one warm-up epoch then linear decay, NPO beta 0.1, retain weight alpha 1 and forget
weight gamma 1 with a retain NLL term (GD, NPO). ``uld-vllm experiment tofu-mini`` passes the
values scaled to SmolLM2 (see ``uld_vllm.experiment.tofu_mini``).
"""

from __future__ import annotations

import argparse

from uld_vllm.baselines import METHODS
from uld_vllm.errors import UldError

OPENUNLEARNING_TOFU = {"epochs": 10, "learning_rate": 1e-5, "batch_size": 32,
                       "micro_batch_size": 8, "weight_decay": 0.01, "warmup_epochs": 1.0,
                       "beta": 0.1, "alpha": 1.0, "gamma": 1.0}


def add_baseline_parser(sub) -> None:
    d = OPENUNLEARNING_TOFU
    p = sub.add_parser("baseline", help="weight-editing unlearning baselines (GA, GD, NPO) on a "
                                        "full model; writes an HF model folder")
    # a plain string, checked in run_baseline: an unknown method is one `uld-vllm: error:` line
    p.add_argument("method", metavar="METHOD", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--model", required=True, help="model to unlearn from (HF folder, hub id or "
                                                  "a known short name)")
    p.add_argument("--forget", required=True, help="forget set (JSONL question/answer rows)")
    p.add_argument("--retain", default=None, help="retain set (JSONL; needed by gd and npo)")
    p.add_argument("--output", required=True, help="HF model folder to write (atomically)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--lr", dest="learning_rate", type=float, default=d["learning_rate"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="rows per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"])
    p.add_argument("--beta", type=float, default=d["beta"], help="NPO's beta")
    p.add_argument("--alpha", type=float, default=d["alpha"],
                   help="weight of the retain NLL (gd, npo)")
    p.add_argument("--gamma", type=float, default=d["gamma"],
                   help="weight of the forget term (gd, npo)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32",
                   help="fp32, or bf16 (autocast forward, float32 master weights)")
    p.add_argument("--prompt-template", default=None,
                   help="default: the tokenizer's chat template, else '[INST] {question} "
                        "[/INST]'")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_baseline)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UldError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    return method


def run_baseline(a: argparse.Namespace) -> None:
    from uld_vllm.baselines.trainer import FullTrainConfig, train_full
    from uld_vllm.core.rows import read_rows

    steps, rest = divmod(a.batch_size, a.micro_batch_size) if a.micro_batch_size >= 1 else (0, 0)
    if rest:
        raise UldError(f"--batch-size {a.batch_size} is not a multiple of --micro-batch-size "
                       f"{a.micro_batch_size}", "make it a multiple")
    cfg = FullTrainConfig(method=check_method(a.method), num_train_epochs=a.epochs,
                          learning_rate=a.learning_rate,
                          per_device_train_batch_size=a.micro_batch_size,
                          gradient_accumulation_steps=steps, weight_decay=a.weight_decay,
                          warmup_epochs=a.warmup_epochs, max_length=a.max_length, seed=a.seed,
                          precision=a.precision, beta=a.beta, gamma=a.gamma, alpha=a.alpha,
                          prompt_template=a.prompt_template)
    forget = read_rows(a.forget, "forget set")
    retain = read_rows(a.retain, "retain set") if a.retain else None
    train_full(a.model, a.output, forget, retain, cfg, overwrite=a.overwrite)
