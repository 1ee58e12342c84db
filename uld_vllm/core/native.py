"""C helpers for the CPU hot path, built on first use with the system's C compiler.

The sources live in ``csrc/`` beside this module, one op each (``topk_ties.c``: the filter's
top k; ``sparse_combine.c``: the combine of a confident batch; ``uld_native.h``: what they
share), built into one library. Each is plain C with no torch headers: the library builds in
about a second and loads through ``ctypes``, where a torch C++ extension takes minutes to
compile on a small machine. The library is built with ``-march=native`` for the CPU it runs
on, so the cache key holds the CPU's flags with the source and the compiler; it lives in
``$ULD_VLLM_HOME/native`` (default ``~/.cache/uld-vllm/native``), written atomically so that
processes starting together can share it.

Without a working compiler the callers fall back to their torch code, and one warning says
so. ``ULD_NATIVE=0`` turns the library off (the torch code runs; for A/B measurements and as
the way out of a broken compiler)."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from uld_vllm.core.models import cache_root

_log = logging.getLogger("uld_vllm")
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("topk_ties.c", "sparse_combine.c")]
_HEADERS = [_CSRC / "uld_native.h"]
# no floating-point contraction: a - b * c rounds twice, as torch computes it
_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
# -march=native first (AVX-512 compress on CPUs that have it); some compilers and
# architectures refuse it, and the portable build is still much faster than the torch code
_ARCH_FLAGS = (["-march=native"], [])
_state: dict = {}


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (``ULD_NATIVE=0``, or no compiler: see ``status()``)."""
    if os.environ.get("ULD_NATIVE", "1") == "0":
        return None
    if "lib" not in _state:
        _state["lib"], _state["status"] = _load()
        if _state["lib"] is None:
            _log.warning("uld-vllm's C code for the CPU combine (the filter's top k, the "
                         "kept-token head, the scatter) is not available (%s); the torch code "
                         "runs instead, a few ms slower per batch-32 step. Fix: install a C "
                         "compiler (gcc) or point CC at one; ULD_NATIVE=0 silences this.",
                         _state["status"])
    return _state["lib"]


def status() -> str:
    """How the library was obtained, or why it was not: for logs and benchmark reports."""
    if os.environ.get("ULD_NATIVE", "1") == "0":
        return "off (ULD_NATIVE=0)"
    library()
    return _state["status"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _load():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler found (cc, gcc; CC unset)"
    cc_cmd = shlex.split(cc)  # CC may carry a launcher or flags ("ccache gcc")
    src = b"\0".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()]))
    out_dir = cache_root() / "native"
    target = out_dir / f"uld_native-{key.hexdigest()[:16]}.so"
    how = f"cached {target}"
    if not target.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return None, f"cannot create {out_dir}: {e}"
        err = ""
        for arch in _ARCH_FLAGS:
            try:
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            except OSError as e:
                return None, f"cannot write in {out_dir}: {e}"
            os.close(fd)
            try:
                run = subprocess.run([*cc_cmd, *_FLAGS, *arch, "-o", tmp, *map(str, _SOURCES)],
                                     capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                run, err = None, str(e)
            if run is not None and run.returncode == 0:
                os.replace(tmp, target)
                how = f"built {target} with {cc} {' '.join(arch)}".rstrip()
                break
            os.unlink(tmp)
            if run is not None:
                err = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
        else:
            return None, f"{cc} failed on {', '.join(p.name for p in _SOURCES)}: {err}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"cannot load {target}: {e}"
    fn = lib.uld_top_k_with_ties_f32
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64] + [ctypes.c_void_p] * 6
    fn = lib.uld_sparse_combine
    fn.restype = ctypes.c_int64
    fn.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_int64] * 3
                   + [ctypes.c_float] + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_float, ctypes.c_int]
                   + [ctypes.c_void_p] * 2)
    return lib, how
