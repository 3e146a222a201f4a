"""End-to-end invariants of the offline API on the real SmolLM2 weights."""
import pytest

from spruce import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "List three colors:",
    "The quick brown fox",
    "In 1492, Columbus",
    "Water boils at",
    "A haiku about the sea:\n",
    "import numpy as np\nx = np.",
    "The meaning of life is",
    "Translate to French: Good morning ->",
    "1, 2, 3, 4,",
    "Dear Sir or Madam, I am writing to",
    "The best way to learn programming is to",
    "Q: What is the largest planet? A:",
    "Roses are red, violets are",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference(make_llm):
    """Each prompt alone, whole prefill, no prefix cache: the ground truth."""
    llm = make_llm(enable_prefix_caching=False)
    return [token_ids(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]


def test_batched_equals_alone(make_llm, reference):
    llm = make_llm()
    assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_chunked_prefill_equals_whole(make_llm, reference):
    llm = make_llm(max_num_batched_tokens=7, enable_prefix_caching=False)
    assert token_ids(llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False)) == reference[:6]


def test_prefix_cache_hit_equals_miss(make_llm, reference):
    llm = make_llm(block_size=4)
    first = token_ids(llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False))
    outs = llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in outs if len(o.prompt_token_ids) > 4)
    assert first == token_ids(outs) == reference[:6]


def test_preempted_equals_not(make_llm, reference):
    # 16 blocks of 4 tokens cannot hold 8 growing sequences: recompute preemption must kick in.
    llm = make_llm(block_size=4, num_gpu_blocks_override=16, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS[:8], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.stats.num_preemptions > 0
    assert token_ids(outs) == reference[:8]
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_seeded_sampling_reproducible_and_batch_independent(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = token_ids(llm.generate([PROMPTS[0]], params, use_tqdm=False))[0]
    again = token_ids(llm.generate([PROMPTS[0]], params, use_tqdm=False))[0]
    others = [SamplingParams(temperature=0.8, max_tokens=10)] * 5
    batch = llm.generate(PROMPTS[1:4] + [PROMPTS[0]] + PROMPTS[4:6], others[:3] + [params] + others[3:],
                         use_tqdm=False)
    assert alone == again == batch[3].outputs[0].token_ids
    other_seed = token_ids(llm.generate([PROMPTS[0]], params.clone(seed=99), use_tqdm=False))[0]
    assert other_seed != alone


def test_n_samples_share_prompt_blocks(make_llm):
    llm = make_llm(block_size=4)
    out = llm.generate([PROMPTS[2]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Children 1 and 2 were admitted in the same step as child 0 and hit its prompt blocks.
    assert llm.engine.kv_manager.prefix_cache_hits >= 2 * (len(out.prompt_token_ids) // 4 * 4 - 4)


def test_stop_string_and_finish_reasons(make_llm):
    llm = make_llm()
    full = llm.generate([PROMPTS[11]], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length"
    stop = full.text[3:6]  # a stop string taken from the middle of the greedy text
    out = llm.generate([PROMPTS[11]], SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]
    incl = llm.generate([PROMPTS[11]], SamplingParams(temperature=0, max_tokens=12, stop=[stop],
                                                      include_stop_str_in_output=True), use_tqdm=False)[0]
    assert incl.outputs[0].text == full.text[:full.text.index(stop) + len(stop)]


def test_eos_stops_chat(make_llm):
    llm = make_llm()
    out = llm.chat([{"role": "user", "content": "Say just the word yes."}],
                   SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < 64


def test_logprobs(make_llm):
    llm = make_llm()
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=5), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert tok in lp and len(lp) >= 5
        assert lp[tok].logprob == max(v.logprob for v in lp.values())  # greedy picks the top one
    assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)))
    assert all(isinstance(v.decoded_token, str) for lp in c.logprobs for v in lp.values())
    # Without detokenization the same numbers come back, without the tokens' texts.
    raw = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, logprobs=5, detokenize=False),
                       use_tqdm=False)[0].outputs[0]
    assert raw.token_ids == c.token_ids and raw.text == ""
    for a, b in zip(raw.logprobs, c.logprobs):
        assert {t: v.logprob for t, v in a.items()} == {t: v.logprob for t, v in b.items()}
        assert all(v.decoded_token is None for v in a.values())


@pytest.mark.parametrize("prompt, params, field", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1, 2, 10**9], SamplingParams(), "prompt_token_ids"),
    ([1, -1], SamplingParams(), "prompt_token_ids"),
    ("x", SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
    ("x", SamplingParams(logit_bias={10**9: 1.0}), "logit_bias"),
])
def test_bad_input_raises_and_engine_keeps_serving(make_llm, prompt, params, field):
    llm = make_llm()
    with pytest.raises(ValueError, match=field):
        llm.generate([PROMPTS[0], prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing of the bad batch was left queued
    assert llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_prompt_longer_than_context(make_llm):
    llm = make_llm(max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(100, 140))], GREEDY, use_tqdm=False)
    out = llm.generate([list(range(100, 125))], SamplingParams(temperature=0, max_tokens=50), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(logprobs=21), "logprobs"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
