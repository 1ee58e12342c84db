"""The console script: subcommands exist, errors are one line with exit status 2."""

import subprocess
import sys

import pytest


def run(*args, timeout=300, module="uld_vllm.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout)


def dev(*args):
    return run(*args, module="uld_vllm.dev")


def test_help_lists_every_subcommand():
    out = run("--help").stdout
    for cmd in ("train", "serve", "generate", "eval", "bench", "demo", "fetch-model"):
        assert cmd in out
    assert "make-tiny-model" not in out  # a developer tool: python -m uld_vllm.dev


@pytest.mark.slow
def test_make_tiny_model_and_random_adapter(tmp_path):
    r = dev("make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--layers", "2",
            "--kv-heads", "2", "--vocab", "600", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").exists()
    r = dev("make-random-adapter", str(tmp_path / "m"), str(tmp_path / "a"), "--num-layers", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "uld_config.json").exists()
    # K >= layers: one clear line, exit 2, nothing written
    r = dev("make-random-adapter", str(tmp_path / "m"), str(tmp_path / "b"), "--num-layers", "2")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uld-vllm: error:") and "K=2" in err[0]
    assert not (tmp_path / "b").exists()


def test_bad_architecture_is_one_line(tmp_path):
    r = dev("make-tiny-model", str(tmp_path / "m"), "--arch", "gpt2")
    assert r.returncode == 2 and "invalid choice" in r.stderr
