"""Build and load Spruce's native CPU ops (a torch C++ extension from spruce/csrc).

The extension is compiled on first use -- scripts/setup.sh does it at install time, since it takes
about a minute -- into $SPRUCE_CACHE_DIR/ext/<key> (default ~/.cache/spruce/ext/<key>), where the
key hashes the sources, the flags, torch's and Python's versions: any of those changing builds
afresh instead of loading a stale or ABI-incompatible library. When there is no C++ compiler or
the build fails, `load_native_ops()` logs one warning and returns None, and the engine keeps the
torch attention backend.

    python -m spruce.attention._build      # build now (prints progress), exit 1 on failure
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)

NAME = "spruce_native_ops"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [CSRC / "paged_attention.cpp", CSRC / "skinny_gemm.cpp", CSRC / "fused_ops.cpp",
           CSRC / "amx_gemm.cpp", CSRC / "quant_bf16.cpp"]
HEADERS = [CSRC / "skinny_gemm.h", CSRC / "fused_ops.h", CSRC / "amx_gemm.h", CSRC / "quant_bf16.h",
           CSRC / "row_split.h"]

_lock = threading.Lock()
_loaded = False
_ops: Optional[ModuleType] = None
_error: Optional[str] = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cflags() -> list[str]:
    # Explicit ISA flags rather than -march=native: the build is keyed by them, so a cache dir
    # shared between slightly different hosts never serves code one of them cannot run. Machines
    # without AVX2/FMA get the portable kernels.
    flags = ["-O3", "-DNDEBUG", "-fopenmp"]
    cpu = _cpu_flags()
    if sys.platform.startswith("linux") and {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"] + (["-mf16c"] if "f16c" in cpu else [])
        # AVX-512 kernels (the fused elementwise ops, attention's score and P @ V passes) where
        # the CPU has it; 512-bit lanes for the loops left to the compiler too (GCC would keep 256
        # for generic tuning).
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu:
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                      "-mprefer-vector-width=512"]
            # bf16 dot products on the quantized blocks (spruce/csrc/quant_bf16.cpp), and the bf16
            # GEMM on AMX tiles (spruce/csrc/amx_gemm.cpp), for decode-sized batches.
            if "avx512_bf16" in cpu:
                flags += ["-mavx512bf16"]
                if {"amx_tile", "amx_bf16"} <= cpu:
                    flags += ["-mamx-tile", "-mamx-bf16"]
    return flags


def _key(flags: list[str]) -> str:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def build_directory(flags: Optional[list[str]] = None) -> Path:
    root = Path(os.environ.get("SPRUCE_CACHE_DIR", Path.home() / ".cache" / "spruce"))
    return root / "ext" / _key(flags if flags is not None else cflags())


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++"))


def _ensure_ninja_on_path() -> bool:
    """torch's builder runs `ninja` from PATH; the pip `ninja` package puts it beside the venv's
    interpreter, which is not on PATH when .venv/bin/python is run directly."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja   # the PyPI package
        dirs.append(ninja.BIN_DIR)
    except Exception:
        pass
    path = os.environ.get("PATH", "")
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "ninja")) and d not in path.split(os.pathsep):
            path = d + os.pathsep + path
    os.environ["PATH"] = path
    return shutil.which("ninja") is not None


def _import_built(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(verbose: bool, announce: bool) -> ModuleType:
    if _compiler() is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    flags = cflags()
    bdir = build_directory(flags)
    so = bdir / (NAME + (".pyd" if sys.platform == "win32" else ".so"))   # torch's naming
    if so.is_file() and not (bdir / "lock").exists():
        # Skips torch's ninja up-to-date check (~0.5 s): the directory key already pins the
        # sources. "lock" is torch's build baton: while another process holds it, the library
        # may be half-written, so go through load(), which waits for it.
        try:
            return _import_built(so)
        except ImportError:
            pass   # a half-written library from an interrupted build: let ninja redo it
    if not _ensure_ninja_on_path():
        raise RuntimeError("ninja not found (pip install ninja)")
    from torch.utils.cpp_extension import load
    if announce and not so.is_file():
        # Otherwise the first model load would just hang for a minute.
        print(f"[spruce] compiling the native CPU attention ops into {bdir} (about a minute, "
              "once per version)", file=sys.stderr, flush=True)
    bdir.mkdir(parents=True, exist_ok=True)
    return load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], build_directory=str(bdir), verbose=verbose)


def _summary(e: Exception) -> str:
    """One line for the warning: a build failure's message holds the whole compiler log, whose
    first `error:` line says more than its last ('ninja: build stopped')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    return f"{type(e).__name__}: {(errors or lines or [''])[0]}"[:300]


def load_native_ops(verbose: bool = False, announce: bool = True) -> Optional[ModuleType]:
    """The compiled ops module, building it if needed; None (after one warning) if that fails.
    Tried once per process."""
    global _loaded, _ops, _error
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                _ops = _build(verbose, announce)
            except Exception as e:   # compiler errors arrive as several exception types
                _error = _summary(e)
                logger.warning("spruce: native CPU attention ops unavailable (%s); using the torch "
                               "backend", _error)
        return _ops


def cpu_ops_for(env_var: str, device, dtype: torch.dtype, needs: str) -> Optional[ModuleType]:
    """The ops module for a model-side op with an fp32/bf16 CPU kernel, or None for its torch path.
    $env_var=auto|torch|native: `torch` forces None, `native` raises where the kernel cannot be
    had (another device or dtype, or a build without `needs`) instead of silently falling back."""
    want = os.environ.get(env_var, "auto").lower()
    if want not in ("auto", "torch", "native"):
        raise ValueError(f"{env_var} must be auto, torch or native, got {want!r}")
    if want == "torch" or torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        if want == "native":
            raise ValueError(f"{env_var}=native needs a float32 or bfloat16 model on CPU")
        return None
    ops = load_native_ops()
    if ops is None or not hasattr(ops, needs):
        if want == "native":
            raise RuntimeError(f"{env_var}=native but the native ops did not build")
        return None
    return ops


def load_error() -> Optional[str]:
    """Why load_native_ops() returned None, if it did."""
    return _error


def main() -> int:
    print(f"[setup] building native CPU attention ops into {build_directory()} "
          "(about a minute the first time)", file=sys.stderr, flush=True)
    ops = load_native_ops(announce=False)
    if ops is None:
        print(f"[setup] native ops build failed: {_error}; Spruce will use the torch attention "
              "backend", file=sys.stderr)
        return 1
    print(f"[setup] native ops ready (AVX2 kernels: {'yes' if ops.has_avx2() else 'no'})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
