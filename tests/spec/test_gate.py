"""The measured speculation gate (spruce/spec/gate.py), with fake timings, and in the engine."""
import pytest

from spruce.sampling_params import SamplingParams
from spruce.spec.gate import SpecGate


def test_gate_measures_both_then_takes_the_faster_and_keeps_probing():
    g = SpecGate(probe_every=4)
    assert g.want_spec(1) is True          # no estimate yet: speculation first
    g.record(1, True, num_tokens=2, seconds=0.1)     # 20 tok/s with drafts
    assert g.want_spec(1) is False         # then the plain step
    g.record(1, False, num_tokens=1, seconds=0.02)   # 50 tok/s without
    # Plain wins; drafting measured 2.5x slower, so it is probed once in 4 x 2.5 = 10 steps.
    choices = [g.want_spec(1) for _ in range(20)]
    assert choices.count(True) == 2 and choices[9] and choices[19]
    for _ in range(10):   # drafts get better: the probes see it and the gate switches over
        g.record(1, True, num_tokens=6, seconds=0.05)
    choices = [g.want_spec(1) for _ in range(8)]
    assert choices.count(True) == 6      # drafting wins; the plain step is probed once in 4


def test_drafting_probes_back_off_while_they_keep_losing():
    g = SpecGate(probe_every=4, max_backoff=4)
    g.want_spec(1); g.record(1, True, 1, 0.04)     # 25 tok/s drafted
    g.want_spec(1); g.record(1, False, 1, 0.02)    # 50 tok/s plain: drafting 2x slower

    def steps_to_next_probe():
        for n in range(1, 200):
            if g.want_spec(1):
                return n
        raise AssertionError("no probe")

    gaps = []
    for _ in range(4):
        gaps.append(steps_to_next_probe())
        g.record(1, True, 1, 0.04)                 # the probe: still slower
    assert gaps == [8, 16, 32, 32]                 # 4 x 2, then doubling, capped at 4x
    steps_to_next_probe()
    for _ in range(6):                             # drafts got good: the probe wins ...
        g.record(1, True, 8, 0.04)
    assert g.want_spec(1) is True                  # ... and drafting takes over, backoff reset
    assert g._backoff[1] == 1
    with pytest.raises(ValueError):
        SpecGate(max_backoff=0)


def test_gate_buckets_by_batch_size():
    g = SpecGate()
    assert [SpecGate.bucket(n) for n in (1, 2, 3, 4, 7, 8, 64)] == [1, 2, 2, 3, 3, 4, 4]
    g.want_spec(1)
    g.record(1, True, 3, 0.03)
    assert g.want_spec(8) is True   # another bucket has no estimate yet
    g.record(2, False, 0, 0.01)      # steps that emitted nothing are not evidence
    assert (2, False) not in g.rate
    with pytest.raises(ValueError):
        SpecGate(probe_every=1)


def test_gated_engine_stays_lossless_and_seeded_sampling_reproducible(make_llm):
    llm = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "adaptive": True})
    assert llm.engine.spec_gate is not None
    plain = make_llm()
    prompts = ["Repeat after me: one two three, one two three, one two three", "List the days of the week."]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, greedy, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == want
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=16)
    runs = [[o.outputs[0].token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert llm.engine.spec_gate.rate   # the gate measured steps
