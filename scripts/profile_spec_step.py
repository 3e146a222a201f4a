"""Orientation probe (not a benchmark): where a speculative step's time goes at batch 1.

    .venv/bin/python scripts/profile_spec_step.py MODE[,MODE...] [num_prompts] [max_tokens]
    # DRAFT=drafts/smollm2-135m SPEC=drafts/smollm2-135m-mlp (bench spec's --draft / --speculator)

For each mode of `spruce bench spec`, runs the first W4 prompts one at a time and splits the engine
steps into drafting (EngineCore._propose), the target's forward (runner.execute) and the rest,
per step and per emitted token, with the mean verified rows per step.
"""
import os
import sys
import time

from spruce.bench.spec import _config, load_w4
from spruce.config import EngineConfig
from spruce.engine.core import load
from spruce.entrypoints.llm import LLM
from spruce.sampling_params import SamplingParams

modes = sys.argv[1].split(",")
num_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 8
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 256
loaded = load(EngineConfig.from_kwargs(model="smollm2-135m"))
tok = loaded.tokenizer
prompts = [tok.encode(tok.apply_chat_template(r["messages"], add_generation_prompt=True), add_special_tokens=False)
           for r in load_w4()[:num_prompts]]
for mode in modes:
    cfg = _config(mode, os.environ.get("DRAFT", "drafts/smollm2-135m"), None,
                  os.environ.get("SPEC", "drafts/smollm2-135m-mlp"))
    llm = LLM(_loaded=loaded, speculative_config=cfg)
    eng = llm.engine
    acc = {"propose": 0.0, "execute": 0.0, "rows": 0, "steps": 0}
    propose, execute = eng._propose, eng.runner.execute

    def timed_propose():
        t = time.perf_counter()
        try:
            return propose()
        finally:
            acc["propose"] += time.perf_counter() - t

    def timed_execute(scheduled):
        t = time.perf_counter()
        try:
            return execute(scheduled)
        finally:
            acc["execute"] += time.perf_counter() - t
            acc["rows"] += scheduled.total_num_scheduled_tokens
            acc["steps"] += 1
    eng._propose, eng.runner.execute = timed_propose, timed_execute
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)   # warm-up
    for k in acc:
        acc[k] = 0 if isinstance(acc[k], int) else 0.0
    t0, tokens = time.perf_counter(), 0
    for p in prompts:
        tokens += len(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids)
    wall = time.perf_counter() - t0
    n = max(acc["steps"], 1)
    print(f"{mode:<14} {tokens / wall:6.1f} tok/s  {tokens / n:4.2f} tok/step  rows/step {acc['rows'] / n:5.1f}  "
          f"per step: propose {acc['propose'] / n * 1e3:5.2f} ms  forward {acc['execute'] / n * 1e3:5.2f} ms  "
          f"other {(wall - acc['propose'] - acc['execute']) / n * 1e3:5.2f} ms", flush=True)
