"""Orientation probe (not a benchmark): what a verified row costs at batch 1.

    .venv/bin/python scripts/probe_verify_rows.py [dtype] [context] [rounds] [sizes, e.g. 1,2,5,9]

Times one target forward of k query tokens (k = 1, 2, 5, 9, 13, 21) after `context` cached tokens,
as a speculative verify step of a chain of k-1 would run, plus the logits of every row. Sizes are
interleaved over rounds and each reports its median, so neighbours' load hits all alike. Speculation
at batch 1 pays when accepted length / (cost(k) / cost(1)) > 1.
"""
import statistics
import sys
import time

import torch

from spruce import LLM
from spruce.attention.metadata import AttentionMetadata

dtype = sys.argv[1] if len(sys.argv) > 1 else "auto"
context = int(sys.argv[2]) if len(sys.argv) > 2 else 300
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 30
llm = LLM("smollm2-135m", dtype=dtype)
runner = llm.engine.runner
model, bs = runner.model, runner.block_size
sizes = [int(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "1,2,5,9,13,21").split(",")]
num_blocks = (context + max(sizes)) // bs + 1
table = torch.arange(1, num_blocks + 1, dtype=torch.long).unsqueeze(0)


def step(k: int) -> float:
    pos = torch.arange(context, context + k)
    md = AttentionMetadata(num_tokens=k, query_start_loc=[0, k], seq_lens=[context + k], query_lens=[k],
                           block_tables=table, slot_mapping=table[0, pos // bs] * bs + pos % bs,
                           block_size=bs, seq_lens_t=torch.tensor([context + k]),
                           tree_masks=None if k == 1 else [torch.tril(torch.ones(k, k, dtype=torch.bool))])
    ids = torch.randint(0, 1000, (k,))
    t = time.perf_counter()
    with torch.inference_mode():
        hidden = model(ids, pos, runner.kv_caches, md)
        model.compute_logits(hidden).argmax(-1).tolist()
    return time.perf_counter() - t


times = {k: [] for k in sizes}
for r in range(rounds + 3):
    for k in sizes:
        dt = step(k)
        if r >= 3:
            times[k].append(dt)
base = statistics.median(times[1])
for k in sizes:
    m = statistics.median(times[k])
    print(f"k={k:2d}: {m * 1e3:6.2f} ms  x{m / base:.2f} of one row")
