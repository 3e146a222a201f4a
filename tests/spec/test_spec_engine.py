"""Speculative decoding inside the engine: lossless greedy, exact bookkeeping, no leaks."""
import pytest

from spruce import SamplingParams

# Prompts whose continuations repeat earlier text, so prompt lookup has something to propose.
PROMPTS = [
    "Repeat after me exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is",
]
CONFIGS = [
    {"method": "ngram", "num_speculative_tokens": 4},
    {"method": "ngram", "num_speculative_tokens": 8},
    {"method": "ngram", "tree": [2, 2, 1, 1]},
    {"method": "merged", "tree": [2, 1, 1], "methods": [
        {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 2},
        {"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 5}]},
]


@pytest.fixture(scope="module")
def reference(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=0, max_tokens=24)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("config", CONFIGS, ids=["chain4", "chain8", "tree", "merged"])
def test_greedy_is_lossless(make_llm, reference, config):
    llm = make_llm(speculative_config=config, block_size=4)
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.token_ids for r in reference]
    assert [o.outputs[0].text for o in out] == [r.text for r in reference]
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_lossless_at_batch_sizes(make_llm, reference, batch):
    llm = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                       "max_num_seqs_for_spec": 16})
    prompts = (PROMPTS * 4)[:batch]
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [reference[i % 4].token_ids for i in range(batch)]


def test_max_tokens_and_stop_strings_under_speculation(make_llm, reference):
    llm = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 8})
    for n in (1, 2, 5, 11):
        out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=n), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [r.token_ids[:n] for r in reference[:2]]
    stop = reference[0].text[6:10]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    assert out.outputs[0].text == reference[0].text[:reference[0].text.index(stop)]
    assert out.outputs[0].finish_reason == "stop"


def test_logprobs_are_the_targets(make_llm):
    plain = make_llm().generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, logprobs=3),
                                use_tqdm=False)[0].outputs[0]
    llm = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    spec = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, logprobs=3),
                        use_tqdm=False)[0].outputs[0]
    assert spec.token_ids == plain.token_ids
    for a, b in zip(plain.logprobs, spec.logprobs):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


def test_sampling_with_speculation_runs_and_respects_opt_out(make_llm):
    llm = make_llm(speculative_config={"method": "ngram", "tree": [2, 1, 1]})
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=20, presence_penalty=0.5)
    a = llm.generate(PROMPTS, params, use_tqdm=False)
    b = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]  # seeded
    drafts = llm.engine.spec_stats.num_drafts
    llm.generate(PROMPTS, params.clone(speculate=False), use_tqdm=False)
    assert llm.engine.spec_stats.num_drafts == drafts


def test_bad_speculative_config():
    from spruce.config import SpeculativeConfig
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.parse('{"method": "magic"}')
    with pytest.raises(ValueError, match="unknown speculative_config keys"):
        SpeculativeConfig.parse({"method": "ngram", "bogus": 1})
    with pytest.raises(ValueError, match="JSON"):
        SpeculativeConfig.parse("{not json")
    with pytest.raises(ValueError, match="beam_width"):
        SpeculativeConfig.parse({"method": "early_exit", "beam_width": 0})
    with pytest.raises(ValueError, match="beam_width too"):
        SpeculativeConfig.parse({"method": "early_exit", "max_tree_nodes": 8})
    with pytest.raises(ValueError, match="max_tree_nodes"):
        SpeculativeConfig.parse({"method": "early_exit", "beam_width": 2, "max_tree_nodes": 1})
    beam = SpeculativeConfig.parse('{"method": "early_exit", "beam_width": 3, "max_tree_nodes": 9}')
    assert (beam.beam_width, beam.max_tree_nodes) == (3, 9)
