"""Full-model training for the target fine-tune and the GA / GD / NPO baselines: one HF
``Trainer`` subclass per method with its own ``compute_loss``, as OpenUnlearning writes them
(``src/trainer/unlearn/``), on the losses of ``uld_vllm.baselines.losses``:

* ``FinetuneTrainer``: answer-token NLL on every row (how the target and the retain model are
  made);
* ``GradAscentTrainer``, ``GradDiffTrainer``, ``NPOTrainer``: ``ga``, ``gd``, ``npo``. As
  OpenUnlearning's ``ForgetRetainDataset`` (anchor ``forget``) does, an epoch is one pass over
  the forget rows and each forget row is paired with a retain row drawn at random.

Master weights stay float32 (``--precision bf16`` only autocasts the forward: an update of
lr 1e-5 is far below bf16's resolution of a weight, so bf16 weights would not move), and the
folder is saved in float32 for the same reason. The learning rate warms up linearly for
``warmup_epochs`` epochs and then decays linearly to 0 (OpenUnlearning's ``warmup_epochs: 1``
with the HF default linear schedule); gradients are clipped to norm 1 (the HF Trainer's
default) and the optimizer is AdamW (OpenUnlearning uses bitsandbytes' 32-bit paged AdamW, the
same update).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from uld_vllm.baselines.losses import UnlearnLoss
from uld_vllm.errors import UldError
from uld_vllm.train.trainer import resolve_precision

TRAIN_LOG = "unlearn_log.json"
KINDS = ("finetune", "ga", "gd", "npo")
PRECISIONS = ("fp32", "bf16")


@dataclass
class FullTrainConfig(TrainingArguments):
    """HF ``TrainingArguments`` with OpenUnlearning's TOFU defaults, and the baselines' own
    options. A step sees ``per_device_train_batch_size x gradient_accumulation_steps`` rows."""

    method: str | None = None
    warmup_epochs: float = 1.0
    max_length: int = 256
    precision: str = "fp32"
    beta: float = 0.1  # NPO
    gamma: float = 1.0  # weight of the forget term (GD, NPO)
    alpha: float = 1.0  # weight of the retain NLL (GD, NPO)
    prompt_template: str | None = None
    # finetune only: stop after the first epoch whose mean answer NLL is below this (None:
    # train every epoch); the learning-rate schedule is still laid out over every epoch
    stop_loss: float | None = None

    num_train_epochs: float = 10
    learning_rate: float = 1e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    weight_decay: float = 0.01
    seed: int = 0
    optim: str = "adamw_torch"  # the update of torch's AdamW (HF's default here is fused)
    logging_steps: float = 1
    save_strategy: str = "no"  # the folder is written once, atomically, by train_full
    disable_tqdm: bool | None = True  # one line per epoch instead
    remove_unused_columns: bool = False

    def __post_init__(self):
        self._check()
        self.bf16 = resolve_precision(self.precision)[0] == "bf16"  # a GPU without: one line
        self.use_cpu = self.use_cpu or not torch.cuda.is_available()  # else HF refuses bf16
        super().__post_init__()

    def _check(self) -> None:
        epochs = self.num_train_epochs
        checks = [
            (self.method in KINDS, f"unknown method {self.method!r}",
             f"use one of {', '.join(KINDS[1:])}"),
            (epochs >= 1 and float(epochs).is_integer(),
             f"--epochs must be a whole number >= 1, got {epochs}", "e.g. 10"),
            (self.learning_rate > 0, "--lr must be > 0", "e.g. 1e-5"),
            (self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             "--batch-size and --micro-batch-size must be >= 1", "e.g. 32 and 8"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0", "e.g. 0.01"),
            (0 <= self.warmup_epochs < epochs,
             f"--warmup-epochs must be in [0, --epochs {epochs:g})", "e.g. 1"),
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


class ForgetRetainData(torch.utils.data.Dataset):
    """Tokenised forget and retain rows, indexed by ``(forget row, retain row or None)``;
    ``collate`` puts the forget rows' tensors at the top of the batch (where the Trainer looks
    for ``input_ids``) with their ``index``, and the retain rows' under ``retain``."""

    def __init__(self, forget: list[dict], retain: list[dict], pad_id: int):
        from uld_vllm.train.dataset import Collator

        self.forget, self.retain, self.pad = forget, retain, Collator(pad_id)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, pair: tuple[int, int | None]) -> tuple[int, int | None]:
        return pair

    def collate(self, pairs: list[tuple[int, int | None]]) -> dict:
        batch = {**self.pad([self.forget[i] for i, _ in pairs]),
                 "index": torch.tensor([i for i, _ in pairs])}
        if pairs[0][1] is not None:
            batch["retain"] = self.pad([self.retain[j] for _, j in pairs])
        return batch


class ForgetRetainSampler(torch.utils.data.Sampler):
    """Per epoch, the forget rows shuffled, each with a random retain row. One generator,
    seeded once, is drawn epoch after epoch (as the loop this trainer replaced drew it), so
    ``__iter__`` replays the earlier epochs' draws: an epoch's pairs depend on (seed, epoch)
    only, however often the Trainer asks."""

    def __init__(self, n_forget: int, n_retain: int, seed: int):
        self.n_forget, self.n_retain, self.seed, self.epoch = n_forget, n_retain, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_forget

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            order = torch.randperm(self.n_forget, generator=g).tolist()
            pick = torch.randint(self.n_retain, (self.n_forget,), generator=g).tolist() \
                if self.n_retain else [None] * self.n_forget
        return iter(zip(order, pick))


class FinetuneTrainer(Trainer):
    """Answer-token NLL on every row. The base of the unlearning trainers: forget / retain
    pairs, each micro-batch weighted by its share of the step's rows, forget (and retain) NLL
    logged beside the loss."""

    # compute_loss weighs its micro-batch itself (see get_batch_samples)
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts: collections.Counter = collections.Counter()

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return ForgetRetainSampler(len(ds.forget), len(ds.retain), self.args.seed)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # the step's loss is the mean over its rows, as one batch of them would give, also
        # when its micro-batches differ in size (the last step of an epoch)
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, sum(len(b["index"]) for b in batches)

    @staticmethod
    def logits(model, batch: dict | None) -> tuple:
        if batch is None:
            return None, None
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).logits, batch["labels"]

    def scaled(self, loss, inputs, step_rows: int, forget: tuple, retain=(None, None)):
        """``loss`` times the micro-batch's share of the step's rows; the NLLs for the log."""
        w = len(inputs["index"]) / step_rows
        with torch.no_grad():  # a softmax over V, no model pass
            self._parts["forget_nll"] += float(UnlearnLoss.mean_nll(*forget)) * w
            if retain[0] is not None:
                self._parts["retain_nll"] += float(UnlearnLoss.mean_nll(*retain)) * w
        return loss * w

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = self.logits(model, inputs)
        return self.scaled(UnlearnLoss.mean_nll(*forget), inputs, num_items_in_batch, forget)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs.update(self._parts)
            self._parts.clear()
        super().log(logs, start_time)


class GradAscentTrainer(FinetuneTrainer):
    """GA: minimising ``-NLL`` of the forget answers."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = self.logits(model, inputs)
        return self.scaled(UnlearnLoss.gradient_ascent(*forget), inputs, num_items_in_batch,
                           forget)


class GradDiffTrainer(FinetuneTrainer):
    """GD: ``gamma`` x GA on the forget rows + ``alpha`` x NLL on their retain rows (none
    with ``alpha`` 0)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        forget, retain = self.logits(model, inputs), self.logits(model, inputs.get("retain"))
        loss = a.gamma * UnlearnLoss.gradient_ascent(*forget) if retain[0] is None else \
            UnlearnLoss.gradient_difference(*forget, *retain, gamma=a.gamma, alpha=a.alpha)
        return self.scaled(loss, inputs, num_items_in_batch, forget, retain)


class NPOTrainer(FinetuneTrainer):
    """NPO with GD's retain term (OpenUnlearning's NPO extends its GradDiff)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The reference model is the starting model: its log-likelihoods are constants, so one
        # pass now replaces a frozen copy of the model and a second forward every step.
        # Autocast as in training, so that at the start the model and reference agree.
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            self.train_dataset, self.args.per_device_train_batch_size,
            sampler=[(i, None) for i in range(len(self.train_dataset))],
            collate_fn=self.data_collator)
        self.model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            self.reference = torch.cat([
                UnlearnLoss.sequence_nll(*self.logits(self.model, self._prepare_inputs(b)))
                for b in loader])
        self.reference_s = time.perf_counter() - t0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        forget, retain = self.logits(model, inputs), self.logits(model, inputs.get("retain"))
        loss = UnlearnLoss.npo(*forget, self.reference[inputs["index"]], *retain, beta=a.beta,
                               gamma=a.gamma, alpha=a.alpha)
        return self.scaled(loss, inputs, num_items_in_batch, forget, retain)


TRAINERS = {"finetune": FinetuneTrainer, "ga": GradAscentTrainer, "gd": GradDiffTrainer,
            "npo": NPOTrainer}


class _Epochs(TrainerCallback):
    """Per epoch: wall time and mean step loss and forget NLL, as a line and in ``epochs``;
    stops at finetune's stop loss."""

    def __init__(self, log):
        self.log, self.epochs = log, []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.t0, self.first = time.perf_counter(), len(state.log_history)

    def on_epoch_end(self, args, state, control, **kwargs):
        steps = [e for e in state.log_history[self.first:] if "loss" in e]
        ep = {"epoch": len(self.epochs) + 1, "wall_s": round(time.perf_counter() - self.t0, 3),
              **{k: sum(e[k] for e in steps) / len(steps) for k in ("loss", "forget_nll")}}
        self.epochs.append(ep)
        self.log(f"  epoch {ep['epoch']}/{args.num_train_epochs:g}: loss {ep['loss']:.4f}, "
                 f"forget NLL {ep['forget_nll']:.4f} ({ep['wall_s']:.1f} s)")
        if args.stop_loss is not None and ep["loss"] < args.stop_loss \
                and ep["epoch"] < args.num_train_epochs:
            self.log(f"  stopping: mean answer NLL {ep['loss']:.4f} < {args.stop_loss}")
            control.should_training_stop = True


def _tokenized(rows: list[dict], source: str, formatter, max_length: int) -> list[dict]:
    from uld_vllm.train.data import to_examples
    from uld_vllm.train.dataset import encode_example

    out = []
    for ex in to_examples(rows, source, "forget"):
        if ex.prompt is None:
            raise UldError(f"{source} holds raw text rows", "pass question/answer rows")
        out += encode_example(ex, formatter, max_length, False)
    return out


def train_full(model_dir: str, out_dir: str | Path, forget_rows: list[dict],
               retain_rows: list[dict] | None, cfg: FullTrainConfig, *,
               overwrite: bool = False, log=print) -> dict:
    """Train ``model_dir`` as ``cfg.method`` says on ``forget_rows`` (for ``finetune``: the
    training rows) and ``retain_rows``; write an HF folder with ``unlearn_log.json`` to
    ``out_dir`` and return that log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uld_vllm.core.adapter import atomic_output_dir
    from uld_vllm.core.models import resolve_model
    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.train.dataset import pad_id_of

    t_start = time.perf_counter()
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
    finetune = cfg.method == "finetune"
    forget = _tokenized(forget_rows, "training set" if finetune else "forget set", formatter,
                        cfg.max_length)
    retain = _tokenized(retain_rows, "retain set", formatter, cfg.max_length) \
        if needs_retain else []
    per_epoch = math.ceil(len(forget) / (cfg.per_device_train_batch_size *
                                         cfg.gradient_accumulation_steps))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    log(f"{cfg.method}: {len(forget)} {'training' if finetune else 'forget'} rows"
        f"{f', {len(retain)} retain rows' if retain else ''}; {cfg.num_train_epochs:g} epochs x "
        f"{per_epoch} steps, lr {cfg.learning_rate}, {cfg.precision}")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        args = dataclasses.replace(cfg, output_dir=str(tmp),
                                   warmup_steps=round(cfg.warmup_epochs * per_epoch))
        data = ForgetRetainData(forget, retain, pad_id_of(tok))
        trainer = TRAINERS[cfg.method](model=model, args=args, train_dataset=data,
                                       data_collator=data.collate)
        trainer.remove_callback(PrinterCallback)
        epochs = _Epochs(log)
        trainer.add_callback(epochs)
        trainer.train()
        model.save_pretrained(tmp)  # float32: see the module docstring
        tok.save_pretrained(tmp)
        steps = [{k: e[k] for k in ("step", "epoch", "loss", "forget_nll", "retain_nll",
                                    "learning_rate", "grad_norm") if k in e}
                 for e in trainer.state.log_history if "loss" in e]
        train_log = {"method": cfg.method, "base_model": model_dir,
                     "config": {**args.to_dict(), "output_dir": str(out)},
                     "rows": {"forget": len(forget), "retain": len(retain)},
                     "prompt_format": formatter.description,
                     "optimizer_steps": trainer.state.global_step,
                     "stopped_early": len(epochs.epochs) < cfg.num_train_epochs,
                     "npo_reference_s": round(trainer.reference_s, 3)
                     if cfg.method == "npo" else None,
                     "epochs": epochs.epochs, "steps": steps,
                     "seconds_per_epoch": sum(e["wall_s"] for e in epochs.epochs)
                     / len(epochs.epochs),
                     "wall_s": round(time.perf_counter() - t_start, 3)}
        (tmp / TRAIN_LOG).write_text(json.dumps(train_log, indent=2) + "\n")
    log(f"wrote {cfg.method} model to {out} ({train_log['wall_s']:.1f} s)")
    return train_log
