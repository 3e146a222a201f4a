"""Spruce's side of W1 (offline throughput) and W2 (single-stream latency), in this process."""
from __future__ import annotations

import resource
import statistics
import time

from spruce.bench.workloads import Workload
from spruce.sampling_params import SamplingParams


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_cache(llm) -> None:
    # Every timed run starts with a cold prefix cache, as a fresh engine would.
    llm.engine.kv_manager.reset_prefix_cache()


def _w1_once(llm, wl: Workload) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=wl.max_tokens, ignore_eos=True, detokenize=True)
    _reset_cache(llm)
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "total_tok_s": (n_out + wl.num_prompt_tokens) / dt}


def _w2_once(llm, wl: Workload) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=wl.max_tokens, ignore_eos=True)
    _reset_cache(llm)
    t0 = time.perf_counter()
    rid = engine.add_request(wl.prompts[0], params)
    t_first = None
    n = 0
    while True:
        outs = [o for o in engine.step() if o.request_id == rid]
        if outs:
            if t_first is None:
                t_first = time.perf_counter()
            n = len(outs[-1].outputs[0].token_ids)
            if outs[-1].finished:
                break
    t_end = time.perf_counter()
    return {"ttft_ms": (t_first - t0) * 1e3, "decode_tok_s": (n - 1) / (t_end - t_first), "output_tokens": n}


def run_spruce(wl: Workload, engine_kwargs: dict) -> dict:
    from spruce.entrypoints.llm import LLM
    llm = LLM(**engine_kwargs)
    once = _w1_once if wl.name == "W1" else _w2_once
    if wl.warmup != "none":
        short = Workload(wl.name, wl.prompts[:8] if wl.name == "W1" else wl.prompts, min(wl.max_tokens, 16))
        once(llm, wl if wl.warmup == "full" else short)
    runs = [once(llm, wl) for _ in range(wl.repeats)]
    keys = ["output_tok_s", "total_tok_s"] if wl.name == "W1" else ["ttft_ms", "decode_tok_s"]
    result = {k: statistics.median(r[k] for r in runs) for k in keys}
    result.update(side="spruce", dtype=str(llm.engine.dtype).replace("torch.", ""), runs=runs,
                  peak_rss_mb=_peak_rss_mb())
    return result
