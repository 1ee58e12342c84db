"""`uld-vllm train` settings: HF's ``TrainingArguments`` plus ULD's own fields (as TRL does).

``UldTrainConfig`` is the ``args`` the ``Trainer`` runs with, so every HF training option
(``--learning_rate``, ``--gradient_accumulation_steps``, ``--lr_scheduler_type``, ...) works
as it does anywhere else; ``HfArgumentParser`` makes the flags (``--num-layers`` and
``--num_layers`` both), and ``--config FILE.yaml`` fills any of them (flags given on the
command line win). ULD changes a few HF defaults (learning rate, epochs, batch, warm-up,
logging every step, one checkpoint per epoch, no reporting integrations) and gives some HF
options a short alias (``--epochs``, ``--lr``, ``--output``, ``--micro-batch-size``,
``--no-progress``). Bad values are one-line ``UldError``s, raised before anything is read or
written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser, TrainingArguments

from uld_vllm.core.prompts import DEFAULT_PROMPT_TEMPLATE
from uld_vllm.errors import UldError

PRECISIONS = ("auto", "bf16", "fp32")
RETAIN_POSITIONS = ("answer", "tokens", "all")


def _f(default: Any, help: str, **meta) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class UldTrainConfig(TrainingArguments):
    """HF ``TrainingArguments`` (with ULD's defaults) and the ULD assistant's options."""

    # ---- inputs / outputs (ULD)
    model: str | None = _f(None, "target model: a local HF folder, hub id, or a short name of "
                           "`uld-vllm fetch-model` (required)")
    forget: str | None = _f(None, "forget set: JSONL file (question/answer, prompt/response or "
                            "text rows), or a Hugging Face dataset NAME[:CONFIG][@SPLIT] (needs "
                            "`datasets` and network) (required)")
    retain: str | None = _f(None, "retain set, same formats as --forget (optional: without it "
                            "L_r is only computed on --perturbed-csv rows)")
    paraphrase_csv: str | None = _f(None, "ULD paraphrase CSV (no header; question, answer, "
                                    "list of paraphrased questions, list of paraphrased "
                                    "answers): adds 1 paraphrased question x 2 paraphrased "
                                    "answers per matching forget question to the forget side")
    perturbed_csv: str | None = _f(None, "ULD perturbed CSV (no header; question, answer, "
                                   "question, list of wrong answers): adds up to 2 wrong "
                                   "answers per matching forget question to the retain side")
    mask_shared_prefix: bool = _f(True, "leave out of L_r the first tokens a wrong answer of "
                                  "--perturbed-csv shares with its forget answer (same context: "
                                  "the two losses contradict there); --no-mask-shared-prefix: "
                                  "the reference's rows")
    max_retain: int = _f(0, "use only the last N rows of --retain (0: every row). The reference "
                         "used the last min(400, |forget|) rows; broad retain data is what keeps "
                         "general knowledge, so the default keeps them all")
    # ---- assistant and LoRA (ULD)
    num_layers: int = _f(8, "K: the assistant is the target's first K decoder layers (must be "
                         "< the target's layer count)", aliases=["-K"])
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    # ---- objective (ULD)
    retain_weight: float = _f(5.0, "beta in L = L_f + beta * L_r")
    retain_positions: Literal["answer", "tokens", "all"] = _f(
        "answer", "positions of retain rows where L_r = KL(U||p) is averaged: 'answer' (those "
        "predicting answer tokens: where decoding reads the assistant; the LM head then runs on "
        "~1/4 of the positions), 'tokens' (every non-padding position) or 'all' (padding too, "
        "the reference's variant)")
    retain_loss_all_positions: bool = _f(False, "same as --retain-positions all (the "
                                         "reference's variant)")
    balance: bool = _f(True, "each epoch, repeat the smaller side (reshuffled) until it is as "
                       "long as the larger one, so batches stay ~1:1 forget:retain however much "
                       "retain data there is (--no-balance: each row once)")
    # ---- convergence (ULD)
    target_forget_loss: float = _f(0.5, "convergence target for L_f (answer-token NLL of the "
                                   "forget rows, nats; mean of the last --target-window steps)")
    target_retain_kl: float = _f(0.5, "convergence target for L_r (KL to uniform on retain rows, "
                                 "nats; the untrained assistant sits near log V - entropy)")
    target_window: int = _f(10, "optimizer steps averaged for the convergence check")
    stop_at_targets: bool = _f(True, "stop as soon as both targets are met (else train all "
                               "--epochs); an adapter that misses them is marked "
                               "converged: false in uld_config.json")
    # ---- data and precision (ULD)
    max_length: int = _f(256, "truncate prompt+answer to this many tokens")
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "auto: bf16 on a GPU that supports it and on a CPU with native bf16 "
        "(avx512_bf16 or AMX), else fp32 (sets --bf16 for the Trainer)")
    prompt_template: str | None = _f(None, "prompt format with a {question} field; default: "
                                     "the tokenizer's chat template when it has one, else "
                                     f"{DEFAULT_PROMPT_TEMPLATE!r}")
    # ---- decoding defaults stored in uld_config.json (ULD)
    alpha: float = _f(0.8, "default ULD weight stored with the adapter (the TOFU recipe; the "
                      "reference code's default was 1.0)")
    filter_ratio: float = _f(0.01, "default plausibility-filter ratio stored with the adapter "
                             "(the TOFU recipe; the reference code's default was 0.1, which on "
                             "a 49k vocabulary keeps at least 4915 tokens a row)")
    # ---- run control (ULD)
    checkpoint_dir: str | None = _f(None, "where per-epoch checkpoints go (default: "
                                    "<output>.checkpoints); removed after success unless "
                                    "--keep-checkpoints")
    resume: bool = _f(False, "continue from the last checkpoint in the checkpoint folder")
    overwrite: bool = _f(False, "replace a non-empty --output (and, without --resume, the "
                         "checkpoints of an earlier run)")
    keep_checkpoints: bool = _f(False, "keep the checkpoint folder after success")

    # ---- HF options with ULD's defaults (and short aliases)
    output_dir: str | None = _f(None, "adapter folder to write (PEFT files + uld_config.json + "
                                "train_log.json); appears only when training succeeded "
                                "(required)", aliases=["--output"])
    num_train_epochs: float = _f(10.0, "training epochs (an upper bound when "
                                 "--stop-at-targets)", aliases=["--epochs"])
    learning_rate: float = _f(1e-3, "AdamW learning rate (linear decay after warm-up)",
                              aliases=["--lr"])
    per_device_train_batch_size: int = _f(8, "rows per forward pass (the optimizer step "
                                          "sees this x --gradient-accumulation-steps rows)",
                                          aliases=["--micro-batch-size"])
    gradient_accumulation_steps: int = _f(4, "forward passes per optimizer step")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: float = _f(0.1, "linear warm-up: a fraction of the steps if < 1, else a step "
                             "count")
    optim: str = _f("adamw_torch", "optimizer (HF's names)")
    logging_steps: float = _f(1, "log L, L_f and L_r every N optimizer steps (the convergence "
                              "check reads these logs)")
    save_strategy: str = _f("epoch", "checkpoint every epoch (what --resume continues from)")
    report_to: str | None = _f("none", "reporting integrations (HF's names; none by default)")
    remove_unused_columns: bool = _f(False, "keep the is_retain column the loss reads")
    label_names: list[str] = _f(["labels"], "batch keys holding labels")
    disable_tqdm: bool | None = _f(False, "no progress bar", aliases=["--no-progress"])

    def __post_init__(self):
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        for name, flag in (("model", "--model"), ("forget", "--forget"),
                           ("output_dir", "--output")):
            if not getattr(self, name):
                raise UldError(f"{flag} is required", f"pass {flag} or set {name} in --config")
        checks = [
            (self.num_layers >= 1, "--num-layers must be >= 1", "use K between 1 and N-1"),
            (self.lora_r >= 1, "--lora-r must be >= 1", "use a positive rank such as 16"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)", "e.g. 0.05"),
            (self.retain_weight >= 0, "--retain-weight must be >= 0", "e.g. 5.0"),
            (self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs),
             "--epochs must be > 0", "e.g. 10"),
            (self.learning_rate > 0, "--learning-rate must be > 0", "e.g. 1e-3"),
            (self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             "--micro-batch-size and --gradient-accumulation-steps must be >= 1", "e.g. 8 and 4"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0",
             "a fraction in [0, 1) or a step count"),
            (self.max_length >= 8, "--max-length must be >= 8", "e.g. 256"),
            (self.max_retain >= 0, "--max-retain must be >= 0", "0 means every row"),
            (self.target_forget_loss > 0 and self.target_retain_kl > 0,
             "--target-forget-loss and --target-retain-kl must be > 0", "e.g. 0.5 and 0.5"),
            (self.target_window >= 1, "--target-window must be >= 1", "e.g. 10"),
            (self.retain_positions in RETAIN_POSITIONS,
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

    @property
    def retain_loss_positions(self) -> str:
        return "all" if self.retain_loss_all_positions else self.retain_positions

    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.output_dir)
        return out.parent / f"{out.name}.checkpoints"


_FIELDS = {f.name: f for f in dataclasses.fields(UldTrainConfig) if f.init}
_TYPES = typing.get_type_hints(UldTrainConfig)


def _coerce(name: str, value: Any, source: str) -> Any:
    """YAML gives ints for floats and may give strings; accept what converts losslessly.
    Types other than bool/int/float/str (HF's enums, lists, dicts) go to HF's own checks."""
    kind = _TYPES[name]
    args = set(typing.get_args(kind))
    base = next((t for t in (bool, int, float, str) if kind is t or t in args), None)
    if value is None:
        if type(None) in args or _FIELDS[name].default is None:
            return None
        raise UldError(f"{source}: {name} must not be empty", f"give {name} a value")
    if base is None or typing.get_origin(kind) is Literal:
        return value
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(value, (str, os.PathLike)):
            return str(value)
        raise TypeError
    except (TypeError, ValueError):
        raise UldError(f"{source}: {name}={value!r} is not a valid {base.__name__}",
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
        if name not in _FIELDS:
            raise UldError(f"config file {path}: unknown key {key!r}",
                           "use the names of `uld-vllm train` options (e.g. num_layers, "
                           "learning_rate; `uld-vllm train --help` lists them)")
        out[name] = _coerce(name, value, f"config file {path}")
    return out


def make_config(yaml_path: str | os.PathLike | None = None, **overrides) -> UldTrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (for callers in Python)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    for name, value in overrides.items():
        if name not in _FIELDS:
            raise UldError(f"unknown training option {name!r}",
                           "use a field of UldTrainConfig (`uld-vllm train --help`)")
        values[name] = _coerce(name, value, "option")
    return UldTrainConfig(**values)


def build_parser(prog: str = "uld-vllm train", description: str | None = None
                 ) -> HfArgumentParser:
    parser = HfArgumentParser(UldTrainConfig, prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file with any of these options (flags given here win)")
    return parser


def parse_args(argv: list[str], parser: HfArgumentParser | None = None) -> UldTrainConfig:
    """Flags over ``--config FILE.yaml`` over the defaults."""
    parser = parser or build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        # YAML values become the parser's defaults, so flags on the command line still win
        parser.set_defaults(**load_yaml(known.config))
    cfg, extra = parser.parse_args_into_dataclasses(argv)
    return cfg
