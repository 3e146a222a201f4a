"""Suffix decoding (SuffixDecoding, Oliaro et al. 2024; vLLM's `method: "suffix"`).

A model-free drafter. Find the longest suffix of the request's tokens that occurred before --
in the request itself (its prompt and output) and in a corpus of the target's own text -- and
draft what followed those occurrences, as a tree weighted by how often each continuation
followed: a node's estimate is the share of occurrences that continue through it. The corpus
is (a) `model`: a datastore file, corpus.npy from `spruce distill` (the target's answers to the
packaged prompts, so the text a small model keeps producing -- its openings, its phrasings --
is there to be found; REST's datastore, made from the target itself), and (b) the outputs of
the last `suffix_decoding_max_cached_requests` finished requests (SuffixDecoding's global
tree). Drafting is a handful of hash lookups (no model), so the engine drafts whenever there is
a match and lets the per-node cut (spec/budget.py) price the rows with these estimates.

Nodes are deterministic picks, verified as point masses: exact when sampling too.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Optional, Sequence

import numpy as np

from spruce.config import SpeculativeConfig
from spruce.spec.draft_checkpoint import CORPUS_PROMPT_TAIL, load_corpus
from spruce.spec.proposers import Proposer, longest_suffix_match
from spruce.spec.tree import Proposal, TokenTree

_MASK = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15          # odd, so every power is a unit mod 2**64


class SuffixIndex:
    """Where every n-gram (n = 1..max_n) of a token corpus ends, by 64-bit polynomial hash, all
    n in one sorted array (hashes of different lengths differ like any two hashes), so a
    lookup of every suffix length is one vectorised search. Sequences in the corpus are
    separated by -1; an n-gram never spans a separator, and only n-grams followed by a token
    are indexed (the others have nothing to draft)."""

    def __init__(self, corpus: np.ndarray, max_n: int):
        t = np.asarray(corpus, dtype=np.int64)
        self.tokens = t
        n_tok = len(t)
        val = (t + 1).astype(np.uint64)      # the separator hashes as 0 but is never inside a key
        h = val.copy()
        inside = t >= 0                      # the window ending here holds no separator
        followed = np.zeros(n_tok, dtype=bool)
        followed[:-1] = t[1:] >= 0
        keys, ends = [], []
        power = 1
        for n in range(1, max_n + 1):
            if n > 1:
                power = power * _BASE & _MASK
                h[n - 1:] += val[:n_tok - n + 1] * np.uint64(power)
                inside[n - 1:] &= t[:n_tok - n + 1] >= 0
                inside[:n - 1] = False
            idx = np.flatnonzero(inside & followed)
            if len(idx) == 0:
                break
            keys.append(h[idx].view(np.int64))
            ends.append(idx)
        keys_all = np.concatenate(keys) if keys else np.empty(0, dtype=np.int64)
        order = np.argsort(keys_all, kind="stable")     # stable: equal keys in corpus order
        self.keys = keys_all[order]
        self.ends = (np.concatenate(ends) if ends else np.empty(0, dtype=np.int64))[order]

    def longest_match(self, suffix_hashes: np.ndarray) -> tuple[int, np.ndarray]:
        """`suffix_hashes[n-1]`: the hash of the context's last n tokens (int64 view). Returns
        (n, end positions) for the longest n the corpus holds, (0, []) if none."""
        lo = self.keys.searchsorted(suffix_hashes, "left")
        hi = self.keys.searchsorted(suffix_hashes, "right")
        found = hi > lo
        # A longer suffix can only occur where a shorter one does: the first miss ends the run.
        n = int(found.argmin()) if not found.all() else len(found)
        return n, (self.ends[lo[n - 1]:hi[n - 1]] if n else self.ends[:0])


def continuations(tokens: np.ndarray, ends: np.ndarray, depth: int, max_occurrences: int) -> np.ndarray:
    """[m, depth]: the tokens after (up to `max_occurrences` evenly spaced of) the positions
    `ends` of `tokens`; -1 past the end."""
    if len(ends) > max_occurrences:
        ends = ends[np.linspace(0, len(ends) - 1, max_occurrences).astype(np.int64)]
    pos = ends[:, None] + 1 + np.arange(depth)
    out = tokens[np.minimum(pos, len(tokens) - 1)]
    out[pos >= len(tokens)] = -1
    return out


def suffix_hashes(tokens: Sequence[int], max_n: int) -> np.ndarray:
    """The SuffixIndex hashes (int64 view) of the last n tokens, n = 1..min(max_n, len(tokens))."""
    out, h, power = [], 0, 1
    for j in range(1, min(max_n, len(tokens)) + 1):
        h = (h + (int(tokens[-j]) + 1) * power) & _MASK
        out.append(h)
        power = power * _BASE & _MASK
    return np.asarray(out, dtype=np.uint64).view(np.int64)


def continuation_probs(rows: np.ndarray, prior: float = 1.0) -> dict[tuple[int, ...], float]:
    """Each continuation prefix (a path) -> the share of the rows that start with it, smoothed
    as count / (rows + prior) so a single occurrence is not a certainty."""
    counts: dict[tuple[int, ...], int] = {}
    for row in rows.tolist():
        path: tuple[int, ...] = ()
        for tok in row:
            if tok < 0:
                break
            path = path + (tok,)
            counts[path] = counts.get(path, 0) + 1
    total = len(rows) + prior
    return {p: c / total for p, c in counts.items()}


# Upper bounds of the match-length buckets of evidence_class: 1, 2, 3-4, 5-8, 9+ tokens.
_MATCH_LEN_BOUNDS = (1, 2, 4, 8)


def evidence_class(source: int, match_len: int) -> int:
    """Proposal.evidence of a continuation found after a `match_len`-token match in source 0 (the
    request), 1 (the datastore) or 2 (finished requests): 1 + the (source, length bucket) pair's
    index, so the cut calibrates each kind of evidence on its own record."""
    return 1 + source * (len(_MATCH_LEN_BOUNDS) + 1) + bisect.bisect_left(_MATCH_LEN_BOUNDS, match_len)


def best_tree(root: int, probs: dict[tuple[int, ...], float], max_nodes: int, min_prob: float,
              proposer: int = 0, max_width: Optional[int] = None,
              evidence: Optional[dict[tuple[int, ...], int]] = None) -> Optional[TokenTree]:
    """The `max_nodes - 1` most probable paths of at least `min_prob` (ancestor-closed, since a
    path is never more probable than its prefix; ties to the shorter), at most `max_width`
    children a node (1: a chain), as a BFS tree whose proposals carry each node's probability
    given its parent and its path's evidence class (default 0)."""
    picked = sorted((p for p, v in probs.items() if v >= min_prob), key=lambda p: (-probs[p], len(p), p))
    keep: set[tuple[int, ...]] = set()
    width: dict[tuple[int, ...], int] = {}
    for p in picked:
        if len(keep) == max_nodes - 1:
            break
        parent = p[:-1]
        if parent and parent not in keep:
            continue          # its parent lost to the width limit
        if max_width is not None and width.get(parent, 0) >= max_width:
            continue
        keep.add(p)
        width[parent] = width.get(parent, 0) + 1
    paths = sorted(keep, key=lambda p: (len(p), p))
    if not paths:
        return None
    index = {(): 0}
    tokens, parents, cum = [root], [-1], [0.0]
    proposals: list[list[Proposal]] = [[]]
    for p in paths:
        parent = index[p[:-1]]
        index[p] = i = len(tokens)
        tokens.append(p[-1]); parents.append(parent); cum.append(float(np.log(probs[p])))
        proposals.append([])
        parent_prob = probs[p[:-1]] if p[:-1] else 1.0
        proposals[parent].append(Proposal(i, None, False, proposer, min(1.0, probs[p] / parent_prob),
                                          evidence.get(p, 0) if evidence else 0))
    return TokenTree(tokens, parents, proposals, cum, _check=False)


class SuffixProposer(Proposer):
    """See the module doc. Config: `num_speculative_tokens` (the tree's depth), `max_tree_nodes`
    (its size, root included; default depth + 1), `tree` (its largest entry caps a node's
    children; default: no cap), `model` (a datastore: a `spruce distill`
    directory or its corpus.npy), and vLLM's suffix_decoding_* options."""
    cheap = True
    # Occurrences a lookup reads at most: enough to tell a 10% continuation from noise.
    max_occurrences = 64

    def __init__(self, config: SpeculativeConfig, proposer_id: int = 0):
        self.depth = config.num_speculative_tokens
        self.max_nodes = config.max_tree_nodes or self.depth + 1
        self.max_n = config.suffix_decoding_max_tree_depth
        self.spec_factor = config.suffix_decoding_max_spec_factor
        self.min_token_prob = config.suffix_decoding_min_token_prob
        # `tree` caps the children of a node, as for the n-gram lookup ([1]: a chain).
        self.max_width = max(config.tree) if config.tree else None
        self.proposer_id = proposer_id
        self.datastore: Optional[SuffixIndex] = None
        if config.model:
            self.datastore = SuffixIndex(load_corpus(config.model), self.max_n)
        # Finished requests' outputs (SuffixDecoding's global tree), indexed again when they have
        # grown by a quarter: indexing is O(n log n) in numpy, a lookup is O(max_n log n).
        self.max_cached = config.suffix_decoding_max_cached_requests
        self._outputs: deque[list[int]] = deque()
        self._cache: Optional[SuffixIndex] = None
        self._cache_tokens = 0              # output tokens in `_outputs`
        self._cached_indexed = 0            # of them, in `_cache`

    def propose(self, requests, min_prob=0.0):
        # A seeded sampled request's draws follow its tree, so its tree must not depend on what
        # other requests said before it: it searches itself and the datastore only.
        return [self._propose_one(r.all_token_ids, min_prob, r.sampling_params.is_seeded_sampling)
                for r in requests]

    def observe_finished(self, requests) -> None:
        """Remember finished requests' outputs (after the prompt's last tokens: the template's
        tail, as in a distill corpus) for later lookups."""
        if self.max_cached <= 0:
            return
        for r in requests:
            out = r.all_token_ids[max(0, r.num_prompt_tokens - CORPUS_PROMPT_TAIL):]
            if r.num_output_tokens >= 2:
                self._outputs.append(list(out))
                self._cache_tokens += len(out)
        while len(self._outputs) > self.max_cached:
            self._cache_tokens -= len(self._outputs.popleft())
        if self._cache_tokens - self._cached_indexed >= max(256, self._cached_indexed // 4):
            flat = [t for out in self._outputs for t in (*out, -1)]
            self._cache = SuffixIndex(np.asarray(flat, dtype=np.int64), self.max_n)
            self._cached_indexed = self._cache_tokens

    def _propose_one(self, tokens: list[int], min_prob: float, seeded: bool = False) -> Optional[TokenTree]:
        arr = np.asarray(tokens, dtype=np.int64)
        n, ends = longest_suffix_match(arr, self.max_n)
        # The request's own latest occurrences: its text is the most specific evidence there is.
        sources = [(0, n, arr, ends[-self.max_occurrences:])]
        hashes = None
        for source, index in ((1, self.datastore), (2, None if seeded else self._cache)):
            if index is not None:
                hashes = suffix_hashes(tokens, self.max_n) if hashes is None else hashes
                n, ends = index.longest_match(hashes)
                sources.append((source, n, index.tokens, ends))
        probs: dict[tuple[int, ...], float] = {}
        evidence: dict[tuple[int, ...], int] = {}
        longest = 0
        for source, n, corpus, ends in sources:
            if n == 0:
                continue
            longest = max(longest, n)
            cls = evidence_class(source, n)
            for p, v in continuation_probs(continuations(corpus, ends, self.depth, self.max_occurrences)).items():
                if v > probs.get(p, 0.0):
                    probs[p], evidence[p] = v, cls
        if not probs:
            return None
        # SuffixDecoding's adaptive size: a short match is weak evidence, so it drafts less.
        max_nodes = min(self.max_nodes, 1 + max(1, int(self.spec_factor * longest)))
        return best_tree(tokens[-1], probs, max_nodes, max(min_prob, self.min_token_prob), self.proposer_id,
                         self.max_width, evidence)
