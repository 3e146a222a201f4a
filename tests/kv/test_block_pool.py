"""BlockPool: free queue order, ref counts, hash map, eviction hook, reset."""
import pytest

from spruce.kv.block_pool import BlockPool, EvictionPolicy, KVBlock, LRUEvictionPolicy


def ids(blocks):
    return [b.block_id for b in blocks]


def test_null_block_reserved_and_fresh_order():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4 and pool.get_num_free_blocks() == 4
    assert pool.usage == 0.0
    blocks = pool.get_new_blocks(4)
    assert ids(blocks) == [1, 2, 3, 4]  # block 0 is never handed out
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.get_num_free_blocks() == 0 and pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError):
        BlockPool(1)


def test_get_new_blocks_raises_without_taking_anything():
    pool = BlockPool(4)
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert pool.get_num_free_blocks() == 3


def test_double_free_and_null_free_raise():
    pool = BlockPool(4)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(ValueError):
        pool.free_blocks([b])
    with pytest.raises(ValueError):
        pool.free_blocks([pool.null_block])


def test_cached_blocks_reused_in_lru_order_plain_blocks_first():
    pool = BlockPool(7)
    a = pool.get_new_blocks(3)          # 1 2 3
    b = pool.get_new_blocks(2)          # 4 5
    pool.cache_full_blocks(a, [101, 102, 103], 0, 3)
    pool.cache_full_blocks(b, [201, 202], 0, 1)  # block 5 stays plain
    pool.free_blocks(reversed(a))       # request a finishes first, tail first: 3 2 1
    pool.free_blocks(reversed(b))       # then b: 5 (plain -> head), 4
    # head first: the plain blocks (6 never used, 5 freed plain), then LRU of cached ones.
    assert ids(pool.free_queue) == [5, 6, 3, 2, 1, 4]
    got = pool.get_new_blocks(4)
    assert ids(got) == [5, 6, 3, 2]
    assert pool.get_cached_block(103) is None and pool.get_cached_block(102) is None
    assert pool.get_cached_block(101).block_id == 1 and pool.get_cached_block(201).block_id == 4
    assert got[2].block_hash is None  # eviction cleared the hash


def test_touch_revives_free_cached_block_and_counts_sharing():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [11, 12], 0, 2)
    pool.touch(blocks)                  # a second request shares them
    assert [b.ref_cnt for b in blocks] == [2, 2]
    pool.free_blocks(reversed(blocks))
    assert pool.get_num_free_blocks() == 1
    pool.free_blocks(reversed(blocks))
    assert pool.get_num_free_blocks() == 3
    hit = pool.get_cached_block(11)
    pool.touch([hit])                   # a cache hit on a free block leaves the free queue
    assert hit.ref_cnt == 1 and pool.get_num_free_blocks() == 2
    assert hit.block_id not in ids(pool.free_queue)
    assert pool.get_new_blocks(2)[0] is not hit


def test_eviction_hook_sees_hash_before_it_is_dropped():
    seen = []
    pool = BlockPool(3, on_evict=lambda blk: seen.append((blk.block_id, blk.block_hash)))
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [7, 8], 0, 2)
    pool.free_blocks(reversed(blocks))
    pool.get_new_blocks(1)
    assert seen == [(2, 8)] and pool.stats.evictions == 1
    assert pool.get_cached_block(8) is None and pool.get_cached_block(7) is not None


def test_cache_full_blocks_duplicates_and_conflicts():
    pool = BlockPool(5)
    a = pool.get_new_blocks(1)
    b = pool.get_new_blocks(1)
    pool.cache_full_blocks(a, [5], 0, 1)
    pool.cache_full_blocks(b, [5], 0, 1)   # same content computed twice: first one wins
    assert pool.get_cached_block(5) is a[0] and b[0].block_hash is None
    pool.cache_full_blocks(a, [5], 0, 1)   # idempotent
    with pytest.raises(ValueError):
        pool.cache_full_blocks(a, [6], 0, 1)
    off = BlockPool(3, enable_caching=False)
    c = off.get_new_blocks(1)
    off.cache_full_blocks(c, [5], 0, 1)
    assert c[0].block_hash is None and off.get_cached_block(5) is None


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [1, 2], 0, 2)
    assert pool.reset_prefix_cache() is False
    pool.free_blocks(reversed(blocks))
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(1) is None and all(b.block_hash is None for b in pool.blocks)
    assert pool.get_num_free_blocks() == 3 and ids(pool.get_new_blocks(3)) == [1, 2, 3]


def test_pluggable_eviction_policy():
    class MostRecentFirst(EvictionPolicy):
        def __init__(self):
            self.stack: list[KVBlock] = []

        def push(self, block):
            self.stack.append(block)

        def remove(self, block):
            self.stack.remove(block)

        def pop(self):
            return self.stack.pop()

        def __len__(self):
            return len(self.stack)

    pool = BlockPool(4, eviction_policy=MostRecentFirst())
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(blocks)
    assert ids(pool.get_new_blocks(3)) == [3, 2, 1]
    assert isinstance(BlockPool(3).free_queue, LRUEvictionPolicy)
