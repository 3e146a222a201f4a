"""AttentionMetadata: everything the attention backend needs for one flat token batch.

The batch is T tokens from B requests laid end to end (no padding). Request i owns query
tokens [query_start_loc[i], query_start_loc[i+1]); its context after this step is seq_lens[i]
tokens, of which the last query_lens[i] are the new ones. K/V live in a paged cache: token j of
request i sits in block block_tables[i, j // block_size] at offset j % block_size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    # Per request (B of them). Host lists are kept beside the tensors so backends can loop
    # without device syncs.
    query_start_loc: list[int]          # len B+1
    seq_lens: list[int]                 # len B: context length including this step's tokens
    query_lens: list[int]               # len B
    block_tables: torch.Tensor          # [B, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor          # [T] int64: flat cache slot each new token's K/V goes to
    block_size: int
    seq_lens_t: Optional[torch.Tensor] = None   # [B] int64 copy of seq_lens on the device
    # Speculative token trees (SpecInfer): for request i, tree_masks[i] is a [q, q] bool ancestor
    # mask over its query tokens (row attends to column). None for a request means plain causal.
    tree_masks: Optional[list[Optional[torch.Tensor]]] = None

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_pure_decode(self) -> bool:
        return self.tree_masks is None and all(q == 1 for q in self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens) if self.seq_lens else 0
