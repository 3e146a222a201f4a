"""A/B of two engine settings on W1 in one process, alternating runs so that both sides see the
same machine (this VM's speed drifts by tens of percent between minutes). Orientation for kernel
work only; claims come from `spruce bench`.

    .venv/bin/python scripts/ab_w1.py [max_tokens] [rounds]

Edit TOGGLE below to say what A and B are.
"""
import sys, time
from spruce import LLM, SamplingParams
from spruce.bench.workloads import build_w1

maxtok = int(sys.argv[1]) if len(sys.argv) > 1 else 64
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
llm = LLM("smollm2-135m", dtype="bfloat16")
w = build_w1(llm.tokenizer)
lin = llm.engine.runner.model.linear


def toggle(on: bool) -> None:   # A = on: the AMX GEMM; B = off: oneDNN
    (lin._no_layout.discard if on else lin._no_layout.add)("amx")


def run() -> float:
    eng = llm.engine
    assert eng.scheduler.kv.reset_prefix_cache()   # each run prefills from scratch, as W1 does
    for p in w.prompts:
        eng.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=maxtok, ignore_eos=True))
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
    return len(w.prompts) * maxtok / (time.perf_counter() - t)


res = {True: [], False: []}
for r in range(rounds):
    for on in (True, False) if r % 2 == 0 else (False, True):
        toggle(on)
        res[on].append(run())
        print(f"round {r} {'A' if on else 'B'}: {res[on][-1]:.1f} out tok/s", flush=True)
a, b = max(res[True]), max(res[False])
print(f"best A {a:.1f}  best B {b:.1f}  A/B x{a / b:.3f}")
