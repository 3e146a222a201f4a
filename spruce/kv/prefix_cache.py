"""Chained block hashes for the prefix cache (vLLM v1's scheme).

A full block of `block_size` tokens is identified by H(parent hash, its token ids, extra keys).
Chaining through the parent makes the hash of block i stand for the *whole* prefix up to and
including block i, so one dict lookup per block finds the longest cached prefix, and two blocks
with equal tokens at different positions or after different prefixes never collide.

The hash is SHA-256 over a pickle of plain ints/strings/tuples with a pinned protocol: unlike
Python's `hash()` it does not depend on PYTHONHASHSEED, so hashes agree across processes (the
engine core, a CPU-tier worker, a replica). The full 256-bit digest is kept as the key; at that
width a collision is not a practical concern, so a hit is never double-checked against tokens.
"""
from __future__ import annotations

import hashlib
import pickle
from typing import Any, Optional

# Parent of the first block. A fixed constant (vLLM uses a random seed per process, which would
# break cross-process agreement, e.g. for a CPU tier shared between engine processes).
NONE_HASH = 0
_PICKLE_PROTOCOL = 4


def hash_block_tokens(parent_hash: Optional[int], token_ids: tuple[int, ...],
                      extra_keys: tuple[Any, ...] = ()) -> int:
    """Hash of one full block given its parent's hash (None for the first block)."""
    payload = (NONE_HASH if parent_hash is None else parent_hash, tuple(token_ids), tuple(extra_keys))
    return int.from_bytes(hashlib.sha256(pickle.dumps(payload, protocol=_PICKLE_PROTOCOL)).digest(), "big")


def block_extra_keys(request, block_index: int) -> tuple[Any, ...]:
    """Keys besides tokens that decide whether a block's K/V can be shared.

    The LoRA id goes into every block (the adapter changes K/V at every position). The cache salt
    only goes into the first block: chaining carries it into every later hash, and keeping it out
    of the rest matches vLLM. Keys are tagged so a lora id and a salt can never alias.
    """
    keys: tuple[Any, ...] = ()
    if request.lora_id is not None:
        keys += (("lora", request.lora_id),)
    if block_index == 0 and request.cache_salt is not None:
        keys += (("salt", request.cache_salt),)
    return keys


def compute_block_hashes(request, block_size: int) -> list[int]:
    """Extend `request.block_hashes` to cover every full block of `request.all_token_ids`.

    Incremental and idempotent: call it whenever tokens may have been appended. Returns the
    (same) list for convenience. Tokens are append-only, so existing hashes stay valid.
    """
    hashes = request.block_hashes
    tokens = request.all_token_ids
    num_full = len(tokens) // block_size
    if len(hashes) > num_full:
        raise ValueError(f"request {request.request_id!r} has {len(hashes)} block hashes but only "
                         f"{num_full} full blocks: tokens were removed after hashing")
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_full):
        parent = hash_block_tokens(parent, tuple(tokens[i * block_size:(i + 1) * block_size]),
                                   block_extra_keys(request, i))
        hashes.append(parent)
    return hashes
