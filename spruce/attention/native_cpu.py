"""CPU attention through the native paged-attention op (spruce/csrc/paged_attention.cpp).

The op reads K/V in place from the paged cache: decode skips the torch backend's gather of every
request's blocks into a padded buffer and the masked SDPA over that padding, and prefill chunks
skip the per-request gather of their cached context. Speculative tree requests go through the op
as well, with their ancestor masks (a flat bool buffer plus per-request offsets), so a spec step
costs one kernel call per layer, not one per request; a mask whose shape does not match the
request's query length (never made by the engine) falls back to TorchAttentionBackend's
per-request path, and caches the op does not take (another device or dtype) go wholly to the torch
backend, whose subclass this is.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from spruce.attention._build import load_native_ops
from spruce.attention.metadata import AttentionMetadata
from spruce.attention.torch_ref import TorchAttentionBackend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _NativePlan:
    decode: bool                          # one query token per request, no tree masks
    block_tables: torch.Tensor            # [B, max_blocks] int64, unit inner stride
    seq_lens: torch.Tensor                # [B] int64
    query_start_loc: Optional[torch.Tensor]   # [B + 1] int64, varlen only
    tree_mask: Optional[torch.Tensor] = None          # flat bool: the ql x ql masks end to end
    tree_mask_offsets: Optional[torch.Tensor] = None  # [B] int64, -1 = plain causal
    torch_tree_reqs: tuple[int, ...] = ()             # tree requests the torch path redoes


class NativeCPUAttentionBackend(TorchAttentionBackend):
    name = "native-cpu"

    def __init__(self, ops: Optional[ModuleType] = None):
        super().__init__()
        self.ops = ops if ops is not None else load_native_ops()
        if self.ops is None:
            raise RuntimeError("native CPU attention ops are not available")

    def prepare(self, md: AttentionMetadata) -> None:
        # The torch plan is built lazily, only if a fallback needs it; drop any from a previous
        # step on a reused metadata object.
        md.__dict__.pop("_torch_ref_plan", None)
        md.__dict__["_native_plan"] = self._build_plan(md)

    @staticmethod
    def _build_plan(md: AttentionMetadata) -> _NativePlan:
        seq_lens = md.seq_lens_t
        if seq_lens is None or seq_lens.dtype != torch.int64 or seq_lens.device.type != "cpu":
            seq_lens = torch.tensor(md.seq_lens, dtype=torch.int64)
        tables = md.block_tables
        if tables.dtype != torch.int64 or tables.device.type != "cpu" or tables.stride(-1) != 1:
            tables = tables.to("cpu", torch.int64).contiguous()
        if md.is_pure_decode and md.num_tokens == md.num_reqs:
            return _NativePlan(True, tables, seq_lens, None)
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
            plan = md.__dict__["_native_plan"] = self._build_plan(md)
        self._write_kv(k, v, key_cache, value_cache, md.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype)
        if plan.decode:
            self.ops.paged_attention_decode(out, q, key_cache, value_cache, plan.block_tables,
                                            plan.seq_lens, scale)
            return out
        self.ops.paged_attention_varlen(out, q, key_cache, value_cache, plan.block_tables,
                                        plan.seq_lens, plan.query_start_loc, scale,
                                        plan.tree_mask, plan.tree_mask_offsets)
        for i in plan.torch_tree_reqs:
            out[md.query_start_loc[i]:md.query_start_loc[i + 1]] = self._one_request(
                q, k, v, key_cache, value_cache, md, i, scale)
        return out
