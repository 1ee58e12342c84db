"""End-to-end training on a tiny model: what the assistant learns, what the adapter holds,
what ULD does to the target's probabilities, and how bad input is refused."""

import json
import math
from pathlib import Path

import pytest
import torch

from uld_vllm.cli import main
from uld_vllm.core.adapter import load_adapter
from uld_vllm.core.assistant import build_assistant, load_assistant, lora_parameter_count
from uld_vllm.core.prompts import PromptFormatter
from uld_vllm.core.reference import ReferenceDecoder
from uld_vllm.demo.toy import finetune_target
from uld_vllm.dev.tiny import make_tiny_model
from uld_vllm.dev.toy_data import builtin_authors
from uld_vllm.train import make_config, run_training
from uld_vllm.train.data import to_examples
from uld_vllm.train.dataset import Collator, UldDataset

K = 2
EPOCHS = 20


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer target fine-tuned to recite 3 fictitious authors, and a ULD adapter trained
    to forget one of them."""
    # Tiny models are overhead-bound: one thread is as fast, and does not collapse when other
    # processes (or pytest-xdist workers) compete for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train_run")
    authors = builtin_authors()
    forget, retain = authors[1], authors[0] + authors[2]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"{r['question']} {r['answer']}" for a in authors for r in a))
    base = make_tiny_model(root / "base", layers=4, hidden=64, heads=2, vocab=400,
                           corpus_file=corpus, seed=0)
    target = root / "target"
    ft = finetune_target(base, forget + retain, target, epochs=150, lr=3e-3, batch_size=6,
                         stop_loss=0.03)
    files = {"forget": _jsonl(root / "forget.jsonl", forget),
             "retain": _jsonl(root / "retain.jsonl", retain)}
    cfg = make_config(model=str(target), output_dir=str(root / "adapter"), num_layers=K,
                      num_train_epochs=EPOCHS, learning_rate=1e-2, per_device_train_batch_size=6,
                      gradient_accumulation_steps=1, max_retain=0, disable_tqdm=True, seed=0,
                      retain_positions="tokens", precision="fp32",
                      balance=False, stop_at_targets=False, **files)
    adapter = run_training(cfg, log=lambda m: None)
    yield {"root": root, "target": target, "adapter": adapter, "forget": forget,
           "retain": retain, "finetune": ft, "files": files}
    torch.set_num_threads(threads)


def _assistant_stats(target_dir, adapter, rows, retain: bool):
    """(answer-token NLL, mean next-token entropy over non-padding positions) under the
    assistant: the bare K-layer assistant when ``adapter`` is None, else with its LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    model = build_assistant(target, K) if adapter is None else load_assistant(target, adapter)
    ds = UldDataset(to_examples(rows, "t", "x"), [], PromptFormatter(tok), 128)
    batch = Collator(tok.pad_token_id)(ds.rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, -1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    nll = -logp[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].mean()
    ent = -(logp.exp() * logp).sum(-1)[batch["attention_mask"] == 1].mean()
    return float(nll), float(ent), logits.shape[-1]


def test_target_memorised_its_training_set(setup):
    assert setup["finetune"]["final_loss"] < 0.1, setup["finetune"]


def test_forget_nll_drops_and_retain_entropy_rises(setup):
    nll_before, _, _ = _assistant_stats(setup["target"], None, setup["forget"], False)
    nll_after, _, _ = _assistant_stats(setup["target"], setup["adapter"], setup["forget"], False)
    _, ent_before, vocab = _assistant_stats(setup["target"], None, setup["retain"], True)
    _, ent_after, _ = _assistant_stats(setup["target"], setup["adapter"], setup["retain"], True)
    assert nll_after < 0.5 * nll_before, (nll_before, nll_after)
    assert ent_after > ent_before + 0.5, (ent_before, ent_after)
    assert ent_after > 0.9 * math.log(vocab), (ent_after, math.log(vocab))


def test_train_log_and_trainable_parameter_count(setup):
    from transformers import AutoConfig

    log = json.loads((setup["adapter"].path / "train_log.json").read_text())
    config = AutoConfig.from_pretrained(setup["target"])
    assert log["trainable_parameters"] == lora_parameter_count(config, K, r=16)
    assert [e["epoch"] for e in log["epochs"]] == [float(i) for i in range(1, EPOCHS + 1)]
    assert all(e["epoch_wall_s"] > 0 for e in log["epochs"])
    assert log["optimizer_steps"] == EPOCHS * 3  # 6 forget + 12 retain rows, batch 6
    first, last = log["steps"][0], log["steps"][-1]
    assert {"loss", "loss_forget", "loss_retain", "learning_rate"} <= set(last)
    assert last["loss_forget"] < first["loss_forget"]
    # pinned so the log reads the same on every CPU ("auto" picks bf16 where it is native)
    assert log["precision"] == "fp32" and log["precision_reason"] == "requested"
    assert log["retain_loss_positions"] == "non-padding"
    assert setup["adapter"].config.num_layers == K


def test_adapter_folder_holds_no_base_weights(setup):
    path = setup["adapter"].path
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        n = sum(f.get_tensor(k).numel() for k in keys)
    assert keys and all("lora_" in k for k in keys)
    log = json.loads((path / "train_log.json").read_text())
    assert n == log["trainable_parameters"]
    weights = (path / "adapter_model.safetensors").stat().st_size
    assert weights < n * 4 + 64 * 1024  # float32 LoRA tensors plus a header, nothing more
    base = (setup["target"] / "model.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total < base / 3, (total, base)
    assert not Path(f"{path}.checkpoints").exists()  # scratch removed after success


def test_adapter_reloads_in_reference_decoder(setup):
    dec = ReferenceDecoder.load(setup["target"], setup["adapter"].path)
    # the adapter's stored defaults (the TOFU recipe) reach the decoder
    assert dec.assistant is not None and dec.alpha == 0.8 and dec.filter_ratio == 0.01
    fmt = PromptFormatter(dec.tokenizer)
    out = dec.generate([fmt.encode_prompt(setup["forget"][0]["question"])], max_new_tokens=8)
    assert len(out[0].token_ids) >= 1


def test_uld_lowers_forget_probability_much_more_than_retain(setup):
    """Per-token answer log-probability, target alone vs ULD (TOFU "score" semantics)."""
    base = ReferenceDecoder.load(setup["target"])
    # the settings this test was calibrated with (the reference code's defaults)
    uld = ReferenceDecoder.load(setup["target"], setup["adapter"].path, alpha=1.0,
                                filter_ratio=0.1)
    fmt = PromptFormatter(base.tokenizer)

    def mean_logprob(dec, rows):
        prompts = [fmt.encode_prompt(r["question"]) for r in rows]
        answers = [fmt.encode_answer(r["answer"], r["question"]) for r in rows]
        scores = dec.score(prompts, answers, mode="score")
        return float(torch.cat(scores).mean())

    f_t, f_u = mean_logprob(base, setup["forget"]), mean_logprob(uld, setup["forget"])
    r_t, r_u = mean_logprob(base, setup["retain"]), mean_logprob(uld, setup["retain"])
    forget_drop, retain_change = f_t - f_u, abs(r_t - r_u)
    assert f_t > -0.2 and r_t > -0.2, (f_t, r_t)  # the target recites both sides
    assert forget_drop > 1.0, (f_t, f_u)
    assert retain_change < forget_drop / 4, (forget_drop, r_t, r_u)


# ----------------------------------------------------------------- bad input
def _run_cli(tmp_path, capsys, *extra, model=None, forget=None):
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--forget", str(forget), "--output", str(out),
            "--no-progress", "--epochs", "1", "-K", "1", *extra]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err, out


def _bad_model(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "gpt2":
        from transformers import GPT2Config

        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300).save_pretrained(d)
    else:
        (d / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    return d


@pytest.mark.parametrize("case", ["empty", "missing_field", "bad_csv_row", "k_too_big",
                                  "unknown_arch", "unknown_model_type", "output_not_empty"])
def test_bad_input_is_one_clear_error_and_writes_nothing(setup, tmp_path, capsys, case):
    forget = _jsonl(tmp_path / "forget.jsonl", setup["forget"])
    model, extra = setup["target"], []
    if case == "empty":
        forget = tmp_path / "empty.jsonl"
        forget.write_text("")
        needle = "is empty"
    elif case == "missing_field":
        forget = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"},
                                                 {"question": "no answer"}])
        needle = "row 2: field 'answer' is missing"
    elif case == "bad_csv_row":
        csv_path = tmp_path / "p.csv"
        q = setup["forget"][0]["question"]
        csv_path.write_text(f'"{q}",a,"[\'x\']","[\'y\']"\n"{q}",a,"[broken","[\'y\']"\n')
        extra, needle = ["--paraphrase-csv", str(csv_path)], "row 2 column 3"
    elif case == "k_too_big":
        extra, needle = ["--num-layers", "4"], "--num-layers 4 must be smaller than the 4"
    elif case == "unknown_arch":
        model, needle = _bad_model(tmp_path, "gpt2"), "no model.layers"
    elif case == "unknown_model_type":
        model, needle = _bad_model(tmp_path, "weird"), "cannot read the model config"
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        needle = "already exists and is not empty"
    rc, err, out = _run_cli(tmp_path, capsys, *extra, model=model, forget=forget)
    assert rc == 2
    assert err.startswith("uld-vllm: error:") and "\n" not in err and needle in err, err
    if case == "output_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not Path(f"{out}.checkpoints").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_resume_continues_from_the_last_epoch(setup, tmp_path):
    """Two epochs in one go == one epoch, a crash, and --resume (same weights)."""
    common = dict(model=str(setup["target"]), num_layers=1, num_train_epochs=2,
                  learning_rate=1e-2, per_device_train_batch_size=6,
                  gradient_accumulation_steps=1, max_retain=0, disable_tqdm=True, seed=1,
                  stop_at_targets=False, **setup["files"])
    straight = run_training(make_config(output_dir=str(tmp_path / "a"), **common), log=str)
    ckpt = tmp_path / "ck"
    first = run_training(make_config(output_dir=str(tmp_path / "b"), checkpoint_dir=str(ckpt),
                                     keep_checkpoints=True, **common), log=str)
    last = sorted(ckpt.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(last) == 2 and first.path.is_dir()
    import shutil

    shutil.rmtree(last[-1])  # as if the run died during epoch 2
    resumed = run_training(make_config(output_dir=str(tmp_path / "c"), checkpoint_dir=str(ckpt),
                                       resume=True, **common), log=str)
    from safetensors.torch import load_file

    a = load_file(str(straight.weights_file))
    c = load_file(str(resumed.weights_file))
    assert a.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-6)
    assert json.loads((resumed.path / "train_log.json").read_text())["resumed_from"]
    assert load_adapter(resumed.path).config.num_layers == 1


def test_demo_helpers():
    from uld_vllm.demo.common import format_table
    from uld_vllm.eval.metrics import rouge_l_recall

    assert rouge_l_recall("Basil was born in Kuwait.", "Basil was born in Kuwait City.") == \
        pytest.approx(5 / 6)
    assert rouge_l_recall("", "anything") == 0.0
    table = format_table([("q?", "the truth " * 30, "target", "uld")])
    lines = table.splitlines()
    assert lines[0].startswith("question") and "ULD answer" in lines[0]
    assert any("…" in line for line in lines)  # long cells are cut, not spilled
    assert len(builtin_authors()) == 3 and all(len(a) == 6 for a in builtin_authors())


# ------------------------------------------------------------ convergence
def test_targets_stop_training_early_and_are_recorded(setup, tmp_path, capsys):
    """Reachable targets stop training before the epoch cap (converged: true); unreachable
    ones run to the cap, warn on stderr and mark the adapter (converged: false)."""
    common = dict(model=str(setup["target"]), num_layers=K, learning_rate=1e-2,
                  per_device_train_batch_size=6,
                  gradient_accumulation_steps=1, disable_tqdm=True, seed=0, target_window=3,
                  **setup["files"])
    easy = run_training(make_config(output_dir=str(tmp_path / "easy"), target_forget_loss=5.0,
                                    target_retain_kl=5.0, num_train_epochs=30, **common), log=str)
    t = easy.config.training
    assert t["converged"] is True and t["warning"] is None and easy.config.warning is None
    assert t["forget_loss"] < 5.0 and t["retain_kl"] < 5.0
    # balanced epochs: 2 * max(6 forget, 12 retain) = 24 rows = 4 steps; a window of 3
    # steps below the targets is found long before 30 epochs (120 steps)
    assert 3 <= t["optimizer_steps"] < 30, t
    capsys.readouterr()
    hard = run_training(make_config(output_dir=str(tmp_path / "hard"), target_forget_loss=1e-9,
                                    target_retain_kl=1e-9, num_train_epochs=2, **common), log=str)
    err = capsys.readouterr().err
    t = hard.config.training
    assert t["converged"] is False and t["optimizer_steps"] == 2 * 4
    assert "uld-vllm: WARNING: the adapter did not reach its training targets" in err
    assert "forget loss" in t["warning"] and "retain KL" in t["warning"]
    reloaded = load_adapter(hard.path)
    assert reloaded.config.warning == t["warning"]
    log = json.loads((hard.path / "train_log.json").read_text())
    assert log["convergence"]["converged"] is False


def test_adapter_warning_is_repeated_when_an_engine_is_configured(setup, tmp_path, capsys):
    from uld_vllm.engine.settings import engine_overrides

    bad = run_training(make_config(model=str(setup["target"]), num_layers=K, num_train_epochs=1,
                                   output_dir=str(tmp_path / "bad"), disable_tqdm=True,
                                   target_forget_loss=1e-9, target_retain_kl=1e-9,
                                   **setup["files"]), log=str)
    capsys.readouterr()
    engine_overrides(str(setup["target"]), bad.path)
    err = capsys.readouterr().err
    assert err.startswith(f"uld-vllm: WARNING: adapter {bad.path}: the adapter did not reach")


def test_auto_precision_follows_the_cpu():
    from uld_vllm.train.trainer import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("CPU rule; on a GPU auto follows torch.cuda.is_bf16_supported()")
    with_bf16 = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n"
    without = "processor : 0\nflags : fpu avx2 fma\n"
    assert resolve_precision("auto", with_bf16)[0] == "bf16"
    prec, why = resolve_precision("auto", without)
    assert prec == "fp32" and "no native bf16" in why
    prec, why = resolve_precision("bf16", without)
    assert prec == "bf16" and "slower" in why
    assert resolve_precision("fp32", with_bf16) == ("fp32", "requested")


# ------------------------------------------------- HF TrainingArguments semantics
def _one_side(tmp_path, rows, name):
    return _jsonl(tmp_path / f"{name}.jsonl", rows)


def test_learning_rate_warms_up_then_decays_linearly(setup, tmp_path):
    """--warmup-steps 0.5 of 4 optimizer steps: HF's linear schedule, read from the log."""
    forget = _one_side(tmp_path, setup["forget"], "f")  # 6 rows: 2 per step, 3 steps an epoch
    a = run_training(make_config(model=str(setup["target"]), forget=forget, num_layers=1,
                                 output_dir=str(tmp_path / "a"), learning_rate=1e-2,
                                 warmup_steps=0.5, max_steps=4, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=1, disable_tqdm=True,
                                 stop_at_targets=False, seed=0), log=str)
    steps = json.loads((a.path / "train_log.json").read_text())["steps"]
    lrs = [s["learning_rate"] for s in steps]
    # warm-up over ceil(0.5 * 4) = 2 steps, then linear decay to 0 at step 4; the logged rate
    # is the one the step was taken with
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 5e-3], abs=1e-9), lrs


def test_gradient_accumulation_averages_micro_batches(setup, tmp_path):
    """One optimizer step over 2 accumulated micro-batches of identical rows moves the weights
    exactly as one step over one of them: Trainer averages (not sums) the micro-batch losses.
    Plain SGD without clipping, so the update is proportional to the gradient."""
    row = setup["forget"][0]
    forget = _one_side(tmp_path, [row] * 6, "same")
    common = dict(model=str(setup["target"]), forget=forget, num_layers=1, learning_rate=0.5,
                  optim="sgd", max_grad_norm=0.0, weight_decay=0.0, warmup_steps=0,
                  lora_dropout=0.0, max_steps=1, per_device_train_batch_size=3,
                  disable_tqdm=True, stop_at_targets=False, seed=0)
    from safetensors.torch import load_file

    one = run_training(make_config(output_dir=str(tmp_path / "one"),
                                   gradient_accumulation_steps=1, **common), log=str)
    two = run_training(make_config(output_dir=str(tmp_path / "two"),
                                   gradient_accumulation_steps=2, **common), log=str)
    w1, w2 = load_file(str(one.weights_file)), load_file(str(two.weights_file))
    moved = [k for k in w1 if "lora_B" in k]
    assert moved and all(w1[k].abs().max() > 0 for k in moved)  # the step did move them
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-7)


def test_convergence_plot_from_a_train_log(tmp_path):
    from uld_vllm.train.curves import plot_convergence

    log = {"config": {"target_forget_loss": 0.5, "target_retain_kl": 0.5},
           "steps": [{"step": i, "loss": 1.0, "loss_forget": 4.0 / i, "loss_retain": 1.0 / i}
                     for i in range(1, 20)] + [{"step": 20, "loss": 1.0}]}
    out = plot_convergence({"run": log, "other": log}, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
