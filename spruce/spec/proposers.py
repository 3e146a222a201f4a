"""Proposers: each drafts a TokenTree per request whose root is the request's last token."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np

from spruce.config import SpeculativeConfig
from spruce.request import Request
from spruce.spec.tree import TokenTree, merge_trees


def longest_suffix_match(tokens: np.ndarray, max_n: int) -> tuple[int, np.ndarray]:
    """(n, end positions of the earlier occurrences of the last n tokens) for the longest
    n <= max_n that occurred before in `tokens`, (0, []) if none. Grown one token leftwards at
    a time over the occurrences alone: a longer suffix occurs only where a shorter one does."""
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    n = 1 if len(ends) else 0
    while 0 < n < min(max_n, len(tokens) - 1):
        starts = ends - n
        ok = starts >= 0
        longer = ends[ok][tokens[starts[ok]] == tokens[-1 - n]]
        if not len(longer):
            break
        ends, n = longer, n + 1
    return n, ends


class Proposer(ABC):
    proposer_id: int = 0
    # Proposing costs next to nothing (a lookup in the request's own tokens). Then the engine
    # drafts whenever there is something to draft and lets the per-node cut (spec/budget.py)
    # price the rows; the measured gate (spec/gate.py) is for proposers that run a model.
    cheap: bool = False
    # Drafts from the target's final hidden state: the runner then returns, per request, the
    # hidden row that produced its last token (ModelRunnerOutput.hidden -> observe_hidden).
    needs_hidden: bool = False

    @abstractmethod
    def propose(self, requests: Sequence[Request], min_prob: float = 0.0) -> list[Optional[TokenTree]]:
        """One tree (or None: nothing to propose) per request. `min_prob`: the estimated
        acceptance below which the step will not verify a node (spec/budget.py); a drafter may
        stop drafting below such nodes of its deterministic trees."""

    def on_finished(self, request_ids: Sequence[str]) -> None:
        """Drop per-request state (draft KV, caches) of finished or preempted requests."""

    def observe_hidden(self, requests: Sequence[Request], hidden: dict) -> None:
        """After a step: `hidden[request_id]` produced that request's last token (needs_hidden)."""

    def observe_finished(self, requests: Sequence[Request]) -> None:
        """Requests that finished this step, with their outputs (a suffix cache learns from them)."""

    def backlog(self, request: Request) -> int:
        """Generated tokens this proposer must still run before it can draft for `request` (a
        model drafter catches up on every token decoded since its last pass; the prompt is not
        counted: a first draft must read it whenever it happens)."""
        return 0

    def propose_cheap(self, requests: Sequence[Request]) -> list[Optional[TokenTree]]:
        """Trees from the cheap part alone (see `cheap`): for steps the gate keeps plain."""
        return self.propose(requests) if self.cheap else [None] * len(requests)


class NgramProposer(Proposer):
    """Prompt lookup: find the longest recent suffix (prompt_lookup_max .. min tokens) that occurred
    earlier in the request's tokens and propose what followed it. With a tree config, the
    continuations of several earlier occurrences become the branches of one tree. Drafts are
    deterministic picks, verified as point masses, so sampling stays exact."""
    cheap = True

    def __init__(self, config: SpeculativeConfig, proposer_id: int = 0):
        self.k = config.depth
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.width = max(config.tree) if config.tree else 1
        self.proposer_id = proposer_id

    def propose(self, requests, min_prob=0.0):
        return [self._propose_one(r.all_token_ids) for r in requests]

    def continuations(self, tokens: list[int]) -> list[list[int]]:
        arr = np.asarray(tokens, dtype=np.int64)
        n, ends = longest_suffix_match(arr, self.max_n)
        if n < self.min_n:
            return []
        conts, seen = [], set()
        for e in ends[::-1]:  # the most recent occurrence first
            cont = tuple(arr[e + 1:e + 1 + self.k].tolist())
            if cont not in seen:
                seen.add(cont)
                conts.append(list(cont))
                if len(conts) == self.width:
                    break
        return conts

    def _propose_one(self, tokens: list[int]) -> Optional[TokenTree]:
        conts = self.continuations(tokens)
        if not conts:
            return None
        root = tokens[-1]
        trees = [TokenTree.chain([root] + c, proposer=self.proposer_id) for c in conts]
        return trees[0] if len(trees) == 1 else merge_trees(trees)


class MergedProposer(Proposer):
    """SpecInfer's merge-based speculation: the trie union of several proposers' trees."""

    def __init__(self, proposers: list[Proposer]):
        self.proposers = proposers
        self.cheap = all(p.cheap for p in proposers)
        self.needs_hidden = any(p.needs_hidden for p in proposers)

    def propose(self, requests, min_prob=0.0):
        return self._merge([p.propose(requests, min_prob) for p in self.proposers])

    def propose_cheap(self, requests):
        return self._merge([p.propose_cheap(requests) for p in self.proposers])

    def backlog(self, request):
        return max(p.backlog(request) for p in self.proposers)

    def observe_hidden(self, requests, hidden):
        for p in self.proposers:
            p.observe_hidden(requests, hidden)

    def observe_finished(self, requests):
        for p in self.proposers:
            p.observe_finished(requests)

    @staticmethod
    def _merge(per: list[list]) -> list:
        out = []
        for trees in zip(*per):
            trees = [t for t in trees if t is not None and len(t) > 1]
            out.append(None if not trees else trees[0] if len(trees) == 1 else merge_trees(trees))
        return out

    def on_finished(self, request_ids):
        for p in self.proposers:
            p.on_finished(request_ids)


def make_proposer(config: SpeculativeConfig, target=None, proposer_id: int = 0) -> Proposer:
    """`target`: the EngineCore, for proposers that reuse the target's weights or tokenizer."""
    if config.method == "ngram":
        return NgramProposer(config, proposer_id)
    if config.method == "suffix":
        from spruce.spec.suffix import SuffixProposer
        return SuffixProposer(config, proposer_id)
    if config.method == "merged":
        subs = []
        for i, sub in enumerate(config.methods):
            sub_cfg = SpeculativeConfig.parse({"num_speculative_tokens": config.num_speculative_tokens,
                                               "tree": config.tree, **sub})
            subs.append(make_proposer(sub_cfg, target, proposer_id=i))
        return MergedProposer(subs)
    if config.method == "mlp_speculator":
        from spruce.spec.mlp_speculator import MLPSpeculatorProposer
        if target is None:
            raise ValueError("speculative method mlp_speculator needs the target engine")
        return MLPSpeculatorProposer(config, target, proposer_id)
    if config.method in ("draft_model", "early_exit"):
        from spruce.spec.draft import make_model_proposer
        return make_model_proposer(config, target, proposer_id)
    raise ValueError(f"unknown speculative method {config.method!r}")
