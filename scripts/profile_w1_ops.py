"""Where a W1-shaped run spends its time, by op class: wraps the model's linear op, elementwise ops,
attention backend and the engine's phases with timers (no torch.profiler: the native ops are
invisible to it). Orientation only -- the timers add a little overhead; claims come from
`spruce bench`.

    .venv/bin/python scripts/profile_w1_ops.py [dtype] [max_tokens]
"""
import sys, time, torch, collections
from spruce import LLM, SamplingParams
from spruce.bench.workloads import build_w1
dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
maxtok = int(sys.argv[2]) if len(sys.argv) > 2 else 64
llm = LLM("smollm2-135m", dtype=dtype)
w = build_w1(llm.tokenizer)
eng = llm.engine
model = eng.runner.model
acc = collections.defaultdict(float); cnt = collections.Counter()
def wrap(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); dt = time.perf_counter() - t
        key = label(a) if callable(label) else label
        acc[key] += dt; cnt[key] += 1
        return r
    setattr(obj, name, g)
lin = model.linear
orig = type(lin).__call__
def lincall(x, w_, b=None):
    t = time.perf_counter(); r = orig(lin, x, w_, b); dt = time.perf_counter() - t
    key = f"linear m{'<=8' if x.shape[0]<=8 else ('<=96' if x.shape[0]<=96 else '>96')} n{w_.shape[0]}"
    acc[key] += dt; cnt[key] += 1; return r
model.linear = lincall
for n in ["rms_norm", "add_rms_norm", "silu_and_mul", "rope"]:
    wrap(model.elementwise, n, n)
wrap(model.backend, "forward", lambda a: "attn " + ("decode" if a[0].shape[0] <= 64 else "prefill"))
wrap(eng.runner, "execute", "runner.execute")
wrap(eng.scheduler, "schedule", "schedule")
wrap(eng, "_update", "update")
for p in w.prompts:
    eng.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=maxtok, ignore_eos=True))
T = time.perf_counter()
while eng.has_unfinished_requests():
    eng.step()
el = time.perf_counter() - T
print(f"total {el:.2f}s")
for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
    print(f"{k:28s} {v:7.3f}s  {cnt[k]:6d} calls  {1e3*v/cnt[k]:8.3f} ms/call")
