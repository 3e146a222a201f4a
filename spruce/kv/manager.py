"""KVCacheManager: the narrow API the scheduler uses to give requests KV blocks (vLLM v1's).

    blocks, n = kv.get_computed_blocks(req)            # prefix-cache hit (new/preempted requests)
    kv.allocate_slots(req, num_new, blocks, n)         # None -> not enough memory: preempt someone
    kv.free(req)                                       # finished, aborted or preempted

Prefix caching happens at *allocation* time: the blocks that become full with known token ids
once this step's tokens are computed are hashed immediately, so a request admitted later in the
same step already hits them. That is only sound because tokens scheduled in a step are computed
in that same step, before any later step is scheduled. Two cases break the promise: a request
preempted in the same step it was allocated (its tokens are unscheduled again) and a failed
forward pass. Both are handled by `free()`: it drops the hashes of the request's blocks that are
not fully covered by `request.num_computed_tokens`, which must therefore count only tokens whose
K/V has been written (Spruce's scheduler advances it in `update_from_output`, after the forward).
What `free()` cannot undo is another request having hit such a block in the same step, so the
scheduler must not preempt a request after admitting, in that step, a request that might share
its blocks (Spruce preempts only in the running phase, before admission, and stops admitting
once it has preempted).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from spruce.kv.block_pool import BlockPool, EvictionPolicy, KVBlock
from spruce.kv.prefix_cache import compute_block_hashes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 on_evict: Optional[Callable[[KVBlock], None]] = None,
                 eviction_policy: Optional[EvictionPolicy] = None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching, on_evict, eviction_policy)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # How many leading blocks of each request were already offered to the prefix cache, so
        # each allocation only hashes the blocks that became full since the last one.
        self.num_cached_blocks: dict[str, int] = {}

    @classmethod
    def from_config(cls, cache_config, num_blocks: int, **kwargs) -> "KVCacheManager":
        return cls(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, **kwargs)

    # ----- the narrow API --------------------------------------------------------------------
    def get_computed_blocks(self, request) -> tuple[list[KVBlock], int]:
        """Longest run of cached full blocks at the start of the request, and its token count.

        For a request that holds no blocks (new, or preempted and reset to 0 computed tokens).
        The hit stops at num_tokens - 1 (block-aligned): the last token is always recomputed
        because its logits are needed. The blocks are not yet owned: pass them straight to
        `allocate_slots` with no other allocation in between, or they may be evicted.
        """
        if not self.enable_caching or getattr(request.sampling_params, "prompt_logprobs", None) is not None:
            return [], 0  # prompt logprobs need the logits of every prompt position
        block_hashes = compute_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        stats = self.block_pool.stats
        stats.queries += request.num_tokens
        stats.hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request, num_new_tokens: int,
                       new_computed_blocks: Optional[Iterable[KVBlock]] = None,
                       num_new_computed_tokens: int = 0,
                       num_lookahead_tokens: int = 0) -> Optional[list[KVBlock]]:
        """Make the request own blocks for num_computed_tokens + num_new_computed_tokens +
        num_new_tokens + num_lookahead_tokens tokens.

        `new_computed_blocks` / `num_new_computed_tokens` are a hit from `get_computed_blocks`;
        lookahead tokens are slots for speculative tokens (allocated, never hashed). Returns the
        newly allocated blocks (possibly []), or None - allocating nothing - when the pool is
        too small, in which case the scheduler preempts and retries.
        """
        if num_new_tokens < 0 or num_lookahead_tokens < 0:
            raise ValueError("num_new_tokens and num_lookahead_tokens must be >= 0")
        hits = list(new_computed_blocks or ())
        if num_new_computed_tokens != len(hits) * self.block_size:
            # A partial hit block would be written into while other requests share it.
            raise ValueError(f"num_new_computed_tokens={num_new_computed_tokens} must cover the "
                             f"{len(hits)} hit blocks exactly")
        rid = request.request_id
        req_blocks = self.req_to_blocks.get(rid, [])
        if hits:
            self._check_hits(request, req_blocks, hits)

        num_computed = request.num_computed_tokens + num_new_computed_tokens
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead_tokens, self.block_size)
        num_new_blocks = max(0, num_required - len(req_blocks) - len(hits))
        # Reviving a free cached block takes it out of the free queue, so it costs a free block.
        num_revived = sum(1 for block in hits if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.block_pool.get_num_free_blocks():
            return None

        self.block_pool.touch(hits)  # before get_new_blocks, which could otherwise evict them
        req_blocks = self.req_to_blocks.setdefault(rid, req_blocks)
        req_blocks.extend(hits)
        if hits:
            self.num_cached_blocks[rid] = len(hits)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks else []
        req_blocks.extend(new_blocks)

        if self.enable_caching:
            # Only tokens whose ids are known and whose K/V is written by the end of this step.
            num_known = min(num_computed + num_new_tokens, request.num_tokens)
            self._cache_full_blocks(request, req_blocks, num_known // self.block_size)
        return new_blocks

    def free(self, request) -> None:
        """Release the request's blocks, tail first; fully computed cached blocks stay reusable."""
        rid = request.request_id
        blocks = self.req_to_blocks.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        if not blocks:
            return
        # Blocks hashed at allocation whose K/V was never (fully) written: see the module doc.
        for block in blocks[request.num_computed_tokens // self.block_size:]:
            if block.block_hash is not None:
                self.block_pool.uncache_block(block)
        self.block_pool.free_blocks(reversed(blocks))

    def release_slots_beyond(self, request, num_tokens: int) -> int:
        """Free the request's tail blocks not needed to hold `num_tokens` tokens (e.g. slots of
        rejected speculative tokens). Returns how many blocks were freed. Refuses to free a
        block offered to the prefix cache: those hold real, computed tokens."""
        rid = request.request_id
        blocks = self.req_to_blocks.get(rid, [])
        keep = cdiv(max(num_tokens, 0), self.block_size)
        if keep >= len(blocks):
            return 0
        if keep < self.num_cached_blocks.get(rid, 0):
            raise ValueError(f"release_slots_beyond({num_tokens}) would free cached blocks of {rid!r}")
        tail = blocks[keep:]
        del blocks[keep:]
        self.block_pool.free_blocks(reversed(tail))
        return len(tail)

    # ----- queries -----------------------------------------------------------------------------
    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_blocks(self, request_id: str) -> list[KVBlock]:
        return list(self.req_to_blocks.get(request_id, ()))

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a request needing `num_tokens` slots, ignoring cache hits, fits right now."""
        return cdiv(num_tokens, self.block_size) <= self.num_free_blocks

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    @property
    def prefix_cache_queries(self) -> int:
        return self.block_pool.stats.queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.block_pool.stats.hits

    @property
    def prefix_cache_hit_rate(self) -> float:
        stats = self.block_pool.stats
        return stats.hits / stats.queries if stats.queries else 0.0

    # ----- internals ---------------------------------------------------------------------------
    def _check_hits(self, request, req_blocks: list[KVBlock], hits: list[KVBlock]) -> None:
        if req_blocks or request.num_computed_tokens:
            raise ValueError(f"cache hits can only start a request that holds no blocks "
                             f"({request.request_id!r} holds {len(req_blocks)})")
        hashes = request.block_hashes
        for i, block in enumerate(hits):
            if i >= len(hashes) or block.block_hash != hashes[i]:
                raise ValueError(f"stale cache hit for {request.request_id!r}: block {block.block_id} was "
                                 "evicted; call allocate_slots right after get_computed_blocks")

    def _cache_full_blocks(self, request, req_blocks: list[KVBlock], num_full_blocks: int) -> None:
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_full_blocks <= start:
            return
        block_hashes = compute_block_hashes(request, self.block_size)
        self.block_pool.cache_full_blocks(req_blocks, block_hashes, start, num_full_blocks)
        self.num_cached_blocks[request.request_id] = num_full_blocks
