"""The attention backend interface: paged-KV write + attention over one flat token batch."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch

from spruce.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """One instance serves every layer; it holds no per-step state.

    `forward` first stores this step's K/V for all T tokens at `md.slot_mapping`, and only then
    attends: a request may read blocks another request in the same batch wrote in this very layer
    call (shared prefix blocks), so every write must land before any read.
    """

    name: str = "abstract"

    def prepare(self, md: AttentionMetadata) -> None:
        """Called once per model forward, before the first layer: derive per-step data shared by
        all layers here (the metadata object may be reused across steps, so always rebuild)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                md: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> out [T, H, D]."""

    @staticmethod
    def write_kv(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        hkv, d = key_cache.shape[-2:]
        key_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(key_cache.dtype))
        value_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(value_cache.dtype))


def get_attention_backend(device: torch.device | str) -> AttentionBackend:
    """The best backend available for `device`: on CPU the native paged-attention op when it
    builds (spruce.attention._build), else the torch one. $SPRUCE_ATTENTION_BACKEND=torch|native
    forces a choice; `native` raises if the op cannot be had rather than silently falling back."""
    from spruce.attention.torch_ref import TorchAttentionBackend
    choice = os.environ.get("SPRUCE_ATTENTION_BACKEND", "").strip().lower()
    if choice not in ("", "auto", "torch", "native"):
        raise ValueError(f"SPRUCE_ATTENTION_BACKEND={choice!r}: expected torch or native")
    if choice == "torch":
        return TorchAttentionBackend()
    if torch.device(device).type == "cpu" or choice == "native":
        from spruce.attention._build import load_error, load_native_ops
        ops = load_native_ops()
        if ops is not None:
            from spruce.attention.native_cpu import NativeCPUAttentionBackend
            return NativeCPUAttentionBackend(ops)
        if choice == "native":
            raise RuntimeError(f"SPRUCE_ATTENTION_BACKEND=native but the native ops are "
                               f"unavailable: {load_error()}")
    return TorchAttentionBackend()
