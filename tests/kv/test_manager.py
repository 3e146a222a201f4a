"""KVCacheManager with plain Requests and no model: accounting, prefix hits, preemption safety."""
import random
import subprocess
import sys
from pathlib import Path

import pytest

from spruce.kv.manager import KVCacheManager
from spruce.kv.prefix_cache import compute_block_hashes, hash_block_tokens
from spruce.request import Request
from spruce.sampling_params import SamplingParams

BS = 4


def make_req(rid, tokens, **kw):
    return Request(rid, list(tokens), SamplingParams(), **kw)


def run(mgr, req, num_new=None):
    """Schedule and 'compute' the rest of the request's known tokens, as the scheduler would."""
    blocks, hit = mgr.get_computed_blocks(req) if req.num_computed_tokens == 0 else ([], 0)
    num_new = req.num_tokens - req.num_computed_tokens - hit if num_new is None else num_new
    assert mgr.allocate_slots(req, num_new, blocks, hit) is not None
    req.num_computed_tokens += hit + num_new
    return hit


def check_invariants(mgr, live=()):
    pool = mgr.block_pool
    owners = {}
    for blocks in mgr.req_to_blocks.values():
        for b in blocks:
            owners[b.block_id] = owners.get(b.block_id, 0) + 1
    free = {b.block_id for b in pool.free_queue}
    assert len(free) == pool.get_num_free_blocks()
    for b in pool.blocks[1:]:
        assert b.ref_cnt == owners.get(b.block_id, 0), b
        assert (b.ref_cnt == 0) == (b.block_id in free), b
        if b.block_hash is not None:
            assert pool.cached_block_hash_to_block[b.block_hash] is b
    assert all(b.block_hash == h for h, b in pool.cached_block_hash_to_block.items())
    assert pool.get_num_free_blocks() + len(owners) == mgr.num_usable_blocks
    for req in live:  # each request owns enough blocks for what it has computed
        assert len(mgr.req_to_blocks.get(req.request_id, [])) * BS >= req.num_computed_tokens


def test_allocation_accounting_and_no_leaks():
    mgr = KVCacheManager(11, BS)
    a = make_req("a", range(10))
    assert mgr.get_computed_blocks(a) == ([], 0)
    new = mgr.allocate_slots(a, 6)
    assert len(new) == 2 and mgr.get_block_ids("a") == [1, 2]
    a.num_computed_tokens = 6
    assert len(mgr.allocate_slots(a, 4)) == 1 and mgr.num_free_blocks == 7
    a.num_computed_tokens = 10
    assert mgr.allocate_slots(a, 1) == []  # token 11 still fits in block 3
    assert mgr.usage == pytest.approx(0.3)
    mgr.free(a)
    mgr.free(a)  # freeing twice (e.g. abort after finish) is harmless
    check_invariants(mgr)
    assert mgr.num_free_blocks == mgr.num_usable_blocks == 10
    assert mgr.can_fit(40) and not mgr.can_fit(41)


def test_prefix_hit_full_blocks_only_and_capped():
    mgr = KVCacheManager(20, BS)
    run(mgr, make_req("a", range(10)))
    assert run(mgr, make_req("b", list(range(10)) + [99])) == 8       # 2 full blocks
    assert run(mgr, make_req("c", list(range(6)) + [50, 51, 52])) == 4  # diverges in block 1
    assert run(mgr, make_req("d", range(8))) == 4   # all 8 cached, but the last token is recomputed
    assert run(mgr, make_req("e", range(3))) == 0   # no full block
    assert mgr.prefix_cache_hits == 16 and mgr.prefix_cache_queries == 10 + 11 + 9 + 8 + 3
    check_invariants(mgr)


def test_sharing_ref_counts_and_free():
    mgr = KVCacheManager(20, BS)
    a, b = make_req("a", range(9)), make_req("b", range(9))
    run(mgr, a)
    run(mgr, b)
    shared = mgr.get_blocks("a")[:2]
    assert mgr.get_blocks("b")[:2] == shared and [x.ref_cnt for x in shared] == [2, 2]
    assert mgr.get_block_ids("a")[2] != mgr.get_block_ids("b")[2]
    mgr.free(a)
    assert [x.ref_cnt for x in shared] == [1, 1]
    mgr.free(b)
    check_invariants(mgr)
    assert mgr.num_free_blocks == mgr.num_usable_blocks
    assert run(mgr, make_req("c", range(9))) == 8  # still cached after everyone left


def test_same_step_hit_on_blocks_cached_at_allocation():
    mgr = KVCacheManager(20, BS)
    a = make_req("a", range(12))
    mgr.allocate_slots(a, 12)  # scheduled, not computed yet
    blocks, hit = mgr.get_computed_blocks(make_req("b", range(12)))
    assert hit == 8 and blocks == mgr.get_blocks("a")[:2]
    # Chunked: only tokens scheduled so far are cached.
    c = make_req("c", range(100, 112))
    mgr.allocate_slots(c, 5)
    assert mgr.get_computed_blocks(make_req("d", range(100, 112)))[1] == 4


def test_lora_and_salt_keep_caches_apart():
    mgr = KVCacheManager(40, BS)
    toks = list(range(9))
    run(mgr, make_req("base", toks))
    assert run(mgr, make_req("l1", toks, lora_id=1)) == 0
    assert run(mgr, make_req("l1b", toks, lora_id=1)) == 8
    assert run(mgr, make_req("l2", toks, lora_id=2)) == 0
    assert run(mgr, make_req("s", toks, cache_salt="x")) == 0
    assert run(mgr, make_req("s2", toks, cache_salt="y")) == 0
    assert run(mgr, make_req("s3", toks, cache_salt="x")) == 8
    assert run(mgr, make_req("plain", toks)) == 8
    # The salt enters the first block's hash only; chaining carries it to the rest.
    r = make_req("h", toks, cache_salt="x")
    h = compute_block_hashes(r, BS)
    assert h[1] == hash_block_tokens(h[0], (4, 5, 6, 7), ())
    assert h[0] != hash_block_tokens(None, (0, 1, 2, 3), ())


def test_hash_is_stable_across_processes():
    code = ("from spruce.kv.prefix_cache import hash_block_tokens as h;"
            "print(h(h(None, (1, 2), (('salt', 's'),)), (3, 4), (('lora', 7),)))")
    root = str(Path(__file__).resolve().parents[2])
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": root}).stdout.strip()
            for seed in ("1", "2")}
    assert outs == {str(hash_block_tokens(hash_block_tokens(None, (1, 2), (("salt", "s"),)),
                                          (3, 4), (("lora", 7),)))}


def test_freed_cached_blocks_evicted_lru_tail_first():
    mgr = KVCacheManager(7, BS)                   # 6 usable blocks
    old, new = make_req("old", range(9)), make_req("new", range(50, 59))
    run(mgr, old)
    run(mgr, new)
    mgr.free(old)                                 # old frees first: its cached blocks are the LRU
    mgr.free(new)
    x = make_req("x", range(200, 209))
    run(mgr, x)                                   # 3 blocks: 2 plain ones, then old's tail block
    mgr.free(x)
    assert run(mgr, o := make_req("o", range(9))) == 4   # old's head block survived
    mgr.free(o)                                   # o needed 2 more: a plain one, then new's tail
    assert run(mgr, make_req("n", range(50, 59))) == 4
    check_invariants(mgr)


def test_allocate_returns_none_and_allocates_nothing_when_full():
    mgr = KVCacheManager(5, BS)                   # 4 usable blocks
    a = make_req("a", range(8))
    run(mgr, a)
    mgr.free(a)                                   # blocks 1, 2 stay cached (and free)
    mgr.allocate_slots(make_req("b", range(8, 16)), 8)  # takes the 2 plain blocks
    c = make_req("c", [0, 1, 2, 3, 9, 9, 9, 9, 9])
    blocks, hit = mgr.get_computed_blocks(c)
    assert hit == 4
    before = [(x.block_id, x.ref_cnt, x.block_hash) for x in mgr.block_pool.blocks]
    # 9 tokens need 3 blocks: the revived hit + 2 new, but only 2 blocks are free.
    assert mgr.allocate_slots(c, 5, blocks, hit) is None
    assert [(x.block_id, x.ref_cnt, x.block_hash) for x in mgr.block_pool.blocks] == before
    assert mgr.get_block_ids("c") == [] and "c" not in mgr.req_to_blocks
    assert len(mgr.allocate_slots(c, 4, blocks, hit)) == 1  # a chunk of 4 fits: 1 revived + 1 new
    assert mgr.num_free_blocks == 0
    check_invariants(mgr)


def test_eviction_hook_called_on_reuse():
    evicted = []
    mgr = KVCacheManager(4, BS, on_evict=lambda blk: evicted.append(blk.block_hash))
    a = make_req("a", range(9))
    run(mgr, a)
    mgr.free(a)
    run(mgr, make_req("b", range(100, 112)))
    assert sorted(evicted) == sorted(compute_block_hashes(a, BS)) and mgr.block_pool.stats.evictions == 2


def test_preempted_in_same_step_drops_uncomputed_hashes():
    mgr = KVCacheManager(20, BS)
    a = make_req("a", range(12))
    run(mgr, a, num_new=4)                       # step 1 computed block 0
    mgr.allocate_slots(a, 8)                     # step 2 schedules blocks 1, 2 (hashed now)
    assert mgr.get_computed_blocks(make_req("p", range(12)))[1] == 8
    mgr.free(a)                                  # preempted before step 2 ran
    check_invariants(mgr)
    assert mgr.get_computed_blocks(make_req("q", range(12)))[1] == 4  # only block 0 is real


def test_stale_or_misplaced_hits_rejected():
    mgr = KVCacheManager(4, BS)
    a = make_req("a", range(9))
    run(mgr, a)
    mgr.free(a)
    b = make_req("b", range(9))
    blocks, hit = mgr.get_computed_blocks(b)
    mgr.allocate_slots(make_req("x", range(100, 112)), 12)  # evicts the hit blocks
    with pytest.raises(ValueError, match="stale"):
        mgr.allocate_slots(b, 1, blocks, hit)
    with pytest.raises(ValueError):
        mgr.allocate_slots(b, 1, blocks, hit - 1)


def test_decode_tokens_get_cached_and_hit():
    mgr = KVCacheManager(20, BS)
    a = make_req("a", range(6))
    run(mgr, a)
    for tok in (60, 61, 62):                     # decode: each sampled token is computed next step
        a.append_output_token_ids([tok])
        run(mgr, a)
    follow_up = make_req("chat2", a.all_token_ids + [7, 7])
    assert run(mgr, follow_up) == 8


def test_lookahead_slots_and_release_slots_beyond():
    mgr = KVCacheManager(20, BS)
    a = make_req("a", range(7))
    assert len(mgr.allocate_slots(a, 7, num_lookahead_tokens=9)) == 4  # 16 slots
    a.num_computed_tokens = 7
    assert mgr.block_pool.get_cached_block(a.block_hashes[0]) is not None
    assert mgr.release_slots_beyond(a, 9) == 1 and len(mgr.get_block_ids("a")) == 3
    assert mgr.release_slots_beyond(a, 9) == 0
    with pytest.raises(ValueError):
        mgr.release_slots_beyond(a, 0)           # block 0 is cached: it holds real tokens
    mgr.free(a)
    check_invariants(mgr)
    assert mgr.num_free_blocks == mgr.num_usable_blocks


def test_caching_disabled_and_reset():
    off = KVCacheManager(10, BS, enable_caching=False)
    run(off, make_req("a", range(9)))
    assert run(off, make_req("b", range(9))) == 0 and off.prefix_cache_queries == 0
    assert all(b.block_hash is None for b in off.block_pool.blocks)
    mgr = KVCacheManager(10, BS)
    a = make_req("a", range(9))
    run(mgr, a)
    assert not mgr.reset_prefix_cache()
    mgr.free(a)
    assert mgr.reset_prefix_cache()
    assert run(mgr, make_req("b", range(9))) == 0


@pytest.mark.parametrize("seed", range(4))
def test_randomized_stress(seed):
    """Random admit / chunked prefill / decode / lookahead / preempt / abort / failed steps, with a
    content oracle: each slot remembers which prefix its K/V was written for, and every prefix
    hit must match it once the step has run. Invariants are checked after every step."""
    rng = random.Random(seed)
    mgr = KVCacheManager(17, BS)
    content = {}                                  # (block_id, offset) -> key of what was written
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(3, 14))] for _ in range(4)]
    waiting, running, n = [], [], 0

    def key(req, pos):
        return (req.lora_id, tuple(req.all_token_ids[:pos + 1]))

    def chunk(req):
        return rng.randrange(1, req.num_tokens - req.num_computed_tokens + 1)

    def reset(req):
        mgr.free(req)
        req.num_computed_tokens = 0
        waiting.append(req)

    for _ in range(300):
        if rng.random() < 0.4:
            toks = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
            waiting.append(make_req(f"r{n}", toks, lora_id=rng.choice([None, None, 1])))
            n += 1
        if running and rng.random() < 0.05:       # abort between steps
            mgr.free(running.pop(rng.randrange(len(running))))
        scheduled, hits, preempted = {}, {}, False
        for req in list(running):                 # running phase; may preempt
            if req not in running:
                continue
            num_new, lookahead = chunk(req), rng.choice([0, 0, 3])
            while mgr.allocate_slots(req, num_new, num_lookahead_tokens=lookahead) is None:
                victim = rng.choice(running)      # possibly already scheduled this step
                running.remove(victim)
                scheduled.pop(victim.request_id, None)
                reset(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = (req, num_new)
        while not preempted and waiting and len(running) < 6:  # admission phase
            req = waiting[0]
            blocks, hit = mgr.get_computed_blocks(req)
            assert hit % BS == 0 and hit < req.num_tokens
            num_new = rng.randrange(1, req.num_tokens - hit + 1)
            if mgr.allocate_slots(req, num_new, blocks, hit) is None:
                break
            waiting.pop(0)
            req.num_computed_tokens = hit
            running.append(req)
            scheduled[req.request_id] = (req, num_new)
            hits[req.request_id] = blocks
        if rng.random() < 0.05:                   # the forward pass failed: nothing was computed
            for req, _ in scheduled.values():
                running.remove(req)
                reset(req)
            check_invariants(mgr, running)
            continue
        for req, num_new in scheduled.values():   # execute: write K/V
            table = mgr.get_blocks(req.request_id)
            for pos in range(req.num_computed_tokens, req.num_computed_tokens + num_new):
                content[(table[pos // BS].block_id, pos % BS)] = key(req, pos)
        for rid, blocks in hits.items():          # every hit holds exactly what it claims
            req = scheduled[rid][0]
            for i, blk in enumerate(blocks):
                for off in range(BS):
                    assert content[(blk.block_id, off)] == key(req, i * BS + off)
        for req, num_new in scheduled.values():   # update: advance, sample, finish
            req.num_computed_tokens += num_new
            if req.num_computed_tokens == req.num_tokens:
                if req.num_tokens > 24 or rng.random() < 0.15:
                    running.remove(req)
                    mgr.free(req)
                    continue
                req.append_output_token_ids([rng.randrange(5)])
            mgr.release_slots_beyond(req, req.num_tokens)
        check_invariants(mgr, running)
    for req in running:
        mgr.free(req)
    check_invariants(mgr)
    assert mgr.num_free_blocks == mgr.num_usable_blocks and mgr.req_to_blocks == {}
    assert mgr.prefix_cache_hits > 0
