"""Verification: greedy walk, target_probs glue, and EXACTNESS of MSS by chi-square tests.

Exactness tests draw N independent speculative steps (fresh draft randomness every time) and
compare the first emitted token, and the first two tokens jointly, with the target model. Each
test also runs a known-wrong verifier on the same samples and requires the SAME check to fail,
so the check has the power to catch the bugs it is there for.
"""
import functools
import gc

import pytest
import torch

from spruce.engine.sampler import Sampler, SamplingMetadata
from spruce.request import Request
from spruce.sampling_params import SamplingParams
from spruce.spec import verify as verify_mod
from spruce.spec.tree import (Proposal, TokenTree, build_by_beam, build_by_expansion, build_by_expansion_batch,
                              merge_trees)
from spruce.spec.verify import (spec_sampling_metadata, target_probs, verify_greedy,
                                verify_stochastic, verify_stochastic_batch)

V, N, ALPHA = 6, 20000, 1e-3


@pytest.fixture(autouse=True)
def _fast_small_ops():
    # Thousands of tiny ops: a second thread only adds hand-off cost. And 20k trees are ~10^6
    # small tracked objects, over which the cyclic GC would spend more than half the time.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.disable()
    yield
    gc.enable()
    torch.set_num_threads(old)


def chisq_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit (scipy.stats.chisquare's p-value, via the regularized
    upper incomplete gamma). A sample in a zero-probability cell is an outright failure."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    exp = probs / probs.sum() * counts.sum()
    if counts[exp == 0].sum() > 0:
        return 0.0
    keep = exp > 0
    assert exp[keep].min() >= 5, "cells too small for the chi-square approximation"
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def test_chisq_helper_matches_known_quantiles():
    # chi2(1) has 5% above 3.841; chi2(5) has 0.1% above 20.515.
    assert chisq_pvalue(torch.tensor([100 + 3.841 ** 0.5 * 50 ** 0.5, 100 - 3.841 ** 0.5 * 50 ** 0.5]),
                        torch.tensor([0.5, 0.5])) == pytest.approx(0.05, rel=1e-3)
    s = torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64), torch.tensor(20.515 / 2))
    assert float(s) == pytest.approx(1e-3, rel=1e-3)


# --- A toy target and two toy drafts over 6 tokens. The target at a node depends on its depth
# and last token; each draft deliberately disagrees with it so that wrong verifiers show.
g0 = torch.Generator().manual_seed(20240601)


def _dist(scale, n=1):
    return torch.softmax(torch.randn(n, V, generator=g0) * scale, -1).squeeze(0)


P0, P1, P2 = _dist(0.8), _dist(0.8, V), _dist(0.8, V)
QA0, QA1 = _dist(1.5), _dist(1.5, V)
QB0, QB1 = _dist(1.5), _dist(1.5, V)
JOINT = P0.unsqueeze(1) * P1           # P(first = a, second = b)


def draft_fn(q0, q1):
    def fn(ctxs):
        last = torch.tensor([c[-1] for c in ctxs])
        at_root = torch.tensor([len(c) == 1 for c in ctxs]).unsqueeze(1)
        return torch.where(at_root, q0, q1[last])
    return fn


def target_rows(trees):
    tok = torch.tensor([t for tr in trees for t in tr.tokens])
    dep = torch.tensor([d for tr in trees for d in tr.depths])
    return torch.where((dep == 0).unsqueeze(1), P0, torch.where((dep == 1).unsqueeze(1), P1[tok], P2[tok]))


def exactness_pvalues(trees, seed=7):
    """(p-value of the first token, p-value of the first two tokens) over one step per tree.
    A step that emits one token is followed by an ordinary target draw, as the next step is."""
    gen = torch.Generator().manual_seed(seed)
    res = verify_stochastic_batch(trees, target_rows(trees), gen)
    toks = [r.tokens(t) for r, t in zip(res, trees)]
    first = torch.tensor([x[0] for x in toks])
    second = torch.tensor([x[1] if len(x) > 1 else -1 for x in toks])
    short = second < 0
    second[short] = torch.multinomial(P1[first[short]], 1, generator=gen).squeeze(1)
    c1 = torch.bincount(first, minlength=V)
    c2 = torch.bincount(first * V + second, minlength=V * V)
    return chisq_pvalue(c1, P0), chisq_pvalue(c2, JOINT)


@functools.lru_cache(maxsize=None)   # tests share draws; nobody mutates a tree
def sampled_trees(expansion, q0, q1, seed, proposer=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    return build_by_expansion_batch(draft_fn(q0, q1), [[0]] * n, expansion, sample=True,
                                    generators=gen, proposer=proposer)


def passes(pv):
    return min(pv) > ALPHA


def test_chain_sampled_is_exact():
    trees = sampled_trees((1, 1), QA0, QA1, seed=1)     # classic speculative sampling
    assert passes(exactness_pvalues(trees))


def test_sampled_tree_is_exact_and_known_bugs_fail(monkeypatch):
    trees = sampled_trees((3, 2), QA0, QA1, seed=2)
    assert any(len(t.children(0)) == 3 for t in trees) and any(len(t.children(0)) < 3 for t in trees)
    assert passes(exactness_pvalues(trees))
    with monkeypatch.context() as m:                       # forgets the residual update
        m.setattr(verify_mod, "_residual", lambda p, q: p)
        assert not passes(exactness_pvalues(trees))
    with monkeypatch.context() as m:                       # AdaServe's `r < d/d + 1e-6`
        m.setattr(verify_mod, "_accept", lambda u, px, qx: px > 0)
        assert not passes(exactness_pvalues(trees))


def test_topk_tree_is_exact_as_point_masses_and_not_with_draft_q():
    tree = build_by_expansion(draft_fn(QA0, QA1), [0], (3, 2))
    assert len(tree) == 1 + 3 + 6
    assert passes(exactness_pvalues([tree] * N))
    # SYSTEMS.md's warning: top-k picks verified as if drawn from q.
    wrong = TokenTree(tree.tokens, tree.parents,
                      [[p._replace(sampled=True) for p in ps] for ps in tree.proposals])
    assert not passes(exactness_pvalues([wrong] * N))


def test_merged_point_mass_chains_sharing_a_prefix_is_exact():
    # What prompt lookup proposes: deterministic chains, here with a repeated first token, so
    # the root tries the same point mass twice.
    chains = [TokenTree.chain([0] + c) for c in ([2, 1], [2, 4], [5, 0], [3])]
    tree = merge_trees(chains)
    assert [tree.tokens[p.child] for p in tree.proposals[0]] == [2, 2, 5, 3]
    assert passes(exactness_pvalues([tree] * N))


def test_root_only_tree_and_empty_batch():
    res = verify_stochastic(TokenTree([3], [-1]), P0.unsqueeze(0), torch.Generator().manual_seed(0))
    assert res.accepted == [] and 0 <= res.bonus < V
    assert verify_stochastic_batch([], torch.zeros(0, V)) == []


def test_beam_tree_is_exact():
    tree = build_by_beam(draft_fn(QA0, QA1), [0], width=3, depth=2, max_nodes=6)
    assert len(tree) == 6
    assert passes(exactness_pvalues([tree] * N))


def rotate_q(tree):
    """Each draw tested against the q of the next draw at its node: the wrong-child-q bug."""
    props = [[Proposal(p.child, ps[(j + 1) % len(ps)].q, p.sampled, p.proposer)
              for j, p in enumerate(ps)]
             for ps in tree.proposals]
    return TokenTree(tree.tokens, tree.parents, props)


def test_merged_two_proposers_is_exact_and_wrong_q_fails():
    a = sampled_trees((2, 2), QA0, QA1, seed=3, proposer=0)
    b = sampled_trees((2, 1), QB0, QB1, seed=4, proposer=1)
    merged = [merge_trees([x, y]) for x, y in zip(a, b)]
    assert {p.proposer for p in merged[0].proposals[0]} == {0, 1}
    assert passes(exactness_pvalues(merged))
    assert not passes(exactness_pvalues([rotate_q(t) for t in merged]))


def test_merged_deterministic_and_sampled_proposers_is_exact():
    top = build_by_beam(draft_fn(QA0, QA1), [0], width=2, depth=2)
    b = sampled_trees((2, 1), QB0, QB1, seed=4, proposer=1)
    assert passes(exactness_pvalues([merge_trees([top, y]) for y in b]))


# --- Greedy, temperature 0, seeds


def greedy_tree():
    #  0:0 -> 1:3 -> 3:4
    #      -> 2:5 -> 4:1
    return TokenTree([0, 3, 5, 4, 1], [-1, 0, 0, 1, 2])


def test_verify_greedy_paths_and_bonus():
    t = greedy_tree()
    assert verify_greedy(t, [3, 4, 9, 2, 9]) == ([1, 3], 2)     # full path + bonus at the leaf
    assert verify_greedy(t, [5, 9, 0, 9, 9]).tokens(t) == [5, 0]  # 5 accepted, 1 != 0
    assert verify_greedy(t, torch.tensor([2, 4, 1, 0, 0])) == ([], 2)   # root argmax in no child


def test_temperature_zero_through_stochastic_entry_equals_greedy():
    reqs = [Request("g", [1, 2], SamplingParams(temperature=0.0))]
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = build_by_expansion(draft_fn(QA0, QA1), [0], (2, 2), sample=True, generator=gen)
        logits = torch.randn(len(t), V, generator=gen)
        want = verify_greedy(t, logits.argmax(-1))
        probs = target_probs(logits, spec_sampling_metadata(reqs, [t], V))
        assert verify_stochastic(t, probs, gen) == want


def test_seeded_rows_reproducible_and_batch_independent():
    gen = torch.Generator().manual_seed(0)
    a, b = sampled_trees((2, 2), QA0, QA1, seed=9, n=2)
    pa, pb = target_rows([a]), target_rows([b])
    runs = [verify_stochastic(a, pa, torch.Generator().manual_seed(s)) for s in range(40)]
    assert runs == [verify_stochastic(a, pa, torch.Generator().manual_seed(s)) for s in range(40)]
    assert len(set(map(tuple, (r.tokens(a) for r in runs)))) > 1
    for s in range(40):
        both = verify_stochastic_batch([b, a], torch.cat([pb, pa]),
                                       [torch.Generator().manual_seed(100 + s),
                                        torch.Generator().manual_seed(s)])
        assert both[1] == runs[s]
    assert gen is not None


# --- target_probs: the Sampler's own distribution, per node history


def sampler_counts(logits_row, request, hist, n=N):
    md = SamplingMetadata.from_requests([request] * n, logits_row.numel(), "cpu",
                                        output_token_ids=[hist] * n)
    out = Sampler()(logits_row.expand(n, -1).clone(), md).sampled_token_ids
    return torch.bincount(out, minlength=logits_row.numel())


@pytest.mark.parametrize("vocab,kw", [
    (12, dict(temperature=0.7, top_k=6, min_p=0.02, repetition_penalty=1.6,
              frequency_penalty=0.5, presence_penalty=0.4, logit_bias={3: 2.0})),
    (600, dict(temperature=1.3, top_p=0.6, top_k=30, presence_penalty=1.0)),  # partial top-p path
])
def test_target_probs_match_sampler_with_node_histories(vocab, kw):
    torch.manual_seed(0)
    r = Request("r", [1, 2], SamplingParams(**kw), eos_token_id=0)
    r.append_output_token_ids([4, 5])
    t = TokenTree([5, 7, 9, 8], [-1, 0, 0, 1])      # node 3 = path 7, 8
    logits = torch.randn(len(t), vocab) * 2
    logits[:, 7] += 3          # make the ancestor-token penalty visible at node 2
    md = spec_sampling_metadata([r], [t], vocab)
    probs = target_probs(logits, md)
    assert torch.allclose(probs.sum(-1), torch.ones(len(t)))
    assert probs[3, 7] < probs[2, 7] * 0.9 or kw.get("top_p")   # node 3 has seen token 7
    for i in ((0, 3) if vocab < 100 else (3,)):
        hist = r.output_token_ids + t.path_tokens(i)
        counts = sampler_counts(logits[i], r, hist, n=N if vocab < 100 else 8000)
        assert chisq_pvalue(counts, probs[i]) > ALPHA


def test_target_probs_min_tokens_per_depth_and_greedy_rows():
    eos = 0
    greedy = Request("g", [1], SamplingParams(temperature=0.0), eos_token_id=eos)
    r = Request("r", [1], SamplingParams(min_tokens=3), eos_token_id=eos)
    r.append_output_token_ids([2])
    t = TokenTree.chain([2, 3, 4, 5])       # node depth d has 1 + d output tokens
    logits = torch.zeros(len(t), V)
    logits[:, eos] = 5.0
    md = spec_sampling_metadata([r, greedy], [t, t], V)
    probs = target_probs(logits.repeat(2, 1), md)
    assert probs[:4, eos].tolist()[:2] == [0.0, 0.0] and (probs[2:4, eos] > 0.5).all()
    assert torch.equal(probs[4:], torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), V).float())
    assert torch.equal(logits, torch.zeros(len(t), V).index_fill_(1, torch.tensor([eos]), 5.0))
