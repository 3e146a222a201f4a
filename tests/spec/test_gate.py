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


def test_a_gated_off_merged_tree_keeps_its_lookups_and_a_stale_draft_stays_plain(make_llm):
    """While the gate keeps a step plain, a merged tree's n-gram part still drafts and the model
    part is not run; once a request has decoded more than max_draft_backlog tokens plain, the
    model drafter is not run for it even when the gate opens (it would first re-read them)."""
    spec = {"method": "merged", "num_speculative_tokens": 4, "adaptive": True, "max_draft_backlog": 4,
            "methods": [{"method": "ngram"}, {"method": "early_exit", "num_early_exit_layers": 4}]}
    llm = make_llm(speculative_config=spec)
    engine = llm.engine
    ngram, early_exit = engine.proposer.proposers
    model_calls = []
    propose = early_exit.propose
    early_exit.propose = lambda reqs, min_prob=0.0: (model_calls.append(len(reqs)), propose(reqs, min_prob))[1]
    steps = []

    def want_spec(num_running):   # closed for the first 10 decode steps, then open
        steps.append(num_running)
        return len(steps) > 10
    engine.spec_gate.want_spec = want_spec
    prompt = "Repeat after me: one two three, one two three, one two three, one two three"
    greedy = SamplingParams(temperature=0.0, max_tokens=40)
    got = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert got == make_llm().generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert len(steps) > 10                    # the gate was asked, and opened
    assert engine.spec_stats.num_drafts > 0   # the lookups drafted while it was closed
    assert model_calls == []                  # the draft never ran: 10 plain tokens > backlog 4

    # A fresh request, gate open from its first decode step: the model drafter runs for it.
    steps.extend([0] * 10)
    llm.generate([prompt], greedy, use_tqdm=False)
    assert model_calls and all(n == 1 for n in model_calls)
