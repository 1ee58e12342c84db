"""`uld-vllm train` settings: one dataclass (TRL style), filled from defaults < YAML < flags.

Every field is a command-line flag (``num_layers`` -> ``--num-layers``) and a YAML key
(``num_layers`` or ``num-layers``); the ``help`` metadata is the flag's help text. Unknown YAML
keys and wrong types are one-line ``UldError``s, raised before anything is read or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from uld_vllm.core.prompts import DEFAULT_PROMPT_TEMPLATE  # noqa: E402,F401
from uld_vllm.errors import UldError

PRECISIONS = ("auto", "bf16", "fp32")


def _f(default: Any = None, help: str = "", **meta) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class UldTrainConfig:
    # ---- inputs / outputs
    model: str = _f(None, "target model: a local HF folder or hub id", required=True,
                   metavar="M")
    forget: str = _f(None, "forget set: JSONL file (question/answer, prompt/response or text "
                     "rows), or a Hugging Face dataset NAME[:CONFIG][@SPLIT] (needs `datasets` "
                     "and network)", required=True, metavar="F")
    retain: str | None = _f(None, "retain set, same formats as --forget (optional: without it "
                            "L_r is only computed on --perturbed-csv rows)", metavar="R")
    output: str = _f(None, "adapter folder to write (PEFT files + uld_config.json + "
                     "train_log.json); appears only when training succeeded", required=True,
                     metavar="DIR")
    paraphrase_csv: str | None = _f(None, "ULD paraphrase CSV (no header; question, answer, "
                                    "list of paraphrased questions, list of paraphrased "
                                    "answers): adds 1 paraphrased question x 2 paraphrased "
                                    "answers per matching forget question to the forget side",
                                    metavar="FILE.csv")
    perturbed_csv: str | None = _f(None, "ULD perturbed CSV (no header; question, answer, "
                                   "question, list of wrong answers): adds up to 2 wrong "
                                   "answers per matching forget question to the retain side",
                                   metavar="FILE.csv")
    max_retain: int = _f(0, "use only the last N rows of --retain (0: every row). The reference "
                         "used the last min(400, |forget|) rows; broad retain data is what keeps "
                         "general knowledge, so the default keeps them all")
    # ---- assistant and LoRA
    num_layers: int = _f(8, "K: the assistant is the target's first K decoder layers (must be "
                         "< the target's layer count)", flags=["-K"], metavar="K")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    # ---- objective
    retain_weight: float = _f(5.0, "beta in L = L_f + beta * L_r", metavar="BETA")
    retain_positions: str = _f("answer", "positions of retain rows where L_r = KL(U||p) is "
                               "averaged: 'answer' (those predicting answer tokens: where "
                               "decoding reads the assistant; the LM head then runs on ~1/4 of "
                               "the positions), 'tokens' (every non-padding position) or 'all' "
                               "(padding too, the reference's variant)",
                               choices=["answer", "tokens", "all"])
    retain_loss_all_positions: bool = _f(False, "same as --retain-positions all (the "
                                         "reference's variant)")
    balance: bool = _f(True, "each epoch, repeat the smaller side (reshuffled) until it is as "
                       "long as the larger one, so batches stay ~1:1 forget:retain however much "
                       "retain data there is")
    # ---- optimisation
    epochs: float = _f(10.0, "training epochs (an upper bound when --stop-at-targets)")
    target_forget_loss: float = _f(0.5, "convergence target for L_f (answer-token NLL of the "
                                   "forget rows, nats; mean of the last --target-window steps)")
    target_retain_kl: float = _f(0.5, "convergence target for L_r (KL to uniform on retain rows, "
                                 "nats; the untrained assistant sits near log V - entropy)")
    target_window: int = _f(10, "optimizer steps averaged for the convergence check")
    stop_at_targets: bool = _f(True, "stop as soon as both targets are met (else train all "
                               "--epochs); an adapter that misses them is marked "
                               "converged: false in uld_config.json")
    learning_rate: float = _f(1e-3, "AdamW learning rate (linear decay after warm-up)",
                              flags=["--lr"])
    batch_size: int = _f(32, "effective batch size (rows per optimizer step)")
    micro_batch_size: int = _f(8, "rows per forward pass; batch_size / micro_batch_size "
                               "gradient-accumulation steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "fraction of steps spent in linear warm-up")
    max_length: int = _f(256, "truncate prompt+answer to this many tokens")
    seed: int = _f(42, "random seed (data order, LoRA init, dropout)")
    precision: str = _f("auto", "auto: bf16 on a GPU that supports it and on a CPU with native "
                        "bf16 (avx512_bf16 or AMX), else fp32", choices=list(PRECISIONS))
    prompt_template: str | None = _f(None, "prompt format with a {question} field; default: "
                                     "the tokenizer's chat template when it has one, else "
                                     f"{DEFAULT_PROMPT_TEMPLATE!r}")
    # ---- decoding defaults stored in uld_config.json
    alpha: float = _f(0.8, "default ULD weight stored with the adapter (the TOFU recipe; the "
                      "reference code's default was 1.0)")
    filter_ratio: float = _f(0.01, "default plausibility-filter ratio stored with the adapter "
                             "(the TOFU recipe; the reference code's default was 0.1, which on "
                             "a 49k vocabulary keeps at least 4915 tokens a row)")
    # ---- run control
    checkpoint_dir: str | None = _f(None, "where per-epoch checkpoints go (default: "
                                    "<output>.checkpoints); removed after success unless "
                                    "--keep-checkpoints")
    resume: bool = _f(False, "continue from the last checkpoint in the checkpoint folder")
    overwrite: bool = _f(False, "replace a non-empty --output (and, without --resume, the "
                         "checkpoints of an earlier run)")
    keep_checkpoints: bool = _f(False, "keep the checkpoint folder after success")
    progress: bool = _f(True, "show a progress bar")

    # --------------------------------------------------------------- validation
    def validate(self) -> UldTrainConfig:
        for name in ("model", "forget", "output"):
            if not getattr(self, name):
                raise UldError(f"--{name.replace('_', '-')} is required",
                               f"pass --{name.replace('_', '-')} or set {name} in --config")
        checks = [
            (self.num_layers >= 1, "--num-layers must be >= 1", "use K between 1 and N-1"),
            (self.lora_r >= 1, "--lora-r must be >= 1", "use a positive rank such as 16"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)", "e.g. 0.05"),
            (self.retain_weight >= 0, "--retain-weight must be >= 0", "e.g. 5.0"),
            (self.epochs > 0 and math.isfinite(self.epochs), "--epochs must be > 0", "e.g. 10"),
            (self.learning_rate > 0, "--learning-rate must be > 0", "e.g. 1e-3"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1,
             "--batch-size and --micro-batch-size must be >= 1", "e.g. 32 and 8"),
            (self.batch_size % self.micro_batch_size == 0,
             f"--batch-size {self.batch_size} is not a multiple of {self.micro_batch_size}",
             "make it a multiple of --micro-batch-size"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)", "e.g. 0.1"),
            (self.max_length >= 8, "--max-length must be >= 8", "e.g. 256"),
            (self.max_retain >= 0, "--max-retain must be >= 0", "0 means every row"),
            (self.target_forget_loss > 0 and self.target_retain_kl > 0,
             "--target-forget-loss and --target-retain-kl must be > 0", "e.g. 0.5 and 0.5"),
            (self.target_window >= 1, "--target-window must be >= 1", "e.g. 10"),
            (self.retain_positions in ("answer", "tokens", "all"),
             "--retain-positions must be answer, tokens or all", "use answer"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}",
             "use auto"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise UldError(problem, fix)
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise UldError(f"--prompt-template {self.prompt_template!r} has no {{question}} "
                           "field", f"use e.g. {DEFAULT_PROMPT_TEMPLATE!r}")
        return self

    @property
    def retain_loss_positions(self) -> str:
        return "all" if self.retain_loss_all_positions else self.retain_positions

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.parent / f"{out.name}.checkpoints"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(UldTrainConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """YAML gives ints for floats and may give strings; accept what converts losslessly."""
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind or f.default is None:
            return None
        raise UldError(f"{source}: {name} must not be empty", f"give {name} a value")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        raise TypeError
    except (TypeError, ValueError):
        raise UldError(f"{source}: {name}={value!r} is not a valid {kind.split(' ')[0]}",
                       f"fix {name} (see `uld-vllm train --help`)") from None


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping of config keys (dashes or underscores); unknown keys are errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UldError(f"config file {path} does not exist", "pass an existing --config FILE")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UldError(f"config file {path} is not valid YAML{where}",
                       "fix the syntax (a mapping of option: value)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UldError(f"config file {path} must hold a mapping of option: value",
                       "write e.g. `num_layers: 8` on its own line")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS or name == "config":
            raise UldError(f"config file {path}: unknown key {key!r}",
                           f"use the names of `uld-vllm train` options (e.g. num_layers); "
                           f"known: {', '.join(sorted(_FIELDS))}")
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def make_config(yaml_path: str | os.PathLike | None = None, **overrides) -> UldTrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (flags given on the command line)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    for name, value in overrides.items():
        if name not in _FIELDS:
            raise UldError(f"unknown training option {name!r}",
                           f"known: {', '.join(sorted(_FIELDS))}")
        values[name] = _coerce(name, value, "option")
    return UldTrainConfig(**values).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are SUPPRESSed so the YAML file can fill unset flags."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file with any of these options (flags given here win)")
    for f in dataclasses.fields(UldTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        shown = "" if f.default is None else f" (default: {f.default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": meta["help"] + shown}
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind.startswith("bool"):
            if f.default:
                parser.add_argument(f"--no-{f.name.replace('_', '-')}", action="store_false",
                                    dest=f.name, default=argparse.SUPPRESS,
                                    help=f"do not {meta['help']}")
                continue
            kw["action"] = "store_true"
            kw["help"] = meta["help"]
        else:
            kw["type"] = {"int": int, "float": float}.get(kind.split(" ")[0], str)
            kw["metavar"] = None if "choices" in meta else meta.get("metavar", f.name.upper())
            if "choices" in meta:
                kw["choices"] = meta["choices"]
        parser.add_argument(flag, *meta.get("flags", []), **kw)


def config_from_args(args: argparse.Namespace) -> UldTrainConfig:
    given = {k: v for k, v in vars(args).items() if k in _FIELDS}
    return make_config(getattr(args, "config", None), **given)
