"""Suffix decoding: the n-gram index against brute force, the trees it drafts, and the engine
staying lossless with it (datastore, finished-output cache, merged with another proposer)."""
import numpy as np
import pytest

from spruce import SamplingParams
from spruce.config import SpeculativeConfig
from spruce.spec.budget import AcceptanceRecord, node_values
from spruce.spec.draft_checkpoint import load_corpus, save_corpus
from spruce.spec.suffix import (SuffixIndex, SuffixProposer, best_tree, continuation_probs,
                                continuations, evidence_class, longest_suffix_match, suffix_hashes)


def _brute_longest(seqs, ctx, max_n):
    """Longest n <= max_n whose last-n-of-ctx occurs inside a sequence with a token after it."""
    best, ends = 0, []
    for n in range(1, min(max_n, len(ctx)) + 1):
        pat, found = ctx[-n:], []
        off = 0
        for s in seqs:
            found += [off + i + n - 1 for i in range(len(s) - n) if s[i:i + n] == pat]
            off += len(s) + 1
        if not found:
            break
        best, ends = n, found
    return best, sorted(ends)


def test_index_finds_the_longest_match_like_brute_force():
    rng = np.random.default_rng(0)
    seqs = [list(map(int, rng.integers(0, 6, rng.integers(1, 30)))) for _ in range(40)]
    index = SuffixIndex(np.asarray([t for s in seqs for t in (*s, -1)]), max_n=6)
    for _ in range(200):
        ctx = list(map(int, rng.integers(0, 6, rng.integers(1, 10))))
        n, ends = index.longest_match(suffix_hashes(ctx, 6))
        assert (n, sorted(ends.tolist())) == _brute_longest(seqs, ctx, 6)
    # A token no sequence holds: no match, nothing to draft.
    assert index.longest_match(suffix_hashes([99], 6))[0] == 0


def test_longest_suffix_match_like_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(300):
        toks = rng.integers(0, 3, rng.integers(1, 25))
        want = (0, [])
        for n in range(1, min(6, len(toks) - 1) + 1):
            ends = [i + n - 1 for i in range(len(toks) - n) if (toks[i:i + n] == toks[-n:]).all()]
            if not ends:
                break
            want = (n, ends)
        n, ends = longest_suffix_match(toks, 6)
        assert (n, ends.tolist()) == want


def test_local_match_and_continuations():
    toks = np.asarray([5, 1, 2, 3, 9, 1, 2, 3, 7, 4, 1, 2, 3])
    n, ends = longest_suffix_match(toks, 8)
    assert n == 3 and ends.tolist() == [3, 7]
    assert continuations(toks, ends, 3, 64).tolist() == [[9, 1, 2], [7, 4, 1]]
    assert continuations(toks, np.asarray([11]), 3, 64).tolist() == [[3, -1, -1]]   # -1 past the end
    assert longest_suffix_match(np.asarray([1, 2, 3]), 8)[0] == 0


def test_best_tree_keeps_the_most_frequent_paths_with_their_probabilities():
    rows = np.asarray([[1, 2, -1], [1, 2, 3], [1, 4, 5], [6, 7, 8]])
    probs = continuation_probs(rows)          # smoothed: count / (4 + 1)
    assert probs[(1,)] == pytest.approx(3 / 5) and probs[(1, 2)] == pytest.approx(2 / 5)
    assert (1, 2, -1) not in probs
    tree = best_tree(0, probs, max_nodes=4, min_prob=0.0)
    assert sorted(tree.paths()) == [[1, 2], [6]]     # ties at 0.2 go to the shorter path
    assert len(tree) == 4 and tree.depths == sorted(tree.depths)
    # The proposals carry the probability given the parent; the cut's estimate is their product.
    v = node_values(tree, AcceptanceRecord(), AcceptanceRecord())
    for i in range(1, len(tree)):
        assert v[i] == pytest.approx(probs[tuple(tree.path_tokens(i))])
    assert best_tree(0, probs, 16, min_prob=0.0, max_width=1).paths() == [[1, 2, 3]]   # a chain
    assert best_tree(0, probs, 16, min_prob=0.5).paths() == [[1]]
    assert best_tree(0, probs, 16, min_prob=0.9) is None


def test_corpus_round_trip_and_bad_paths(tmp_path):
    save_corpus(tmp_path, [[1, 2, 3], [4]])
    assert load_corpus(tmp_path).tolist() == [1, 2, 3, -1, 4, -1]
    with pytest.raises(ValueError, match="no datastore corpus"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="suffix_decoding_min_token_prob"):
        SpeculativeConfig.parse({"method": "suffix", "suffix_decoding_min_token_prob": 2})
    with pytest.raises(ValueError, match="max_tree_nodes"):
        SpeculativeConfig.parse({"method": "ngram", "max_tree_nodes": 8})


class _Req:
    def __init__(self, prompt, out, seed=None):
        self.all_token_ids, self.num_prompt_tokens, self.num_output_tokens = prompt + out, len(prompt), len(out)
        self.sampling_params = SamplingParams(temperature=1.0 if seed is not None else 0.0, seed=seed)


def test_proposer_drafts_from_the_datastore_and_from_finished_outputs(tmp_path):
    save_corpus(tmp_path, [[10, 11, 12, 13, 14, 15]] * 3)
    cfg = SpeculativeConfig.parse({"method": "suffix", "model": str(tmp_path), "num_speculative_tokens": 4,
                                   "max_tree_nodes": 8, "suffix_decoding_max_cached_requests": 2})
    p = SuffixProposer(cfg)
    tree = p.propose([_Req([1, 2, 10, 11], [])])[0]
    # A match of 2 tokens drafts at most 2 nodes (max_spec_factor 1.0).
    assert tree.paths() == [[12, 13]]
    assert p.propose([_Req([7, 8], [20])])[0] is None
    # Finished outputs are searched after enough of them arrived (the cache re-indexes in steps).
    fin = _Req([0, 0, 0], list(range(20, 20 + 300)))
    p.observe_finished([fin])
    tree = p.propose([_Req([7, 8], [20, 21, 22, 23])])[0]
    assert tree.paths() == [[24, 25, 26, 27]]
    # ... but not for a seeded sampled request, whose draws must not depend on other requests.
    assert p.propose([_Req([7, 8], [20, 21, 22, 23], seed=1)])[0] is None


PROMPTS = [
    "Repeat after me exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Write a haiku about the sea.",
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is",
]


@pytest.fixture(scope="module")
def datastore(make_llm, tmp_path_factory):
    """The target's own greedy answers to the prompts (what `spruce distill` saves), and the
    references the engine must reproduce."""
    llm = make_llm()
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    d = tmp_path_factory.mktemp("store")
    save_corpus(d, [list(o.prompt_token_ids[-3:]) + list(o.outputs[0].token_ids) for o in out])
    return d, [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("shape", ["datastore", "local", "merged"])
def test_suffix_is_lossless(make_llm, datastore, shape, batch):
    path, ref = datastore
    suffix = {"method": "suffix", "num_speculative_tokens": 6, "max_tree_nodes": 10,
              **({} if shape == "local" else {"model": str(path)})}
    cfg = suffix if shape != "merged" else {"method": "merged", "methods": [suffix, {"method": "ngram"}]}
    llm = make_llm(speculative_config={**cfg, "max_num_seqs_for_spec": 16}, block_size=4)
    prompts = (PROMPTS * 4)[:max(batch, 4)]
    for _ in range(2):       # the second round also drafts from the first round's outputs
        out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [ref[i % 4] for i in range(len(prompts))]
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    if shape == "datastore":    # the datastore holds these answers: most drafts are accepted
        assert stats.num_accepted_tokens >= 0.5 * stats.num_draft_tokens
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_estimates_are_calibrated_by_what_they_turned_out_to_be_worth():
    probs = {(1,): 0.55, (1, 2): 0.5}
    tree = best_tree(0, probs, 4, 0.0)
    prior = AcceptanceRecord()
    assert node_values(tree, AcceptanceRecord(), prior)[1] == pytest.approx(0.55)   # no record yet
    for _ in range(40):            # estimated 0.55, accepted one time in five
        prior.record(tree, [7])
    for _ in range(10):
        prior.record(tree, [1, 2, 9])
    v = node_values(tree, AcceptanceRecord(), prior)
    assert v[1] == pytest.approx((10 + 8 * 0.55) / (50 + 8))
    # A request's own record moves it from there, towards what its own nodes did.
    own = AcceptanceRecord()
    for _ in range(8):
        own.record(tree, [1, 2, 9])
    assert node_values(tree, own, prior)[1] > v[1]


def test_each_kind_of_evidence_is_calibrated_on_its_own_record():
    """A long match in the request and one token matched in the datastore may both say 0.55; the
    record keeps them apart, so each is priced by what its own kind turned out to be worth."""
    assert evidence_class(0, 12) != evidence_class(1, 1) and evidence_class(0, 3) == evidence_class(0, 4)
    assert len({evidence_class(s, n) for s in range(3) for n in range(1, 20)}) == 15
    probs = {(1,): 0.55}
    strong = best_tree(0, probs, 2, 0.0, evidence={(1,): evidence_class(0, 12)})
    weak = best_tree(0, probs, 2, 0.0, evidence={(1,): evidence_class(1, 1)})
    assert strong.proposals[0][0].evidence == evidence_class(0, 12)
    prior = AcceptanceRecord()
    for _ in range(30):
        prior.record(strong, [1, 5])     # accepted
        prior.record(weak, [7])          # rejected
    assert node_values(strong, AcceptanceRecord(), prior)[1] > 0.8
    assert node_values(weak, AcceptanceRecord(), prior)[1] < 0.2
    with pytest.raises(ValueError, match="evidence class 16"):
        AcceptanceRecord().calibrated(0.5, evidence=16)


def test_proposer_marks_where_and_how_long_the_match_was():
    """The request's own repeat gives source-0 evidence, with the bucket of its match length."""
    prop = SuffixProposer(SpeculativeConfig.parse({"method": "suffix", "num_speculative_tokens": 3}))
    tokens = [9, 1, 2, 3, 4, 5, 8, 1, 2, 3]           # "1 2 3" recurs: then comes 4 5
    tree = prop._propose_one(tokens, 0.0)
    assert tree is not None and tree.tokens[1] == 4
    assert {p.evidence for ps in tree.proposals for p in ps} == {evidence_class(0, 3)}
