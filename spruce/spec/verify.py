"""Verification of token trees against the target model: greedy and exact stochastic (MSS).

Stochastic procedure (SpecInfer's multi-step speculative sampling, made exact). At node u let
p be the target's PROCESSED next-token distribution (`target_probs`) and proposals[u] the
ordered draws made there (tree.py). For each draw x with proposal distribution q in turn:
  - q is the draft distribution when the draw was an independent sample from it, and the point
    mass on x when it was a deterministic pick (top-k, beam, hand-built);
  - accept x with probability min(1, p(x)/q(x)): move to x's node, p <- the target there;
  - else p <- norm(max(0, p - q)) and try the next draw.
With no draw left, the bonus token is sampled from the current p.

Why it is exact: one step "draw x ~ q, accept with min(1, p/q), else sample from
norm(max(0, p - q))" outputs exactly p (speculative sampling). If the draws at u are mutually
independent given the path to u, each distributed as its own q, then by backward induction
over the list (the residual sampler at step j is exact for its p_j, so step j-1 is exact for
p_{j-1}) the token leaving u is distributed as p_u, for ANY mix of q's: several proposers
(merge_trees concatenates their draws), repeated draws of a token (a repeat is rejected surely
but still updates p), point masses (which reduce to sampling p and checking membership). The
subtree under an accepted child was drafted from fresh randomness, so the argument repeats at
every depth. What breaks it: testing a draw against a q it was not drawn from (top-k picks
verified with the draft q, i.e. SYSTEMS.md's warning, or another child's q), skipping the
residual update, or AdaServe's always-true test `r < d/d`. Temperature 0 needs no special path:
`target_probs` gives greedy rows a one-hot p, for which every coin is decided (p(x) is 0 or 1).

The walk is batched: many trees (one per request, or many draws of one tree in tests) are
flattened into one forest and advanced one draw per step for every row at once, with no host
sync until the end. A row's coins come from its own generator, a fixed number per tree, so a
seeded request's tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple, Optional, Sequence, Union

import torch

from spruce.engine.sampler import Sampler, SamplingMetadata
from spruce.request import Request
from spruce.spec.tree import TokenTree

# A rejected draw whose residual mass is below this had (numerically) zero rejection chance:
# p ~= q. Keeping p then is as good as any choice and avoids dividing by ~0.
_RESIDUAL_EPS = 1e-12


class VerifyResult(NamedTuple):
    accepted: list[int]   # accepted node indices, root excluded, in path order
    bonus: int            # the target's own token after the last accepted node

    def tokens(self, tree: TokenTree) -> list[int]:
        """Everything this step emits: the accepted draft tokens, then the bonus token."""
        return [tree.tokens[i] for i in self.accepted] + [self.bonus]


# ---------------------------------------------------------------------------------------------
# Target distributions per tree node


def spec_sampling_metadata(requests: Sequence[Request], trees: Sequence[TokenTree], vocab_size: int,
                           device="cpu") -> SamplingMetadata:
    """One row per tree node, trees laid end to end. A node's history is the request's output
    plus the node's path, so penalties and min_tokens see what the output would be there."""
    reqs, hists = [], []
    for r, t in zip(requests, trees, strict=True):
        for i in range(len(t)):
            reqs.append(r)
            hists.append(r.output_token_ids + t.path_tokens(i))
    return SamplingMetadata.from_requests(reqs, vocab_size, device, max_num_logprobs=None,
                                          output_token_ids=hists)


def target_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """[rows, V] float32: the distribution the Sampler would draw each row from, after every
    processing stage (min_tokens, logit_bias, penalties, temperature, min-p, top-k/top-p);
    greedy rows get the one-hot of their argmax. Does not modify `logits`.
    """
    assert logits.dim() == 2 and logits.shape[0] == md.num_rows
    logits = logits.float().clone()
    Sampler._apply_bias_and_penalties(logits, md)
    greedy = None if md.all_random else torch.nn.functional.one_hot(
        logits.argmax(-1), logits.shape[-1]).float()
    if md.all_greedy:
        return greedy
    probs = Sampler.probs(logits, md)
    probs = probs / probs.sum(-1, keepdim=True)
    return probs if greedy is None else torch.where(md.greedy_mask.unsqueeze(1), greedy, probs)


# ---------------------------------------------------------------------------------------------
# Greedy


def verify_greedy(tree: TokenTree, target_argmax: Union[torch.Tensor, Sequence[int]]) -> VerifyResult:
    """Follow the child whose token is the target's argmax at the current node; the argmax at
    the first node without such a child is the bonus. Equals non-speculative greedy decoding."""
    am = target_argmax.tolist() if isinstance(target_argmax, torch.Tensor) else list(target_argmax)
    assert len(am) == len(tree)
    u, accepted = 0, []
    while True:
        nxt = next((c for c in tree.children(u) if tree.tokens[c] == am[u]), None)
        if nxt is None:
            return VerifyResult(accepted, int(am[u]))
        accepted.append(nxt)
        u = nxt


# ---------------------------------------------------------------------------------------------
# Stochastic (MSS)


def _accept(u: torch.Tensor, px: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """Accept with probability min(1, p(x)/q(x)), u ~ U[0,1): no division, and p(x) = 0 is
    never accepted."""
    return u * qx < px


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to sample from after x ~ q was rejected: norm(max(0, p - q))."""
    r = (p - q).clamp_(min=0)
    z = r.sum(-1, keepdim=True)
    return torch.where(z > _RESIDUAL_EPS, r / z.clamp(min=_RESIDUAL_EPS), p)


def max_verify_steps(tree: TokenTree) -> int:
    """Most coins one walk of `tree` can use: one per draw tried, plus the bonus sample."""
    worst = [0] * len(tree)
    for u in range(len(tree) - 1, -1, -1):
        w = len(tree.proposals[u]) + 1            # every draw rejected, then the bonus
        for j, p in enumerate(tree.proposals[u]):  # draw j accepted after j rejections
            w = max(w, j + 1 + worst[p.child])
        worst[u] = w
    return worst[0]


def verify_stochastic(tree: TokenTree, probs: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> VerifyResult:
    """MSS for one tree; probs [N, V] is `target_probs` for its nodes."""
    return verify_stochastic_batch([tree], probs, [generator])[0]


def verify_stochastic_batch(trees: Sequence[TokenTree], probs: torch.Tensor,
                            generators: Union[None, torch.Generator,
                                              Sequence[Optional[torch.Generator]]] = None
                            ) -> list[VerifyResult]:
    """MSS for many trees at once. probs: [sum of tree sizes, V], trees' rows end to end.
    generators: one per tree (None: the global RNG), or one generator for all rows."""
    if not trees:
        return []
    R, V, dev = len(trees), probs.shape[-1], probs.device
    f = _Forest(trees, V, dev)
    assert probs.shape[0] == f.num_nodes, "probs must have one row per tree node"
    U = _uniforms(trees, f.steps, generators).to(dev)
    S = int(U.shape[1])
    probs = probs.float()
    rows = torch.arange(R, device=dev)
    u = f.node_off.clone()                          # current node (global index)
    k = torch.zeros(R, dtype=torch.long, device=dev)   # next draw to try at u
    p = probs[u]                                    # current (residual) target distribution
    s_fin = torch.full((R,), S - 1, dtype=torch.long, device=dev)   # coin for the bonus
    done = torch.zeros(R, dtype=torch.bool, device=dev)
    D = max(1, max(max(t.depths) for t in trees))
    path = torch.full((R, D), -1, dtype=torch.long, device=dev)
    cols = torch.arange(D, device=dev)
    for step in range(S):
        has = ~done & (k < f.nprop[u])
        fin = ~done & ~has
        s_fin = torch.where(fin, step, s_fin)
        done = done | fin
        prop = (f.pstart[u] + k).clamp_(max=f.num_props - 1)
        child, qi = f.pchild[prop], f.pq[prop]
        x = f.tok[child]
        q = torch.where((qi >= 0).unsqueeze(1), f.qtab[qi.clamp(min=0)],
                        torch.nn.functional.one_hot(x, V).float())
        px, qx = p[rows, x], q[rows, x]
        acc = has & _accept(U[:, step], px, qx)
        rej = has & ~acc
        p = torch.where(acc.unsqueeze(1), probs[child],
                        torch.where(rej.unsqueeze(1), _residual(p, q), p))
        path = torch.where(acc.unsqueeze(1) & (cols == f.depth[child].unsqueeze(1) - 1),
                           (child - f.node_off).unsqueeze(1), path)
        u = torch.where(acc, child, u)
        k = torch.where(acc, 0, k + rej.long())
    cdf = p.cumsum(-1)
    t = U[rows, s_fin].unsqueeze(1) * cdf[:, -1:]
    bonus = torch.searchsorted(cdf, t, right=True).squeeze(1).clamp_(max=V - 1)
    path_l, depth_l, bonus_l = path.tolist(), f.depth[u].tolist(), bonus.tolist()
    assert bool(done.all()), "walk did not finish: max_verify_steps is wrong"
    return [VerifyResult(path_l[r][:depth_l[r]], bonus_l[r]) for r in range(R)]


def _uniforms(trees: Sequence[TokenTree], steps: list[int], generators) -> torch.Tensor:
    """[R, max steps] coins on the host; row r's first steps[r] come from its own generator."""
    R, S = len(trees), max(steps)
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand(R, S, generator=generators)
    assert len(generators) == R
    U = torch.rand(R, S) if any(g is None for g in generators) else torch.empty(R, S)
    for r, g in enumerate(generators):
        if g is not None:
            U[r, :steps[r]] = torch.rand(steps[r], generator=g, device=g.device).cpu()
    return U


class _TreeArrays(NamedTuple):
    starts: list[int]      # per node: index of its first proposal
    counts: list[int]      # per node: number of proposals
    childs: list[int]      # per proposal: child node
    qidx: list[int]        # per proposal: index into qs, -1 for a point mass
    qs: list[torch.Tensor]  # distinct q objects of the sampled proposals
    steps: int             # max_verify_steps


# A tree is verified once per step in the engine but many times in tests; trees are treated as
# immutable once built, so their flat form is kept while the tree lives.
_ARRAYS: "weakref.WeakKeyDictionary[TokenTree, _TreeArrays]" = weakref.WeakKeyDictionary()


def _tree_arrays(t: TokenTree) -> _TreeArrays:
    a = _ARRAYS.get(t)
    if a is None:
        flat = [pr for ps in t.proposals for pr in ps]
        counts = [len(ps) for ps in t.proposals]
        # Siblings drawn from one q object share its row.
        qs = {id(pr.q): pr.q for pr in flat if pr.sampled}
        row = {k: i for i, k in enumerate(qs)}
        a = _ARRAYS[t] = _TreeArrays(
            list(itertools.accumulate(counts, initial=0))[:-1], counts, [pr.child for pr in flat],
            [row[id(pr.q)] if pr.sampled else -1 for pr in flat], list(qs.values()),
            max_verify_steps(t))
    return a


class _Forest:
    """Flat device arrays over all trees: node tokens/depths, each node's slice of the flat
    proposal list, each proposal's child and q row (-1: point mass). A tree object that occurs
    several times (R draws of one deterministic tree) contributes its q rows once."""

    def __init__(self, trees: Sequence[TokenTree], V: int, device):
        q_off: dict[int, int] = {}
        qlist: list[torch.Tensor] = []
        tok, depth, pstart, nprop, pchild, pq = [], [], [], [], [], []
        n_nodes, n_props, q_offs, self.steps = [], [], [], []
        for t in trees:
            a = _tree_arrays(t)
            if id(t) not in q_off:
                q_off[id(t)] = len(qlist)
                qlist += a.qs
            tok += t.tokens; depth += t.depths; nprop += a.counts; pstart += a.starts
            pchild += a.childs; pq += a.qidx
            n_nodes.append(len(t)); n_props.append(len(a.childs)); q_offs.append(q_off[id(t)])
            self.steps.append(a.steps)

        def lt(x):
            return torch.tensor(x, dtype=torch.long)
        # Local indices -> global: add each tree's offsets, spread over its nodes/proposals.
        n_nodes_t, n_props_t = lt(n_nodes), lt(n_props)
        node_off = n_nodes_t.cumsum(0) - n_nodes_t
        prop_off = n_props_t.cumsum(0) - n_props_t
        pstart_t = lt(pstart) + prop_off.repeat_interleave(n_nodes_t)
        pchild_t = lt(pchild) + node_off.repeat_interleave(n_props_t)
        pq_t = lt(pq)
        pq_t = torch.where(pq_t >= 0, pq_t + lt(q_offs).repeat_interleave(n_props_t), -1)
        if not pchild:   # keeps the gathers valid; no row ever selects it (nprop is all 0)
            pchild_t, pq_t = lt([0]), lt([-1])
        self.tok, self.depth, self.nprop = lt(tok).to(device), lt(depth).to(device), lt(nprop).to(device)
        self.pstart, self.pchild, self.pq = pstart_t.to(device), pchild_t.to(device), pq_t.to(device)
        self.node_off = node_off.to(device)
        self.num_nodes, self.num_props = len(tok), len(pchild_t)
        self.qtab = (torch.stack([q.float().to(device) for q in qlist]) if qlist
                     else torch.zeros(1, V, device=device))
