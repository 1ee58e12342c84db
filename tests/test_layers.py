"""The package's layers: the pure core imports neither vLLM nor Triton, nothing imports in a
cycle, and nothing sets vLLM's environment variables behind the user's back."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "uld_vllm"

# what must work without vLLM (training and the reference decoder run without an engine)
PURE = ["uld_vllm.core", "uld_vllm.train", "uld_vllm.dev", "uld_vllm.eval.metrics",
        "uld_vllm.eval.tofu_data", "uld_vllm.eval.leaks", "uld_vllm.eval.audit",
        "uld_vllm.eval.audit_report", "uld_vllm.errors"]


def _modules(prefix: str = "uld_vllm") -> list[str]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name == prefix or name.startswith(prefix + "."):
            out.append(name)
    return out


_BLOCK = """
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vllm", "triton", "ray"):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
for m in sys.argv[1:]:
    importlib.import_module(m)
print("ok", len(sys.argv) - 1)
"""


def test_pure_core_imports_without_vllm_or_triton():
    mods = [m for p in PURE for m in _modules(p)]
    assert "uld_vllm.core.reference" in mods and "uld_vllm.train.trainer" in mods
    r = subprocess.run([sys.executable, "-c", _BLOCK, *mods], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"ok {len(mods)}"


def test_the_blocker_does_block():
    # the check above would pass vacuously if the blocker let vLLM through
    r = subprocess.run([sys.executable, "-c", _BLOCK, "uld_vllm.engine.model"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "blocked: vllm" in r.stderr


def _imports(path: Path, name: str) -> set[str]:
    """uld_vllm modules imported anywhere in a module, inside functions too: a lazy import
    cannot fail at import time, but two modules that need each other are one layer, and the
    layers (core -> engine -> jobs -> CLI) must stay readable."""
    tree = ast.parse(path.read_text())
    found = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("uld_vllm")}


def test_no_import_cycles():
    mods = set(_modules())
    paths = {}
    for m in mods:
        rel = Path(*m.split("."))
        p = PKG.parent / (str(rel) + ".py")
        paths[m] = p if p.is_file() else PKG.parent / rel / "__init__.py"
    graph = {m: {d for d in _imports(paths[m], m) if d in mods and d != m}
             for m in mods}
    # a package's __init__ importing its own submodules is not a cycle with them
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not d.startswith(m + ".")}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles
    assert graph["uld_vllm.jobs.replicas"] and graph["uld_vllm.jobs.run"]  # the graph is real
    # and it sees imports inside functions: cli.main imports the jobs only when it runs
    assert "uld_vllm.jobs.generate" in graph["uld_vllm.cli.main"]


def test_importing_anything_sets_no_vllm_variable():
    code = ("import importlib, os, sys\n"
            "before = {k: v for k, v in os.environ.items() if k.startswith('VLLM_')}\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n"
            "after = {k: v for k, v in os.environ.items() if k.startswith('VLLM_')}\n"
            "print(sorted(set(after.items()) ^ set(before.items())))\n")
    mods = [m for m in _modules() if not m.startswith("uld_vllm.kernels")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_v1_runner_is_chosen_only_while_a_uld_engine_is_built(monkeypatch):
    from uld_vllm.engine.settings import v1_model_runner
    from uld_vllm.errors import UldError

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    with v1_model_runner():
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ  # later plain engines: vLLM's choice
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    with v1_model_runner():
        pass
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # the user's own setting stays
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(UldError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        with v1_model_runner():
            pass
