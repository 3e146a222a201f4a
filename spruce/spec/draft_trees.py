"""How a model drafter's step function becomes trees, shared by the paged drafters (draft.py:
a draft model, early exit) and the MLP speculator (mlp_speculator.py): greedy requests get
deterministic top-k picks, sampled ones draws from q at their temperature (seeded ones from a
stream of their own), and a reduced-vocabulary head's logits are scattered to the full vocabulary.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from spruce.engine.sampler import _SAMPLING_EPS
from spruce.request import Request
from spruce.spec.tree import TokenTree, build_by_beam_batch, build_by_expansion_batch


def reduced_head_logits(linear, hidden: torch.Tensor, head_weight: torch.Tensor, head_ids: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """A reduced head's logits (rows of `head_ids`) as [rows, vocab_size] float32, -inf elsewhere:
    q = 0 outside the head's vocabulary, which keeps verification exact."""
    full = torch.full((hidden.shape[0], vocab_size), -math.inf, device=hidden.device)
    full[:, head_ids] = linear(hidden, head_weight).float()
    return full


def build_draft_trees(requests: Sequence[Request], make_step_fn, expansion: list[int], beam_width: Optional[int],
                      depth: int, max_tree_nodes: Optional[int], proposer_id: int,
                      generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                      min_prob: float = 0.0) -> list[TokenTree]:
    """One tree per request from a model drafter. Greedy requests get top-k picks, sampled ones
    draws from q at their temperature. `make_step_fn(group, temps)` gives the DraftStepFn for
    the requests at indices `group`; its contexts are [-(j+1), root, path...] (j: index in the
    group). `generators`: per request, for seeded sampled requests' draws. `min_prob`: greedy
    requests' trees do not expand nodes below it (see build_by_expansion_batch); a sampled
    request's tree never depends on it (a seeded one's text must not depend on timing)."""
    temps = [_temperature(r) for r in requests]
    if generators is None:
        generators = [draft_generator(r) for r in requests]
    trees: list[Optional[TokenTree]] = [None] * len(requests)
    greedy = [i for i, t in enumerate(temps) if t is None]
    sampled = [i for i, t in enumerate(temps) if t is not None]
    for group, sample in ((greedy, False), (sampled, True)):
        if not group:
            continue
        fn = make_step_fn(group, [temps[i] or 1.0 for i in group])
        roots = [[-(j + 1), requests[i].all_token_ids[-1]] for j, i in enumerate(group)]
        if beam_width:
            built = build_by_beam_batch(fn, roots, beam_width, depth, max_tree_nodes, proposer=proposer_id,
                                        min_prob=0.0 if sample else min_prob)
        else:
            gens = [generators[i] for i in group]
            built = build_by_expansion_batch(fn, roots, expansion, sample=sample,
                                             generators=gens if any(g is not None for g in gens) else None,
                                             proposer=proposer_id, min_prob=0.0 if sample else min_prob)
        for i, t in zip(group, built):
            trees[i] = t
    return trees


def _temperature(req: Request) -> Optional[float]:
    t = req.sampling_params.temperature
    return None if t < _SAMPLING_EPS else float(t)


def draft_generator(req: Request) -> Optional[torch.Generator]:
    """Seeded requests draft from their own stream (not the request's), so reruns repeat."""
    seed = req.sampling_params.seed
    if seed is None:
        return None
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 0x5EED) % (1 << 63))
