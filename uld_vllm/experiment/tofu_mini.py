"""`uld-vllm experiment tofu-mini --out DIR`: TOFU's forget01 protocol in miniature, one command.

Stages, each in its own subfolder of ``--out`` with a ``.done`` marker (written last, holding
the stage's fingerprint, its wall time and its result), so a rerun skips every finished stage
and redoes an unfinished one from scratch. A stage's fingerprint covers only the options it
depends on (``STAGE_FIELDS``) and the stages it builds on, so a rerun with, say, another ULD
learning rate redoes the ULD stage and the report and reuses the fine-tuned target and retain
model:

1. ``data``: the forget split's rows and the retain authors' rows as JSONL (the retain authors
   are the first ``--retain-authors`` x 20 rows of TOFU's ``full.jsonl``, which are the authors
   of ``retain_perturbed``, the retain split every eval scores).
2. ``target``: the model fully fine-tuned on forget + retain rows (answer-token NLL), evaluated
   by ``eval tofu`` (no forget quality yet: the retain model does not exist).
3. ``retain``: the same recipe on the retain rows only; its ``eval tofu`` output is the
   forget-quality reference of every other eval.
4. ``uld``: ``uld-vllm train`` on the target with the reference recipe (K = N/4, remember +
   uniform loss, paraphrase and perturbed augmentation from ULD's CSVs), evaluated through the
   ULD engine.
5. ``ga``, ``gd``, ``npo``: ``uld_vllm.baselines`` on the target, each an HF folder evaluated
   by ``eval tofu``.
6. ``uld-rule-<rule>``, one per rule of ``--uld-rules`` (``ULD_RULES``; default all): the ULD
   adapter evaluated again under that decoding rule, for the rules x metrics table.
7. ``report``: ``summary.md``, ``summary.json``, ``fq_vs_mu.png``, ``uld_convergence.png``
   and OpenUnlearning result files per method (``openunlearning/<method>/``), every method's
   forget quality against the retain model (the target's included).

The defaults are TOFU shrunk to fit 90 minutes on a 2-core CPU with SmolLM2-135M-Instruct (30
layers); docs/tofu.md gives every choice and its reason:

* data: forget01 and 2 retain authors (rows 0-39 of ``full.jsonl``).
* target / retain model: <= 10 epochs, lr 2e-4, batch 8, AdamW, weight decay 0.01, one
  warm-up epoch then linear decay; stops after the first epoch whose mean answer NLL is below
  0.05 nats (``--target-stop-loss``, 0: never): each answer token then gets ~95% of the
  probability, enough for greedy decoding to recite it. TOFU fine-tunes Llama-2-7B for 5
  epochs at 1e-5; a 135 M model on 80 rows needs a larger step and more steps.
* ULD: K = N/4 rounded half up (8 of 30), LoRA r 16 / alpha 32, lr 3e-3, batch 8, <= 10
  epochs with the trainer's convergence stop, beta 1, every retain row on the retain side, the
  forget rows plus 1 paraphrased question x 2 paraphrased answers per forget row on the forget
  side (``--uld-augment paraphrase``), and the target's own greedy answers to 200 questions of
  other TOFU authors beside the retain rows (``--uld-self-retain``). ULD's recipe (beta 5,
  plus 2 perturbed answers per forget question on the retain side: ``--uld-retain-weight 5
  --uld-augment both``) left the assistant at L_f 4.4 after 10 epochs: it never learned the
  forget answers. Decoding alpha 0.8, filter 0.01, and the rule the adapter carries (the
  library's default: the gated above-uniform penalty); ``--uld-rules`` adds the other rules.
* GA / GD / NPO: OpenUnlearning's TOFU recipe (batch 32, weight decay 0.01, one warm-up
  epoch, NPO beta 0.1, alpha = gamma = 1 with a retain NLL term) with two changes: the
  learning rate is the target's (OpenUnlearning unlearns at the rate its targets were
  fine-tuned with, 1e-5 there, 2e-4 here) and 5 epochs instead of 10.
* ``--precision auto``: bf16 autocast where the hardware runs it natively (a GPU with bf16, a
  CPU with avx512_bf16/AMX), else fp32 (an AVX2-only CPU emulates bf16, which is slower than
  fp32 there). Master weights and saved models stay float32.
* eval: the first 40 rows of each split (all 40 of forget01), greedy, 200 new tokens, float32,
  the CPU engine's worker bound to every core while it runs
  (``uld_vllm.jobs.spec.engine_on_every_core``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from uld_vllm.core.rows import SHARED_DATA
from uld_vllm.errors import UldError

STAGES = ("data", "target", "retain", "uld", "ga", "gd", "npo", "report")
METHODS = ("uld", "ga", "gd", "npo")
AUGMENT = ("both", "paraphrase", "perturbed", "none")
# the options each stage reads (beside what every stage reads: _COMMON), and the stages whose
# output it builds on; the report reads everything
_COMMON = ("model", "data_dir", "forget_split", "retain_authors", "max_forget_rows", "seed",
           "precision")
_EVAL = ("max_examples", "max_new_tokens", "eval_dtype", "max_model_len")
_FINETUNE = ("target_epochs", "target_lr", "target_batch_size", "target_stop_loss",
             "micro_batch_size", "weight_decay", "warmup_epochs", "max_length")
_UNLEARN = ("unlearn_epochs", "unlearn_lr", "batch_size", "micro_batch_size", "weight_decay",
            "warmup_epochs", "max_length", "npo_beta", "retain_weight", "forget_weight")
STAGE_FIELDS = {
    "data": (), "target": _FINETUNE + _EVAL, "retain": _FINETUNE + _EVAL,
    "uld": ("uld_num_layers", "uld_epochs", "uld_lr", "uld_batch_size", "uld_micro_batch_size",
            "uld_retain_weight", "uld_augment", "uld_self_retain", "uld_alpha",
            "uld_filter_ratio", "max_length") + _EVAL,
    **{m: _UNLEARN + _EVAL for m in ("ga", "gd", "npo")},
}
STAGE_DEPS = {"target": ("data",), "retain": ("data",),
              **{m: ("data", "target", "retain") for m in METHODS}}
# the decoding rules `--uld-rules` evaluates beside the adapter's own (the library's default:
# the above-uniform penalty behind the confidence gate), each one more eval of the ULD stage's
# adapter on an engine given these settings: the rules x metrics table of the report
ULD_RULES = {
    # the paper's rule: engine.settings.RULES["reference"] (not imported: it pulls in torch,
    # and the command line builds this module's parser; tests/test_experiment.py compares them)
    "reference": {"penalty": "logit", "gate": None},
    "logit-gated": {"penalty": "logit"},  # the paper's penalty behind the adapter's gate
    "ungated": {"gate": None},  # the above-uniform penalty without the gate
}
# options added after runs existed, with the value that means "as before": a stage's
# fingerprint leaves them out at that value, so an older run keeps its finished stages
_AS_BEFORE = {"uld_self_retain": 0}
RULE_PREFIX = "uld-rule-"  # a rule's stage (and folder): uld-rule-reference, ...
_RULE_FIELDS = ("uld_alpha", "uld_filter_ratio") + _EVAL


def rule_stage(rule: str) -> str:
    return RULE_PREFIX + rule


def _fields_of(stage: str) -> tuple:
    if stage == "report":  # everything (a stage's own result, the methods listed)
        return tuple(f.name for f in dataclasses.fields(TofuMiniConfig))
    if stage.startswith(RULE_PREFIX):
        return _COMMON + _RULE_FIELDS
    return _COMMON + STAGE_FIELDS[stage]
DONE = ".done"
EXPERIMENT_FILE = "experiment.json"
ROWS_PER_AUTHOR = 20
# the target's own answers as ULD retain rows (--uld-self-retain): questions of full.jsonl past
# the 20 authors of retain_perturbed (which the evals score), answered greedily
SELF_RETAIN_FROM_ROW = 20 * ROWS_PER_AUTHOR
SELF_RETAIN_TOKENS = 64
_FIX_CONFIG = "pass another --out, or the same options as the run in that folder"


@dataclasses.dataclass
class TofuMiniConfig:
    model: str = "smollm2-135m-instruct"
    data_dir: str = str(SHARED_DATA)
    forget_split: str = "forget01"
    retain_authors: int = 2
    max_forget_rows: int = 0  # 0: every row of the forget split (smoke tests use a few)
    methods: tuple = METHODS
    seed: int = 0
    precision: str = "auto"
    # target and retain model
    target_epochs: int = 10
    target_lr: float = 2e-4
    target_batch_size: int = 8
    target_stop_loss: float = 0.05  # stop fine-tuning once the epoch's answer NLL is below
    batch_size: int = 32
    micro_batch_size: int = 8
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_length: int = 256
    # GA / GD / NPO
    unlearn_epochs: int = 5
    unlearn_lr: float = 2e-4
    npo_beta: float = 0.1
    retain_weight: float = 1.0  # OpenUnlearning's alpha
    forget_weight: float = 1.0  # OpenUnlearning's gamma
    # ULD
    uld_num_layers: int = 0  # 0: N/4 rounded half up
    uld_epochs: float = 10.0
    uld_lr: float = 3e-3
    uld_batch_size: int = 8
    uld_micro_batch_size: int = 8
    # beta 1 and the paraphrases only: ULD's beta 5 and perturbed answers (the forget questions
    # again, to be uniform on) kept the assistant from converging (docs/tofu.md)
    uld_retain_weight: float = 1.0
    uld_augment: str = "paraphrase"  # ULD's CSVs: paraphrases (forget side), perturbed (retain)
    # the target's own answers to other authors' questions on the retain side: on forget01 they
    # kept model utility at the target's, at some cost in forget quality (docs/tofu.md)
    uld_self_retain: int = 200
    uld_alpha: float = 0.8
    uld_filter_ratio: float = 0.01
    uld_rules: tuple = tuple(ULD_RULES)  # names of ULD_RULES, each one more eval
    # eval
    max_examples: int = 40
    max_new_tokens: int = 200
    eval_dtype: str = "float32"
    max_model_len: int = 1024

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        d["uld_rules"] = list(self.uld_rules)
        return d

    def fingerprint(self, stage: str | None = None) -> str:
        """Of the whole configuration, or of what ``stage`` depends on (``STAGE_FIELDS``,
        and the stages before it that it reads)."""
        d = self.to_dict()
        if stage is not None:
            rule = stage.startswith(RULE_PREFIX)
            deps = ("data", "target", "retain", "uld") if rule else STAGE_DEPS.get(stage, ())
            d = {"stage": stage, **{k: d[k] for k in _fields_of(stage)
                                    if k not in _AS_BEFORE or d[k] != _AS_BEFORE[k]},
                 "after": [self.fingerprint(s) for s in deps]}
            if rule:  # what the rule's name stands for, should it ever change
                d["rule"] = ULD_RULES[stage[len(RULE_PREFIX):]]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> TofuMiniConfig:
        from uld_vllm.eval.tofu_data import FORGET_SPLITS

        if self.forget_split not in FORGET_SPLITS:
            raise UldError(f"unknown forget split {self.forget_split!r}",
                           f"use one of {', '.join(FORGET_SPLITS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UldError(f"unknown method {', '.join(bad) or '(none given)'}",
                           f"--methods takes a comma-separated subset of {', '.join(METHODS)}")
        bad = [r for r in self.uld_rules if r not in ULD_RULES]
        if bad:
            raise UldError(f"unknown decoding rule {bad[0]!r} in --uld-rules",
                           f"use a comma-separated subset of {', '.join(ULD_RULES)}, or none")
        if self.uld_rules and "uld" not in self.methods:
            raise UldError("--uld-rules evaluates the ULD adapter, but --methods leaves out uld",
                           "add uld to --methods or pass --uld-rules none")
        checks = [
            (self.retain_authors >= 1, "--retain-authors must be >= 1", "e.g. 20"),
            (self.max_forget_rows >= 0, "--max-forget-rows must be >= 0", "0 means every row"),
            (self.max_examples >= 1, "--max-examples must be >= 1", "e.g. 300"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be >= 1", "e.g. 200"),
            (self.uld_num_layers >= 0, "--uld-num-layers must be >= 0", "0 means N/4"),
            (self.uld_retain_weight >= 0, "--uld-retain-weight must be >= 0", "e.g. 5"),
            (self.uld_self_retain >= 0, "--uld-self-retain must be >= 0", "0 means none"),
            (self.uld_augment in AUGMENT,
             f"--uld-augment {self.uld_augment!r} is not one of {', '.join(AUGMENT)}",
             "use paraphrase (the default) or both (ULD's recipe)"),
            (self.micro_batch_size >= 1 and self.target_batch_size % self.micro_batch_size == 0
             and self.batch_size % self.micro_batch_size == 0,
             f"--target-batch-size {self.target_batch_size} and --batch-size {self.batch_size} "
             f"must be multiples of --micro-batch-size {self.micro_batch_size}",
             "e.g. 8, 32 and 8"),
            (self.uld_micro_batch_size >= 1
             and self.uld_batch_size % self.uld_micro_batch_size == 0,
             f"--uld-batch-size {self.uld_batch_size} is not a multiple of "
             f"--uld-micro-batch-size {self.uld_micro_batch_size}", "e.g. 32 and 8"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"--precision {self.precision!r} is not auto, fp32 or bf16", "use auto"),
        ]
        for ok, problem, fix in checks:
            if not ok:
                raise UldError(problem, fix)
        data = Path(self.data_dir)
        need = [data / "tofu" / f for f in ("full.jsonl", f"{self.forget_split}.jsonl",
                                            f"{self.forget_split}_perturbed.jsonl",
                                            "retain_perturbed.jsonl")]
        if "uld" in self.methods:
            aug = data / "uld_aug" / "tofu" / self.forget_split
            need += [aug / name for name, used in (
                ("paraphrase_res.csv", self.uld_augment in ("both", "paraphrase")),
                ("perturb_res.csv", self.uld_augment in ("both", "perturbed"))) if used]
        missing = [str(p) for p in need if not p.is_file()]
        if missing:
            raise UldError(f"{missing[0]} does not exist",
                           "pass --data-dir with tofu/ and uld_aug/ as in ../shared/data")
        return self


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]})
                            + "\n" for r in rows))


class TofuMini:
    """The experiment in ``out`` with configuration ``cfg``; ``run()`` does what is left."""

    def __init__(self, cfg: TofuMiniConfig, out: str | os.PathLike, log=print):
        self.cfg = cfg.validate()
        self.out = Path(out)
        self.log = log
        self.fp = cfg.fingerprint()

    # ------------------------------------------------------------------ bookkeeping
    def _claim(self) -> None:
        """Take ``--out``: refuse unrelated files; a run of another configuration is continued
        (its stages whose options changed are redone, and the log says which options)."""
        if self.out.exists() and not self.out.is_dir():
            raise UldError(f"--out {self.out} is a file", "pass a folder")
        meta = self.out / EXPERIMENT_FILE
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())
                old_cfg, old_fp = old["config"], old["fingerprint"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UldError(f"{meta} is not a tofu-mini experiment file", _FIX_CONFIG) \
                    from None
            if old_fp == self.fp:
                return
            new = self.cfg.to_dict()
            diff = sorted(k for k in set(old_cfg) | set(new)
                          if old_cfg.get(k, _AS_BEFORE.get(k)) != new.get(k))
            if diff:
                self.log(f"--out {self.out} holds a run that differs in {', '.join(diff)}: "
                         "the stages that depend on them are redone")
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise UldError(f"--out {self.out} is not empty and holds no {EXPERIMENT_FILE}",
                           "pass a new or empty folder")
        self.out.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"fingerprint": self.fp, "config": self.cfg.to_dict()},
                                   indent=2) + "\n")

    def _stage(self, name: str, fn) -> dict:
        folder = self.out / name
        marker = folder / DONE
        fp = self.cfg.fingerprint(name)
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("fingerprint") == fp:
                self.log(f"[{name}] finished earlier ({done['wall_s']:.1f} s): skipped")
                return done
        if folder.exists():  # an interrupted attempt: its files cannot be trusted
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.log(f"[{name}] started")
        t0 = time.perf_counter()
        result = fn(folder)
        done = {"stage": name, "fingerprint": fp, "wall_s": round(time.perf_counter() - t0, 3),
                "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"), "result": result}
        marker.write_text(json.dumps(done, indent=2) + "\n")  # last: the stage counts as done
        self.log(f"[{name}] done in {done['wall_s']:.1f} s")
        return done

    # ------------------------------------------------------------------ stages
    def _precision(self) -> str:
        from uld_vllm.train.trainer import resolve_precision

        return resolve_precision(self.cfg.precision)[0]

    def _full_cfg(self, method: str):
        from uld_vllm.baselines.trainer import FullTrainConfig

        c = self.cfg
        finetune = method == "finetune"
        return FullTrainConfig(
            method=method, num_train_epochs=c.target_epochs if finetune else c.unlearn_epochs,
            learning_rate=c.target_lr if finetune else c.unlearn_lr,
            per_device_train_batch_size=c.micro_batch_size,
            gradient_accumulation_steps=(c.target_batch_size if finetune else c.batch_size)
            // c.micro_batch_size, weight_decay=c.weight_decay,
            warmup_epochs=c.warmup_epochs, max_length=c.max_length, seed=c.seed,
            precision=self._precision(), beta=c.npo_beta, gamma=c.forget_weight,
            alpha=c.retain_weight, stop_loss=(c.target_stop_loss or None) if finetune else None)

    def _eval(self, folder: Path, model: Path, adapter: Path | None = None,
              reference: bool = True, rule: dict | None = None) -> dict:
        from uld_vllm.eval.tofu import tofu_eval
        from uld_vllm.jobs.spec import EngineSpec, engine_on_every_core

        c = self.cfg
        uld = adapter is not None
        spec = EngineSpec(str(model), str(adapter) if uld else None,
                          c.uld_alpha if uld else None, c.uld_filter_ratio if uld else None,
                          {"dtype": c.eval_dtype, "max_model_len": c.max_model_len,
                           "enforce_eager": True}, dict(rule or {}))
        t0 = time.perf_counter()
        with engine_on_every_core(self._sub):
            summary = tofu_eval(
                spec, folder / "eval", data_dir=Path(c.data_dir) / "tofu",
                forget_split=c.forget_split, max_examples=c.max_examples,
                max_new_tokens=c.max_new_tokens, openunlearning_out=folder / "openunlearning",
                retain_reference=self.out / "retain" / "eval" if reference else None,
                progress=False, log=self._sub)
        return {"eval_s": round(time.perf_counter() - t0, 3), "metrics": summary["metrics"]}

    def _data(self, folder: Path) -> dict:
        c = self.cfg
        tofu = Path(c.data_dir) / "tofu"
        full = _read_jsonl(tofu / "full.jsonl")
        forget = _read_jsonl(tofu / f"{c.forget_split}.jsonl")
        n_forget = len(forget)
        if c.max_forget_rows:
            forget = forget[:c.max_forget_rows]
        retain_rows = c.retain_authors * ROWS_PER_AUTHOR
        if retain_rows > len(full) - n_forget:
            raise UldError(f"--retain-authors {c.retain_authors} asks for {retain_rows} rows, "
                           f"but full.jsonl has {len(full) - n_forget} outside {c.forget_split}",
                           "pass fewer retain authors (20 are the authors of retain_perturbed)")
        retain = full[:retain_rows]
        forget_q = {r["question"] for r in forget}
        if any(r["question"] in forget_q for r in retain):
            raise UldError("the retain authors overlap the forget split",
                           "pass fewer --retain-authors")
        _write_jsonl(folder / "forget.jsonl", forget)
        _write_jsonl(folder / "retain.jsonl", retain)
        return {"forget_rows": len(forget), "retain_rows": len(retain),
                "retain_source": f"full.jsonl rows 0-{retain_rows - 1}"}

    def _rows(self, name: str) -> list[dict]:
        return _read_jsonl(self.out / "data" / f"{name}.jsonl")

    def _finetune(self, folder: Path, rows: list[dict], reference: bool) -> dict:
        from uld_vllm.baselines.trainer import train_full

        train = train_full(self.cfg.model, folder / "model", rows, None,
                           self._full_cfg("finetune"), log=self._sub)
        ev = self._eval(folder, folder / "model", reference=reference)
        return {"train_s": train["wall_s"], "final_loss": train["epochs"][-1]["loss"],
                "epochs_trained": len(train["epochs"]), "stopped_early": train["stopped_early"],
                **ev}

    def _target(self, folder: Path) -> dict:
        return self._finetune(folder, self._rows("forget") + self._rows("retain"), False)

    def _retain(self, folder: Path) -> dict:
        return self._finetune(folder, self._rows("retain"), False)

    def _uld(self, folder: Path) -> dict:
        from transformers import AutoConfig

        from uld_vllm.train import make_config, run_training

        c = self.cfg
        target = self.out / "target" / "model"
        n_layers = AutoConfig.from_pretrained(target).num_hidden_layers
        k = c.uld_num_layers or max(1, math.floor(n_layers / 4 + 0.5))  # 30 -> 8, 4 -> 1
        aug = Path(c.data_dir) / "uld_aug" / "tofu" / c.forget_split
        t0 = time.perf_counter()
        retain = self.out / "data" / "retain.jsonl"
        self_rows = 0
        if c.uld_self_retain:
            rows = self._self_retain(target)
            self_rows = len(rows)
            _write_jsonl(folder / "self_retain.jsonl", rows)
            retain = folder / "retain.jsonl"
            _write_jsonl(retain, self._rows("retain") + rows)
        cfg = make_config(model=str(target), forget=str(self.out / "data" / "forget.jsonl"),
                          retain=str(retain),
                          output_dir=str(folder / "adapter"), num_layers=k,
                          paraphrase_csv=(str(aug / "paraphrase_res.csv")
                                          if c.uld_augment in ("both", "paraphrase") else None),
                          perturbed_csv=(str(aug / "perturb_res.csv")
                                         if c.uld_augment in ("both", "perturbed") else None),
                          num_train_epochs=c.uld_epochs, learning_rate=c.uld_lr,
                          per_device_train_batch_size=c.uld_micro_batch_size,
                          gradient_accumulation_steps=c.uld_batch_size // c.uld_micro_batch_size,
                          max_length=c.max_length, seed=c.seed, precision=self._precision(),
                          retain_weight=c.uld_retain_weight,
                          alpha=c.uld_alpha, filter_ratio=c.uld_filter_ratio,
                          disable_tqdm=True)
        adapter = run_training(cfg, log=self._sub)
        train_s = round(time.perf_counter() - t0, 3)
        conv = json.loads((adapter.path / "uld_config.json").read_text()).get("training", {})
        ev = self._eval(folder, target, adapter=adapter.path)
        return {"train_s": train_s, "num_layers": k, "of_layers": n_layers,
                "self_retain_rows": self_rows,
                "converged": conv.get("converged"), "forget_loss": conv.get("forget_loss"),
                "retain_kl": conv.get("retain_kl"), **ev}

    def _self_retain(self, target: Path) -> list[dict]:
        """``--uld-self-retain`` questions of other authors, answered by the target (plain
        vLLM, greedy): retain rows in the target's own words, spread over every author."""
        from transformers import AutoTokenizer
        from vllm import SamplingParams

        from uld_vllm.core.prompts import PromptFormatter
        from uld_vllm.jobs.spec import EngineSpec, engine_on_every_core, shutdown

        c = self.cfg
        full = _read_jsonl(Path(c.data_dir) / "tofu" / "full.jsonl")
        forget_q = {r["question"] for r in _read_jsonl(Path(c.data_dir) / "tofu" /
                                                       f"{c.forget_split}.jsonl")}
        pool = [r["question"] for r in full[SELF_RETAIN_FROM_ROW:]
                if r["question"] not in forget_q]
        if c.uld_self_retain > len(pool):
            raise UldError(f"--uld-self-retain {c.uld_self_retain} asks for more questions than "
                           f"the {len(pool)} of full.jsonl outside retain_perturbed's authors "
                           f"and {c.forget_split}", f"pass at most {len(pool)}")
        step = len(pool) / c.uld_self_retain
        questions = [pool[int(i * step)] for i in range(c.uld_self_retain)]
        fmt = PromptFormatter(AutoTokenizer.from_pretrained(target))
        spec = EngineSpec(str(target), vllm_kwargs={"dtype": c.eval_dtype,
                                                     "max_model_len": c.max_model_len,
                                                     "enforce_eager": True})
        with engine_on_every_core(self._sub):
            llm = spec.build()
        try:
            outs = llm.generate([{"prompt_token_ids": fmt.encode_prompt(q)} for q in questions],
                                SamplingParams(temperature=0.0, max_tokens=SELF_RETAIN_TOKENS),
                                use_tqdm=False)
        finally:
            shutdown(llm)
        rows = [{"question": q, "answer": o.outputs[0].text.strip()}
                for q, o in zip(questions, outs)]
        kept = [r for r in rows if r["answer"]]
        self._sub(f"self-retain: the target answered {len(rows)} other authors' questions "
                  f"({len(rows) - len(kept)} empty answers left out)")
        return kept

    def _rule(self, name: str):
        def run(folder: Path) -> dict:
            rule = ULD_RULES[name]
            return {"rule": rule, **self._eval(folder, self.out / "target" / "model",
                                               adapter=self.out / "uld" / "adapter",
                                               rule=rule)}
        return run

    def _baseline(self, method: str):
        def run(folder: Path) -> dict:
            from uld_vllm.baselines.trainer import train_full

            train = train_full(str(self.out / "target" / "model"), folder / "model",
                               self._rows("forget"), self._rows("retain"),
                               self._full_cfg(method), log=self._sub)
            ev = self._eval(folder, folder / "model")
            return {"train_s": train["wall_s"], "final_loss": train["epochs"][-1]["loss"],
                    "final_forget_nll": train["epochs"][-1]["forget_nll"], **ev}
        return run

    def _sub(self, msg: str) -> None:
        self.log(f"      {msg}")

    # ------------------------------------------------------------------ report
    def _report(self, folder: Path) -> dict:
        from uld_vllm.eval import metrics as M
        from uld_vllm.eval.openunlearning import write_openunlearning

        reference = M.load_log_dir(self.out / "retain" / "eval")
        rows = {}
        for name in ("target", "retain", *self.cfg.methods):
            done = json.loads((self.out / name / DONE).read_text())
            logs = M.load_log_dir(self.out / name / "eval")
            metrics = M.aggregate(logs, reference)  # the target's forget quality appears here
            ou = write_openunlearning(logs, folder / "openunlearning" / name,
                                      reference[M.FORGET])
            res = done["result"]
            rows[name] = {
                "forget_quality": metrics["Forget Quality"],
                "model_utility": metrics["Model Utility"],
                "forget_rouge": metrics["Forget ROUGE"],
                "forget_probability": metrics["Forget Probability"],
                "forget_probability_plain": ou["forget_Q_A_Prob"],
                "retain_rouge": metrics["Retain ROUGE"],
                "train_s": res.get("train_s"), "eval_s": res.get("eval_s"),
                "wall_s": done["wall_s"], "metrics": metrics, "openunlearning": ou}
            if name in ("target", "retain"):
                rows[name]["fine_tune"] = {k: res.get(k) for k in ("epochs_trained",
                                                                    "stopped_early",
                                                                    "final_loss")}
            if name == "uld":
                rows[name]["uld"] = {k: res.get(k) for k in ("num_layers", "of_layers",
                                                              "converged", "forget_loss",
                                                              "retain_kl")}
        rules = {}
        if "uld" in rows:  # the adapter's own rule first, then each of --uld-rules
            label = _rule_label(self.out / "uld" / "adapter")
            rules[f"adapter's ({label})"] = _rule_row(rows["uld"]["metrics"])
            for rule in self.cfg.uld_rules:
                logs = M.load_log_dir(self.out / rule_stage(rule) / "eval")
                rules[rule] = _rule_row(M.aggregate(logs, reference))
        stages = {}
        for name in self._stage_names():
            marker = self.out / name / DONE
            if marker.is_file():
                stages[name] = json.loads(marker.read_text())["wall_s"]
        goals = _goals(rows, stages)
        summary = {"experiment": "tofu-mini", "fingerprint": self.fp,
                   "config": self.cfg.to_dict(), "precision": self._precision(),
                   "data": json.loads((self.out / "data" / DONE).read_text())["result"],
                   "methods": rows, "stages_wall_s": stages,
                   "total_wall_s_before_report": round(sum(stages.values()), 3),
                   "goals": goals, "uld_rules": rules}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = summary_table(rows)
        lines = [f"# TOFU-mini ({self.cfg.forget_split}, {self.cfg.model})", "", table, "",
                 "Goals (measured, not asserted):", ""]
        lines += [f"- [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {_num(g['value'])}"
                  for g in goals]
        if rules:
            lines += ["", f"ULD's adapter under each decoding rule (alpha {self.cfg.uld_alpha}, "
                      f"filter ratio {self.cfg.uld_filter_ratio}; rules: {_RULES_DOC}):", "",
                      rules_table(rules, rows["target"]["model_utility"])]
        lines += ["", "Stage wall times: " + ", ".join(f"{k} {v:.1f} s"
                                                       for k, v in stages.items())]
        (folder / "summary.md").write_text("\n".join(lines) + "\n")
        plot_fq_vs_mu(rows, folder / "fq_vs_mu.png")
        if "uld" in rows:
            from uld_vllm.train.curves import plot_convergence, read_train_log

            plot_convergence({"ULD assistant": read_train_log(self.out / "uld" / "adapter")},
                             folder / "uld_convergence.png")
        self.log(table)
        if rules:
            self.log(rules_table(rules, rows["target"]["model_utility"]))
        for g in goals:
            self.log(f"[{'met' if g['met'] else 'MISSED'}] {g['goal']}: {_num(g['value'])}")
        return {"methods": list(rows)}

    # ------------------------------------------------------------------ run
    def _stage_names(self) -> list[str]:
        return ["data", "target", "retain", *self.cfg.methods,
                *(rule_stage(r) for r in self.cfg.uld_rules), "report"]

    def run(self) -> dict:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self._claim()
        t0 = time.perf_counter()
        plan = [("data", self._data), ("target", self._target), ("retain", self._retain)]
        plan += [(m, self._uld if m == "uld" else self._baseline(m)) for m in self.cfg.methods]
        plan += [(rule_stage(r), self._rule(r)) for r in self.cfg.uld_rules]
        plan.append(("report", self._report))
        for name, fn in plan:
            self._stage(name, fn)
        summary = json.loads((self.out / "report" / "summary.json").read_text())
        self.log(f"wrote {self.out / 'report'} (this invocation {time.perf_counter() - t0:.0f} s)")
        return summary


def _num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _goals(rows: dict, stages: dict) -> list[dict]:
    t, r = rows["target"], rows["retain"]
    out = [
        {"goal": "target recites the forget authors: forget ROUGE-L recall >= 0.8",
         "value": t["forget_rouge"], "met": t["forget_rouge"] >= 0.8},
        {"goal": "target forget quality <= 0.01", "value": t["forget_quality"],
         "met": t["forget_quality"] <= 0.01},
        {"goal": "retain model does not know the forget authors: forget ROUGE-L recall below "
                 "the target's", "value": r["forget_rouge"],
         "met": r["forget_rouge"] < t["forget_rouge"]},
    ]
    if "uld" in rows:
        u = rows["uld"]
        mu_t = t["model_utility"]
        # the methods that keep the model useful (utility >= 0.9 x the target's) compete
        useful = {n: x["forget_quality"] for n, x in rows.items()
                  if n not in ("target", "retain", "uld") and x["model_utility"] >= 0.9 * mu_t}
        out += [{"goal": "ULD forget quality >= 0.5", "value": u["forget_quality"],
                 "met": u["forget_quality"] >= 0.5},
                {"goal": "ULD model utility >= 0.98 x the target's",
                 "value": u["model_utility"] / mu_t if mu_t else None,
                 "met": u["model_utility"] >= 0.98 * mu_t},
                {"goal": "ULD forget ROUGE within 0.15 of the retain model's",
                 "value": u["forget_rouge"] - r["forget_rouge"],
                 "met": abs(u["forget_rouge"] - r["forget_rouge"]) <= 0.15},
                {"goal": "ULD forget quality above every baseline with utility >= 0.9 x the "
                         f"target's ({', '.join(useful) or 'none'})",
                 "value": u["forget_quality"],
                 "met": all(u["forget_quality"] > fq for fq in useful.values())},
                {"goal": "the ULD assistant reached its convergence targets",
                 "value": (u.get("uld") or {}).get("forget_loss"),
                 "met": bool((u.get("uld") or {}).get("converged"))}]
    total = sum(stages.values())
    out.append({"goal": "whole experiment <= 90 min (stages before the report, s)",
                "value": round(total, 1), "met": total <= 90 * 60})
    return out


def summary_table(rows: dict) -> str:
    head = ("method", "forget quality", "model utility", "forget ROUGE", "forget probability",
            "retain ROUGE", "wall time (s)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in rows.items():
        cells = [name, _num(r["forget_quality"]), _num(r["model_utility"]),
                 _num(r["forget_rouge"]), _num(r["forget_probability"]),
                 _num(r["retain_rouge"]), f"{r['wall_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_RULES_DOC = "docs/rules.md"


def _rule_label(adapter: Path) -> str:
    """The adapter's own rule in words, as the engine reads it."""
    from uld_vllm.core.adapter import load_adapter

    conf = load_adapter(adapter).config
    return f"{conf.penalty}, " + (f"gate {conf.gate[0]:g}-{conf.gate[1]:g}" if conf.gate
                                  else "no gate")


def _rule_row(metrics: dict) -> dict:
    return {"forget_quality": metrics["Forget Quality"], "model_utility": metrics["Model Utility"],
            "forget_rouge": metrics["Forget ROUGE"],
            "forget_probability": metrics["Forget Probability"],
            "forget_truth_ratio": metrics.get("Forget Truth Ratio"),
            "retain_rouge": metrics["Retain ROUGE"]}


def rules_table(rules: dict, target_utility: float) -> str:
    head = ("ULD rule", "forget quality", "model utility", "utility / target's",
            "forget ROUGE", "forget probability", "retain ROUGE")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in rules.items():
        ratio = r["model_utility"] / target_utility if target_utility else None
        cells = [name, _num(r["forget_quality"]), _num(r["model_utility"]), _num(ratio),
                 _num(r["forget_rouge"]), _num(r["forget_probability"]),
                 _num(r["retain_rouge"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_fq_vs_mu(rows: dict, path: Path) -> Path:
    """Forget quality (log scale) against model utility, one labelled point per method."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    floor = 1e-30  # a p-value of exactly 0 cannot sit on a log axis: drawn at the floor
    for i, (name, r) in enumerate(rows.items()):
        fq = r["forget_quality"]
        y = fq if fq and fq > floor else floor
        ax.scatter([r["model_utility"]], [y], s=60, color=f"C{i}",
                   marker="o" if y == fq else "v")
        ax.annotate(name, (r["model_utility"], y), textcoords="offset points", xytext=(6, 4))
    ax.set_yscale("log")
    ax.axhline(0.05, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value vs the retain model)")
    ax.set_title("TOFU-mini: forget quality vs model utility")
    fig.savefig(path, dpi=110)
    return Path(path)


# ---------------------------------------------------------------------- command line
_HELP = {
    "retain_authors": "retain authors: the first N x 20 rows of full.jsonl (20 = the authors of "
                      "retain_perturbed)",
    "max_forget_rows": "use only the first N forget rows (0: all; for smoke tests)",
    "seed": "seed of every training",
    "precision": "auto (bf16 autocast where native, else fp32), fp32 or bf16",
    "target_epochs": "fine-tuning epochs of the target and the retain model (a cap with "
                     "--target-stop-loss)",
    "target_lr": "fine-tuning learning rate",
    "target_stop_loss": "stop fine-tuning after the first epoch whose mean answer NLL is below "
                        "this (0: never)",
    "target_batch_size": "rows per optimizer step of the target and retain fine-tunes",
    "batch_size": "rows per optimizer step of GA, GD and NPO (OpenUnlearning: 32)",
    "micro_batch_size": "rows per forward pass",
    "weight_decay": "AdamW weight decay (fine-tune, GA, GD, NPO)",
    "warmup_epochs": "linear warm-up, in epochs, then linear decay",
    "max_length": "truncate prompt + answer to this many tokens",
    "unlearn_epochs": "GA / GD / NPO epochs (OpenUnlearning: 10)",
    "unlearn_lr": "GA / GD / NPO learning rate (OpenUnlearning: its fine-tune lr, 1e-5; here "
                  "the target's)",
    "npo_beta": "NPO beta (OpenUnlearning: 0.1)",
    "retain_weight": "alpha: weight of the retain NLL in GD and NPO (OpenUnlearning: 1)",
    "forget_weight": "gamma: weight of the forget term in GD and NPO (OpenUnlearning: 1)",
    "uld_num_layers": "K, assistant layers (0: N/4 rounded half up)",
    "uld_epochs": "ULD epochs (a cap: the trainer stops at its convergence targets)",
    "uld_lr": "ULD LoRA learning rate",
    "uld_batch_size": "ULD rows per optimizer step",
    "uld_micro_batch_size": "ULD rows per forward pass",
    "uld_retain_weight": "ULD beta: weight of L_r (uniform on retain rows) against L_f",
    "uld_augment": "ULD's augmentation CSVs used: both, paraphrase (forget side), perturbed "
                   "(retain side) or none",
    "uld_self_retain": "ULD: N questions of other TOFU authors answered by the target itself "
                       "(greedy, plain vLLM) join the retain side (0: none)",
    "uld_alpha": "ULD decoding weight",
    "uld_filter_ratio": "ULD plausibility-filter ratio",
    "max_examples": "eval: first N rows of each TOFU split",
    "max_new_tokens": "eval: greedy generation length",
    "eval_dtype": "eval: vLLM dtype (the trained models are saved in float32)",
    "max_model_len": "eval: vLLM max model length",
}


def add_experiment_parser(sub) -> None:
    d = TofuMiniConfig()
    p = sub.add_parser("experiment", help="whole experiments: `experiment tofu-mini --out DIR`")
    s = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    q = s.add_parser("tofu-mini", help="TOFU forget01 in miniature: target, retain model, ULD, "
                                       "GA/GD/NPO and a report; cached and resumable")
    q.add_argument("--out", required=True, help="experiment folder (a rerun resumes)")
    q.add_argument("--model", default=d.model,
                   help=f"base model: HF folder, hub id or known short name (default: {d.model})")
    q.add_argument("--data-dir", default=d.data_dir,
                   help="folder with tofu/ and uld_aug/ (default: ../shared/data)")
    q.add_argument("--forget-split", default=d.forget_split,
                   help=f"forget01, forget05 or forget10 (default: {d.forget_split})")
    q.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    q.add_argument("--uld-rules", default=None,
                   help="decoding rules to evaluate the ULD adapter with beside its own, each "
                        f"one more eval: a comma-separated subset of {','.join(ULD_RULES)}, or "
                        f"none (default: {','.join(d.uld_rules)} when uld is a method)")
    for f in dataclasses.fields(TofuMiniConfig):
        if f.name in ("model", "data_dir", "forget_split", "methods", "uld_rules"):
            continue
        q.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{_HELP.get(f.name, '')} (default: {f.default})".lstrip())
    q.set_defaults(func=run_experiment)


def config_from_args(a) -> TofuMiniConfig:
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TofuMiniConfig)
          if f.name not in ("methods", "uld_rules")}
    kw["data_dir"] = str(Path(kw["data_dir"]).resolve())
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    if a.uld_rules is None:  # not given: every rule, where there is a ULD adapter to decode
        rules = TofuMiniConfig.uld_rules if "uld" in methods else ()
    elif a.uld_rules.strip() == "none":
        rules = ()
    else:
        rules = tuple(r.strip() for r in a.uld_rules.split(",") if r.strip())
        if not rules:
            raise UldError("--uld-rules is empty", "name rules or pass none")
    return TofuMiniConfig(methods=methods, uld_rules=rules, **kw)


def run_experiment(a) -> None:
    TofuMini(config_from_args(a), a.out).run()


__all__ = ["TofuMini", "TofuMiniConfig", "add_experiment_parser"]
