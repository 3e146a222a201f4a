"""Run W1 or W2 with HF transformers `generate` and print one JSON result line.

Run in its own process (so its peak RSS is its own) by `spruce.bench.peers.run_peer("hf", ...)`:

    python -m spruce.bench.hf_runner REQUEST.json [RESULT.json]

It imports only torch, transformers and the standard library. REQUEST.json has the same shape as for
`vllm_runner.py`; engine_args understood here: batch_size (W1; default all prompts in one batch),
threads (torch.set_num_threads; default $OMP_NUM_THREADS or 2), attn_implementation.

W1: the prompts left-padded into batches, greedy, max_new_tokens = min_new_tokens = max_tokens (that is
ignore_eos). W2: batch 1; TTFT = wall time of a max_new_tokens=1 generate, decode tok/s =
(n - 1) / (t_n - t_1).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

RESULT_MARKER = "SPRUCE_PEER_RESULT "


def _vm_hwm_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries it across fork+exec, so a
    child started by a big parent reports at least the parent's RSS at the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        req = json.load(f)
    out_path = argv[2] if len(argv) > 2 else None

    t_import = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    t_import = time.perf_counter() - t_import

    workload = req["workload"].upper()
    prompts = [list(map(int, p)) for p in req["prompts"]]
    s = req.get("settings", {})
    ea = dict(req.get("engine_args") or {})
    max_tokens = int(s.get("max_tokens", 128 if workload == "W1" else 256))
    temperature = float(s.get("temperature", 0.0))
    ignore_eos = bool(s.get("ignore_eos", True))
    repeats = max(1, int(s.get("repeats", 3)))
    warmup = s.get("warmup", "short" if workload == "W1" else "full")
    return_ids = bool(s.get("return_token_ids", True))
    if temperature != 0.0:
        raise SystemExit("hf_runner: only greedy (temperature 0) is supported")

    threads = int(ea.pop("threads", os.environ.get("OMP_NUM_THREADS", 2)))
    torch.set_num_threads(threads)
    batch_size = int(ea.pop("batch_size", len(prompts)))
    dtype_name = req.get("dtype", "float32")
    dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype_name]

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=dtype, **ea)
    model.eval()
    load_s = time.perf_counter() - t0
    gc_cfg = model.generation_config
    pad_id = gc_cfg.pad_token_id if gc_cfg.pad_token_id is not None else model.config.pad_token_id
    if pad_id is None:
        eos = gc_cfg.eos_token_id
        pad_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)

    def batch_tensors(ps):
        width = max(len(p) for p in ps)
        ids = torch.full((len(ps), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for r, p in enumerate(ps):                      # left padding
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        return ids, mask

    batches = [batch_tensors(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]

    @torch.inference_mode()
    def gen(n):
        """Generate n tokens for every prompt; returns (seconds, list of new-token lists)."""
        outs = []
        t = time.perf_counter()
        for ids, mask in batches:
            o = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               min_new_tokens=n if ignore_eos else 0, pad_token_id=pad_id,
                               temperature=None, top_p=None, top_k=None)
            outs.extend(o[:, ids.shape[1]:].tolist())
        return time.perf_counter() - t, outs

    num_prompt_tokens = sum(len(p) for p in prompts)
    result = {"engine": "hf", "engine_version": transformers.__version__, "torch": torch.__version__,
              "workload": workload, "dtype": dtype_name, "model_dir": req["model_dir"],
              "engine_args": {"batch_size": batch_size, "threads": threads, **ea}, "settings": s,
              "num_prompts": len(prompts), "prompt_tokens": num_prompt_tokens,
              "import_s": round(t_import, 3), "load_s": round(load_s, 3),
              "python": platform.python_version()}

    if warmup != "none":
        gen(max_tokens if warmup == "full" else min(max_tokens, 8))
        if workload == "W2":
            gen(1)

    runs = []
    last = None
    if workload == "W1":
        for _ in range(repeats):
            el, outs = gen(max_tokens)
            n_out = sum(len(o) for o in outs)
            runs.append({"elapsed_s": el, "output_tokens": n_out, "output_tok_s": n_out / el,
                         "total_tok_s": (n_out + num_prompt_tokens) / el})
            last = outs
        result["output_tokens"] = runs[-1]["output_tokens"]
        for k in ("elapsed_s", "output_tok_s", "total_tok_s"):
            result[k] = statistics.median(r[k] for r in runs)
    elif workload == "W2":
        if len(prompts) != 1:
            raise SystemExit("W2 is a single stream: exactly one prompt")
        for _ in range(repeats):
            t1, _o = gen(1)
            tn, outs = gen(max_tokens)
            n_out = len(outs[0])
            runs.append({"ttft_ms": t1 * 1e3, "e2e_s": tn, "output_tokens": n_out,
                         "decode_tok_s": (n_out - 1) / (tn - t1) if tn > t1 else None})
            last = outs
        result["output_tokens"] = runs[-1]["output_tokens"]
        for k in ("ttft_ms", "e2e_s", "decode_tok_s"):
            vals = [r[k] for r in runs if r[k] is not None]
            result[k] = statistics.median(vals) if vals else None
    else:
        raise SystemExit(f"unknown workload {workload!r}")

    result["runs"] = runs
    if return_ids and last is not None:
        result["output_token_ids"] = last
    result["peak_rss_mb"] = round(_vm_hwm_mb(), 1)
    result["peak_rss_total_mb"] = result["peak_rss_mb"]

    line = json.dumps(result)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line)
    print(RESULT_MARKER + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
