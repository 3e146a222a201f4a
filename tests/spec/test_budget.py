"""Cutting draft trees to the nodes worth verifying (spruce/spec/budget.py), on hand-built trees."""
import math

import pytest
import torch

from spruce.spec.budget import AcceptanceRecord, StepCost, cut_trees, node_values, row_value
from spruce.spec.tree import Proposal, TokenTree, merge_trees


def _draft_tree(tokens, parents, probs):
    """A deterministic draft tree whose node i was picked with draft probability probs[i]."""
    cum = [0.0] * len(tokens)
    for i in range(1, len(tokens)):
        cum[i] = cum[parents[i]] + math.log(probs[i])
    q = torch.full((8,), 1 / 8)
    props = [[Proposal(c, q, False) for c in range(1, len(tokens)) if parents[c] == u] for u in range(len(tokens))]
    return TokenTree(tokens, parents, props, cum)


def _record(rates: dict[int, tuple[int, int]]) -> AcceptanceRecord:
    r = AcceptanceRecord()
    for d, (hit, tried) in rates.items():
        r.hit[d], r.tried[d] = hit, tried
    return r


def test_node_values_are_path_products():
    t = _draft_tree([5, 1, 2, 3], [-1, 0, 0, 1], [1, 0.5, 0.25, 0.5])
    assert node_values(t, AcceptanceRecord(), AcceptanceRecord()) == pytest.approx([1, 0.5, 0.25, 0.25])
    # A lookup chain (no q) takes the request's acceptance record, smoothed towards the global one.
    chain = TokenTree.chain([5, 1, 2])
    own = _record({1: (8, 8), 2: (0, 8)})
    glob = _record({1: (50, 100), 2: (50, 100)})
    v = node_values(chain, own, glob)
    assert v[1] == pytest.approx((8 + 4 * 0.5) / 12)
    assert v[2] == pytest.approx(v[1] * (0 + 4 * 0.5) / 12)


def test_cut_keeps_nodes_above_the_row_value_and_within_the_row_cap():
    t = _draft_tree([5, 1, 2, 3, 4], [-1, 0, 0, 1, 3], [1, 0.9, 0.05, 0.9, 0.9])
    rec = [AcceptanceRecord()]
    (cut,) = cut_trees([t], rec, AcceptanceRecord(), num_running=1)
    assert row_value(1) > 0.05
    assert cut.tokens == [5, 1, 3, 4]          # the 0.05 branch is dropped, the chain kept
    assert cut.parents == [-1, 0, 1, 2]
    # At batch 8 a row must bring more: 0.9^3 = 0.73 still pays, 0.05 does not.
    (cut8,) = cut_trees([t], rec, AcceptanceRecord(), num_running=8)
    assert cut8.tokens == [5, 1, 3, 4]
    # The cap counts every request's own row: 3 requests, cap 5 -> 2 speculative rows in all,
    # given to the best nodes across the trees.
    weak = _draft_tree([7, 1], [-1, 0], [1, 0.3])
    out = cut_trees([t, weak, None], [AcceptanceRecord()] * 3, AcceptanceRecord(), num_running=3, max_rows=5)
    assert out[0].tokens == [5, 1, 3] and out[1] is None and out[2] is None


def test_cut_never_orphans_a_node_and_leaves_sampled_trees_whole():
    t = _draft_tree([5, 1, 2, 3], [-1, 0, 0, 2], [1, 0.6, 0.6, 1.0])   # node 3 ties its parent
    (cut,) = cut_trees([t], [AcceptanceRecord()], AcceptanceRecord(), num_running=1, max_rows=3)
    assert cut.tokens == [5, 1, 2]
    q = torch.full((8,), 1 / 8)
    sampled = TokenTree.chain([5, 1, 2, 3], qs=[q, q, q])
    (same,) = cut_trees([sampled], [AcceptanceRecord()], AcceptanceRecord(), num_running=8, max_rows=2)
    assert same is sampled


def test_record_counts_lookup_nodes_on_the_accepted_path():
    lookup = TokenTree.chain([5, 1, 2, 3])
    draft = _draft_tree([5, 1, 9], [-1, 0, 1], [1, 0.5, 0.5])
    merged = merge_trees([lookup, draft])       # 5 -> 1 -> {2 (lookup), 9 (draft)} -> 3
    r = AcceptanceRecord()
    r.record(merged, [1, 9, 4])                 # accepted 1 and the draft's 9, bonus 4
    assert (r.tried[1], r.hit[1]) == (1, 1)     # depth 1: lookup node 1 taken
    assert (r.tried[2], r.hit[2]) == (1, 0)     # depth 2: lookup node 2 passed over for 9
    assert r.tried[3] == 0                      # node 9 has no children
    r.record(lookup, [7])                       # rejected at once
    assert (r.tried[1], r.hit[1]) == (2, 1)


def test_engine_cuts_trees_and_stays_lossless(make_llm):
    from spruce.sampling_params import SamplingParams
    spec = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 8, "adaptive": True,
                                        "max_num_verify_rows": 4})
    plain = make_llm()
    prompts = ["Repeat after me: one two three, one two three, one two three, one two three"]
    p = SamplingParams(temperature=0.0, max_tokens=32)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, p)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, p)]
    eng = spec.engine
    assert sum(eng.spec_record.tried) > 0
    # max_num_verify_rows=4: one root row plus at most 3 draft tokens a step.
    assert len(eng.spec_stats.num_accepted_tokens_per_pos) <= 3
    with pytest.raises(ValueError, match="max_num_verify_rows"):
        make_llm(speculative_config={"method": "ngram", "max_num_verify_rows": 1})


def test_step_cost_fits_fixed_and_per_row_time_and_prices_a_row():
    cost = StepCost(min_steps=8)
    for _ in range(4):
        cost.observe(1, 0.010 + 0.001)      # plain steps only: rows cannot be priced yet
    assert cost.fit() is None and cost.row_value(1) == row_value(1)
    for i in range(40):
        rows = 1 + i % 9
        cost.observe(rows, 0.010 + 0.001 * rows)
    fixed, per_row = cost.fit()
    assert fixed == pytest.approx(0.010, rel=1e-6) and per_row == pytest.approx(0.001, rel=1e-6)
    # A plain step of 1 request: 11 ms for 1 token; an extra row (1 ms) must bring 1/11 token.
    assert cost.row_value(1) == pytest.approx(1 / 11)
    assert cost.row_value(8) == pytest.approx(8 / 18)
    # Rows that cost almost nothing still need a floor of 0.01 tokens ...
    cheap = StepCost(min_steps=8)
    for i in range(40):
        cheap.observe(1 + i % 9, 0.010 + 1e-7 * (1 + i % 9))
    assert cheap.fit() is not None and cheap.row_value(1) == 0.01
    # ... and a negative slope is no fit at all.
    flat = StepCost(min_steps=8)
    for i in range(40):
        flat.observe(1 + i % 9, 0.012 - 0.0001 * (i % 9))
    assert flat.fit() is None and flat.row_value(1) == row_value(1)


def test_cut_uses_the_given_threshold():
    t = _draft_tree([5, 1, 2], [-1, 0, 1], [1, 0.5, 0.2])      # path values 0.5, 0.1
    (cut,) = cut_trees([t], [AcceptanceRecord()], AcceptanceRecord(), num_running=1, threshold=0.3)
    assert cut.tokens == [5, 1]
    (whole,) = cut_trees([t], [AcceptanceRecord()], AcceptanceRecord(), num_running=1, threshold=0.05)
    assert whole.tokens == [5, 1, 2]
