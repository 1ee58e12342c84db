"""GA / GD / NPO losses against hand-computed values, and the full-model trainer on a tiny
model (HF folder written, NPO reference computed once, GA raising the forget NLL, bad input)."""

import json
import math

import pytest
import torch

from uld_vllm.baselines.losses import UnlearnLoss
from uld_vllm.cli import main
from uld_vllm.errors import UldError

# one row, 4 positions, vocabulary 3; labels: prompt (-100), two answer tokens, padding
LOGITS = torch.tensor([[[0.0, 0.0, 0.0],       # predicts labels[1] = -100: ignored
                        [2.0, 0.0, 0.0],       # predicts labels[2] = 0
                        [0.0, 1.0, 0.0],       # predicts labels[3] = 2
                        [5.0, 5.0, 5.0]]])     # last position predicts nothing
LABELS = torch.tensor([[-100, -100, 0, 2]])
# hand: -log softmax([2,0,0])[0] = log(e^2 + 2) - 2; -log softmax([0,1,0])[2] = log(2 + e) - 0
NLL_A = math.log(math.e ** 2 + 2) - 2
NLL_B = math.log(2 + math.e)


def test_nll_reductions_match_hand_values():
    assert UnlearnLoss.sequence_nll(LOGITS, LABELS).item() == pytest.approx(NLL_A + NLL_B)
    assert UnlearnLoss.mean_nll(LOGITS, LABELS).item() == pytest.approx((NLL_A + NLL_B) / 2)
    # two rows: the token mean weighs tokens, not rows
    logits = torch.cat([LOGITS, LOGITS])
    labels = torch.tensor([[-100, -100, 0, 2], [-100, -100, -100, 2]])
    assert UnlearnLoss.mean_nll(logits, labels).item() == pytest.approx((NLL_A + 2 * NLL_B) / 3)
    assert UnlearnLoss.sequence_nll(logits, labels).tolist() == pytest.approx(
        [NLL_A + NLL_B, NLL_B])


def test_gradient_ascent_and_difference():
    assert UnlearnLoss.gradient_ascent(LOGITS, LABELS).item() == pytest.approx(
        -(NLL_A + NLL_B) / 2)
    r_logits = torch.tensor([[[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    r_labels = torch.tensor([[-100, 1]])
    r_nll = math.log(2 + math.e ** 3) - 0.0  # -log softmax([0,0,3])[1]
    gd = UnlearnLoss.gradient_difference(LOGITS, LABELS, r_logits, r_labels, gamma=0.5,
                                         alpha=2.0)
    assert gd.item() == pytest.approx(0.5 * -(NLL_A + NLL_B) / 2 + 2.0 * r_nll)


def test_npo_hand_values_and_no_gradient_into_the_reference():
    s = torch.tensor([2.0, 1.0], requires_grad=True)
    ref = torch.tensor([1.0, 1.0], requires_grad=True)
    beta = 0.1

    def logsig(x):
        return -math.log1p(math.exp(-x))

    want = -(2 / beta) * (logsig(beta * 1.0) + logsig(0.0)) / 2
    loss = UnlearnLoss.npo_forget(s, ref, beta=beta)
    assert loss.item() == pytest.approx(want)
    loss.backward()
    assert ref.grad is None  # the reference is a constant
    # d/ds_i of -(2/beta) mean logsigmoid(beta (s_i - ref_i)) = -(1/n) 2 sigmoid(-beta (s-ref))
    want_grad = [-(2 / 2) / (1 + math.exp(beta * 1.0)), -(2 / 2) / (1 + math.exp(0.0))]
    assert s.grad.tolist() == pytest.approx(want_grad)
    # at the start (model == reference) NPO is (2/beta) log 2, whatever the NLLs
    same = torch.tensor([3.0, 7.0])
    assert UnlearnLoss.npo_forget(same, same, beta=0.5).item() == pytest.approx(4 * math.log(2))
    with pytest.raises(ValueError):
        UnlearnLoss.npo_forget(same, same, beta=0.0)


def test_npo_with_retain_term_is_gamma_npo_plus_alpha_nll():
    ref = torch.tensor([NLL_A + NLL_B + 1.0])
    r_logits, r_labels = torch.tensor([[[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]]), \
        torch.tensor([[-100, 1]])
    npo = UnlearnLoss.npo_forget(UnlearnLoss.sequence_nll(LOGITS, LABELS), ref, beta=0.1)
    full = UnlearnLoss.npo(LOGITS, LABELS, ref, r_logits, r_labels, beta=0.1, gamma=2.0,
                           alpha=3.0)
    r_nll = math.log(2 + math.e ** 3)
    assert full.item() == pytest.approx(2.0 * npo.item() + 3.0 * r_nll)
    alone = UnlearnLoss.npo(LOGITS, LABELS, ref, beta=0.1)
    assert alone.item() == pytest.approx(npo.item())


def test_no_answer_tokens_is_a_connected_zero():
    labels = torch.full((1, 4), -100)
    logits = LOGITS.clone().requires_grad_()
    loss = UnlearnLoss.gradient_ascent(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


@pytest.fixture(scope="module")
def rows(shared_data):
    full = [json.loads(x) for x in (shared_data / "tofu" / "full.jsonl").read_text().splitlines()]
    return full[3996:4000], full[0:6]  # 4 forget rows (forget01's last), 6 retain rows


def _forget_nll(model_dir, rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uld_vllm.baselines.trainer import ForgetRetainData, _tokenized
    from uld_vllm.core.prompts import PromptFormatter

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = ForgetRetainData(_tokenized(rows, "rows", PromptFormatter(tok), 128), [],
                            tok.pad_token_id)
    b = data.collate([(i, None) for i in range(len(data))])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return UnlearnLoss.sequence_nll(logits, b["labels"])


def test_npo_reference_is_computed_once_from_the_starting_model(tiny_llama, rows, tmp_path,
                                                                monkeypatch):
    from uld_vllm.baselines import trainer as T

    forget, retain = rows
    seen = []
    real = UnlearnLoss.npo_forget

    def spy(seq_nll, ref_seq_nll, *, beta):
        seen.append(ref_seq_nll.detach().clone())
        return real(seq_nll, ref_seq_nll, beta=beta)

    monkeypatch.setattr(UnlearnLoss, "npo_forget", staticmethod(spy))
    calls = {"n": 0}
    real_seq = UnlearnLoss.sequence_nll

    def count(logits, labels):
        if not torch.is_grad_enabled():
            calls["n"] += 1
        return real_seq(logits, labels)

    monkeypatch.setattr(UnlearnLoss, "sequence_nll", staticmethod(count))
    cfg = T.FullTrainConfig(method="npo", num_train_epochs=2, learning_rate=1e-3,
                            per_device_train_batch_size=2, gradient_accumulation_steps=1,
                            warmup_epochs=0, max_length=128)
    log = T.train_full(str(tiny_llama), tmp_path / "npo", forget, retain, cfg, log=lambda m: None)
    monkeypatch.undo()
    assert calls["n"] == 2  # one no-grad pass over the 4 forget rows in micro-batches of 2
    assert len(seen) == 4  # 2 epochs x 2 micro-batches
    start = _forget_nll(tiny_llama, forget)
    # each micro-batch saw the starting model's NLL of its own rows, in epoch 2 as in epoch 1
    got = sorted(torch.cat(seen[:2]).tolist())
    assert got == pytest.approx(sorted(start.tolist()), rel=1e-4)
    assert sorted(torch.cat(seen[2:]).tolist()) == pytest.approx(got)
    assert log["npo_reference_s"] is not None and log["rows"] == {"forget": 4, "retain": 6}


def test_trainer_writes_a_float32_hf_folder_and_ga_raises_the_forget_nll(tiny_llama, rows,
                                                                        tmp_path):
    from transformers import AutoConfig

    forget, _ = rows
    out = tmp_path / "ga"
    r = main(["baseline", "ga", "--model", str(tiny_llama), "--forget", _jsonl(tmp_path, forget),
              "--output", str(out), "--epochs", "2", "--lr", "1e-3", "--batch-size", "4",
              "--micro-batch-size", "2", "--warmup-epochs", "0", "--max-length", "128"])
    assert r == 0
    assert AutoConfig.from_pretrained(out).torch_dtype == torch.float32
    log = json.loads((out / "unlearn_log.json").read_text())
    assert log["method"] == "ga" and log["optimizer_steps"] == 2 and len(log["epochs"]) == 2
    assert log["config"]["learning_rate"] == 1e-3 and log["wall_s"] > 0
    for s in log["steps"]:
        assert s["loss"] == pytest.approx(-s["forget_nll"], rel=1e-5)
    before, after = _forget_nll(tiny_llama, forget), _forget_nll(out, forget)
    assert after.sum() > before.sum() + 1.0


def test_finetune_stops_at_the_stop_loss_and_only_finetune_takes_one(tiny_llama, rows,
                                                                      tmp_path):
    from uld_vllm.baselines.trainer import FullTrainConfig, train_full

    forget, _ = rows
    cfg = FullTrainConfig(method="finetune", num_train_epochs=3, learning_rate=1e-3,
                          per_device_train_batch_size=4, gradient_accumulation_steps=1,
                          warmup_epochs=0, max_length=128, stop_loss=1e6)
    log = train_full(str(tiny_llama), tmp_path / "ft", forget, None, cfg, log=lambda m: None)
    assert len(log["epochs"]) == 1 and log["stopped_early"] and log["optimizer_steps"] == 1
    cfg.stop_loss = 1e-9  # never reached: every epoch runs
    log = train_full(str(tiny_llama), tmp_path / "ft2", forget, None, cfg, log=lambda m: None)
    assert len(log["epochs"]) == 3 and not log["stopped_early"]
    with pytest.raises(UldError, match="fine-tuning only"):
        FullTrainConfig(method="ga", stop_loss=0.1)


def _jsonl(tmp_path, rows):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("argv,needle", [
    (["baseline", "gx"], "unknown method 'gx'"),
    (["baseline", "gd"], "gd needs retain rows"),
    (["baseline", "npo", "--beta", "0"], "--beta must be > 0"),
    (["baseline", "ga", "--batch-size", "5", "--micro-batch-size", "2"], "not a multiple"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, needle, tiny_llama, rows,
                                                         tmp_path, capsys):
    out = tmp_path / "out"
    argv = argv + ["--model", str(tiny_llama), "--forget", _jsonl(tmp_path, rows[0]),
                   "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uld-vllm: error: ") and needle in err[0]
    assert not out.exists()


def _reference_run(model_dir, forget_rows, retain_rows, method, *, epochs, lr, batch, micro,
                   warmup_epochs, bf16=False, seed=0, weight_decay=0.01, beta=0.1, gamma=1.0,
                   alpha=1.0):
    """The baselines' recipe as a plain PyTorch loop, written apart from the trainer so that
    the two can be compared: per epoch a shuffle of the forget rows and one random retain row
    per forget row (one generator, seeded once), steps of ``batch`` rows as micro-batches each
    weighted by its share of the step's rows, clip to norm 1, AdamW with no decay on norms,
    linear warm-up then linear decay, NPO's reference from the starting model. Returns the
    per-step losses and the final model's summed answer NLL per forget row."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uld_vllm.core.prompts import PromptFormatter
    from uld_vllm.train.data import to_examples
    from uld_vllm.train.dataset import Collator, encode_example, pad_id_of

    tok = AutoTokenizer.from_pretrained(model_dir)
    fmt, collate = PromptFormatter(tok), Collator(pad_id_of(tok))

    def encode(rows):
        return [r for ex in to_examples(rows, "rows", "forget")
                for r in encode_example(ex, fmt, 128, False)]

    fg, rt = encode(forget_rows), (encode(retain_rows) if method in ("gd", "npo") else [])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def logits(rows, autocast=bf16):
        b = collate(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return out, b["labels"]

    def forget_nll(autocast=bf16):
        with torch.no_grad():
            return torch.cat([UnlearnLoss.sequence_nll(*logits(fg[s:s + micro], autocast))
                              for s in range(0, len(fg), micro)])

    ref = forget_nll()
    per_epoch = math.ceil(len(fg) / batch)
    total, warm = per_epoch * epochs, round(warmup_epochs * per_epoch)
    params = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    sched = LambdaLR(opt, lambda t: t / warm if t < warm else (total - t) / (total - warm))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(fg), generator=g).tolist()
        pick = torch.randint(len(rt), (len(fg),), generator=g).tolist() if rt else []
        for s in range(0, len(order), batch):
            step = 0.0
            for m in range(s, min(s + batch, len(order)), micro):
                pos = range(m, min(m + micro, len(order), s + batch))
                f = logits([fg[order[i]] for i in pos])
                r = logits([rt[pick[i]] for i in pos]) if rt else (None, None)
                if method == "finetune":
                    loss = UnlearnLoss.mean_nll(*f)
                elif method == "ga":
                    loss = UnlearnLoss.gradient_ascent(*f)
                elif method == "gd":
                    loss = UnlearnLoss.gradient_difference(*f, *r, gamma=gamma, alpha=alpha)
                else:
                    loss = UnlearnLoss.npo(*f, ref[[order[i] for i in pos]], *r, beta=beta,
                                           gamma=gamma, alpha=alpha)
                w = len(pos) / len(order[s:s + batch])
                (loss * w).backward()
                step += loss.item() * w
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(step)
    model.eval()
    return losses, forget_nll(autocast=False)  # as the saved float32 folder is scored


@pytest.mark.parametrize("method,precision", [("finetune", "fp32"), ("ga", "fp32"),
                                              ("gd", "fp32"), ("npo", "fp32"), ("npo", "bf16")])
def test_trainer_matches_a_reference_loop(method, precision, tiny_llama, shared_data,
                                          tmp_path):
    from uld_vllm.baselines.trainer import FullTrainConfig, train_full

    full = [json.loads(x) for x in (shared_data / "tofu" / "full.jsonl").read_text().splitlines()]
    # 7 forget rows in steps of 4 as micro-batches of 2: the last step's micro-batches hold 2
    # and 1 rows (weights 2/3 and 1/3), and 3 epochs give a warm-up step and a decay
    forget, retain = full[3993:4000], full[0:6]
    cfg = FullTrainConfig(method=method, num_train_epochs=3, learning_rate=1e-3,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          warmup_epochs=1, max_length=128, precision=precision)
    log = train_full(str(tiny_llama), tmp_path / "out", forget, retain, cfg, log=lambda m: None)
    losses, nll = _reference_run(tiny_llama, forget, retain, method, epochs=3, lr=1e-3,
                                 batch=4, micro=2, warmup_epochs=1, bf16=precision == "bf16")
    assert len(losses) == log["optimizer_steps"] == 6
    # Same maths on the same rows in the same order, and the updates came out bit-identical
    # when this was written (equal grad norms at every step); the logged loss still differs
    # by ~1e-7 relative, the Trainer summing a step's micro-batch losses in float32 where this
    # loop sums them in float64. 1e-5 leaves room for that, and for float32 rounding of other
    # kernels, while a change of data order, micro-batch weighting, NPO reference or schedule
    # moves the losses by 2e-2 or more
    assert [s["loss"] for s in log["steps"]] == pytest.approx(losses, rel=1e-5)
    assert _forget_nll(tmp_path / "out", forget).tolist() == pytest.approx(nll.tolist(),
                                                                            rel=1e-5)
