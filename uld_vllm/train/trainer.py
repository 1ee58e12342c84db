"""The ULD trainer: HF ``Trainer`` + PEFT LoRA on an assistant that shares the target's tensors.

``run_training(cfg)`` checks everything it can before touching the disk (options, output
folder, model architecture and K, every input row), then trains with per-epoch checkpoints in
a scratch folder beside ``--output`` and finally writes the adapter folder atomically
(``save_adapter``), with ``train_log.json`` inside it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from uld_vllm.core.adapter import LORA_MODULES, UldAdapter
from uld_vllm.core.hardware import cpu_has_native_bf16
from uld_vllm.errors import UldError
from uld_vllm.train.config import UldTrainConfig
from uld_vllm.train.data import build_data
from uld_vllm.train.dataset import (
    Collator,
    InterleavedSampler,
    PromptFormatter,
    UldDataset,
    pad_id_of,
)
from uld_vllm.train.loss import UldLoss

RUN_CONFIG = "uld_run_config.json"
# Options that may differ between a run and its --resume (they do not change the maths).
_RESUMABLE = {"resume", "overwrite", "keep_checkpoints", "disable_tqdm", "num_train_epochs",
              "output_dir", "checkpoint_dir", "logging_dir", "alpha", "filter_ratio",
              "target_forget_loss",
              "target_retain_kl", "target_window", "stop_at_targets"}


class UldTrainer(Trainer):
    """``compute_loss`` is ``UldLoss`` on the assistant's logits at the positions the loss
    reads (the LM head runs on those hidden states only); batches interleave forget and retain
    rows (``InterleavedSampler``); L_f / L_r are logged beside the total loss and their means
    over the last ``window`` steps are checked against the convergence targets."""

    # compute_loss returns a per-micro-batch mean: Trainer must divide it by the accumulation
    # steps (tests/test_train_run.py checks the update). Newer transformers read this flag;
    # older ones divide when model_accepts_loss_kwargs is False (set in __init__).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, retain_weight: float, retain_positions: str, balance: bool,
                 targets: tuple[float, float] | None = None, window: int = 10,
                 stop_at_targets: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.retain_weight = retain_weight
        self.retain_positions = retain_positions
        self.balance = balance
        self.targets = targets
        self.stop_at_targets = stop_at_targets
        self._parts: dict[str, list[float]] = {"loss_forget": [], "loss_retain": []}
        self.recent = {k: collections.deque(maxlen=window) for k in self._parts}

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return InterleavedSampler(ds.n_forget, ds.n_retain, self.args.seed, balance=self.balance)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.model(input_ids=inputs["input_ids"],
                            attention_mask=inputs["attention_mask"],
                            use_cache=False).last_hidden_state
        sel, targets, retain_pos = UldLoss.select_positions(
            inputs["labels"], inputs["attention_mask"], inputs["is_retain"],
            self.retain_positions)
        logits = base.lm_head(hidden[sel])
        res = UldLoss.from_selected(logits, targets[sel], retain_pos[sel],
                                    retain_weight=self.retain_weight, anchor=hidden)
        if model.training:
            has_retain = inputs["is_retain"].bool()
            if not has_retain.all():
                self._parts["loss_forget"].append(res.forget.item())
            if has_retain.any():
                self._parts["loss_retain"].append(res.retain.item())
        return (res.loss, {"logits": logits}) if return_outputs else res.loss

    def log(self, logs, start_time=None):
        # Each term is averaged over the micro-batches that hold its side: a batch without
        # forget rows says nothing about how well the forget set is remembered.
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = sum(values) / len(values)
                    self.recent[key].append(logs[key])
                values.clear()
            if self.stop_at_targets and self.targets_met():
                self.control.should_training_stop = True
        super().log(logs, start_time)

    def recent_means(self) -> dict[str, float | None]:
        return {k: (sum(v) / len(v) if v else None) for k, v in self.recent.items()}

    def targets_met(self) -> bool:
        """Both sides' means over a full window are below their targets."""
        if self.targets is None:
            return False
        full = all(len(v) == v.maxlen for v in self.recent.values())
        means = self.recent_means()
        return full and means["loss_forget"] < self.targets[0] \
            and means["loss_retain"] < self.targets[1]


class _EpochTimer(TrainerCallback):
    """Wall time per epoch, stored in the log history (so checkpoints and --resume keep it)."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        state.log_history.append({"epoch": round(state.epoch or 0.0, 4),
                                  "step": state.global_step,
                                  "epoch_wall_s": round(time.perf_counter() - self.t0, 3)})


class _QuietProgress(ProgressCallback):
    """The usual bar, with the latest losses as its postfix instead of one printed line per
    logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.3g}" for k in ("loss", "loss_forget", "loss_retain")
                     if k in logs}
            self.training_bar.set_postfix(shown, refresh=False)


def resolve_precision(requested: str, cpuinfo: str | None = None) -> tuple[str, str]:
    """-> ("bf16" | "fp32", why)."""
    cuda = torch.cuda.is_available()
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16(cpuinfo)
    if requested == "fp32":
        return "fp32", "requested"
    if requested == "bf16":
        if cuda and not bf16_ok:
            raise UldError("--precision bf16 was requested but this GPU does not support bf16",
                           "use --precision fp32 (or auto)")
        if not cuda and not bf16_ok:
            return "bf16", "requested (this CPU has no native bf16: expect it to be slower " \
                           "than fp32)"
        return "bf16", "requested"
    if bf16_ok:
        return "bf16", "auto: " + ("the GPU supports bf16" if cuda else
                                   "the CPU has native bf16 (avx512_bf16/AMX)")
    return "fp32", "auto: " + ("the GPU does not support bf16" if cuda else
                               "the CPU has no native bf16 (avx512_bf16/AMX)")


def check_model(model: str, num_layers: int):
    """Read the target's config and refuse unknown architectures or K >= layers (no weights
    are loaded: the model is instantiated on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    # unknown model_type, missing folder, no network: all become one line
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UldError(f"cannot read the model config of {model!r} ({type(exc).__name__}: "
                       f"{first})", "pass a local HF model folder or hub id of a Llama, "
                       "Mistral or Qwen2-style decoder-only model") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise UldError(f"{model!r} ({getattr(config, 'model_type', '?')}) is not a causal "
                       f"language model transformers can build ({type(exc).__name__})",
                       "ULD supports Llama, Mistral and Qwen2-style decoder-only models") \
            from None
    from uld_vllm.core.assistant import decoder_layers

    layers = decoder_layers(skeleton)
    names = {n.rsplit(".", 1)[-1] for n, _ in layers[0].named_modules()}
    missing = [m for m in LORA_MODULES if m not in names]
    if missing:
        raise UldError(f"{model!r} ({config.model_type}) has no {', '.join(missing)} "
                       "projections", "ULD supports Llama, Mistral and Qwen2-style models")
    n = len(layers)
    if num_layers >= n:
        raise UldError(f"--num-layers {num_layers} must be smaller than the {n} layers of "
                       f"{model!r}", f"choose K between 1 and {n - 1} (about a quarter of the "
                       "layers is typical)")
    return config


def _check_output(cfg: UldTrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UldError(f"--output {out} is a file", "pass a folder path")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UldError(f"output folder {out} already exists and is not empty",
                       "choose another --output or pass --overwrite")
    return out


def _run_config(cfg: UldTrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}


def _prepare_checkpoints(cfg: UldTrainConfig) -> tuple[Path, str | None]:
    """-> (checkpoint folder, checkpoint to resume from or None); refuses ambiguous states."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = cfg.checkpoint_path()
    if cfg.resume:
        last = get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None
        if last is None:
            raise UldError(f"--resume: no checkpoint in {ckpt}",
                           "run without --resume to start, or pass the --checkpoint-dir used")
        saved = ckpt / RUN_CONFIG
        if saved.is_file():
            old = json.loads(saved.read_text())
            diff = sorted(k for k in set(old) | set(_run_config(cfg))
                          if old.get(k) != _run_config(cfg).get(k))
            if diff:
                raise UldError(f"--resume: options {', '.join(diff)} differ from the run in "
                               f"{ckpt}", "resume with the same options, or pass --overwrite "
                               "instead of --resume to start over")
        return ckpt, last
    if ckpt.exists() and any(ckpt.iterdir()):
        if not cfg.overwrite:
            raise UldError(f"checkpoint folder {ckpt} holds an earlier run",
                           "pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(ckpt)
    return ckpt, None


def run_training(cfg: UldTrainConfig, log=print) -> UldAdapter:
    """Train a ULD adapter as ``cfg`` says and return the written adapter folder."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from uld_vllm.core.assistant import (
        build_assistant,
        lora_config,
        lora_parameter_count,
        save_adapter,
    )
    from uld_vllm.core.models import resolve_model

    t_start = time.perf_counter()
    cfg.model = resolve_model(cfg.model, log=log)
    _check_output(cfg)
    config = check_model(cfg.model, cfg.num_layers)
    data = build_data(cfg.forget, cfg.retain, paraphrase_csv=cfg.paraphrase_csv,
                      perturbed_csv=cfg.perturbed_csv, max_retain=cfg.max_retain,
                      mask_shared_prefix=cfg.mask_shared_prefix, log=log)
    precision, why = resolve_precision(cfg.precision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except Exception as exc:  # noqa: BLE001
        raise UldError(f"cannot load the tokenizer of {cfg.model!r} ({type(exc).__name__})",
                       "the model folder needs its tokenizer files") from None
    formatter = PromptFormatter(tokenizer, cfg.prompt_template)
    dataset = UldDataset(data.forget, data.retain, formatter, cfg.max_length)
    ckpt, resume_from = _prepare_checkpoints(cfg)  # first write to disk happens below

    set_seed(cfg.seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    target = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    assistant = build_assistant(target, cfg.num_layers)
    del target  # layers >= K are freed; the assistant holds the tensors it shares
    model = get_peft_model(assistant, lora_config(cfg.num_layers, r=cfg.lora_r,
                                                  alpha=cfg.lora_alpha,
                                                  dropout=cfg.lora_dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = lora_parameter_count(config, cfg.num_layers, r=cfg.lora_r)
    if trainable != expected:  # would mean frozen weights leak into training: a bug, not input
        raise RuntimeError(f"trainable parameters {trainable} != LoRA count {expected}")
    log(f"assistant: K={cfg.num_layers} of {config.num_hidden_layers} layers, "
        f"{trainable:,} trainable LoRA parameters; {precision} ({why}); prompt: "
        f"{formatter.description}; forget rows {dataset.n_forget}, retain rows "
        f"{dataset.n_retain}")

    ckpt.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        (ckpt / RUN_CONFIG).write_text(json.dumps(_run_config(cfg), indent=2) + "\n")
    cuda = torch.cuda.is_available()
    # the config is the Trainer's args; only what was resolved here differs
    args = dataclasses.replace(
        cfg, output_dir=str(ckpt), bf16=precision == "bf16", use_cpu=not cuda,
        data_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
        dataloader_pin_memory=cuda and cfg.dataloader_pin_memory)
    trainer = UldTrainer(model=model, args=args, train_dataset=dataset,
                         data_collator=Collator(pad_id_of(tokenizer)),
                         retain_weight=cfg.retain_weight,
                         retain_positions=cfg.retain_loss_positions, balance=cfg.balance,
                         targets=(cfg.target_forget_loss, cfg.target_retain_kl),
                         window=cfg.target_window, stop_at_targets=cfg.stop_at_targets)
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress())
    trainer.add_callback(_EpochTimer())
    trainer.train(resume_from_checkpoint=resume_from)

    training = convergence_report(cfg, trainer)
    train_log = _train_log(cfg, trainer, data.stats, dataset, trainable, precision, why,
                           formatter, time.perf_counter() - t_start, resume_from)
    train_log["convergence"] = training
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model
    adapter = save_adapter(model, cfg.output_dir, base_model=base, target_config=config,
                           alpha=cfg.alpha, filter_ratio=cfg.filter_ratio,
                           overwrite=cfg.overwrite, training=training,
                           extra_files={"train_log.json": json.dumps(train_log, indent=2) + "\n"})
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    log(f"training: L_f {_fmt(training['forget_loss'])} (target < {cfg.target_forget_loss}), "
        f"L_r {_fmt(training['retain_kl'])} (target < {cfg.target_retain_kl}) over the last "
        f"{cfg.target_window} steps, {trainer.state.global_step} optimizer steps, "
        f"{trainer.state.epoch or 0:.2f} epochs")
    if not training["converged"]:
        print(f"uld-vllm: WARNING: {training['warning']}", file=sys.stderr, flush=True)
    log(f"wrote ULD adapter to {adapter.path}")
    return adapter


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def convergence_report(cfg: UldTrainConfig, trainer: UldTrainer) -> dict:
    """What ``uld_config.json`` records about how training ended (``converged`` and, when it
    did not, a ``warning`` that eval and serve repeat)."""
    means = trainer.recent_means()
    f, r = means["loss_forget"], means["loss_retain"]
    missed = []
    if f is None or f >= cfg.target_forget_loss:
        missed.append(f"forget loss {_fmt(f)} >= {cfg.target_forget_loss} (the assistant does "
                      "not remember the forget set: ULD will not remove it)")
    if r is None or r >= cfg.target_retain_kl:
        missed.append(f"retain KL {_fmt(r)} >= {cfg.target_retain_kl} (the assistant is not "
                      "uniform on the retain set: ULD will damage what should be kept)")
    warning = None
    if missed:
        warning = (f"the adapter did not reach its training targets after "
                   f"{trainer.state.global_step} steps ({trainer.state.epoch or 0:.2f} epochs): "
                   + "; ".join(missed) + "; train longer (--epochs), with more retain data, or "
                   "a higher --learning-rate")
    return {"converged": not missed, "forget_loss": f, "retain_kl": r,
            "targets": {"forget_loss": cfg.target_forget_loss,
                        "retain_kl": cfg.target_retain_kl, "window": cfg.target_window},
            "optimizer_steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 4), "warning": warning}


def _train_log(cfg, trainer, stats, dataset, trainable, precision, why, formatter, wall,
               resumed) -> dict:
    hist = trainer.state.log_history
    steps = [{k: e[k] for k in ("step", "epoch", "loss", "loss_forget", "loss_retain",
                                "learning_rate", "grad_norm") if k in e}
             for e in hist if "loss" in e]
    epochs = [e for e in hist if "epoch_wall_s" in e]
    return {
        "config": cfg.to_dict(),
        "data": {**stats, "train_rows_forget": dataset.n_forget,
                 "train_rows_retain": dataset.n_retain, "truncated_rows": dataset.truncated,
                 "shared_prefix_tokens": dataset.shared_prefix_tokens},
        "prompt_format": formatter.description,
        "trainable_parameters": trainable,
        "precision": precision,
        "precision_reason": why,
        "device": str(trainer.args.device),
        "retain_loss_positions": {"tokens": "non-padding"}.get(cfg.retain_loss_positions,
                                                               cfg.retain_loss_positions),
        "optimizer_steps": trainer.state.global_step,
        "epochs": epochs,
        "seconds_per_epoch": (sum(e["epoch_wall_s"] for e in epochs) / len(epochs)
                              if epochs else None),
        "steps": steps,
        "wall_s": round(wall, 3),
        "resumed_from": resumed,
    }
