import math

import pytest
import torch

from spruce.spec.tree import (Proposal, TokenTree, build_by_beam, build_by_expansion,
                              build_by_expansion_batch, merge_trees)


def hand_tree():
    #        0:10
    #       /     \
    #    1:11     2:12
    #    /  \        \
    #  3:13 4:14     5:15
    return TokenTree([10, 11, 12, 13, 14, 15], [-1, 0, 0, 1, 1, 2])


def test_ancestor_mask_and_positions_exact():
    t = hand_tree()
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.ancestor_mask(), want)
    # 7 tokens precede the root: the root sits at position 7, depth d at 7 + d.
    assert t.positions(7).tolist() == [7, 8, 8, 9, 9, 9]
    assert t.depths == [0, 1, 1, 2, 2, 2]
    assert t.paths() == [[11, 13], [11, 14], [12, 15]]
    assert t.path(4) == [1, 4] and t.path_tokens(5) == [12, 15] and t.path(0) == []
    assert t.children(1) == [3, 4] and t.children(3) == []
    # Hand-built trees default to deterministic picks (verified as point masses).
    assert [(p.child, p.sampled, p.q) for p in t.proposals[1]] == [(3, False, None), (4, False, None)]


def test_chain_is_width_one_tree():
    qs = [torch.full((20,), 0.05) for _ in range(3)]
    c = TokenTree.chain([5, 6, 7, 8], qs)
    assert torch.equal(c.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert c.positions(3).tolist() == [3, 4, 5, 6]
    assert c.paths() == [[6, 7, 8]]
    assert all(c.proposals[i][0].sampled and c.proposals[i][0].q is qs[i] for i in range(3))
    assert c.proposals[3] == []
    assert TokenTree.chain([5]).paths() == [] and len(TokenTree.chain([5])) == 1


def test_invalid_trees_rejected():
    with pytest.raises(AssertionError):
        TokenTree([1, 2, 2], [-1, 0, 0])          # duplicate sibling token: not a trie
    with pytest.raises(AssertionError):
        TokenTree([1, 2, 3], [-1, 2, 0])          # parent after child
    with pytest.raises(AssertionError):
        TokenTree([1, 2, 3, 4], [-1, 0, 1, 0])    # depth 2 before depth 1: not BFS
    with pytest.raises(AssertionError):
        TokenTree([1, 2], [-1, 0], [[Proposal(1, None, True)], []])   # sampled needs q


V = 8


def ranked_draft(calls):
    """q favours tokens in an order that rotates with the context's last token, so every node
    ranks differently and we know its top-k: (last + 1), (last + 2), ... mod V."""
    def fn(ctxs):
        calls.append([list(c) for c in ctxs])
        out = torch.zeros(len(ctxs), V)
        for r, c in enumerate(ctxs):
            for rank in range(V):
                out[r, (c[-1] + 1 + rank) % V] = 0.5 ** (rank + 1)
        return out / out.sum(-1, keepdim=True)
    return fn


def test_expansion_1_1_3_1_shape_and_contexts():
    calls = []
    t = build_by_expansion(ranked_draft(calls), [4, 0], expansion=(1, 1, 3, 1))
    assert len(t) == 1 + 1 + 1 + 3 + 3
    assert [t.depths.count(d) for d in range(5)] == [1, 1, 1, 3, 3]
    assert t.root_token == 0 and t.tokens[1] == 1 and t.tokens[2] == 2
    assert t.children(2) == [3, 4, 5] and [t.tokens[i] for i in (3, 4, 5)] == [3, 4, 5]
    assert t.paths() == [[1, 2, 3, 4], [1, 2, 4, 5], [1, 2, 5, 6]]
    # One draft call per depth, over the whole frontier; contexts are root_ctx + path.
    assert calls[2] == [[4, 0, 1, 2]] and calls[3] == [[4, 0, 1, 2, 3], [4, 0, 1, 2, 4], [4, 0, 1, 2, 5]]
    # Deterministic picks; each keeps the q it was chosen from and its cumulative log-prob.
    src = t.sources(4)
    assert len(src) == 1 and not src[0].sampled and src[0].q[4] == pytest.approx(0.25 / (1 - 0.5 ** V))
    assert t.cum_logprobs[1] == pytest.approx(math.log(0.5 / (1 - 0.5 ** V)))


def test_expansion_sampled_keeps_every_draw():
    g = torch.Generator().manual_seed(0)
    t = build_by_expansion(ranked_draft([]), [0], expansion=(6, 2), sample=True, generator=g)
    assert len(t.proposals[0]) == 6                           # every draw, repeats included
    kids = t.children(0)
    assert len(kids) == len({p.child for p in t.proposals[0]}) < 6   # repeats share a node
    q0 = t.proposals[0][0].q
    assert all(p.sampled and p.q is q0 for p in t.proposals[0])   # one q object per parent
    assert all(len(t.proposals[k]) == 2 for k in kids)
    assert sum(len(s) for s in (t.sources(k) for k in kids)) == 6


def test_expansion_batch_one_draft_call_per_depth_and_seeded_trees_batch_independent():
    calls = []
    ctxs = [[0], [3], [5, 1]]
    trees = build_by_expansion_batch(ranked_draft(calls), ctxs, (2, 1))
    assert len(calls) == 2 and len(calls[0]) == 3 and len(calls[1]) == 6
    assert [t.paths() for t in trees] == [build_by_expansion(ranked_draft([]), c, (2, 1)).paths()
                                          for c in ctxs]
    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = build_by_expansion_batch(ranked_draft([]), ctxs, (3, 2), sample=True, generators=gens())
    alone = build_by_expansion(ranked_draft([]), ctxs[1], (3, 2), sample=True, generator=gens()[1])
    assert [p.child for p in batch[1].proposals[0]] == [p.child for p in alone.proposals[0]]
    assert batch[1].paths() == alone.paths() and batch[1].tokens == alone.tokens


def test_beam_with_cap():
    q = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    def draft(ctxs):
        return q.expand(len(ctxs), -1)
    full = build_by_beam(draft, [9], width=2, depth=3)
    # Layer 1 keeps 0 (.5) and 1 (.3); layer 2 the best two of .25 .15 | .15 .09 (a tie goes to
    # the earlier parent), so node 1 stays a leaf; layer 3: .125 and .075 (again a tie).
    assert full.paths() == [[1], [0, 1], [0, 0, 0], [0, 0, 1]]
    assert [full.depths.count(d) for d in range(4)] == [1, 2, 2, 2]
    cut = build_by_beam(draft, [9], width=2, depth=3, max_nodes=4)
    assert len(cut) == 4 and cut.paths() == [[1], [0, 0]]
    # The cut kept the best nodes by cumulative probability, and it is a valid tree.
    kept = sorted(math.exp(x) for x in cut.cum_logprobs[1:])
    assert kept == pytest.approx([0.25, 0.3, 0.5])
    assert all(not p.sampled for ps in cut.proposals for p in ps)
    assert build_by_beam(draft, [9], width=2, depth=3, max_nodes=100).paths() == full.paths()
    assert len(build_by_beam(draft, [9], width=2, depth=3, max_nodes=1)) == 1


def test_beam_batch_is_one_draft_call_per_depth_and_the_same_trees_as_alone():
    from spruce.spec.tree import build_by_beam_batch
    def random_draft(calls):
        def fn(ctxs):      # a distribution of its own for every context, the same on every call
            calls.append(len(ctxs))
            rows = [torch.randn(V, generator=torch.Generator().manual_seed(hash(tuple(c)) % 2 ** 31)) * 2
                    for c in ctxs]
            return torch.stack(rows).softmax(-1)
        return fn
    ctxs = [[0], [3, 1], [5, 1, 2]]
    for max_nodes in (None, 5):
        calls = []
        batch = build_by_beam_batch(random_draft(calls), ctxs, width=3, depth=3, max_nodes=max_nodes)
        alone = [build_by_beam(random_draft([]), c, width=3, depth=3, max_nodes=max_nodes) for c in ctxs]
        assert len(calls) == 3
        assert [t.paths() for t in batch] == [t.paths() for t in alone]
        assert [t.cum_logprobs for t in batch] == [t.cum_logprobs for t in alone]


def test_min_prob_stops_drafting_below_nodes_the_step_would_not_verify():
    """Nodes whose cumulative draft probability is under min_prob become leaves: fewer draft
    calls, and cutting at min_prob (as spec/budget.py does) leaves the same tree either way."""
    from spruce.spec.tree import _subtree
    q = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    def draft(calls):
        def fn(ctxs):
            calls.append(len(ctxs))
            return q.expand(len(ctxs), -1)
        return fn

    def cut(t, p):
        return _subtree(t, [i for i in range(len(t)) if math.exp(t.cum_logprobs[i]) >= p])
    for build in (lambda fn, m: build_by_beam(fn, [9], width=2, depth=4, min_prob=m),
                  lambda fn, m: build_by_expansion_batch(fn, [[9]], (2, 2, 1, 1), min_prob=m)[0]):
        full_calls, pruned_calls = [], []
        full, pruned = build(draft(full_calls), 0.0), build(draft(pruned_calls), 0.2)
        assert sum(pruned_calls) < sum(full_calls)
        assert cut(pruned, 0.2).paths() == cut(full, 0.2).paths()
        assert all(math.exp(pruned.cum_logprobs[pruned.parents[i]]) >= 0.2 for i in range(1, len(pruned)))
    # Sampled draws are never pruned (a draw dropped for its value would bias MSS).
    a = build_by_expansion_batch(draft([]), [[9]], (2, 2), sample=True, min_prob=0.9,
                                 generators=torch.Generator().manual_seed(0))[0]
    b = build_by_expansion_batch(draft([]), [[9]], (2, 2), sample=True,
                                 generators=torch.Generator().manual_seed(0))[0]
    assert a.paths() == b.paths()


def test_beam_skips_impossible_tokens():
    q = torch.tensor([0.0, 1.0, 0.0])
    t = build_by_beam(lambda c: q.expand(len(c), -1), [0], width=3, depth=2)
    assert t.paths() == [[1, 1]]


def test_merge_union_shared_prefixes_no_duplicates():
    qa, qb = torch.full((8,), 1 / 8), torch.full((8,), 1 / 8)
    def sampled(tokens, parents, q, who):
        props = [[] for _ in tokens]
        for i in range(1, len(tokens)):
            props[parents[i]].append(Proposal(i, q, True, who))
        return TokenTree(tokens, parents, props)
    a = sampled([0, 1, 4, 2, 3], [-1, 0, 0, 1, 1], qa, 0)     # paths 1-2, 1-3, 4
    b = sampled([0, 1, 6, 2, 5], [-1, 0, 0, 1, 3], qb, 1)     # paths 1-2-5, 6
    m = merge_trees([a, b])
    assert sorted(m.paths()) == [[1, 2, 5], [1, 3], [4], [6]]
    assert len(m) == 1 + 3 + 2 + 1                            # shared prefixes 1 and 1-2 once
    assert len({tuple(m.path_tokens(i)) for i in range(len(m))}) == len(m)
    assert m.depths == sorted(m.depths)
    n1 = next(c for c in m.children(0) if m.tokens[c] == 1)
    assert [(m.tokens[p.child], p.proposer) for p in m.proposals[n1]] == [(2, 0), (3, 0), (2, 1)]
    n12 = next(c for c in m.children(n1) if m.tokens[c] == 2)
    assert [(p.proposer, p.q is (qa if p.proposer == 0 else qb)) for p in m.sources(n12)] == \
        [(0, True), (1, True)]
    assert [p.proposer for p in m.proposals[0]] == [0, 0, 1, 1]
    # Merging a tree with itself changes the paths not at all (every draw is kept twice).
    assert sorted(merge_trees([a, a]).paths()) == sorted(a.paths())
    with pytest.raises(AssertionError):
        merge_trees([a, TokenTree([7], [-1])])
