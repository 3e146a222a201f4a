"""Token trees for speculative decoding (SpecInfer), and the builders that draft them.

Convention: node 0 is the ROOT, the last committed token. It belongs to the tree because its
logits are what predict the depth-1 candidates, and in a decode step its K/V is not cached yet,
so it is the first query token of the verify pass. Nodes are in BFS order (parent index < child
index, depths non-decreasing); sibling tokens are distinct, so the tree is a trie and each node
is one candidate continuation (its root->node path).

Positions: with `prefix_len` = the number of tokens before the root (the root's own position;
in a plain decode step that is `num_computed_tokens`), node i sits at prefix_len + depth[i].

Proposals. Exact stochastic verification (see verify.py) needs to know, at each node, *how*
its children were drafted, not only which they are. So every node keeps the ordered list of
draws made at it, `proposals[u]`: each names the child node it produced, the draft distribution
q it came from, whether the token was an independent random draw from q (`sampled`) or a
deterministic pick (top-k, beam: verified as a point mass), and which proposer made it. Draws
with replacement may repeat a token: the child node is shared but every draw stays a proposal,
because each one's residual update is part of the exact procedure.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

# contexts (root_ctx + the node's path tokens, one list per node) -> draft probs [len, V].
DraftStepFn = Callable[[list[list[int]]], torch.Tensor]


class Proposal(NamedTuple):
    child: int                   # node index of the proposed token
    q: Optional[torch.Tensor]    # [V] draft distribution at the parent (None: proposer gave none)
    sampled: bool                # True: an independent draw from q; False: a deterministic pick
    proposer: int = 0
    # Without q: the proposer's estimate that the target continues with this child given the
    # parent (suffix decoding's continuation frequency), for the per-node cut; None: no estimate.
    prob: Optional[float] = None
    # Which of the proposer's estimates are alike, calibrated together (suffix decoding: where the
    # match was and how long it was); 0: one class for all.
    evidence: int = 0


class TokenTree:
    """Parallel lists `tokens`, `parents`, `depths`, `proposals`, `cum_logprobs`, indexed by node.
    Treat a tree as immutable once built: the verifier caches its flat form per tree object."""

    def __init__(self, tokens: Sequence[int], parents: Sequence[int],
                 proposals: Optional[Sequence[Sequence[Proposal]]] = None,
                 cum_logprobs: Optional[Sequence[float]] = None, *, _check: bool = True):
        """`proposals=None`: every non-root node is a deterministic pick of its parent (what a
        hand-built or top-k tree is). `cum_logprobs`: draft log-prob of each root->node path.
        `_check=False` is for builders whose output is valid by construction (hot path)."""
        n = len(tokens)
        assert n >= 1 and len(parents) == n and parents[0] == -1, "node 0 must be the root"
        if _check:   # own copies, in plain ints
            tokens, parents = list(map(int, tokens)), list(map(int, parents))
            proposals = None if proposals is None else [list(ps) for ps in proposals]
            cum_logprobs = None if cum_logprobs is None else list(cum_logprobs)
        self.tokens, self.parents = tokens, parents
        self.depths = depths = [0] * n
        self._children: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            p = parents[i]
            assert 0 <= p < i, f"node {i}: parent {p} must come earlier (BFS order)"
            depths[i] = depths[p] + 1
            self._children[p].append(i)
        if proposals is None:
            proposals = [[Proposal(c, None, False) for c in self._children[u]] for u in range(n)]
        assert len(proposals) == n
        self.proposals = proposals
        self.cum_logprobs = cum_logprobs if cum_logprobs is not None else [0.0] * n
        if _check:
            self._validate()

    def _validate(self) -> None:
        assert all(a <= b for a, b in zip(self.depths, self.depths[1:])), "nodes not in BFS order"
        pairs = set(zip(self.parents, self.tokens))
        assert len(pairs) == len(self), "duplicate sibling tokens: not a trie"
        for u, ps in enumerate(self.proposals):
            for pr in ps:
                assert self.parents[pr.child] == u, f"proposal at {u} names non-child {pr.child}"
                assert pr.q is not None or not pr.sampled, "a sampled proposal needs its q"

    @classmethod
    def chain(cls, tokens: Sequence[int], qs: Optional[Sequence[torch.Tensor]] = None,
              proposer: int = 0) -> "TokenTree":
        """tokens[0] is the root, tokens[1:] the draft. qs[i]: the distribution tokens[i+1] was
        sampled from (classic speculative sampling); without qs the drafts are point masses."""
        n = len(tokens)
        assert qs is None or len(qs) == n - 1
        props = [[Proposal(i + 1, None if qs is None else qs[i], qs is not None, proposer)]
                 for i in range(n - 1)] + [[]]
        return cls(tokens, [-1] + list(range(n - 1)), props)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def root_token(self) -> int:
        return self.tokens[0]

    def children(self, u: int) -> list[int]:
        return list(self._children[u])

    def path(self, i: int) -> list[int]:
        """Node indices root-exclusive down to i."""
        out = []
        while i > 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def path_tokens(self, i: int) -> list[int]:
        """The tokens node i appends after the root (its hypothetical output beyond the root)."""
        return [self.tokens[j] for j in self.path(i)]

    def paths(self) -> list[list[int]]:
        """Candidate sequences: root->leaf token paths, root excluded, in BFS order of leaves."""
        return [self.path_tokens(i) for i in range(1, len(self)) if not self._children[i]]

    def sources(self, i: int) -> list[Proposal]:
        """Every draw that produced node i (several after a merge or a repeated draw)."""
        return [] if i == 0 else [p for p in self.proposals[self.parents[i]] if p.child == i]

    def ancestor_mask(self, device=None) -> torch.Tensor:
        """[N, N] bool: row i may attend to column j iff j is i or an ancestor of i."""
        n = len(self)
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            if i:
                m[i] = m[self.parents[i]]
            m[i, i] = True
        return m.to(device) if device is not None else m

    def positions(self, prefix_len: int, device=None) -> torch.Tensor:
        """[N] long: prefix_len + depth, prefix_len being the number of tokens before the root."""
        return torch.tensor(self.depths, dtype=torch.long, device=device) + prefix_len

    def __repr__(self) -> str:
        return f"TokenTree(n={len(self)}, depth={max(self.depths)}, paths={self.paths()})"


class _Builder:
    """Grows a trie in BFS order; a repeated (parent, token) reuses the node, adds a proposal."""

    def __init__(self, root_token: int):
        self.tokens, self.parents, self.cum = [root_token], [-1], [0.0]
        self.proposals: list[list[Proposal]] = [[]]
        self.index: dict[tuple[int, int], int] = {}
        self.paths: list[list[int]] = [[]]

    def add(self, parent: int, token: int, q, sampled: bool, proposer: int,
            cum: float) -> tuple[int, bool]:
        child = self.index.get((parent, token))
        new = child is None
        if new:
            child = self.index[(parent, token)] = len(self.tokens)
            self.tokens.append(token); self.parents.append(parent); self.cum.append(cum)
            self.proposals.append([])
            self.paths.append(self.paths[parent] + [token])
        self.proposals[parent].append(Proposal(child, q, sampled, proposer))
        return child, new

    def build(self) -> TokenTree:
        # The builder hands its lists over; it is not used afterwards.
        return TokenTree(self.tokens, self.parents, self.proposals, self.cum, _check=False)


def _draft(fn: DraftStepFn, contexts: list[list[int]]) -> torch.Tensor:
    q = fn(contexts)
    assert q.dim() == 2 and q.shape[0] == len(contexts), "draft_step_fn must return [len(contexts), V]"
    q = q.float()
    # Renormalized so that the q a draw is verified against is exactly the one it was drawn from.
    return q / q.sum(-1, keepdim=True)


def _sample_iid(q: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, k] i.i.d. draws by inverse CDF: torch.multinomial takes ~75 us for k=1 on CPU, and
    this works whatever device the generator is on. u < 1 keeps zero-mass tokens unreachable."""
    cdf = q.cumsum(-1)
    dev = generator.device if generator is not None else q.device
    u = torch.rand(q.shape[0], k, generator=generator, device=dev).to(q.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=q.shape[-1] - 1)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def build_by_expansion(draft_step_fn: DraftStepFn, root_ctx: Sequence[int],
                       expansion: Sequence[int] = (1, 1, 3, 1, 1, 1, 1, 1), *,
                       sample: bool = False, generator: Optional[torch.Generator] = None,
                       proposer: int = 0) -> TokenTree:
    """SpecInfer's expansion config <k1..kd>: every node at depth i-1 gets k_i children.
    sample=False: its top-k_i draft tokens (zero-probability ones skipped), verified as point
    masses. sample=True: k_i i.i.d. draws from q (repeats share a node), verified with q: the
    form that gives MSS its p/q acceptance rate. root_ctx ends with the root token."""
    return build_by_expansion_batch(draft_step_fn, [root_ctx], expansion, sample=sample,
                                    generators=generator, proposer=proposer)[0]


def build_by_expansion_batch(draft_step_fn: DraftStepFn, root_ctxs: Sequence[Sequence[int]],
                             expansion: Sequence[int] = (1, 1, 3, 1, 1, 1, 1, 1), *,
                             sample: bool = False,
                             generators: Union[None, torch.Generator,
                                               Sequence[Optional[torch.Generator]]] = None,
                             proposer: int = 0, min_prob: float = 0.0) -> list[TokenTree]:
    """build_by_expansion for many requests: one draft_step_fn call per depth covers every
    tree's frontier (the draft model runs batched anyway). `generators`: one for all draws,
    or one per tree so a seeded request's draft does not depend on its batch. `min_prob`
    (deterministic picks only): a node whose cumulative draft probability is below it is not
    expanded -- the step verifies no node below that value (spec/budget.py), and a child's
    probability never exceeds its parent's, so its children would only cost drafting time."""
    bs = [_Builder(int(c[-1])) for c in root_ctxs]
    frontier = [(t, 0) for t in range(len(bs))]      # (tree, node), grouped by tree in order
    log_min = _log(min_prob)
    per_tree = generators is not None and not isinstance(generators, torch.Generator)
    for k in expansion:
        if not frontier:
            break
        q_rows = _draft(draft_step_fn, [list(root_ctxs[t]) + bs[t].paths[n] for t, n in frontier])
        # One sampling call per layer (per tree if seeded); lists spare a tensor index per draw.
        if not sample:
            vals, ids = q_rows.topk(min(k, q_rows.shape[-1]), dim=-1)
        else:
            if per_tree:
                parts, lo = [], 0
                for t, grp in itertools.groupby(t for t, _ in frontier):
                    hi = lo + sum(1 for _ in grp)
                    parts.append(_sample_iid(q_rows[lo:hi], k, generators[t]))
                    lo = hi
                ids = torch.cat(parts)
            else:
                ids = _sample_iid(q_rows, k, generators)
            vals = q_rows.gather(1, ids)
        # Only the drawn tokens' probabilities come to Python, never a whole [rows, V] row.
        draws = [[(tok, v) for tok, v in zip(ti, vi) if sample or v > 0]
                 for ti, vi in zip(ids.tolist(), vals.tolist())]
        nxt = []
        for (t, n), q, ts in zip(frontier, q_rows.unbind(0), draws):
            b = bs[t]
            for tok, qv in ts:
                child, new = b.add(n, tok, q, sample, proposer, b.cum[n] + _log(qv))
                if new and (sample or b.cum[child] >= log_min):
                    nxt.append((t, child))
        frontier = nxt
    return [b.build() for b in bs]


def build_by_beam(draft_step_fn: DraftStepFn, root_ctx: Sequence[int], width: int, depth: int,
                  max_nodes: Optional[int] = None, *, branch: Optional[int] = None,
                  proposer: int = 0, min_prob: float = 0.0) -> TokenTree:
    """AdaServe/FlexFlow beam drafting: each frontier node offers its top-`branch` tokens
    (default `width`), a layer keeps the `width` best by cumulative draft probability, and the
    tree is then cut to the `max_nodes` best nodes, ROOT INCLUDED (max_nodes = the query tokens
    the target verifies). The cut is ancestor-closed: a child's cumulative probability never
    exceeds its parent's and ties go to the shallower node. Children are deterministic picks.
    `min_prob`: as in build_by_expansion_batch, nodes below it are not expanded."""
    return build_by_beam_batch(draft_step_fn, [root_ctx], width, depth, max_nodes, branch=branch,
                               proposer=proposer, min_prob=min_prob)[0]


def build_by_beam_batch(draft_step_fn: DraftStepFn, root_ctxs: Sequence[Sequence[int]], width: int, depth: int,
                        max_nodes: Optional[int] = None, *, branch: Optional[int] = None,
                        proposer: int = 0, min_prob: float = 0.0) -> list[TokenTree]:
    """build_by_beam for many requests, one draft_step_fn call per depth for all of them (a
    drafter's cost per call hardly depends on its rows: at 4 requests, 4x fewer calls)."""
    branch = branch or width
    log_min = _log(min_prob)
    bs = [_Builder(int(c[-1])) for c in root_ctxs]
    frontier = [(t, 0) for t in range(len(bs))]      # (tree, node), grouped by tree in order
    for _ in range(depth):
        if not frontier:
            break
        q_rows = _draft(draft_step_fn, [list(root_ctxs[t]) + bs[t].paths[n] for t, n in frontier])
        vals, ids = q_rows.topk(min(branch, q_rows.shape[-1]), dim=-1)
        rank = {tn: i for i, tn in enumerate(frontier)}
        cands: list[list] = [[] for _ in bs]
        for (t, n), q, vs, ts in zip(frontier, q_rows.unbind(0), vals.tolist(), ids.tolist()):
            cands[t] += [(bs[t].cum[n] + math.log(v), n, tok, q) for tok, v in zip(ts, vs) if v > 0]
        nxt = []
        for t, cs in enumerate(cands):
            if not cs:
                continue
            # sorted() is stable, so equal scores keep frontier order: deterministic trees.
            keep = sorted(cs, key=lambda c: -c[0])[:width]
            keep.sort(key=lambda c: rank[(t, c[1])])   # BFS: children grouped in parent order
            for sc, n, tok, q in keep:
                child = bs[t].add(n, tok, q, False, proposer, sc)[0]
                if sc >= log_min:
                    nxt.append((t, child))
        frontier = nxt
    trees = [b.build() for b in bs]
    if max_nodes is None:
        return trees
    assert max_nodes >= 1
    out = []
    for tree in trees:
        if max_nodes >= len(tree):
            out.append(tree)
            continue
        best = sorted(range(1, len(tree)), key=lambda i: (-tree.cum_logprobs[i], tree.depths[i], i))
        out.append(_subtree(tree, sorted([0] + best[:max_nodes - 1])))
    return out


def _subtree(tree: TokenTree, keep: list[int]) -> TokenTree:
    """The nodes `keep` (ascending, ancestor-closed), with proposals to dropped nodes removed.
    Meant for deterministic trees: dropping sampled draws because of their value (as a
    probability cut does) would bias MSS, which assumes every draw made is tried."""
    new = {old: i for i, old in enumerate(keep)}
    assert all(tree.parents[o] in new for o in keep[1:]), "cut must be ancestor-closed"
    props = [[p._replace(child=new[p.child]) for p in tree.proposals[o] if p.child in new] for o in keep]
    return TokenTree([tree.tokens[o] for o in keep], [-1] + [new[tree.parents[o]] for o in keep[1:]],
                     props, [tree.cum_logprobs[o] for o in keep])


def merge_trees(trees: Sequence[TokenTree]) -> TokenTree:
    """SpecInfer's merge-based speculation: the trie union of the trees' candidate sequences.
    A node's proposals are the concatenation, in input order, of its proposals in every input
    tree that has it, so each child keeps the q (and proposer id) of each draft that proposed it.
    Verification then runs MSS over that list; it is exact because drafts from different
    proposers are independent draws, each tested against its own q (see verify.py)."""
    assert trees, "nothing to merge"
    root = trees[0].root_token
    assert all(t.root_token == root for t in trees), "trees must share the root token"
    b = _Builder(root)
    maps = [[0] * len(t) for t in trees]
    # Depth-major over all inputs keeps the merged order BFS.
    order = sorted((t.depths[i], ti, i) for ti, t in enumerate(trees) for i in range(1, len(t)))
    for _, ti, i in order:
        t = trees[ti]
        p, tok = maps[ti][t.parents[i]], t.tokens[i]
        node = b.index.get((p, tok))
        if node is None:
            node = b.index[(p, tok)] = len(b.tokens)
            b.tokens.append(tok); b.parents.append(p); b.cum.append(t.cum_logprobs[i])
            b.proposals.append([])
        b.cum[node] = max(b.cum[node], t.cum_logprobs[i])
        maps[ti][i] = node
    for ti, t in enumerate(trees):
        for u, ps in enumerate(t.proposals):
            b.proposals[maps[ti][u]] += [p._replace(child=maps[ti][p.child]) for p in ps]
    return b.build()
