"""Scheduler tests on CPU with a real KV manager over fake block counts and no model."""
import pytest

from spruce.config import EngineConfig
from spruce.engine.scheduler import Scheduler
from spruce.kv.manager import KVCacheManager
from spruce.request import Request, RequestStatus
from spruce.sampling_params import SamplingParams

BLOCK = 4
EOS = 2


def make_scheduler(num_blocks=100, max_tokens_budget=64, max_num_seqs=16, policy="fcfs", caching=True,
                   chunked=True, max_model_len=1000):
    config = EngineConfig.from_kwargs(model="fake", max_num_batched_tokens=max_tokens_budget,
                                      max_num_seqs=max_num_seqs, scheduling_policy=policy,
                                      enable_chunked_prefill=chunked, block_size=BLOCK)
    kv = KVCacheManager(num_blocks, BLOCK, caching)
    return Scheduler(config, kv, max_model_len)


def make_request(rid, prompt_len=10, max_tokens=5, priority=0, arrival=None, first_token=100, **params):
    prompt = [first_token + i for i in range(prompt_len)]
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(str(rid), prompt, sp, eos_token_id=EOS, priority=priority,
                   arrival_time=float(rid) if arrival is None else arrival)


def fake_step(sched, token=7):
    out = sched.schedule()
    sampled = {s.request.request_id: [token] for s in out.scheduled if s.samples}
    sched.update_from_output(out, sampled)
    return out


def run_to_completion(sched, limit=1000):
    for _ in range(limit):
        if not sched.has_unfinished_requests():
            return
        fake_step(sched)
    raise AssertionError("requests did not finish")


def assert_no_leaks(sched):
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks
    assert sched.kv.usage == 0


def test_budget_and_chunked_prefill():
    sched = make_scheduler(max_tokens_budget=32)
    req = make_request(0, prompt_len=100)
    sched.add_request(req)
    chunks = []
    for _ in range(4):
        out = fake_step(sched)
        assert out.total_num_scheduled_tokens <= 32
        chunks.append(out.scheduled[0].num_new_tokens)
    assert chunks == [32, 32, 32, 4]
    assert req.num_output_tokens == 1  # only the last chunk samples
    run_to_completion(sched)
    assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED and req.num_output_tokens == 5
    assert_no_leaks(sched)


def test_no_chunking_waits_for_room():
    sched = make_scheduler(max_tokens_budget=32, chunked=False)
    sched.add_request(make_request(0, prompt_len=20))
    sched.add_request(make_request(1, prompt_len=20, first_token=300))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [20]


def test_same_step_prefix_sharing():
    # The second copy of a prompt admitted in the same step hits the blocks the first one is
    # computing right now (they are written before attention reads them, layer by layer).
    sched = make_scheduler(max_tokens_budget=64)
    sched.add_request(make_request(0, prompt_len=20))
    sched.add_request(make_request(1, prompt_len=20))
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [20, 4]
    assert out.scheduled[0].block_ids[:4] == out.scheduled[1].block_ids[:4]


def test_running_first_then_waiting_and_budget_shared():
    sched = make_scheduler(max_tokens_budget=16)
    a = make_request(0, prompt_len=8)
    sched.add_request(a)
    fake_step(sched)
    b = make_request(1, prompt_len=40)
    sched.add_request(b)
    out = fake_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("0", 1), ("1", 15)]


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=3)
    for i in range(5):
        sched.add_request(make_request(i, prompt_len=4))
    out = fake_step(sched)
    assert len(out.scheduled) == 3 and sched.num_waiting == 2


def test_stop_conditions():
    sched = make_scheduler()
    eos_req = make_request(0)
    stop_tok = make_request(1, stop_token_ids=[9])
    min_req = make_request(2, min_tokens=3, max_tokens=10)
    ignore = make_request(3, ignore_eos=True, max_tokens=3)
    for r in (eos_req, stop_tok, min_req, ignore):
        sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, {"0": [EOS], "1": [9], "2": [EOS], "3": [EOS]})
    assert eos_req.status == RequestStatus.FINISHED_STOPPED and eos_req.stop_reason is None
    assert stop_tok.status == RequestStatus.FINISHED_STOPPED and stop_tok.stop_reason == 9
    assert min_req.status == RequestStatus.RUNNING  # EOS ignored below min_tokens
    assert ignore.status == RequestStatus.RUNNING
    for _ in range(2):
        out = sched.schedule()
        sched.update_from_output(out, {"2": [EOS], "3": [EOS]})
    assert min_req.status == RequestStatus.FINISHED_STOPPED and min_req.num_output_tokens == 3
    assert ignore.status == RequestStatus.FINISHED_LENGTH_CAPPED and ignore.num_output_tokens == 3


def test_max_model_len_caps_generation():
    sched = make_scheduler(max_model_len=12)
    req = make_request(0, prompt_len=10, max_tokens=100)
    sched.add_request(req)
    run_to_completion(sched)
    assert req.num_tokens == 12 and req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_prefix_hit_skips_computed_tokens():
    sched = make_scheduler()
    a = make_request(0, prompt_len=18)
    sched.add_request(a)
    run_to_completion(sched)
    b = make_request(1, prompt_len=18)
    sched.add_request(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 16  # four full blocks of 4
    assert out.scheduled[0].num_new_tokens == 2
    c = make_request(2, prompt_len=16)  # whole prompt cached: the last token is still recomputed
    sched.add_request(c)
    out = sched.schedule()
    assert c.num_cached_tokens == 12 and out.scheduled[-1].num_new_tokens == 4


def test_fcfs_preempts_latest_and_recovers():
    # 6 usable-ish blocks: two requests that each grow past what both can hold.
    sched = make_scheduler(num_blocks=7, max_tokens_budget=64)
    a = make_request(0, prompt_len=8, max_tokens=10)
    b = make_request(1, prompt_len=8, max_tokens=10, first_token=300)
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        out = fake_step(sched)
        preempted += [r.request_id for r in out.preempted]
    assert preempted and preempted[0] == "1"
    assert a.status.is_finished and b.status.is_finished
    assert a.num_output_tokens == 10 and b.num_output_tokens == 10
    assert b.num_preemptions >= 1 and sched.stats.num_preemptions == len(preempted)
    assert_no_leaks(sched)


def test_priority_policy_admits_and_preempts_by_priority():
    sched = make_scheduler(num_blocks=7, policy="priority", max_num_seqs=1)
    low = make_request(0, prompt_len=4, priority=5)
    high = make_request(1, prompt_len=4, priority=-1, first_token=300)
    sched.add_request(low)
    sched.add_request(high)
    out = sched.schedule()
    assert out.scheduled[0].request is high

    sched = make_scheduler(num_blocks=7, policy="priority")
    low = make_request(0, prompt_len=8, max_tokens=10, priority=5)
    high = make_request(1, prompt_len=8, max_tokens=10, priority=0, first_token=300)
    sched.add_request(low)
    sched.add_request(high)
    preempted = []
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        preempted += [r.request_id for r in fake_step(sched).preempted]
    assert preempted and set(preempted) == {"0"}
    assert_no_leaks(sched)


def test_abort_frees_blocks_in_any_state():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request(0), make_request(1)
    sched.add_request(a)
    sched.add_request(b)
    fake_step(sched)
    done = sched.finish_requests(["0", "1", "nope"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in done} == {"0", "1"}
    assert not sched.has_unfinished_requests()
    assert_no_leaks(sched)


def test_duplicate_request_id_rejected():
    sched = make_scheduler()
    sched.add_request(make_request(0))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request(0))


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_invariants(seed):
    import random
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=30, max_tokens_budget=rng.choice([8, 16, 48]), max_num_seqs=6)
    reqs = [make_request(i, prompt_len=rng.randint(1, 30), max_tokens=rng.randint(1, 12),
                         first_token=rng.choice([100, 200]), arrival=i) for i in range(25)]
    pending = list(reqs)
    for _ in range(2000):
        if pending and rng.random() < 0.3:
            sched.add_request(pending.pop(0))
        if rng.random() < 0.02 and sched.running:
            sched.finish_requests([rng.choice(sched.running).request_id], RequestStatus.FINISHED_ABORTED)
        out = fake_step(sched)
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= 6
        if not pending and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests()
    for r in reqs:
        assert r.is_finished
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert r.num_output_tokens == r.max_tokens
    assert_no_leaks(sched)
