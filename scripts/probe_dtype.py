"""Orientation probe (not a benchmark): greedy decode speed of the default model in one dtype.

    .venv/bin/python scripts/probe_dtype.py bfloat16|float32

Prints tokens/s at batch 1 (128 tokens, twice after a warm-up) and for 64 short prompts x 64
tokens. Claims go through `spruce bench ...`; this only tells which dtype to look at first.
"""
import sys
import time

from spruce import LLM, SamplingParams

dtype = sys.argv[1] if len(sys.argv) > 1 else "auto"
llm = LLM("smollm2-135m", dtype=dtype)
prompt = "Write a detailed story about a spruce tree in winter."
one = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
llm.generate([prompt], one)
for _ in range(2):
    t = time.perf_counter()
    out = llm.generate([prompt], one)
    print(f"{dtype} batch 1, 128 tokens: {128 / (time.perf_counter() - t):.1f} tok/s")
print(repr(out[0].outputs[0].text[:200]))
many = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
t = time.perf_counter()
llm.generate([f"{prompt} Number {i}." for i in range(64)], many)
print(f"{dtype} 64 prompts x 64 tokens: {64 * 64 / (time.perf_counter() - t):.1f} tok/s")
