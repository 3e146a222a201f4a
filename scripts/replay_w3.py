"""W3's arrival process replayed through EngineCore in one process (no HTTP): the same prompts
and send times `spruce bench serve` uses for a seed and rate, TTFT / TPOT medians as vLLM
defines them, and where the steps' time goes by step shape. Orientation only -- claims come from
`spruce bench serve` against a live server.

    .venv/bin/python scripts/replay_w3.py [rate] [seed] [num_prompts]
"""
import collections
import random
import sys
import time

import numpy as np

from spruce import LLM, SamplingParams
from spruce.bench.serve import _arrival_delays
from spruce.bench.serve_datasets import BenchTokenizer, sample_random

rate = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 4
n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
random.seed(seed)
np.random.seed(seed)
reqs = sample_random(BenchTokenizer("smollm2-135m"), n, 200, 128, seed=seed)
delays = _arrival_delays(n, rate, 1.0)
llm = LLM("smollm2-135m")
eng = llm.engine
tok = llm.tokenizer
params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

shape = {}
_schedule = eng.scheduler.schedule
def schedule():
    out = _schedule()
    dec = sum(1 for x in out.scheduled if x.num_new_tokens == 1)
    pre = sum(x.num_new_tokens for x in out.scheduled if x.num_new_tokens > 1)
    shape["key"] = (f"decode {4 * (dec // 4):2d}-{4 * (dec // 4) + 3:2d}", "prefill" if pre else "-")
    return out
eng.scheduler.schedule = schedule
steps = collections.defaultdict(lambda: [0, 0.0])   # (decode rows bucket, has prefill) -> [n, s]
sent, first, done, ntok = {}, {}, {}, {}
T0 = time.perf_counter()
i = 0
while i < n or eng.has_unfinished_requests():
    now = time.perf_counter() - T0
    while i < n and delays[i] <= now:
        rid = eng.add_request(tok.encode(reqs[i].prompt, add_special_tokens=False), params)
        sent[rid] = delays[i]
        i += 1
    if not eng.has_unfinished_requests():
        time.sleep(max(0.0, delays[i] - now))
        continue
    t = time.perf_counter()
    outs = eng.step()
    dt = time.perf_counter() - t
    now = time.perf_counter() - T0
    for o in outs:
        c = o.outputs[0]
        if c.token_ids and o.request_id not in first:
            first[o.request_id] = now
        ntok[o.request_id] = len(c.token_ids)
        if o.finished:
            done[o.request_id] = now
    key = shape["key"]
    steps[key][0] += 1
    steps[key][1] += dt
el = time.perf_counter() - T0
ttft = sorted(first[r] - sent[r] for r in sent)
tpot = sorted((done[r] - first[r]) / (ntok[r] - 1) for r in sent if ntok[r] > 1)
print(f"rate {rate} seed {seed}: {sum(ntok.values()) / el:.1f} out tok/s, median TTFT "
      f"{1e3 * np.median(ttft):.0f} ms, median TPOT {1e3 * np.median(tpot):.1f} ms, wall {el:.1f}s")
for k, (c, s) in sorted(steps.items(), key=lambda kv: str(kv[0])):
    print(f"  {str(k):24s} {c:5d} steps {s:7.2f}s {1e3 * s / c:7.1f} ms/step")
