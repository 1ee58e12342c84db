"""A full-model trainer for the target fine-tune and the GA / GD / NPO baselines.

One small loop (no HF ``Trainer``: the baselines need a forget batch *and* a retain batch per
step, and NPO a per-row constant) that writes a normal HF model folder, atomically:

* ``finetune``: ordinary answer-token NLL on every row (how the target and the retain model
  are made);
* ``ga`` / ``gd`` / ``npo``: the losses of ``uld_vllm.baselines.losses``. As OpenUnlearning's
  ``ForgetRetainDataset`` (anchor ``forget``) does, an epoch is one pass over the forget rows
  and each forget row is paired with a retain row drawn at random.

Master weights stay float32 (``--precision bf16`` only autocasts the forward: an update of
lr 1e-5 is far below bf16's resolution of a weight, so bf16 weights would not move), and the
folder is saved in float32 for the same reason. The learning rate warms up linearly for
``warmup_epochs`` epochs and then decays linearly to 0 (OpenUnlearning's ``warmup_epochs: 1``
with the HF default linear schedule); gradients are clipped to norm 1 (the HF Trainer's
default) and the optimizer is AdamW (OpenUnlearning uses bitsandbytes' 32-bit paged AdamW, the
same update).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from uld_vllm.errors import UldError

TRAIN_LOG = "unlearn_log.json"
KINDS = ("finetune", "ga", "gd", "npo")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass
class FullTrainConfig:
    method: str
    epochs: int = 10
    learning_rate: float = 1e-5
    batch_size: int = 32
    micro_batch_size: int = 8
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_length: int = 256
    seed: int = 0
    precision: str = "fp32"
    beta: float = 0.1  # NPO
    gamma: float = 1.0  # weight of the forget term (GD, NPO)
    alpha: float = 1.0  # weight of the retain NLL (GD, NPO)
    # the HF Trainer's default, which OpenUnlearning's trainers inherit (its configs leave it)
    max_grad_norm: float = 1.0
    prompt_template: str | None = None
    # finetune only: stop after the first epoch whose mean answer NLL is below this (None:
    # train every epoch); the learning-rate schedule is still laid out over ``epochs``
    stop_loss: float | None = None

    def validate(self) -> FullTrainConfig:
        checks = [
            (self.method in KINDS, f"unknown method {self.method!r}",
             f"use one of {', '.join(KINDS[1:])}"),
            (isinstance(self.epochs, int) and self.epochs >= 1,
             f"--epochs must be a whole number >= 1, got {self.epochs}", "e.g. 10"),
            (self.learning_rate > 0, "--lr must be > 0", "e.g. 1e-5"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1,
             "--batch-size and --micro-batch-size must be >= 1", "e.g. 32 and 8"),
            (self.batch_size % self.micro_batch_size == 0,
             f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
             f"{self.micro_batch_size}", "make it a multiple"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0", "e.g. 0.01"),
            (0 <= self.warmup_epochs < self.epochs,
             f"--warmup-epochs must be in [0, --epochs {self.epochs})", "e.g. 1"),
            (self.max_length >= 8, "--max-length must be >= 8", "e.g. 256"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0", "e.g. 1.0"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}",
             "use fp32 or bf16"),
            (self.beta > 0, f"--beta must be > 0, got {self.beta}", "OpenUnlearning uses 0.1"),
            (self.gamma >= 0 and self.alpha >= 0, "--gamma and --alpha must be >= 0",
             "OpenUnlearning uses 1 and 1"),
            (self.stop_loss is None or (self.method == "finetune" and self.stop_loss > 0),
             "a stop loss is for fine-tuning only and must be > 0",
             "pass a positive value, or none"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise UldError(problem, fix)
        return self


def _tokenized(rows: list[dict], source: str, formatter, max_length: int) -> list[dict]:
    from uld_vllm.train.data import to_examples
    from uld_vllm.train.dataset import encode_example

    out = []
    for ex in to_examples(rows, source, "forget"):
        if ex.prompt is None:
            raise UldError(f"{source} holds raw text rows", "pass question/answer rows")
        out += encode_example(ex, formatter, max_length, False)
    return out


def _batch(rows: list[dict], pad_id: int) -> dict:
    from uld_vllm.train.dataset import Collator

    b = Collator(pad_id)(rows)
    b.pop("is_retain")
    return b


def train_full(model_dir: str, out_dir: str | Path, forget_rows: list[dict],
               retain_rows: list[dict] | None, cfg: FullTrainConfig, *,
               overwrite: bool = False, log=print) -> dict:
    """Train ``model_dir`` as ``cfg.method`` says on ``forget_rows`` (for ``finetune``: the
    training rows) and ``retain_rows``; write an HF folder with ``unlearn_log.json`` to
    ``out_dir`` and return that log."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from uld_vllm.baselines.losses import UnlearnLoss
    from uld_vllm.core.adapter import atomic_output_dir
    from uld_vllm.core.models import resolve_model
    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.train.dataset import pad_id_of

    t_start = time.perf_counter()
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before minutes of work
        raise UldError(f"output folder {out} already exists and is not empty",
                       "choose another --output or pass --overwrite")
    needs_retain = cfg.method in ("gd", "npo") and cfg.alpha > 0
    if needs_retain and not retain_rows:
        raise UldError(f"{cfg.method} needs retain rows (its loss has a retain NLL term)",
                       "pass --retain, or --alpha 0 for the forget term alone")
    model_dir = resolve_model(model_dir, log=log)
    tok = AutoTokenizer.from_pretrained(model_dir)
    formatter = PromptFormatter(tok, cfg.prompt_template)
    forget = _tokenized(forget_rows, "forget set" if cfg.method != "finetune" else
                        "training set", formatter, cfg.max_length)
    retain = _tokenized(retain_rows, "retain set", formatter, cfg.max_length) \
        if needs_retain else []
    pad = pad_id_of(tok)

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def logits_of(rows):
        b = {k: v.to(device) for k, v in _batch(rows, pad).items()}
        with autocast:
            lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       use_cache=False).logits
        return lg, b["labels"]

    ref_nll = None
    t_ref = 0.0
    if cfg.method == "npo":
        # the reference model is the starting model: its log-probs are constants, so one
        # pass now replaces a frozen copy of the model and a second forward every step
        t0 = time.perf_counter()
        model.eval()
        vals = []
        with torch.no_grad():
            for s in range(0, len(forget), cfg.micro_batch_size):
                lg, lb = logits_of(forget[s:s + cfg.micro_batch_size])
                vals.append(UnlearnLoss.sequence_nll(lg, lb).cpu())
        ref_nll = torch.cat(vals)
        t_ref = time.perf_counter() - t0

    model.train()
    steps_per_epoch = math.ceil(len(forget) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.learning_rate)
    sched = get_scheduler("linear", opt, num_warmup_steps=round(cfg.warmup_epochs *
                                                                steps_per_epoch),
                          num_training_steps=total)
    g = torch.Generator().manual_seed(cfg.seed)
    steps, epochs = [], []
    log(f"{cfg.method}: {len(forget)} {'training' if cfg.method == 'finetune' else 'forget'} "
        f"rows{f', {len(retain)} retain rows' if retain else ''}; {cfg.epochs} epochs x "
        f"{steps_per_epoch} steps, lr {cfg.learning_rate}, {cfg.precision}")
    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        order = torch.randperm(len(forget), generator=g).tolist()
        for s in range(0, len(order), cfg.batch_size):
            chunk = order[s:s + cfg.batch_size]
            parts = {"loss": 0.0, "forget_nll": 0.0, "retain_nll": 0.0}
            for m in range(0, len(chunk), cfg.micro_batch_size):
                idx = chunk[m:m + cfg.micro_batch_size]
                w = len(idx) / len(chunk)  # the step's loss is the chunk mean
                f_logits, f_labels = logits_of([forget[i] for i in idx])
                r_logits = r_labels = None
                if retain:
                    pick = torch.randint(len(retain), (len(idx),), generator=g).tolist()
                    r_logits, r_labels = logits_of([retain[i] for i in pick])
                if cfg.method == "finetune":
                    loss = UnlearnLoss.mean_nll(f_logits, f_labels)
                elif cfg.method == "ga":
                    loss = UnlearnLoss.gradient_ascent(f_logits, f_labels)
                elif cfg.method == "gd" and retain:
                    loss = UnlearnLoss.gradient_difference(f_logits, f_labels, r_logits,
                                                           r_labels, gamma=cfg.gamma,
                                                           alpha=cfg.alpha)
                elif cfg.method == "gd":  # --alpha 0: the forget term alone
                    loss = cfg.gamma * UnlearnLoss.gradient_ascent(f_logits, f_labels)
                else:
                    loss = UnlearnLoss.npo(f_logits, f_labels, ref_nll[idx].to(device),
                                           r_logits, r_labels, beta=cfg.beta,
                                           gamma=cfg.gamma, alpha=cfg.alpha)
                with torch.no_grad():  # for the log only (a softmax over V, no model pass)
                    f_nll = UnlearnLoss.mean_nll(f_logits, f_labels)
                    r_nll = UnlearnLoss.mean_nll(r_logits, r_labels) if retain else None
                (loss * w).backward()
                parts["loss"] += float(loss.detach()) * w
                parts["forget_nll"] += float(f_nll) * w
                if r_nll is not None:
                    parts["retain_nll"] += float(r_nll) * w
            # the norm before clipping is what is logged, as the HF Trainer logs it
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                             cfg.max_grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            entry = {"step": len(steps) + 1, "epoch": round(epoch + (s + len(chunk)) /
                                                            len(order), 4),
                     "loss": parts["loss"], "forget_nll": parts["forget_nll"],
                     "learning_rate": sched.get_last_lr()[0], "grad_norm": grad_norm}
            if retain:
                entry["retain_nll"] = parts["retain_nll"]
            steps.append(entry)
        ep_steps = [e for e in steps if e["epoch"] > epoch]
        epochs.append({"epoch": epoch + 1, "wall_s": round(time.perf_counter() - t_epoch, 3),
                       "loss": sum(e["loss"] for e in ep_steps) / len(ep_steps),
                       "forget_nll": sum(e["forget_nll"] for e in ep_steps) / len(ep_steps)})
        log(f"  epoch {epoch + 1}/{cfg.epochs}: loss {epochs[-1]['loss']:.4f}, forget NLL "
            f"{epochs[-1]['forget_nll']:.4f} ({epochs[-1]['wall_s']:.1f} s)")
        if cfg.stop_loss is not None and epochs[-1]["loss"] < cfg.stop_loss \
                and epoch + 1 < cfg.epochs:
            log(f"  stopping: mean answer NLL {epochs[-1]['loss']:.4f} < {cfg.stop_loss}")
            break

    model.eval()
    train_log = {"method": cfg.method, "base_model": model_dir, "config": dataclasses.asdict(cfg),
                 "rows": {"forget": len(forget), "retain": len(retain)},
                 "prompt_format": formatter.description, "optimizer_steps": len(steps),
                 "stopped_early": len(epochs) < cfg.epochs,
                 "npo_reference_s": round(t_ref, 3) if ref_nll is not None else None,
                 "epochs": epochs, "steps": steps,
                 "seconds_per_epoch": sum(e["wall_s"] for e in epochs) / len(epochs)}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)  # float32: see the module docstring
        tok.save_pretrained(tmp)
        train_log["wall_s"] = round(time.perf_counter() - t_start, 3)
        (tmp / TRAIN_LOG).write_text(json.dumps(train_log, indent=2) + "\n")
    log(f"wrote {cfg.method} model to {out} ({train_log['wall_s']:.1f} s)")
    return train_log
