"""Training inputs: readers, ULD augmentation CSVs, tokenisation, interleaving, config."""

import json
from pathlib import Path

import pytest

from uld_vllm.errors import UldError
from uld_vllm.train.config import load_yaml, make_config
from uld_vllm.train.data import (
    Example,
    build_data,
    read_paraphrase_csv,
    read_perturbed_csv,
    read_rows,
    to_examples,
)
from uld_vllm.train.dataset import (
    Collator,
    InterleavedSampler,
    PromptFormatter,
    UldDataset,
    balanced_interleave,
)
from uld_vllm.train.loss import IGNORE_INDEX

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOFU = SHARED / "tofu"
AUG = SHARED / "uld_aug" / "tofu"
needs_shared = pytest.mark.skipif(not (TOFU / "forget01.jsonl").is_file(),
                                  reason=f"shared data folder {SHARED} is missing")


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------- readers
def test_reads_all_three_row_kinds(tmp_path):
    qa = to_examples(read_rows(_jsonl(tmp_path / "a.jsonl", [
        {"question": " Q1 ", "answer": "A1"}]), "x"), "a", "forget")
    pr = to_examples(read_rows(_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "P", "response": "R", "extra": 1}]), "x"), "b", "forget")
    doc = to_examples(read_rows(_jsonl(tmp_path / "c.jsonl", [{"text": "Call me Ishmael."}]),
                                "x"), "c", "retain")
    assert qa == [Example("Q1", "A1", "forget")]
    assert pr == [Example("P", "R", "forget")]
    assert doc == [Example(None, "Call me Ishmael.", "retain")]
    # a row `uld-vllm generate` writes: the target's own answer is the response
    gen = to_examples(read_rows(_jsonl(tmp_path / "e.jsonl", [
        {"id": 0, "prompt": "P", "generation": " G ", "finish_reason": "stop"}]), "x"), "e",
        "retain")
    assert gen == [Example("P", "G", "retain")]
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"question": "q", "answer": "a"}] * 2))
    assert len(read_rows(str(arr), "x")) == 2


@pytest.mark.parametrize("content, needle", [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ('{"question": "q"}\n', "'answer' is missing"),
    ('{"question": "q", "answer": ""}\n', "'answer' is empty"),
    ('{"title": "t"}\n', "none of the fields"),
    ('{"prompt": "p", "generation": ["a", "b"]}\n', "`uld-vllm generate --n 1`"),
    ('{"prompt": "p", "generation": ""}\n', "'generation' is empty"),
    ('{"question": "q", "answer": "a"}\nnot json\n', "line 2 is not valid JSON"),
    ('["q", "a"]\n', "not an object"),
])
def test_bad_rows_are_one_line_errors(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UldError) as exc:
        build_data(str(p))
    assert needle in _one_line(exc)
    assert str(p) in str(exc.value)


def test_missing_file_and_missing_datasets_package(tmp_path):
    with pytest.raises(UldError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"), "forget set")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UldError, match="datasets"):
            read_rows("locuslab/TOFU:forget01@train", "forget set")


# ------------------------------------------------------------ augmentation
def _csv(path: Path, rows) -> str:
    import csv

    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return str(path)


def test_csv_has_no_header_first_row_is_used(tmp_path):
    forget = _jsonl(tmp_path / "f.jsonl", [{"question": "Who is X?", "answer": "X is Y."},
                                          {"question": "Where?", "answer": "Here."}])
    para = _csv(tmp_path / "p.csv", [
        ["Who is X?", "X is Y.", repr(["Who's X?", "Who's X?", "X is who?"]),
         repr(["Y is X.", "It is Y.", "Y."])],
        ["Where?", "Here.", repr(["At what place?"]), repr(["Right here.", "Right here."])],
    ])
    pert = _csv(tmp_path / "w.csv", [
        ["Where?", "Here.", "Where?", repr(["There.", "Nowhere.", "Far."])],
        ["Who is X?", "X is Y.", "Who is X?", repr(["X is Z."])],
    ])
    data = build_data(forget, paraphrase_csv=para, perturbed_csv=pert)
    para_rows = [e for e in data.forget if e.origin == "paraphrase"]
    # one paraphrased question x two distinct paraphrased answers; duplicates dropped
    assert para_rows == [Example("Who's X?", "Y is X.", "paraphrase"),
                         Example("Who's X?", "It is Y.", "paraphrase"),
                         Example("At what place?", "Right here.", "paraphrase")]
    # matched by question text, not by position; at most two wrong answers each
    # each carries the forget answer it perturbs (its shared first tokens get no L_r)
    assert data.retain == [Example("Who is X?", "X is Z.", "perturbed", "X is Y."),
                           Example("Where?", "There.", "perturbed", "Here."),
                           Example("Where?", "Nowhere.", "perturbed", "Here.")]
    assert data.stats["paraphrase_rows"] == 3 and data.stats["perturbed_rows"] == 3
    plain = build_data(forget, perturbed_csv=pert, mask_shared_prefix=False)
    assert [e.forget_answer for e in plain.retain] == [None, None, None]


@pytest.mark.parametrize("row, needle", [
    (["q", "a", "['x']"], "has 3 columns, expected 4"),
    (["q", "a", "[unbalanced", "['y']"], "row 2 column 3 is not a Python list"),
    (["q", "a", "['x']", "42"], "row 2 column 4 is not a Python list"),
    (["q", "a", "[]", "['y']"], "empty"),
])
def test_unreadable_csv_row(tmp_path, row, needle):
    good = ["Who?", "Me.", "['Who is it?']", "['It is me.']"]
    path = _csv(tmp_path / "p.csv", [good, row])
    with pytest.raises(UldError) as exc:
        read_paraphrase_csv(path)
    assert needle in _one_line(exc)


def test_csv_matching_no_forget_question_is_an_error(tmp_path):
    forget = _jsonl(tmp_path / "f.jsonl", [{"question": "Q?", "answer": "A."}])
    pert = _csv(tmp_path / "w.csv", [["Other?", "B.", "Other?", "['C.']"]])
    with pytest.raises(UldError, match="matches none of the 1 forget questions"):
        build_data(forget, perturbed_csv=pert)


@needs_shared
def test_tofu_forget01_recipe():
    """D'_f = 40 + 80 paraphrases; D'_r = last 40 retain99 rows + 80 wrong answers (the
    reference's min(400, |forget|) cut, asked for with max_retain)."""
    data = build_data(str(TOFU / "forget01.jsonl"), str(TOFU / "retain99.jsonl"),
                      paraphrase_csv=str(AUG / "forget01" / "paraphrase_res.csv"),
                      perturbed_csv=str(AUG / "forget01" / "perturb_res.csv"), max_retain=40)
    full = [json.loads(x) for x in (TOFU / "full.jsonl").read_text().splitlines()]
    assert data.stats["forget_rows"] == 40 and len(data.forget) == 40 + 80
    retain = [e for e in data.retain if e.origin == "retain"]
    assert [e.prompt for e in retain] == [r["question"] for r in full[3920:3960]]
    perturbed = [e for e in data.retain if e.origin == "perturbed"]
    assert len(perturbed) == 80
    forget_q = [r["question"] for r in full[3960:4000]]
    assert [e.prompt for e in perturbed] == [q for q in forget_q for _ in range(2)]
    # the perturb CSV's rows are forget10 in order (400 rows), yet forget01 rows match it
    table = read_perturbed_csv(str(AUG / "forget01" / "perturb_res.csv"))
    assert len(table) == 400
    # the default keeps every retain row: broad retain data is what keeps general knowledge
    every = build_data(str(TOFU / "forget01.jsonl"), str(TOFU / "retain99.jsonl"))
    assert [e.prompt for e in every.retain] == [r["question"] for r in full[:3960]]
    assert perturbed[0].response == table[forget_q[0]][0]
    assert perturbed[0].response != full[3960]["answer"]
    # no header: the very first CSV row (forget10[0]) is data
    assert full[3600]["question"] in table
    assert full[3960]["question"] in read_paraphrase_csv(
        str(AUG / "forget01" / "paraphrase_res.csv"))


# ------------------------------------------------------------ tokenisation
class _Tok:
    """A whitespace tokenizer: enough to check masking exactly."""

    bos_token_id, eos_token_id, pad_token_id, chat_template = 1, 2, 0, None

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_prompt_tokens_are_masked_and_answer_ends_with_eos():
    tok = _Tok()
    fmt = PromptFormatter(tok)
    ds = UldDataset([Example("who is x", "x is y", "forget")],
                    [Example(None, "some book text here", "retain")], fmt, max_length=64)
    f, r = ds[0], ds[1]
    prompt = tok("[INST] who is x [/INST]")["input_ids"]
    assert f["input_ids"][:len(prompt)] == prompt
    assert f["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert f["labels"][len(prompt):] == tok("x is y", False)["input_ids"] + [2]
    assert f["is_retain"] is False and r["is_retain"] is True
    assert r["labels"] == r["input_ids"]  # a document is all target text
    batch = Collator(pad_id=0)([f, r])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][1].tolist() == [1] * len(r["input_ids"]) + \
        [0] * (len(f["input_ids"]) - len(r["input_ids"]))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["is_retain"].tolist() == [False, True]


def test_a_wrong_answer_gets_no_retain_label_where_it_shares_the_forget_context():
    tok = _Tok()
    fmt = PromptFormatter(tok)
    forget = Example("where was x born", "x was born in paris", "forget")
    wrong = Example("where was x born", "x was born in rome today", "perturbed",
                    forget.response)
    ds = UldDataset([forget], [wrong, Example("where was x born", wrong.response,
                                              "perturbed")], fmt, max_length=64)
    f, masked, plain = ds.rows
    n = len(tok("[INST] where was x born [/INST]")["input_ids"])
    assert masked["input_ids"] == plain["input_ids"]
    # "x was born in" is shared (4 tokens); the position predicting "rome" still reads the
    # forget row's context, so 5 answer tokens lose their label: "rome today </s>" keep theirs
    assert masked["labels"][:n + 5] == [IGNORE_INDEX] * (n + 5)
    assert masked["labels"][n + 5:] == plain["labels"][n + 5:] == masked["input_ids"][n + 5:]
    assert plain["labels"][n:] == plain["input_ids"][n:]
    assert f["labels"][n:] == f["input_ids"][n:]  # a forget row is never masked
    assert ds.shared_prefix_tokens == 5
    # the same sentence as the forget answer leaves no retain position at all
    same = UldDataset([], [Example(forget.prompt, forget.response, "perturbed",
                                   forget.response)], fmt, max_length=64).rows[0]
    assert same["labels"] == [IGNORE_INDEX] * len(same["input_ids"])


def test_long_documents_are_split_not_cut():
    tok = _Tok()
    ds = UldDataset([], [Example(None, " ".join(f"w{i}" for i in range(25)), "retain")],
                    PromptFormatter(tok), max_length=10)
    assert [len(r["input_ids"]) for r in ds.rows] == [10, 10, 6]
    assert ds.n_retain == 3 and ds.truncated == 0


def test_prompt_template_needs_question_field():
    with pytest.raises(UldError, match="question"):
        PromptFormatter(_Tok(), "Q: {q} A:")
    assert PromptFormatter(_Tok(), "Q: {question} A:").prompt_text("hi") == "Q: hi A:"


# -------------------------------------------------------------- interleave
def test_balanced_interleave_follows_the_reference_and_keeps_every_row():
    assert balanced_interleave([0, 1], [10, 11, 12, 13]) == [0, 10, 11, 1, 12, 13]
    assert balanced_interleave([10, 11, 12, 13], [0, 1]) == [0, 10, 11, 1, 12, 13]
    # round(7/3) = 2: the reference would drop the 7th long element; it is appended here
    assert balanced_interleave([0, 1, 2], list(range(10, 17))) == \
        [0, 10, 11, 1, 12, 13, 2, 14, 15, 16]
    assert balanced_interleave([], [5, 6]) == [5, 6]


def test_balanced_sampler_repeats_the_smaller_side():
    s = InterleavedSampler(3, 8, seed=0, balance=True)
    order = list(s)
    assert len(order) == len(s) == 16
    forget = [i for i in order if i < 3]
    assert len(forget) == 8 and sorted(set(forget)) == [0, 1, 2]
    assert sorted(i for i in order if i >= 3) == list(range(3, 11))  # each retain row once
    # every forget row appears floor or ceil of 8/3 times (whole reshuffled passes first)
    assert sorted(forget.count(i) for i in range(3)) == [2, 3, 3]
    # 1:1 interleaving: no run of more than two retain rows
    assert "rrr" not in "".join("f" if i < 3 else "r" for i in order)
    assert sorted(InterleavedSampler(3, 0, seed=0, balance=True)) == [0, 1, 2]


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = InterleavedSampler(4, 6, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and len(s) == 10
    assert e0[0] < 4  # the shorter side (forget) leads
    assert list(InterleavedSampler(4, 6, seed=3)) == e0
    s.set_epoch(1)
    assert list(s) != e0 and sorted(s) == list(range(10))


# ------------------------------------------------------------------ config
def test_yaml_config_and_flag_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nforget: f.jsonl\noutput_dir: out\nnum-layers: 3\nlearning_rate: 2\n"
                 "retain_loss_all_positions: true\n")
    cfg = make_config(y, num_layers=2)
    assert cfg.num_layers == 2 and cfg.learning_rate == 2.0
    assert cfg.retain_loss_all_positions is True and cfg.retain_weight == 5.0
    assert cfg.checkpoint_path() == Path("out.checkpoints")


@pytest.mark.parametrize("text, needle", [
    ("num_layerz: 3\n", "unknown key 'num_layerz'"),
    ("num_layers: three\n", "num_layers='three' is not a valid int"),
    ("num_layers: 2.5\n", "is not a valid int"),
    ("- a\n- b\n", "must hold a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_config(tmp_path, text, needle):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(UldError) as exc:
        load_yaml(y)
    assert needle in _one_line(exc)


def test_config_validation():
    with pytest.raises(UldError, match="--micro-batch-size and --gradient-accumulation-steps"):
        make_config(model="m", forget="f", output_dir="o", gradient_accumulation_steps=0)
    with pytest.raises(UldError, match="--model is required"):
        make_config(forget="f", output_dir="o")
    with pytest.raises(UldError, match="unknown training option 'batch_sise'"):
        make_config(model="m", forget="f", output_dir="o", batch_sise=3)


def test_config_is_hf_training_arguments():
    from transformers import TrainingArguments

    from uld_vllm.train.config import UldTrainConfig

    cfg = make_config(model="m", forget="f", output_dir="o")
    assert isinstance(cfg, TrainingArguments) and isinstance(cfg, UldTrainConfig)
    # ULD's defaults on HF's own fields
    assert (cfg.learning_rate, cfg.num_train_epochs, cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps, cfg.warmup_steps) == (1e-3, 10.0, 8, 4, 0.1)
    assert cfg.report_to == [] and cfg.save_strategy == "epoch" and not cfg.disable_tqdm


def test_cli_parser_has_the_options(tmp_path):
    from uld_vllm.train.config import parse_args

    cfg = parse_args(["--model", "m", "--forget", "f", "--output", "o", "-K", "2",
                      "--retain-weight", "3", "--no-progress", "--retain-loss-all-positions"])
    assert (cfg.num_layers, cfg.retain_weight, cfg.disable_tqdm) == (2, 3.0, True)
    assert cfg.retain_loss_all_positions and cfg.learning_rate == 1e-3
    assert cfg.output_dir == "o"
    # HF's own flags, both spellings, and a YAML file under the flags
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nforget: f\noutput_dir: o\nlearning_rate: 0.5\nlora_r: 4\n")
    cfg = parse_args(["--config", str(y), "--lora-r", "8", "--gradient_accumulation_steps", "2",
                      "--lr-scheduler-type", "cosine", "--epochs", "3"])
    assert (cfg.learning_rate, cfg.lora_r, cfg.gradient_accumulation_steps) == (0.5, 8, 2)
    assert cfg.lr_scheduler_type.value == "cosine" and cfg.num_train_epochs == 3.0
