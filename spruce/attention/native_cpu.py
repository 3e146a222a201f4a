"""CPU attention through the native paged-attention op (spruce/csrc/paged_attention.cpp).

The op reads K/V in place from the paged cache: decode skips the torch backend's gather of every
request's blocks into a padded buffer and the masked SDPA over that padding, and prefill chunks
skip the per-request gather of their cached context. Speculative tree requests go through the op
as well, with their ancestor masks (a flat bool buffer plus per-request offsets), so a spec step
costs one kernel call per layer, not one per request; a mask whose shape does not match the
request's query length (never made by the engine) falls back to TorchAttentionBackend's
per-request path, and caches the op does not take (another device or dtype) go wholly to the torch
backend, whose subclass this is. A request whose whole context is this step's tokens (a cold
prompt of at least `sdpa_min_tokens`) is attended by torch's SDPA over the batch's own K/V instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from spruce.attention._build import load_native_ops
from spruce.attention.metadata import AttentionMetadata
from spruce.attention.torch_ref import TorchAttentionBackend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A request prefilled whole in one step (no cached context) at least this long runs through
# torch's SDPA instead of the op. Where the CPU has AMX, SDPA's flash kernel runs its blocked GEMMs
# on it: 2-2.5x the op's speed on W1's 100-300 token prompts (AMX dev box), so only prompts too
# short to pay for a call stay with the op. Without AMX the op is the faster one (Zen 4 dev box,
# SmolLM2's 9/3 heads, both threads, bf16: 0.15 / 0.53 / 3.2 / 17.5 / 53 ms at 100 / 200 / 512 /
# 1024 / 2048 tokens against SDPA's 0.45 / 1.06 / 5.6 / 23.0 / 47.8; fp32 alike), up to ~1.5k.
SDPA_MIN_TOKENS_AMX = 32
SDPA_MIN_TOKENS_NO_AMX = 1536


def default_sdpa_min_tokens(ops: ModuleType) -> int:
    env = os.environ.get("SPRUCE_SDPA_MIN_TOKENS")
    if env:
        return int(env)
    amx = getattr(ops, "amx_available", None)
    return SDPA_MIN_TOKENS_AMX if amx is not None and amx() else SDPA_MIN_TOKENS_NO_AMX


@dataclass
class _NativePlan:
    decode: bool                          # one query token per request, no tree masks
    block_tables: torch.Tensor            # [B, max_blocks] int64, unit inner stride
    seq_lens: torch.Tensor                # [B] int64
    query_start_loc: Optional[torch.Tensor]   # [B + 1] int64, varlen only
    tree_mask: Optional[torch.Tensor] = None          # flat bool: the ql x ql masks end to end
    tree_mask_offsets: Optional[torch.Tensor] = None  # [B] int64, -1 = plain causal
    torch_tree_reqs: tuple[int, ...] = ()             # tree requests the torch path redoes
    # Requests whose whole context is this step's tokens, run through torch's SDPA on the batch's
    # own K/V; the op then runs only the other requests, whose q rows `op_rows` gathers.
    sdpa_reqs: tuple[int, ...] = ()
    op_rows: Optional[torch.Tensor] = None   # [T'] int64; None: the op runs every row


class NativeCPUAttentionBackend(TorchAttentionBackend):
    name = "native-cpu"

    def __init__(self, ops: Optional[ModuleType] = None, sdpa_min_tokens: Optional[int] = None):
        super().__init__()
        self.ops = ops if ops is not None else load_native_ops()
        if self.ops is None:
            raise RuntimeError("native CPU attention ops are not available")
        self.sdpa_min_tokens = sdpa_min_tokens if sdpa_min_tokens is not None else default_sdpa_min_tokens(self.ops)

    def prepare(self, md: AttentionMetadata) -> None:
        # The torch plan is built lazily, only if a fallback needs it; drop any from a previous
        # step on a reused metadata object.
        md.__dict__.pop("_torch_ref_plan", None)
        md.__dict__["_native_plan"] = self._build_plan(md, self.sdpa_min_tokens)

    @staticmethod
    def _build_plan(md: AttentionMetadata, sdpa_min_tokens: int) -> _NativePlan:
        seq_lens = md.seq_lens_t
        if seq_lens is None or seq_lens.dtype != torch.int64 or seq_lens.device.type != "cpu":
            seq_lens = torch.tensor(md.seq_lens, dtype=torch.int64)
        tables = md.block_tables
        if tables.dtype != torch.int64 or tables.device.type != "cpu" or tables.stride(-1) != 1:
            tables = tables.to("cpu", torch.int64).contiguous()
        if md.is_pure_decode and md.num_tokens == md.num_reqs:
            return _NativePlan(True, tables, seq_lens, None)
        if not any(m is not None for m in (md.tree_masks or [])):
            fresh = [i for i, (ql, sl) in enumerate(zip(md.query_lens, md.seq_lens))
                     if ql == sl and ql >= sdpa_min_tokens]
            if fresh:
                return NativeCPUAttentionBackend._split_plan(md, tables, seq_lens, fresh)
        plan = _NativePlan(False, tables, seq_lens, torch.tensor(md.query_start_loc, dtype=torch.int64))
        trees = md.tree_masks or []
        offsets, flat, fallback, off = [-1] * md.num_reqs, [], [], 0
        for i, mask in enumerate(trees):
            ql = md.query_lens[i]
            if mask is None or ql == 0:
                continue
            if tuple(mask.shape) != (ql, ql):
                fallback.append(i)
                continue
            offsets[i] = off
            flat.append(mask.reshape(-1).to("cpu", torch.bool))
            off += ql * ql
        if flat:
            plan.tree_mask = torch.cat(flat)
            plan.tree_mask_offsets = torch.tensor(offsets, dtype=torch.int64)
        plan.torch_tree_reqs = tuple(fallback)
        return plan

    @staticmethod
    def _split_plan(md: AttentionMetadata, tables: torch.Tensor, seq_lens: torch.Tensor,
                    fresh: list[int]) -> _NativePlan:
        fresh_set = set(fresh)
        rest = [i for i in range(md.num_reqs) if i not in fresh_set]
        qsl = md.query_start_loc
        plan = _NativePlan(False, tables, seq_lens, None, sdpa_reqs=tuple(fresh))
        if rest:
            idx = torch.tensor(rest, dtype=torch.int64)
            lens = [md.query_lens[i] for i in rest]
            plan.block_tables, plan.seq_lens = tables.index_select(0, idx), seq_lens.index_select(0, idx)
            plan.query_start_loc = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0)
            plan.op_rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in rest])
        return plan

    @staticmethod
    def _fresh_prefills(out, q, k, v, md: AttentionMetadata, plan: _NativePlan, scale: float) -> None:
        gqa = q.shape[1] != k.shape[1]
        for i in plan.sdpa_reqs:
            s, e = md.query_start_loc[i], md.query_start_loc[i + 1]
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                v[s:e].transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=gqa)
            out[s:e] = o[0].transpose(0, 1)

    @staticmethod
    def supports(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and key_cache.device.type == "cpu"
                and key_cache.dtype in _DTYPES and value_cache.dtype == key_cache.dtype
                and q.dtype in _DTYPES and q.stride(-1) == 1
                and key_cache.is_contiguous() and value_cache.is_contiguous())

    def _write_kv(self, k, v, key_cache, value_cache, slot_mapping) -> None:
        if (k.dtype == v.dtype == key_cache.dtype and slot_mapping.dtype == torch.int64
                and all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v))):
            self.ops.write_kv(key_cache, value_cache, k, v, slot_mapping)
        else:
            self.write_kv(k, v, key_cache, value_cache, slot_mapping)

    def forward(self, q, k, v, key_cache, value_cache, md: AttentionMetadata, scale: float):
        if not self.supports(q, key_cache, value_cache):
            return super().forward(q, k, v, key_cache, value_cache, md, scale)
        plan = md.__dict__.get("_native_plan")
        if plan is None:
            plan = md.__dict__["_native_plan"] = self._build_plan(md, self.sdpa_min_tokens)
        self._write_kv(k, v, key_cache, value_cache, md.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype)
        if plan.decode:
            self.ops.paged_attention_decode(out, q, key_cache, value_cache, plan.block_tables,
                                            plan.seq_lens, scale)
            return out
        if plan.sdpa_reqs:
            self._fresh_prefills(out, q, k, v, md, plan, scale)
            if plan.query_start_loc is None:
                return out
        if plan.op_rows is not None:
            sub = torch.empty((len(plan.op_rows),) + tuple(q.shape[1:]), dtype=q.dtype)
            self.ops.paged_attention_varlen(sub, q.index_select(0, plan.op_rows), key_cache,
                                            value_cache, plan.block_tables, plan.seq_lens,
                                            plan.query_start_loc, scale)
            out.index_copy_(0, plan.op_rows, sub)
            return out
        self.ops.paged_attention_varlen(out, q, key_cache, value_cache, plan.block_tables,
                                        plan.seq_lens, plan.query_start_loc, scale,
                                        plan.tree_mask, plan.tree_mask_offsets)
        for i in plan.torch_tree_reqs:
            out[md.query_start_loc[i]:md.query_start_loc[i + 1]] = self._one_request(
                q, k, v, key_cache, value_cache, md, i, scale)
        return out
