"""Model-based proposers: a separate draft model, and early-exit self-drafting.

Both draft with a small causal LM that runs over its own paged KV cache, batched over requests,
one flat forward per draft depth:

1. Catch-up. The draft's KV must hold every committed token of the request. A separate draft
   model computes them (one flat forward over every request's new tokens, ROOT INCLUDED: the
   root's logits are the depth-1 distribution). The early-exit draft copies them from the
   target's cache instead (see EarlyExitProposer) and then runs only the root.
2. Drafting. `build_by_expansion_batch` (SpecInfer's expansion config; a chain <1,..,1> when no
   tree is configured) or `build_by_beam_batch` (spec/draft_trees.py) call `draft_step_fn` once per depth with the frontier
   nodes. The frontier's ancestors that are not cached yet are re-run as one query chunk per
   request, with their ancestor mask, into scratch "lookahead" slots after the root. Nodes on
   the frontier's common path (a chain's every node, a tree's trunk) stay cached across depths,
   so a chain costs one single-token decode per depth and a tree re-runs only its branches
   (<= ~20 tokens): the attention backends' tree mask only restricts the query block, so a
   cached node must be an ancestor of every later query, which is what the trunk is.
3. The scratch slots are given back at the end of `propose`; the draft keeps exactly the
   committed tokens. Requests that finish, abort or get preempted are dropped by `on_finished`
   (EngineCore calls it) and, as a safety net, whenever `propose` sees a finished request's state.

Exactness. Greedy requests get deterministic top-k picks (point masses: no q needed). Sampled
requests get i.i.d. draws from the draft's distribution at the request's temperature, and that
q rides on each proposal, so MSS verification (verify.py) stays exact. A draft whose head covers
only a reduced vocabulary (FR-Spec) has q = 0 outside it, which is still exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from spruce.attention.metadata import AttentionMetadata
from spruce.config import SpeculativeConfig
from spruce.kv.manager import KVCacheManager, cdiv
from spruce.models.llama import allocate_kv_cache
from spruce.models.quant import read_as_q8_0, select_rows
from spruce.request import Request
from spruce.spec.draft_checkpoint import check_draft_vocab, load_draft_vocab
from spruce.spec.draft_trees import build_draft_trees, draft_generator, reduced_head_logits
from spruce.spec.proposers import Proposer
from spruce.spec.tree import TokenTree



@dataclass
class _Seq:
    """One request's draft state: what KVCacheManager needs (request_id, num_computed_tokens)."""
    request_id: str
    request: Request                      # identity: a reused request id starts a fresh state
    num_computed_tokens: int = 0          # request tokens whose draft K/V is cached
    generator: Optional[torch.Generator] = None   # draws for sampled trees (seeded requests)
    # During one propose: the root's index in the batch, and the trunk (tokens after the root)
    # whose K/V sits in the scratch slots right after the root, at their true positions.
    trunk: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens


class PagedDraftProposer(Proposer):
    """The drafting machinery shared by DraftModelProposer and EarlyExitProposer.

    Subclasses set `self.model` (forward(input_ids, positions, kv_caches, md) -> hidden, and
    compute_logits), `self.kv_caches`, `self.kv` (a KVCacheManager without prefix caching) and
    may override `_fill` (how committed tokens reach the draft's KV) and `_logits`."""

    def __init__(self, config: SpeculativeConfig, target, proposer_id: int = 0):
        self.proposer_id = proposer_id
        self.device = target.device
        self.block_size = target.config.cache_config.block_size
        self.vocab_size = target.vocab_size
        self.max_model_len = target.max_model_len
        self.expansion = list(config.tree) if config.tree else [1] * config.num_speculative_tokens
        self.beam_width = config.beam_width
        self.max_tree_nodes = config.max_tree_nodes
        self.depth = len(self.expansion)
        if self.beam_width:
            self.max_nodes = self.beam_width * self.depth          # non-root nodes
            if self.max_tree_nodes:
                self.max_nodes = min(self.max_nodes, self.max_tree_nodes - 1)
        else:
            self.max_nodes, width = 0, 1
            for k in self.expansion:
                width *= k
                self.max_nodes += width
        self.seqs: dict[str, _Seq] = {}
        # Set by subclasses.
        self.model = None
        self.kv_caches: list = []
        self.kv: Optional[KVCacheManager] = None
        self.head_ids: Optional[torch.Tensor] = None   # reduced-vocabulary head (FR-Spec)
        self.head_weight: Optional[torch.Tensor] = None

    # ----- pool --------------------------------------------------------------------------------
    def _pool_blocks(self, target, bytes_per_token: int) -> int:
        """Enough blocks for as many tokens as the target's pool, plus every speculating
        request's scratch; never more than the target's KV memory budget."""
        bs = self.block_size
        spec_cfg = target.spec_config
        lookahead = spec_cfg.max_num_seqs_for_spec * (cdiv(self.max_nodes + 1, bs) + 1)
        n = target.num_blocks + lookahead
        budget = target.config.cache_config.kv_cache_memory
        if budget:
            n = min(n, max(int(budget) // max(bytes_per_token * bs, 1), lookahead + 2))
        return int(n)

    # ----- Proposer API ------------------------------------------------------------------------
    def on_finished(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is not None:
                self.kv.free(seq)

    def backlog(self, request: Request) -> int:
        seq = self.seqs.get(request.request_id)
        done = seq.num_computed_tokens if seq is not None and seq.request is request else 0
        return request.num_tokens - max(done, request.num_prompt_tokens)

    def _sweep(self, keep: set[str]) -> None:
        """Drop states of finished requests (in case a caller did not report them)."""
        dead = [rid for rid, s in self.seqs.items() if rid not in keep and s.request.is_finished]
        self.on_finished(dead)

    def _evict_others(self, keep: set[str]) -> bool:
        victims = [rid for rid in self.seqs if rid not in keep]
        self.on_finished(victims)
        return bool(victims)

    @torch.inference_mode()
    def propose(self, requests: Sequence[Request], min_prob: float = 0.0) -> list[Optional[TokenTree]]:
        out: list[Optional[TokenTree]] = [None] * len(requests)
        if not requests:
            return out
        ids = {r.request_id for r in requests}
        self._sweep(ids)
        batch: list[tuple[int, _Seq]] = []
        for i, req in enumerate(requests):
            if req.num_tokens + self.depth > self.max_model_len:
                continue
            seq = self.seqs.get(req.request_id)
            if seq is not None and (seq.request is not req or seq.num_computed_tokens > req.num_tokens):
                self.on_finished([req.request_id])
                seq = None
            if seq is None:
                seq = self.seqs[req.request_id] = _Seq(req.request_id, req, generator=draft_generator(req))
            if not self._allocate(seq, ids):
                continue
            batch.append((i, seq))
        if not batch:
            return out
        try:
            seqs = [s for _, s in batch]
            self._fill(seqs)
            root_probs = self._run_roots(seqs)
            trees = self._build(seqs, root_probs, min_prob)
            for (i, _), tree in zip(batch, trees):
                out[i] = tree
        except BaseException:
            # A failed forward leaves the draft KV of these requests undefined: start them over.
            self.on_finished([s.request_id for _, s in batch])
            raise
        finally:
            for _, seq in batch:
                if seq.request_id in self.seqs:
                    seq.trunk = []
                    self.kv.release_slots_beyond(seq, seq.num_computed_tokens)
        return out

    def _allocate(self, seq: _Seq, keep: set[str]) -> bool:
        num_new = seq.num_tokens - seq.num_computed_tokens
        while self.kv.allocate_slots(seq, num_new, num_lookahead_tokens=self.max_nodes) is None:
            if not self._evict_others(keep):
                return False   # not even this batch fits: no draft for this request this step
        return True

    # ----- steps -------------------------------------------------------------------------------
    def _fill(self, seqs: list[_Seq]) -> None:
        """Hook: bring committed tokens' K/V into the draft cache before `_run_roots`."""

    def _run_roots(self, seqs: list[_Seq]) -> torch.Tensor:
        """One flat forward over each request's uncached committed tokens, the root last;
        returns the root rows' logits [B, V]."""
        chunks, starts = [], []
        for seq in seqs:
            # The root is re-run when it is cached already (a request proposed for but not
            # scheduled last step): its logits are needed.
            start = min(seq.num_computed_tokens, seq.num_tokens - 1)
            toks = seq.request.all_token_ids[start:]
            chunks.append(toks)
            starts.append(start)
        hidden = self._forward(seqs, chunks, [list(range(s, s + len(c))) for s, c in zip(starts, chunks)],
                               starts, [None] * len(seqs))
        rows = torch.tensor(_cumsum([len(c) for c in chunks])[1:], dtype=torch.long,
                            device=self.device) - 1
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens
        return self._logits(hidden.index_select(0, rows))

    def _forward(self, seqs: list[_Seq], chunks: list[list[int]], positions: list[list[int]],
                 slot_starts: list[int], masks: list[Optional[torch.Tensor]]) -> torch.Tensor:
        """Request i's query chunk `chunks[i]` is written to its slots slot_starts[i].. and sees
        every earlier slot, then its own chunk causally or by masks[i] ([q, q] bool)."""
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens, qlens, tables = [], [], [], [0], [], [], []
        for seq, chunk, p, s0 in zip(seqs, chunks, positions, slot_starts):
            blocks = self.kv.get_block_ids(seq.request_id)
            ids += chunk
            pos += p
            slots += [blocks[j // bs] * bs + j % bs for j in range(s0, s0 + len(chunk))]
            qsl.append(qsl[-1] + len(chunk))
            seq_lens.append(s0 + len(chunk))
            qlens.append(len(chunk))
            tables.append(blocks)
        width = max(len(b) for b in tables)
        table = torch.zeros(len(tables), width, dtype=torch.long)
        for i, b in enumerate(tables):
            table[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        dev = self.device
        tree_masks = None if all(m is None for m in masks) else list(masks)
        md = AttentionMetadata(
            num_tokens=len(ids), query_start_loc=qsl, seq_lens=seq_lens, query_lens=qlens,
            block_tables=table.to(dev), slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_size=bs, seq_lens_t=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            tree_masks=tree_masks)
        return self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(pos, dtype=torch.long, device=dev), self.kv_caches, md)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, V] float32 draft logits; -inf outside a reduced head's vocabulary."""
        if self.head_ids is None:
            return self.model.compute_logits(hidden)
        return reduced_head_logits(self.model.linear, hidden, self.head_weight, self.head_ids, self.vocab_size)

    # ----- tree building -----------------------------------------------------------------------
    def _build(self, seqs: list[_Seq], root_logits: torch.Tensor, min_prob: float = 0.0) -> list[TokenTree]:
        def make_step_fn(group: list[int], temps: list[float]):
            return self._step_fn([seqs[i] for i in group], root_logits[group], temps)
        return build_draft_trees([s.request for s in seqs], make_step_fn, self.expansion, self.beam_width,
                                 self.depth, self.max_tree_nodes, self.proposer_id,
                                 [s.generator for s in seqs], min_prob)

    def _step_fn(self, seqs: list[_Seq], root_logits: torch.Tensor, temps: list[float]):
        """The DraftStepFn for one group. Contexts are [-(j+1), root, path...]: the marker names
        the request, the rest is the node's path; the logits of the root come precomputed."""
        temp_t = torch.tensor(temps, dtype=torch.float32, device=self.device)[:, None]

        def step(contexts: list[list[int]]) -> torch.Tensor:
            js = [-c[0] - 1 for c in contexts]
            paths = [tuple(c[2:]) for c in contexts]
            logits = torch.empty(len(contexts), self.vocab_size, device=self.device)
            at_root = [k for k, p in enumerate(paths) if not p]
            if at_root:
                logits[at_root] = root_logits[[js[k] for k in at_root]]
            if len(at_root) < len(paths):
                rows = [k for k, p in enumerate(paths) if p]
                logits[rows] = self._run_nodes(seqs, [js[k] for k in rows], [paths[k] for k in rows])
            return (logits / temp_t[js]).softmax(-1)

        return step

    def _run_nodes(self, seqs: list[_Seq], js: list[int], paths: list[tuple]) -> torch.Tensor:
        """Logits at tree nodes (request j of the group, path below the root): one flat forward
        over each request's nodes that are not cached, i.e. below its trunk."""
        frontier: dict[int, list[tuple]] = {}
        for j, p in zip(js, paths):
            frontier.setdefault(j, []).append(p)
        qseqs, chunks, poss, starts, masks, rows = [], [], [], [], [], {}
        row = 0
        for j, ps in frontier.items():
            seq = seqs[j]
            n = seq.num_computed_tokens          # the root is token n-1, its K/V is cached
            lcp = _common_prefix(ps)
            r = len(_common_prefix([tuple(seq.trunk), lcp]))
            r = min(r, min(len(p) for p in ps) - 1)   # every asked node is in the query
            nodes = _trie_nodes(ps, r)                  # the paths' prefixes longer than r, BFS
            index = {p: k for k, p in enumerate(nodes)}
            qseqs.append(seq)
            chunks.append([p[-1] for p in nodes])
            poss.append([n - 1 + len(p) for p in nodes])   # rope position: root's + depth
            starts.append(n + r)                            # trunk node of depth d sits at n-1+d
            masks.append(None if _is_chain(nodes) else _ancestor_mask(nodes, index))
            for p in nodes:
                rows[(j, p)] = row + index[p]
            row += len(nodes)
            # The query's first nodes are the rest of the common path (one per depth, in BFS
            # order), so they land at their true positions: the new trunk.
            seq.trunk = list(lcp)
        hidden = self._forward(qseqs, chunks, poss, starts, masks)
        sel = torch.tensor([rows[(j, p)] for j, p in zip(js, paths)], dtype=torch.long,
                           device=self.device)
        return self._logits(hidden.index_select(0, sel))


def _cumsum(xs: list[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _common_prefix(paths: list[tuple]) -> tuple:
    if not paths:
        return ()
    first, n = paths[0], min(len(p) for p in paths)
    k = 0
    while k < n and all(p[k] == first[k] for p in paths):
        k += 1
    return first[:k]


def _trie_nodes(paths: list[tuple], r: int) -> list[tuple]:
    """Every prefix of the paths longer than r, deduplicated, by length then first appearance."""
    seen, out = set(), []
    for d in range(r + 1, max(len(p) for p in paths) + 1):
        for p in paths:
            if len(p) >= d and p[:d] not in seen:
                seen.add(p[:d])
                out.append(p[:d])
    return out


def _is_chain(nodes: list[tuple]) -> bool:
    return all(len(b) == len(a) + 1 and b[:-1] == a for a, b in zip(nodes, nodes[1:]))


def _ancestor_mask(nodes: list[tuple], index: dict) -> torch.Tensor:
    m = torch.zeros(len(nodes), len(nodes), dtype=torch.bool)
    for k, p in enumerate(nodes):
        m[k, k] = True
        parent = p[:-1]
        if parent in index:
            m[k] |= m[index[parent]]
    return m


# ----- the two proposers ----------------------------------------------------------------------

class DraftModelProposer(PagedDraftProposer):
    """A separate small causal LM with the target's tokenizer (e.g. `spruce distill`'s output,
    or any checkpoint the loader reads), loaded like a target, with its own paged KV."""

    def __init__(self, config: SpeculativeConfig, target, proposer_id: int = 0):
        super().__init__(config, target, proposer_id)
        from spruce.models.loader import load_model
        from spruce.models.resolve import resolve_model
        resolved = resolve_model(config.model)
        model, mcfg = load_model(resolved, target.dtype, target.device,
                                 target.max_model_len + self.depth + 1)
        check_draft_vocab(resolved, mcfg, target)
        self.model, self.model_config = model, mcfg
        if resolved.kind == "hf_dir":
            ids = load_draft_vocab(Path(resolved.path))
            if ids is not None:
                self.head_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
                w = model.embed_tokens if model.lm_head is None else model.lm_head
                self.head_weight = select_rows(model.linear, w, self.head_ids)
        # A checkpoint made here is fp32; an fp32 target reads its own weights as blocks, and a
        # draft read as fp32 would cost half a target step per drafted token (2 layers and an
        # 8192-row head, 44 MB against the target's ~80 MB of Q4_1/Q8_0).
        read_as_q8_0(model.linear, [w for layer in model.layers
                                    for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
                     + ([model.embed_tokens if model.lm_head is None else model.lm_head] if self.head_ids is None else []))
        per_token = 2 * mcfg.num_hidden_layers * mcfg.num_key_value_heads * mcfg.head_dim \
            * torch.empty((), dtype=target.dtype).element_size()
        num_blocks = self._pool_blocks(target, per_token)
        self.kv_caches = allocate_kv_cache(mcfg, num_blocks, self.block_size, target.dtype, target.device)
        self.kv = KVCacheManager(num_blocks, self.block_size, enable_caching=False)


class EarlyExitProposer(PagedDraftProposer):
    """Self-drafting: the target's first L layers, then its final norm and head, on the
    target's own weights (nothing is copied: LlamaForCausalLM.forward zips its layers with the
    KV caches it is given, so L caches run exactly the first L layers, then the final norm).

    KV: its own paged cache for those L layers (L/num_layers of the target's per-token KV),
    filled for committed tokens by COPYING the target's first-L-layer K/V (bit-identical to
    what it would compute: same weights, same tokens, same positions), so committed tokens are
    never recomputed; only the root and the draft nodes run. Reading the target's blocks in
    place is not done: the tree scratch would have to go in target slots the scheduler has not
    allocated yet (and whose blocks the prefix cache may hash as holding full K/V), and the
    backends take one cache tensor per layer, so target blocks and private scratch blocks
    cannot be mixed in one block table."""

    def __init__(self, config: SpeculativeConfig, target, proposer_id: int = 0):
        super().__init__(config, target, proposer_id)
        n_layers = target.model_config.num_hidden_layers
        L = config.num_early_exit_layers or default_early_exit_layers(n_layers)
        if not 1 <= L < n_layers:
            raise ValueError(f"num_early_exit_layers must be in [1, {n_layers - 1}] for this "
                             f"{n_layers}-layer target, got {L}")
        self.num_layers = L
        self.model = target.model
        self.target = target
        mc = target.model_config
        per_token = 2 * L * mc.num_key_value_heads * mc.head_dim \
            * torch.empty((), dtype=target.dtype).element_size()
        num_blocks = self._pool_blocks(target, per_token)
        full = allocate_kv_cache(mc, num_blocks, self.block_size, target.dtype, target.device)
        self.kv_caches = full[:L]
        self.kv = KVCacheManager(num_blocks, self.block_size, enable_caching=False)

    def _fill(self, seqs: list[_Seq]) -> None:
        """Copy committed tokens [cached, n-1) from the target's cache: the target has computed
        every token but the root (a decoding request has num_computed_tokens = n - 1)."""
        bs = self.block_size
        src, dst = [], []
        for seq in seqs:
            req = seq.request
            end = min(req.num_computed_tokens, seq.num_tokens - 1)
            if end <= seq.num_computed_tokens:
                continue
            tblocks = self.target.kv_manager.get_block_ids(req.request_id)
            dblocks = self.kv.get_block_ids(seq.request_id)
            for p in range(seq.num_computed_tokens, end):
                src.append(tblocks[p // bs] * bs + p % bs)
                dst.append(dblocks[p // bs] * bs + p % bs)
            seq.num_computed_tokens = end
        if not src:
            return
        src_t = torch.tensor(src, dtype=torch.long, device=self.device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
        for (tk, tv), (dk, dv) in zip(self.target.kv_caches, self.kv_caches):
            for t, d in ((tk, dk), (tv, dv)):
                rows = t.view(-1, *t.shape[2:]).index_select(0, src_t)
                d.view(-1, *d.shape[2:]).index_copy_(0, dst_t, rows)


def default_early_exit_layers(num_layers: int) -> int:
    """A quarter of the target's layers (at least 1)."""
    return max(1, num_layers // 4)


# ----- checkpoints ----------------------------------------------------------------------------

def make_model_proposer(config: SpeculativeConfig, target, proposer_id: int = 0) -> Proposer:
    if target is None:
        raise ValueError(f"speculative method {config.method!r} needs the target engine")
    if config.method == "draft_model":
        return DraftModelProposer(config, target, proposer_id)
    if config.method == "early_exit":
        return EarlyExitProposer(config, target, proposer_id)
    raise ValueError(f"not a model-based speculative method: {config.method!r}")
