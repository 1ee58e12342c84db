"""Adapter folder format and its one-line errors."""

import json
import shutil

import pytest

from uld_vllm.core.adapter import atomic_output_dir, config_fingerprint, load_adapter
from uld_vllm.core.reference import ReferenceDecoder
from uld_vllm.errors import UldError


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


@pytest.fixture
def adapter_copy(llama_adapter, tmp_path):
    dst = tmp_path / "adapter"
    shutil.copytree(llama_adapter, dst)
    return dst


def test_folder_is_standard_peft_plus_uld_config(llama_adapter, tiny_llama):
    names = {p.name for p in llama_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "uld_config.json"} <= names
    peft_cfg = json.loads((llama_adapter / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 16
    assert peft_cfg["lora_alpha"] == 32
    assert set(peft_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"}
    assert peft_cfg["layers_to_transform"] == [0, 1]
    ad = load_adapter(llama_adapter)
    assert ad.config.num_layers == 2 and ad.config.base_num_layers == 4
    assert ad.config.base_model == str(tiny_llama)
    assert ad.config.alpha == 0.8 and ad.config.filter_ratio == 0.1
    # no base weights: the adapter is far smaller than the model
    model_bytes = (tiny_llama / "model.safetensors").stat().st_size
    assert (llama_adapter / "adapter_model.safetensors").stat().st_size < model_bytes / 4


def test_fingerprint_depends_on_shape_fields_only():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}
    assert config_fingerprint(base) == config_fingerprint({**base,
                                                           "max_position_embeddings": 4096})
    assert config_fingerprint(base) != config_fingerprint({**base, "hidden_size": 32})
    assert config_fingerprint(base) != config_fingerprint({**base, "model_type": "qwen2"})


def test_adapter_for_another_base_is_refused(llama_adapter, tiny_qwen2):
    with pytest.raises(UldError) as e:
        ReferenceDecoder.load(tiny_qwen2, llama_adapter)
    msg = one_line(e.value)
    assert "was trained for base model" in msg and "fingerprint" in msg


def test_k_not_below_model_layers_is_refused(adapter_copy, tiny_llama):
    cfg = json.loads((adapter_copy / "uld_config.json").read_text())
    cfg["num_layers"] = 4
    (adapter_copy / "uld_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UldError) as e:
        ReferenceDecoder.load(tiny_llama, adapter_copy)
    assert "num_layers=4" in one_line(e.value)


def test_k_larger_than_the_serving_model_is_refused(llama_adapter):
    ad = load_adapter(llama_adapter)
    other = {"model_type": "llama", "num_hidden_layers": 2}
    ad.config.base_fingerprint = config_fingerprint(other)
    with pytest.raises(UldError) as e:
        ad.check_base(other)
    assert "K=2" in one_line(e.value) and "only 2" in str(e.value)


@pytest.mark.parametrize("missing", ["uld_config.json", "adapter_config.json",
                                     "adapter_model.safetensors"])
def test_missing_files_are_named(adapter_copy, missing):
    (adapter_copy / missing).unlink()
    with pytest.raises(UldError) as e:
        load_adapter(adapter_copy)
    assert missing.split(".")[0] in one_line(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(UldError) as e:
        load_adapter(tmp_path / "nope")
    assert "does not exist" in one_line(e.value)


def test_corrupt_files(adapter_copy):
    (adapter_copy / "uld_config.json").write_text("{not json")
    with pytest.raises(UldError) as e:
        load_adapter(adapter_copy)
    assert "not valid JSON" in one_line(e.value)


def test_truncated_weights(adapter_copy):
    w = adapter_copy / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(UldError) as e:
        load_adapter(adapter_copy)
    assert "cannot read adapter weights" in one_line(e.value)


def test_lora_on_unexpected_modules_is_refused(adapter_copy):
    import torch
    from safetensors.torch import load_file, save_file

    w = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(w)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(16, 128)
    save_file(tensors, w)
    with pytest.raises(UldError) as e:
        load_adapter(adapter_copy)
    assert "unexpected module" in one_line(e.value) and "lm_head" in str(e.value)


def test_lora_beyond_k_is_refused(adapter_copy):
    import torch
    from safetensors.torch import load_file, save_file

    w = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(w)
    tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"] = torch.zeros(16,
                                                                                           128)
    save_file(tensors, w)
    with pytest.raises(UldError) as e:
        load_adapter(adapter_copy)
    assert "layer 3" in one_line(e.value)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.json").write_text("{}")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done.json").write_text("{}")
    assert (out / "done.json").exists()
    with pytest.raises(UldError, match="already exists"):
        with atomic_output_dir(out):
            pass


def test_an_adapter_is_read_once_until_it_changes(tiny_llama, tmp_path, monkeypatch):
    from uld_vllm.core import adapter as mod
    from uld_vllm.dev.tiny import make_random_adapter

    path = tmp_path / "adapter"
    make_random_adapter(tiny_llama, path, num_layers=1, seed=3)
    monkeypatch.setattr(mod, "_LOADED", {})
    reads = []
    real = mod._read_adapter
    monkeypatch.setattr(mod, "_read_adapter", lambda p: reads.append(p) or real(p))
    first = mod.load_adapter(path)
    assert mod.load_adapter(str(path)).config == first.config and len(reads) == 1
    # each caller gets its own copy: changing one changes neither the cache nor the others
    first.config.base_fingerprint = "changed"
    assert mod.load_adapter(path).config.base_fingerprint != "changed" and len(reads) == 1
    reads.clear()
    # the writer validates what it wrote, which reads the new folder (once) into the cache
    make_random_adapter(tiny_llama, path, num_layers=2, seed=3, overwrite=True)
    assert mod.load_adapter(path).config.num_layers == 2 and len(reads) >= 1
