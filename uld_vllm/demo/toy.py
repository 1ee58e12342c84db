"""`uld-vllm demo`: the whole ULD story on a model small enough for a laptop CPU.

1. Build a small Llama whose tokenizer is trained on a few authors' biographies (TOFU authors
   from the shared data folder when present, else a built-in set of fictitious facts).
2. Fine-tune it (HF Trainer) until it recites those authors' answers: this is the *target*.
3. Train a ULD adapter (``uld_vllm.train``) to forget one author and keep the others.
4. Answer every question greedily with the target alone and with ULD (target - alpha *
   assistant), and print them side by side, with a one-line score per side.

Generation goes through vLLM: plain vLLM for the target alone, the uld-vllm engine (target +
LoRA assistant in one batch) for ULD (see ``_generate``).
Everything is seeded; what the demo prints is what happened, including a failure to memorise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from uld_vllm.core.rows import SHARED_DATA
from uld_vllm.demo.common import KV_CACHE_BYTES, clear_outputs, format_table, quiet_vllm
from uld_vllm.dev.toy_data import AUTHORS, builtin_authors
from uld_vllm.errors import UldError
from uld_vllm.eval.metrics import rouge_l_recall

# TOFU's full.jsonl holds 200 authors x 20 questions, in author order; the last 40 rows are
# forget01 (authors 198 and 199), which ULD's augmentation CSVs cover.
TOFU_AUTHORS = (197, 198, 199)
TOFU_FORGET_AUTHOR = 198
TOFU_FORGET_NAME = "Basil Mahfouz Al-Kuwaiti"
_OUTPUTS = ("base", "target", ".target.trainer", "uld_adapter", "uld_adapter.checkpoints",
            "corpus.txt", "forget.jsonl", "retain.jsonl")
ROWS_PER_AUTHOR = 20

MODEL = {"arch": "llama", "layers": 4, "hidden": 128, "heads": 2, "vocab": 2048, "seed": 0}
FINETUNE = {"epochs": 60, "lr": 3e-3, "batch_size": 10, "stop_loss": 0.02}
# Off-recipe on purpose: the target is driven to near-zero loss (very peaked logits), so the
# assistant gets a wider LoRA (r 32, not 16), more epochs on the tiny set (40, not 10), a
# smaller batch (16, not 32) and a larger ULD weight than TOFU's 0.8.
ULD = {"num_layers": 2, "lora_r": 32, "lora_alpha": 64, "num_train_epochs": 40,
       "learning_rate": 5e-3, "per_device_train_batch_size": 16, "gradient_accumulation_steps": 1,
       "max_length": 128, "alpha": 1.5,
       "filter_ratio": 0.1}

def tofu_authors(data_dir: Path) -> list[list[dict]] | None:
    full = data_dir / "tofu" / "full.jsonl"
    if not full.is_file():
        return None
    rows = [json.loads(line) for line in full.read_text().splitlines() if line.strip()]
    return [rows[a * ROWS_PER_AUTHOR:(a + 1) * ROWS_PER_AUTHOR] for a in TOFU_AUTHORS]


def finetune_target(model_dir, rows: list[dict], out_dir, *, epochs: int = 60,
                    lr: float = 3e-3, batch_size: int = 10, stop_loss: float | None = 0.02,
                    seed: int = 0, prompt_template: str | None = None) -> dict:
    """Full fine-tune of ``model_dir`` on question/answer ``rows`` (answer tokens only), with
    the HF Trainer, saved to ``out_dir``. Stops early once the logged loss is below
    ``stop_loss``. Returns ``{"epochs": ..., "final_loss": ..., "wall_s": ...}``."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.train.data import to_examples
    from uld_vllm.train.dataset import Collator, UldDataset, pad_id_of
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = UldDataset(to_examples(rows, "fine-tuning set", "forget"), [],
                    PromptFormatter(tok, prompt_template), max_length=256)
    collate = Collator(pad_id_of(tok))

    def collate_lm(batch):
        out = collate(batch)
        out.pop("is_retain")
        return out

    class _StopWhenMemorised(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if stop_loss is not None and logs and logs.get("loss", 1e9) < stop_loss:
                control.should_training_stop = True

    steps_per_epoch = -(-len(ds) // batch_size)
    args = TrainingArguments(
        output_dir=str(Path(out_dir).parent / f".{Path(out_dir).name}.trainer"),
        num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=0.05, weight_decay=0.0,
        logging_steps=steps_per_epoch, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=seed,
        remove_unused_columns=False, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate_lm,
                      callbacks=[_StopWhenMemorised()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)  # save_strategy="no": only an empty dir
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"epochs": round(trainer.state.epoch or 0.0, 2),
            "final_loss": losses[-1] if losses else None,
            "wall_s": round(time.perf_counter() - t0, 1)}


def _generate(target_dir: Path, adapter_dir: Path, prompts: list[list[int]], *, alpha: float,
              filter_ratio: float, max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy answers of the target alone (plain vLLM) and under ULD (the uld-vllm engine)."""
    from vllm import LLM as PlainLLM
    from vllm import SamplingParams

    import uld_vllm

    kw = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0,
          "kv_cache_memory_bytes": KV_CACHE_BYTES}
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    engines = {
        "target": lambda: PlainLLM(str(target_dir), **kw),
        "uld": lambda: uld_vllm.LLM(str(target_dir), uld_adapter=str(adapter_dir),
                                    uld_alpha=alpha, uld_filter_ratio=filter_ratio, **kw),
    }
    out = {}
    from uld_vllm.jobs.spec import shutdown

    for name, make in engines.items():
        llm = make()
        try:
            out[name] = [r.outputs[0].text.strip()
                         for r in llm.generate(inputs, params, use_tqdm=False)]
        finally:
            shutdown(llm)  # free the cores before the next engine
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@quiet_vllm()
def run_demo(workdir: str | os.PathLike = "demo_out", *, data_dir: str | os.PathLike | None = None,
             show_per_side: int = 5, log=print) -> dict:
    """Run the story in ``workdir`` (re-created) and print it; returns the numbers it printed."""
    import torch

    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.dev.tiny import make_tiny_model
    from uld_vllm.train import make_config
    from uld_vllm.train.data import build_data
    from uld_vllm.train.trainer import run_training

    t_start = time.perf_counter()
    torch.manual_seed(0)
    work = Path(workdir)
    if work.exists() and not work.is_dir():
        raise UldError(f"demo workdir {work} is a file", "pass a folder with --workdir")
    clear_outputs(work, _OUTPUTS)
    data_dir = Path(data_dir) if data_dir is not None else SHARED_DATA
    authors = tofu_authors(data_dir)
    csvs: dict = {}
    model_kw = dict(MODEL)
    if authors is not None:
        source = f"TOFU authors {', '.join(map(str, TOFU_AUTHORS))} from {data_dir / 'tofu'}"
        forget_idx = TOFU_AUTHORS.index(TOFU_FORGET_AUTHOR)
        aug = data_dir / "uld_aug" / "tofu" / "forget01"
        for key, name in (("paraphrase_csv", "paraphrase_res.csv"),
                          ("perturbed_csv", "perturb_res.csv")):
            if (aug / name).is_file():
                csvs[key] = str(aug / name)
    else:
        source = f"built-in fictitious authors ({data_dir / 'tofu'} not found)"
        authors, forget_idx = builtin_authors(), 1
        # this small corpus yields ~540 BPE tokens: a larger vocab would hold untrained
        # reserved ids that the plausibility filter could keep
        model_kw["vocab"] = 512
    forget = authors[forget_idx]
    retain = [r for i, a in enumerate(authors) if i != forget_idx for r in a]
    forget_name = TOFU_FORGET_NAME if source.startswith("TOFU") else AUTHORS[1][0]
    log(f"[1/4] data: {source}; forget {len(forget)} questions about {forget_name}, retain "
        f"{len(retain)} questions about the other {len(authors) - 1} authors")

    _write_jsonl(work / "forget.jsonl", forget)
    _write_jsonl(work / "retain.jsonl", retain)
    # The tokenizer learns from exactly the text the two trainings will see.
    seen = build_data(str(work / "forget.jsonl"), str(work / "retain.jsonl"), max_retain=0,
                      log=lambda m: None, **csvs)
    corpus = [f"{e.prompt or ''} {e.response}" for e in seen.forget + seen.retain]
    (work / "corpus.txt").write_text("\n".join(corpus) + "\n")
    base_dir = make_tiny_model(work / "base", corpus_file=work / "corpus.txt", **model_kw)
    target_dir = work / "target"
    ft = finetune_target(base_dir, forget + retain, target_dir, epochs=FINETUNE["epochs"],
                         lr=FINETUNE["lr"], batch_size=FINETUNE["batch_size"],
                         stop_loss=FINETUNE["stop_loss"])
    log(f"[2/4] target: {MODEL['layers']}-layer Llama, hidden {MODEL['hidden']}, vocab "
        f"{model_kw['vocab']}; fine-tuned {ft['epochs']} epochs on all "
        f"{len(forget) + len(retain)} questions in {ft['wall_s']} s (final loss "
        f"{ft['final_loss']:.3f})")

    cfg = make_config(model=str(target_dir), forget=str(work / "forget.jsonl"),
                      retain=str(work / "retain.jsonl"), output_dir=str(work / "uld_adapter"),
                      max_retain=0, seed=0, **csvs, **ULD)
    adapter = run_training(cfg, log=lambda m: log(f"      {m}"))
    train_log = json.loads((adapter.path / "train_log.json").read_text())
    last = _last_epoch_means(train_log)
    log(f"[3/4] ULD adapter: K={ULD['num_layers']} of {MODEL['layers']} layers, "
        f"{train_log['trainable_parameters']:,} trainable parameters, "
        f"{train_log['seconds_per_epoch']:.2f} s/epoch x {len(train_log['epochs'])} epochs "
        f"(rows: forget {train_log['data']['train_rows_forget']}, retain "
        f"{train_log['data']['train_rows_retain']}); last epoch: L_f {last['loss_forget']:.2f}, "
        f"L_r {last['loss_retain']:.3f} (log|V| = {math.log(model_kw['vocab']):.2f})")

    from transformers import AutoTokenizer

    fmt = PromptFormatter(AutoTokenizer.from_pretrained(target_dir))
    sides = (("forget", forget), ("retain", retain))
    answers = _generate(target_dir, adapter.path,
                        [fmt.encode_prompt(r["question"]) for _, rows in sides for r in rows],
                        alpha=ULD["alpha"], filter_ratio=ULD["filter_ratio"], max_new_tokens=96)
    results = {}
    table = []
    start = 0
    for side, rows in sides:
        t_out = answers["target"][start:start + len(rows)]
        u_out = answers["uld"][start:start + len(rows)]
        start += len(rows)
        results[side] = {
            name: {"rougeL_recall": sum(rouge_l_recall(o, r["answer"])
                                        for o, r in zip(outs, rows)) / len(rows),
                   "exact": sum(o == r["answer"].strip() for o, r in zip(outs, rows))
                   / len(rows)}
            for name, outs in (("target", t_out), ("uld", u_out))}
        pick = _spread(len(rows), show_per_side)
        table += [(f"[{side}] {rows[i]['question']}", rows[i]["answer"], t_out[i], u_out[i])
                  for i in pick]
    log(f"[4/4] greedy answers, target alone vs ULD (alpha={ULD['alpha']}, filter ratio "
        f"{ULD['filter_ratio']}):\n")
    log(format_table(table))
    log("")
    for side in ("forget", "retain"):
        t, u = results[side]["target"], results[side]["uld"]
        log(f"{side:>6} ({len(forget if side == 'forget' else retain)} questions): ROUGE-L "
            f"recall target {t['rougeL_recall']:.2f} -> ULD {u['rougeL_recall']:.2f}; exact "
            f"answers target {t['exact']:.0%} -> ULD {u['exact']:.0%}")
    results["verdict"] = _verdict(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["trainable_parameters"] = train_log["trainable_parameters"]
    results["seconds_per_epoch"] = train_log["seconds_per_epoch"]
    log(f"{results['verdict']} (demo wall time {results['wall_s']:.0f} s)")
    return results


def _last_epoch_means(train_log: dict) -> dict:
    final = train_log["epochs"][-1]["epoch"] if train_log["epochs"] else 0
    steps = [s for s in train_log["steps"] if s.get("epoch", 0) > final - 1]
    out = {}
    for key in ("loss_forget", "loss_retain"):
        vals = [s[key] for s in steps if key in s]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


def _spread(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _verdict(results: dict) -> str:
    f, r = results["forget"], results["retain"]
    memorised = f["target"]["rougeL_recall"] >= 0.8 and r["target"]["rougeL_recall"] >= 0.8
    forgot = f["uld"]["rougeL_recall"] <= 0.6 * f["target"]["rougeL_recall"]
    kept = r["uld"]["rougeL_recall"] >= 0.9 * r["target"]["rougeL_recall"]
    if not memorised:
        return "verdict: the target did not memorise its training answers, so there was " \
               "little to forget (train longer)"
    if forgot and kept:
        return "verdict: the target recites both sides; under ULD it no longer recites the " \
               "forget answers and keeps the retain answers"
    return (f"verdict: ULD {'forgot' if forgot else 'did NOT forget'} the forget answers and "
            f"{'kept' if kept else 'did NOT keep'} the retain answers")
