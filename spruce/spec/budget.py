"""Which draft nodes a step verifies (AdaServe's idea: spend verification rows where they pay).

A verified node costs a row of the target's forward whether or not it is accepted, and what a
row costs against what a step yields grows with the batch: on the Zen 4 dev box an extra row is
~6% of a 1-request decode step and ~45% of a row's share of an 8-request one. So each node gets an
estimated probability of being accepted, its path's product of per-node estimates:
  - a draft-model node: its draft probability given its parent (exp of the cum_logprob step);
  - a suffix-decoding node: the share of the matched occurrences that continued through it,
    calibrated by the record of how often nodes so estimated, on like evidence (Proposal.evidence:
    the match's source and length), were accepted;
  - another node without a draft distribution (n-gram lookup): the request's own record of how often
    such nodes were accepted at that depth, given that their parent was, smoothed towards the
    record of all requests;
  - a node both proposed: the larger.
The step keeps, over all its trees, the nodes whose estimate is at least the expected tokens a
row must bring to pay for itself (`StepCost.row_value(batch)`, fitted to this machine's step
times), best first and at most `max_rows` in all (the plain rows included: 16 keeps every row of
a small batch in the bf16 dot kernel, whose rows do not depend on the batch, so greedy
speculation stays lossless in bf16 too).

Only deterministic trees are cut. Dropping an independent draw because of the token it drew
would bias multi-step speculative sampling, so a tree with sampled proposals is kept whole.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from spruce.spec.tree import TokenTree, _subtree

# Expected accepted tokens per verified row at which a row pays for itself, per running request
# (measured step times on the Zen 4 dev box, SmolLM2 bf16: a row costs ~0.75 ms against a 12.4 ms
# step at batch 1, ~1.3 ms against ~23 ms at batch 8).
ROW_VALUE_PER_REQUEST = 0.06
MAX_DEPTH_TRACKED = 16
PROB_BINS = 10     # a proposer's own estimates (Proposal.prob), calibrated per tenth
EVIDENCE_CLASSES = 16   # ... and per evidence class (Proposal.evidence)


def _prob_bin(prob: float, evidence: int = 0) -> int:
    if not 0 <= evidence < EVIDENCE_CLASSES:
        raise ValueError(f"evidence class {evidence} outside 0..{EVIDENCE_CLASSES - 1}")
    return evidence * PROB_BINS + min(int(prob * PROB_BINS), PROB_BINS - 1)


class AcceptanceRecord:
    """Per depth d (1-based): how often a node without a draft distribution at depth d was
    verified with its parent accepted (`tried`), and how often it was accepted (`hit`). And per
    tenth of a proposer's own estimate (Proposal.prob, a suffix match's continuation frequency):
    how often such a node was verified with its parent accepted, and how often it was accepted --
    the frequencies run high (W4 on the Zen 4 box: an estimated 0.5 was accepted a third of the
    time), so the cut uses what they turned out to be worth."""

    __slots__ = ("tried", "hit", "prob_tried", "prob_hit")

    def __init__(self):
        self.tried = [0] * (MAX_DEPTH_TRACKED + 1)
        self.hit = [0] * (MAX_DEPTH_TRACKED + 1)
        self.prob_tried = [0] * (PROB_BINS * EVIDENCE_CLASSES)
        self.prob_hit = [0] * (PROB_BINS * EVIDENCE_CLASSES)

    def calibrated(self, prob: float, prior: Optional["AcceptanceRecord"] = None,
                   prior_weight: float = 8.0, evidence: int = 0) -> float:
        """What a node estimated at `prob` on evidence class `evidence` is accepted with: this
        record's rate in that bin, smoothed towards the prior's (or towards `prob` itself)."""
        b = _prob_bin(prob, evidence)
        p0 = prob if prior is None else prior.calibrated(prob, evidence=evidence)
        return (self.prob_hit[b] + prior_weight * p0) / (self.prob_tried[b] + prior_weight)

    def rate(self, depth: int, prior: Optional["AcceptanceRecord"] = None, prior_weight: float = 4.0) -> float:
        d = min(depth, MAX_DEPTH_TRACKED)
        p0 = 0.5 if prior is None else prior.rate(d)
        return (self.hit[d] + prior_weight * p0) / (self.tried[d] + prior_weight)

    def record(self, tree: TokenTree, emitted: Sequence[int]) -> None:
        """Walk the accepted path (`emitted` = accepted tokens then the bonus token): at each node
        reached, were there children without a draft distribution, and was one of them taken?"""
        u = 0
        for depth, tok in enumerate(emitted, start=1):
            kids = tree.children(u)
            if not kids:
                return
            d = min(depth, MAX_DEPTH_TRACKED)
            plain = [c for c in kids if any(p.q is None and p.prob is None for p in tree.sources(c))]
            nxt = next((c for c in kids if tree.tokens[c] == tok), None)
            if plain:
                self.tried[d] += 1
                self.hit[d] += nxt in plain
            for c in kids:
                est = max(((p.prob, p.evidence) for p in tree.sources(c) if p.prob is not None), default=None)
                if est is not None:
                    b = _prob_bin(*est)
                    self.prob_tried[b] += 1
                    self.prob_hit[b] += c == nxt
            if nxt is None:
                return
            u = nxt


def row_value(num_running: int) -> float:
    return min(0.9, ROW_VALUE_PER_REQUEST * max(1, num_running))


class StepCost:
    """What a verified row costs on this machine, fitted online: the target's forward time of
    pure-decode steps (trees included) as t = fixed + per_row * rows, by least squares with old
    steps forgotten at `decay` per step. A plain step of n requests then costs fixed + per_row * n
    for n tokens, and an extra row pays when it brings at least per_row * n / (fixed + per_row * n)
    tokens. Until enough steps with different row counts are seen, `row_value` is the constant
    measured on the Zen 4 dev box; the fit is what carries to other CPUs (AMX makes rows cheaper)."""

    def __init__(self, decay: float = 0.995, min_steps: float = 24.0):
        self.decay, self.min_steps = decay, min_steps
        self.n = self.sr = self.srr = self.st = self.srt = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.n, self.sr, self.srr = d * self.n + 1, d * self.sr + rows, d * self.srr + rows * rows
        self.st, self.srt = d * self.st + seconds, d * self.srt + rows * seconds

    def fit(self) -> Optional[tuple[float, float]]:
        """(fixed, per_row) seconds, or None while the steps seen cannot tell them apart."""
        if self.n < self.min_steps:
            return None
        var = self.srr / self.n - (self.sr / self.n) ** 2
        if var < 0.25:           # (almost) every step had the same row count
            return None
        per_row = (self.srt / self.n - self.sr / self.n * self.st / self.n) / var
        fixed = self.st / self.n - per_row * self.sr / self.n
        return (fixed, per_row) if per_row > 0 and fixed > 0 else None

    def row_value(self, num_running: int) -> float:
        f = self.fit()
        if f is None:
            return row_value(num_running)
        fixed, per_row = f
        n = max(1, num_running)
        return min(0.9, max(0.01, per_row * n / (fixed + per_row * n)))


def node_values(tree: TokenTree, record: AcceptanceRecord, prior: AcceptanceRecord) -> list[float]:
    """Estimated acceptance probability of each node (the root: 1)."""
    v = [1.0] * len(tree)
    cum = tree.cum_logprobs
    for i in range(1, len(tree)):
        p = tree.parents[i]
        local = 0.0
        for prop in tree.sources(i):
            if prop.prob is not None:
                local = max(local, record.calibrated(prop.prob, prior, evidence=prop.evidence))
            elif prop.q is None:
                local = max(local, record.rate(tree.depths[i], prior))
            else:
                local = max(local, math.exp(min(0.0, cum[i] - cum[p])))
        v[i] = v[p] * local
    return v


def cut_trees(trees: Sequence[Optional[TokenTree]], records: Sequence[AcceptanceRecord],
              prior: AcceptanceRecord, num_running: int, max_rows: int = 16,
              threshold: Optional[float] = None) -> list[Optional[TokenTree]]:
    """The trees cut to the nodes worth verifying this step (a tree left with its root only -> None).
    `threshold`: the estimated acceptance a node needs (default `row_value(num_running)`)."""
    threshold = row_value(num_running) if threshold is None else threshold
    budget = max_rows - num_running          # speculative rows, beyond one row per request
    cand = []                                # (-value, depth, tree index, node)
    values: dict[int, list[float]] = {}
    for ti, tree in enumerate(trees):
        if tree is None or any(p.sampled for ps in tree.proposals for p in ps):
            continue
        values[ti] = v = node_values(tree, records[ti], prior)
        cand += [(-v[i], tree.depths[i], ti, i) for i in range(1, len(tree)) if v[i] >= threshold]
    cand.sort()
    keep: dict[int, set[int]] = {ti: {0} for ti in values}
    for _, _, ti, i in cand:
        if budget <= 0:
            break
        if trees[ti].parents[i] in keep[ti]:   # values never grow down a path, so parents come first
            keep[ti].add(i)
            budget -= 1
    out = list(trees)
    for ti in values:
        nodes = sorted(keep[ti])
        out[ti] = None if len(nodes) == 1 else trees[ti] if len(nodes) == len(trees[ti]) \
            else _subtree(trees[ti], nodes)
    return out
