"""What the ULD model cannot serve is refused with one line; `serve --help` lists the flags."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from uld_vllm.engine.settings import check_engine_options, check_vllm_config
from uld_vllm.errors import UldError

REFUSALS = [
    ({"enable_lora": True}, "--enable-lora"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
     "speculative decoding"),
    ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ({"enable_batch_sharded_sampling": True}, "--enable-batch-sharded-sampling"),
]


@pytest.mark.parametrize("kw, words", REFUSALS)
def test_each_unsupported_feature_is_one_line_naming_it(kw, words):
    with pytest.raises(UldError) as e:
        check_engine_options(**kw)
    assert words in str(e.value) and ": " in str(e.value) and "\n" not in str(e.value)


def test_supported_defaults_pass():
    check_engine_options()
    check_engine_options(enable_lora=False, speculative_config=None, pipeline_parallel_size=1,
                         enable_batch_sharded_sampling=False)


@pytest.mark.parametrize("kw, words", REFUSALS)
def test_uld_llm_refuses_before_any_engine_starts(kw, words, tiny_llama, llama_adapter):
    import uld_vllm

    with pytest.raises(UldError, match=re.escape(words)):
        uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter), **kw)


def test_model_runner_v2_is_refused_when_asked_for(tiny_llama, llama_adapter, monkeypatch):
    import uld_vllm

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(UldError, match="VLLM_USE_V2_MODEL_RUNNER=1.*set it to 0"):
        uld_vllm.LLM(str(tiny_llama), uld_adapter=str(llama_adapter))


def test_built_config_checks_cover_the_plain_vllm_form():
    def cfg(**over):
        base = dict(lora_config=None, speculative_config=None, use_v2_model_runner=False,
                    parallel_config=SimpleNamespace(pipeline_parallel_size=1,
                                                    enable_batch_sharded_sampling=None))
        return SimpleNamespace(**{**base, **over})

    check_vllm_config(cfg())
    for over, words in [({"lora_config": object()}, "--enable-lora"),
                        ({"speculative_config": object()}, "speculative decoding"),
                        ({"use_v2_model_runner": True}, "VLLM_USE_V2_MODEL_RUNNER=0")]:
        with pytest.raises(UldError, match=re.escape(words)):
            check_vllm_config(cfg(**over))


def _vllm_model_probes() -> set[str]:
    """Names of model methods vLLM's runners, samplers and drafters call or probe for."""
    import vllm

    root = Path(vllm.__file__).parent / "v1"
    pat = re.compile(r"(?:hasattr\((?:self\.)?model,\s*\"(\w+)\"|(?:self\.)?model\.(\w+)\()")
    names = set()
    for f in root.rglob("*.py"):
        for m in pat.finditer(f.read_text(errors="replace")):
            names.add(m.group(1) or m.group(2))
    return names


def test_every_logits_path_vllm_probes_is_known_and_the_sharded_ones_are_refused():
    """A new vLLM fast path that computes logits per vocabulary shard would apply ULD's
    filter to one shard; this fails until that path is looked at and listed."""
    # imported for this test only: test_plugin checks that register() alone never loads it
    try:
        _check_probes()
    finally:
        sys.modules.pop("uld_vllm.engine.model", None)


def _check_probes():
    from uld_vllm.engine.model import UldLlamaForCausalLM, UldQwen2ForCausalLM

    logits_paths = {n for n in _vllm_model_probes() if "logits" in n or "top_token" in n}
    full_row = {"compute_logits"}  # what the ULD model implements on full rows
    # called on draft models by speculative decoding, which ULD refuses (REFUSALS above)
    drafter_only = {"compute_draft_logits"}
    sharded = set(UldLlamaForCausalLM.SHARDED_LOGITS_PATHS)
    assert logits_paths == full_row | drafter_only | sharded, (
        f"vLLM's model probes changed: {sorted(logits_paths)}; check each new one against "
        "ULD's need for full-vocabulary rows and list it in SHARDED_LOGITS_PATHS or here")
    for cls in (UldLlamaForCausalLM, UldQwen2ForCausalLM):
        model = cls.__new__(cls)  # hasattr on an instance is what vLLM checks
        for name in cls.SHARDED_LOGITS_PATHS:
            assert not hasattr(model, name), f"{cls.__name__}.{name} must not exist"


@pytest.mark.slow
def test_serve_refuses_enable_lora_with_one_line(tiny_llama, llama_adapter):
    r = subprocess.run([sys.executable, "-m", "uld_vllm.cli", "serve", str(tiny_llama),
                        "--uld-adapter", str(llama_adapter), "--enable-lora"],
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("uld-vllm: error:")]
    assert len(lines) == 1 and "--enable-lora" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, env, words", [
    ([], {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "VLLM_USE_V2_MODEL_RUNNER=1"),
    ([], {"VLLM_SERVER_DEV_MODE": "1"}, "VLLM_SERVER_DEV_MODE=1"),
    (["--uld-request-policy", "open"], {}, "--uld-request-policy 'open' is unknown"),
    (["--uld-alpha-range", "2,1"], {}, "MIN > MAX"),
])
def test_serve_refuses_ways_around_the_policy_with_one_line(tiny_llama, llama_adapter, args,
                                                            env, words):
    """The V2 runner would skip the per-request controls; the dev endpoints reach the
    worker (/collective_rpc); a bad policy must not fall back to an open one."""
    r = subprocess.run([sys.executable, "-m", "uld_vllm.cli", "serve", str(tiny_llama),
                        "--uld-adapter", str(llama_adapter), *args],
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **env))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("uld-vllm: error:")]
    assert len(lines) == 1 and words in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


HELP = """
import contextlib, io, sys
from uld_vllm.cli.main import serve
for flag in ("--help", "--help=ULD"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        serve([flag])
    sys.stderr.write("=====" + flag + "\\n" + out.getvalue())
"""


@pytest.mark.slow
def test_serve_help_lists_the_uld_flags():
    """`uld-vllm serve` is vLLM's own CLI (its parser, with the plugin's flags added)."""
    r = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True,
                       timeout=240)
    parts = dict(p.split("\n", 1) for p in r.stderr.split("=====")[1:])
    short, group = parts["--help"], parts["--help=ULD"]
    assert "ULD" in short and "--help=ULD" in short
    flags = ("--uld-adapter", "--uld-alpha", "--uld-filter-ratio", "--uld-mode",
             "--uld-request-policy", "--uld-alpha-range")
    for flag in flags:
        assert flag in short, short[-1500:]
        assert re.search(rf"^\s+{flag}\b", group, re.M), group[-1500:]
    assert "vllm_xargs" in group  # the per-request keys are pointed to
