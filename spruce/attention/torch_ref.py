"""Attention over the paged KV cache with plain torch ops: the reference (and CPU default) backend.

Single-token queries without a tree mask (decode) are batched: their context K/V is gathered from
the block tables into one padded [B, L, Hkv, D] tensor and attended in one SDPA call, masked by
seq_lens. Multi-token queries (prefill chunks, speculative trees) are handled one request at a
time. GQA never materialises repeated K/V: in decode the G query heads of a KV group are folded
into SDPA's query-length axis; in the per-request path SDPA's enable_gqa does it.

Padded positions in the decode gather read whatever sits in other blocks (block 0 for the
table's padding); they are masked out, but 0 * NaN is NaN, so caches must start zeroed
(`spruce.models.llama.allocate_kv_cache` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from spruce.attention.backend import AttentionBackend
from spruce.attention.metadata import AttentionMetadata


@dataclass
class _DecodePlan:
    rows: Optional[torch.Tensor]   # token rows of the decode requests; None when they are all rows
    flat_blocks: torch.Tensor      # [B * nb] block ids
    mask: torch.Tensor             # [B, 1, 1, L] bool, True = attend
    num_reqs: int
    length: int                    # L = nb * block_size


@dataclass
class _Plan:
    decode: Optional[_DecodePlan]
    others: list[int]              # requests attended one at a time


def _decode_plan(md: AttentionMetadata, reqs: list[int], all_rows: bool) -> _DecodePlan:
    bs = md.block_size
    max_len = max(md.seq_lens[i] for i in reqs)
    nb = (max_len + bs - 1) // bs
    device = md.block_tables.device
    if all_rows:
        tables, lens, rows = md.block_tables[:, :nb], md.seq_lens_t, None
        if lens is None:
            lens = torch.tensor(md.seq_lens, dtype=torch.int64, device=device)
    else:
        idx = torch.tensor(reqs, dtype=torch.int64, device=device)
        tables = md.block_tables.index_select(0, idx)[:, :nb]
        lens = torch.tensor([md.seq_lens[i] for i in reqs], dtype=torch.int64, device=device)
        rows = torch.tensor([md.query_start_loc[i] for i in reqs], dtype=torch.int64, device=device)
    length = nb * bs
    mask = torch.arange(length, device=device)[None, :] < lens.to(device)[:, None]
    return _DecodePlan(rows, tables.reshape(-1), mask[:, None, None, :], len(reqs), length)


def _plan(md: AttentionMetadata) -> _Plan:
    """Per-step work split shared by all layers: built by prepare(), stashed on the metadata.
    Whoever reuses one metadata object across steps must call prepare() each step (the model does)."""
    plan = md.__dict__.get("_torch_ref_plan")
    return plan if plan is not None else _build_plan(md)


def _build_plan(md: AttentionMetadata) -> _Plan:
    decode, others = [], []
    for i, ql in enumerate(md.query_lens):
        if ql == 0:
            continue
        if ql == 1 and (md.tree_masks is None or md.tree_masks[i] is None):
            decode.append(i)
        else:
            others.append(i)
    all_rows = len(decode) == md.num_reqs and md.num_tokens == len(decode)
    plan = _Plan(_decode_plan(md, decode, all_rows) if decode else None, others)
    md.__dict__["_torch_ref_plan"] = plan
    return plan


def _decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            p: _DecodePlan, scale: float, ws: "_Workspace") -> torch.Tensor:
    """q [B, H, D] (one token per request) -> [B, H, D]."""
    b, h, d = q.shape
    hkv = key_cache.shape[2]
    kbuf, vbuf = ws.get(p.flat_blocks.numel(), key_cache)
    k = torch.index_select(key_cache, 0, p.flat_blocks, out=kbuf).view(b, p.length, hkv, d).transpose(1, 2)
    v = torch.index_select(value_cache, 0, p.flat_blocks, out=vbuf).view(b, p.length, hkv, d).transpose(1, 2)
    # A KV group's G query heads become G "query positions" of one SDPA head: no K/V repeat.
    o = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, d).to(k.dtype), k, v,
                                       attn_mask=p.mask, scale=scale)
    return o.reshape(b, h, d)


class _Workspace:
    """Reused gather buffers for the decode path. Fresh multi-MB tensors per layer cost page
    faults on every allocation (glibc hands big blocks back to the OS), which measured as much as
    the copy itself."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def get(self, num_blocks: int, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_blocks, *cache.shape[1:])
        if (self.k is None or self.k.dtype != cache.dtype or self.k.device != cache.device
                or self.k.shape[1:] != cache.shape[1:] or self.k.shape[0] < num_blocks):
            n = max(num_blocks, int(1.25 * (self.k.shape[0] if self.k is not None else 0)))
            self.k = torch.empty((n, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
            self.v = torch.empty_like(self.k)
        return self.k[:shape[0]], self.v[:shape[0]]


def _context(cache: torch.Tensor, md: AttentionMetadata, i: int, seq_len: int) -> torch.Tensor:
    nb = (seq_len + md.block_size - 1) // md.block_size
    blocks = cache.index_select(0, md.block_tables[i, :nb])
    return blocks.view(-1, *cache.shape[2:])[:seq_len]


def _request_mask(md: AttentionMetadata, i: int, ql: int, sl: int, device) -> torch.Tensor:
    """[ql, sl] bool: the chunk's queries see all earlier context, then causal or tree order."""
    offset = sl - ql
    tree = md.tree_masks[i] if md.tree_masks is not None else None
    if tree is None:
        cols = torch.arange(sl, device=device)
        return cols[None, :] <= (offset + torch.arange(ql, device=device))[:, None]
    if tree.shape != (ql, ql):
        raise ValueError(f"tree mask of request {i} is {tuple(tree.shape)}, expected ({ql}, {ql})")
    mask = torch.ones(ql, sl, dtype=torch.bool, device=device)
    mask[:, offset:] = tree.to(device=device, dtype=torch.bool)
    return mask


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self):
        self._ws = _Workspace()

    def prepare(self, md: AttentionMetadata) -> None:
        _build_plan(md)

    def forward(self, q, k, v, key_cache, value_cache, md: AttentionMetadata, scale: float):
        self.write_kv(k, v, key_cache, value_cache, md.slot_mapping)
        plan = _plan(md)
        dp = plan.decode
        if dp is not None and dp.rows is None:
            return _decode(q, key_cache, value_cache, dp, scale, self._ws).to(q.dtype)
        out = torch.empty_like(q)
        if dp is not None:
            out.index_copy_(0, dp.rows, _decode(q.index_select(0, dp.rows), key_cache, value_cache,
                                                dp, scale, self._ws).to(q.dtype))
        for i in plan.others:
            out[md.query_start_loc[i]:md.query_start_loc[i + 1]] = self._one_request(
                q, k, v, key_cache, value_cache, md, i, scale)
        return out

    @staticmethod
    def _one_request(q, k, v, key_cache, value_cache, md: AttentionMetadata, i: int, scale: float):
        start, end = md.query_start_loc[i], md.query_start_loc[i + 1]
        ql, sl = end - start, md.seq_lens[i]
        tree = md.tree_masks[i] if md.tree_masks is not None else None
        qi = q[start:end].transpose(0, 1)[None]                          # [1, H, ql, D]
        if sl == ql and tree is None:
            # Whole prompt in this step: its K/V are exactly this step's, no gather needed.
            ki, vi = k[start:end], v[start:end]
            o = F.scaled_dot_product_attention(qi, ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                                               is_causal=True, scale=scale, enable_gqa=True)
        else:
            ki = _context(key_cache, md, i, sl)
            vi = _context(value_cache, md, i, sl)
            mask = _request_mask(md, i, ql, sl, q.device)
            o = F.scaled_dot_product_attention(qi.to(ki.dtype), ki.transpose(0, 1)[None],
                                               vi.transpose(0, 1)[None], attn_mask=mask,
                                               scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1).to(q.dtype)
