"""BlockPool: which KV blocks are free, who shares which, and which hold a cached prefix.

Pure bookkeeping of block ids; the K/V tensors live with the model runner.

- A block with ref_cnt > 0 is owned by that many requests. A block with ref_cnt 0 is *free*: it
  sits in the free queue and may still carry a block hash, i.e. still be a prefix-cache entry
  that a later request can revive with `touch()`.
- The free queue is an `EvictionPolicy`. The default (LRU) hands out the least recently freed
  block first, so cached prefixes live as long as possible. Handing out a block that still
  carries a hash evicts it from the hash map first (and calls `on_evict`).
- Block 0 is reserved as the null block (as in vLLM): it is never allocated, so block tables can
  be padded with 0 and padding tokens can be given slots in block 0 without touching any real
  request's K/V. `num_usable_blocks` and `get_num_free_blocks()` exclude it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Optional[int] = None

    def __repr__(self) -> str:
        h = "-" if self.block_hash is None else f"{self.block_hash & 0xFFFF:04x}"
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class EvictionPolicy:
    """The free queue: orders the ref_cnt-0 blocks and chooses which one to hand out next.

    The seam for cost-aware eviction (AsymCache): a policy sees every block as it becomes free
    (`push`), as a cache hit revives it (`remove`), and picks the next block to reuse (`pop`).
    """

    def push(self, block: KVBlock) -> None: raise NotImplementedError
    def remove(self, block: KVBlock) -> None: raise NotImplementedError
    def pop(self) -> KVBlock: raise NotImplementedError
    def __len__(self) -> int: raise NotImplementedError


class LRUEvictionPolicy(EvictionPolicy):
    """Least recently freed first. OrderedDict is a C doubly linked list: O(1) everywhere.

    Freed blocks *without* a hash go to the head, not the tail: reusing them costs nothing, so
    they should be consumed before any cached prefix is evicted (vLLM appends them to the tail).
    """

    def __init__(self):
        self._queue: OrderedDict[int, KVBlock] = OrderedDict()

    def push(self, block: KVBlock) -> None:
        self._queue[block.block_id] = block
        if block.block_hash is None:
            self._queue.move_to_end(block.block_id, last=False)

    def remove(self, block: KVBlock) -> None:
        del self._queue[block.block_id]

    def pop(self) -> KVBlock:
        return self._queue.popitem(last=False)[1]

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self):  # head (next to reuse) first; tests and debugging
        return iter(self._queue.values())


@dataclass
class PrefixCacheStats:
    """Monotonic counters, in tokens like vllm:prefix_cache_queries / vllm:prefix_cache_hits."""
    queries: int = 0
    hits: int = 0
    evictions: int = 0  # cached blocks whose hash was dropped to reuse the block


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_evict: Optional[Callable[[KVBlock], None]] = None,
                 eviction_policy: Optional[EvictionPolicy] = None):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.on_evict = on_evict
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # permanently held, so it never enters the free queue
        self.free_queue = eviction_policy if eviction_policy is not None else LRUEvictionPolicy()
        self._queue_all_blocks()
        # hash -> block. One block per hash: if two requests compute the same block concurrently,
        # the first one cached wins and the duplicate stays unhashed (freed as a plain block).
        self.cached_block_hash_to_block: dict[int, KVBlock] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks owned by requests (free cached blocks count as free)."""
        return 1.0 - self.get_num_free_blocks() / self.num_usable_blocks

    def get_cached_block(self, block_hash: int) -> Optional[KVBlock]:
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {self.get_num_free_blocks()} free")
        out = []
        for _ in range(num_blocks):
            block = self.free_queue.pop()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        # The hook runs while the block still has its hash and its K/V is intact: the new owner
        # writes only when this step executes, so a CPU tier can copy the block out first.
        if self.on_evict is not None:
            self.on_evict(block)
        self.uncache_block(block)
        self.stats.evictions += 1

    def uncache_block(self, block: KVBlock) -> None:
        """Drop `block` from the prefix cache (no hook: its content is not worth keeping)."""
        if block.block_hash is not None and self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """A cache hit: one more owner; a free block leaves the free queue (it is no longer evictable)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one owner from each block. Blocks reaching ref_cnt 0 join the free queue *in the
        given order*, so pass the block that should be evicted first first (a request frees its
        blocks tail first: a prefix's last blocks are the least likely to be shared)."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0 or block is self.null_block:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.push(block)

    def cache_full_blocks(self, blocks: Sequence[KVBlock], block_hashes: Sequence[int],
                          start: int, end: int) -> None:
        """Register blocks[start:end] (full, token ids known) under block_hashes[start:end]."""
        if not self.enable_caching:
            return
        for i in range(start, end):
            block, block_hash = blocks[i], block_hashes[i]
            if block.block_hash is not None:
                if block.block_hash != block_hash:
                    raise ValueError(f"{block} at index {i} is already cached under another hash")
                continue  # a cache hit, or cached by an earlier allocation
            if block_hash in self.cached_block_hash_to_block:
                continue  # duplicate of a block another request cached first
            block.block_hash = block_hash
            self.cached_block_hash_to_block[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix. Only when no request holds a block (as in vLLM), because a
        running request's blocks would otherwise be re-cached halfway; returns False then.
        `on_evict` is not called: a reset means the content is unwanted (e.g. weights changed)."""
        if self.get_num_free_blocks() != self.num_usable_blocks:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        # Re-queue in id order so the now-plain blocks are not stuck behind stale LRU positions.
        while len(self.free_queue):
            self.free_queue.pop()
        self._queue_all_blocks()
        return True

    def _queue_all_blocks(self) -> None:
        # Reversed because LRU puts plain blocks at the head: block 1 then comes out first.
        for block in reversed(self.blocks[1:]):
            self.free_queue.push(block)
