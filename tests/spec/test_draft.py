"""Model-based proposers (draft model, early exit) and `spruce distill`: lossless greedy output,
chains and trees, batch 1 and 4, no leaked blocks in the target's or the draft's KV."""
import json
import re
from pathlib import Path

import pytest
import torch

from spruce import SamplingParams

PROMPTS = [
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4, 5, 6, 7, 8,",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def reference(make_llm):
    out = make_llm().generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


@pytest.fixture(scope="module")
def drafts(smollm, tmp_path_factory):
    """Two drafts saved by distill's own code: a 2-layer one (target layers 0 and 29, reduced
    8192-token head: near-zero acceptance) and the 30-layer copy of the target (full head:
    near-total acceptance, so accepted paths and multi-token catch-up are exercised; stored in
    bf16 to halve the file)."""
    from spruce.spec.distill import make_draft, save_draft
    root = tmp_path_factory.mktemp("drafts")
    small = make_draft(smollm.model, 2, [0, 29])
    full = make_draft(smollm.model, 30, list(range(30)))
    stops = sorted(smollm.tokenizer.stop_token_ids)
    vocab = stops + [t for t in range(8192) if t not in stops]
    return {"small": str(save_draft(small, root / "small", smollm.tokenizer, "smollm2-135m", vocab)),
            "full": str(save_draft(full, root / "full", smollm.tokenizer, "smollm2-135m",
                                   dtype=torch.bfloat16))}


def _assert_no_leaks(llm):
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_usable_blocks
    p = llm.engine.proposer
    for p in getattr(p, "proposers", [p]):
        assert not p.seqs, "draft state of finished requests was kept"
        assert p.kv.num_free_blocks == p.kv.num_usable_blocks


EE = "early_exit"
CASES = [  # (id, speculative config (model filled in), batch)
    ("draft2-chain4-b1", {"method": "draft_model", "model": "small", "num_speculative_tokens": 4}, 1),
    ("draft2-chain4-b4", {"method": "draft_model", "model": "small", "num_speculative_tokens": 4}, 4),
    ("draft2-tree-b4", {"method": "draft_model", "model": "small", "tree": [2, 2, 1]}, 4),
    ("draft30-chain5-b4", {"method": "draft_model", "model": "full", "num_speculative_tokens": 5}, 4),
    ("draft30-specinfer-b1", {"method": "draft_model", "model": "full", "tree": "specinfer"}, 1),
    ("draft30-tree-b4", {"method": "draft_model", "model": "full", "tree": [1, 3, 2]}, 4),
    ("early4-chain4-b4", {"method": EE, "num_early_exit_layers": 4, "num_speculative_tokens": 4}, 4),
    ("early29-tree-b4", {"method": EE, "num_early_exit_layers": 29, "tree": [2, 2, 1, 1]}, 4),
    ("early29-chain4-b1", {"method": EE, "num_early_exit_layers": 29, "num_speculative_tokens": 4}, 1),
]


@pytest.mark.parametrize("config,batch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_greedy_is_lossless(make_llm, reference, drafts, config, batch):
    config = dict(config)
    if "model" in config:
        config["model"] = drafts[config["model"]]
    llm = make_llm(speculative_config=config, block_size=4)
    out = llm.generate(PROMPTS[:batch], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == reference[:batch]
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 0
    if config.get("model") == drafts["full"] or config.get("num_early_exit_layers") == 29:
        assert stats.mean_accepted_length > 2.0   # a (near) copy of the target
    _assert_no_leaks(llm)


def test_beam_and_merged_drafts_are_lossless(make_llm, reference, drafts):
    # Beam drafting (build_by_beam), configured as the CLI's JSON would be.
    beam = {"method": "draft_model", "model": drafts["full"], "num_speculative_tokens": 3,
            "beam_width": 2, "max_tree_nodes": 6}
    merged = {"method": "merged", "tree": [2, 1, 1], "methods": [
        {"method": "draft_model", "model": drafts["small"]},
        {"method": EE, "num_early_exit_layers": 29}]}
    for config in (beam, merged):
        llm = make_llm(speculative_config=config, block_size=4)
        out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == reference
        assert llm.engine.spec_stats.mean_accepted_length > 2.0
        _assert_no_leaks(llm)


def test_preemption_and_abort_free_draft_state(make_llm, reference, drafts):
    # 40 blocks of 4 tokens cannot hold four requests to the end: the scheduler preempts.
    llm = make_llm(speculative_config={"method": "draft_model", "model": drafts["full"],
                                       "num_speculative_tokens": 3},
                   block_size=4, num_gpu_blocks_override=40)
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == reference
    assert llm.engine.scheduler.stats.num_preemptions > 0
    _assert_no_leaks(llm)

    eng = llm.engine
    rids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=50)) for p in PROMPTS[:2]]
    for _ in range(4):
        eng.step()
    assert eng.proposer.seqs
    eng.abort_request(rids)
    assert not eng.has_unfinished_requests()
    _assert_no_leaks(llm)


def test_sampled_drafts_are_seeded(make_llm, drafts):
    """Sampled requests draw their drafts from q (verified by MSS); seeded runs repeat."""
    llm = make_llm(speculative_config={"method": "draft_model", "model": drafts["full"], "tree": [2, 1, 1]})
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=16)
    a = llm.generate(PROMPTS, params, use_tqdm=False)
    b = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    _assert_no_leaks(llm)


def test_draft_trees_carry_q_when_sampled(make_llm, drafts):
    from spruce.request import Request
    llm = make_llm(speculative_config={"method": "draft_model", "model": drafts["small"], "tree": [2, 2]})
    eng = llm.engine
    ids = eng.tokenizer.encode(PROMPTS[0])
    greedy = Request("g", ids, SamplingParams(temperature=0, max_tokens=8))
    sampled = Request("s", ids, SamplingParams(temperature=0.7, seed=1, max_tokens=8))
    tg, ts = eng.proposer.propose([greedy, sampled])
    assert len(tg) == 7 and max(tg.depths) == 2          # top-2 of top-2: a full binary tree
    assert all(not p.sampled for ps in tg.proposals for p in ps)
    draws = [p for ps in ts.proposals for p in ps]
    assert len(draws) == 2 + 2 * len(ts.children(0))     # k draws at every node (repeats share one)
    assert all(p.sampled and p.q is not None for p in draws)
    head = set(json.loads((Path(drafts["small"]) / "draft_vocab.json").read_text())["token_ids"])
    assert all(t in head for t in tg.tokens[1:] + ts.tokens[1:])   # reduced head: q is 0 elsewhere
    assert all(float(p.q[[t for t in range(eng.vocab_size) if t not in head][:100]].sum()) == 0
               for p in draws)
    eng.proposer.on_finished(["g", "s"])
    assert eng.proposer.kv.num_free_blocks == eng.proposer.kv.num_usable_blocks


def test_dense_forward_matches_the_engine(smollm):
    from spruce.spec.distill import dense_forward, make_draft
    from spruce.attention.metadata import AttentionMetadata
    from spruce.models.llama import allocate_kv_cache
    draft = make_draft(smollm.model, 2, [3, 17])
    ids = torch.tensor([smollm.tokenizer.encode(PROMPTS[2])])
    t = ids.shape[1]
    with torch.no_grad():
        dense = dense_forward(draft, ids)[0]
        kv = allocate_kv_cache(draft.config, 4, 16, torch.float32, "cpu")
        md = AttentionMetadata(num_tokens=t, query_start_loc=[0, t], seq_lens=[t], query_lens=[t],
                               block_tables=torch.tensor([[1, 2]]), slot_mapping=torch.arange(16, 16 + t),
                               block_size=16)
        paged = draft(ids[0], torch.arange(t), kv, md)
    torch.testing.assert_close(dense, paged, atol=1e-4, rtol=1e-4)


def test_draft_with_another_vocabulary_is_rejected(make_llm, drafts, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(drafts["small"], bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="different tokenizer"):
        make_llm(speculative_config={"method": "draft_model", "model": str(bad)})


def test_distill_tiny_budget_writes_a_loadable_checkpoint(smollm, make_llm, reference, tmp_path):
    from spruce.spec.distill import distill
    from spruce.spec.draft_checkpoint import load_corpus
    path = distill("smollm2-135m", str(tmp_path / "d"), num_prompts=3, samples_per_prompt=1,
                   max_tokens=8, max_steps=2, draft_vocab=512, batch_tokens=512, _loaded=smollm,
                   kv_cache_memory="64MiB", log=lambda m: None)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["spruce_draft"]["target"] == "smollm2-135m"
    assert cfg["spruce_draft"]["steps"] == 2
    assert len(json.loads((path / "draft_vocab.json").read_text())["token_ids"]) <= 512
    assert (path / "tokenizer.json").is_file()
    corpus = load_corpus(path)       # the generated answers, each after the template's tail
    assert (corpus == -1).sum() == 3 and corpus[-1] == -1
    llm = make_llm(speculative_config=json.dumps({"method": "draft_model", "model": str(path)}))
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference[0]
    _assert_no_leaks(llm)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_distill_prompt_set_is_disjoint_from_w4():
    from spruce.bench.spec import load_w4
    from spruce.spec.distill import load_prompts
    prompts = load_prompts()
    assert len(prompts) >= 200
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert {p["kind"] for p in prompts} >= {"chat", "code", "edit", "summarize"}
    w4 = load_w4()
    shared = Path("/work/shared/bench/prompts_w4.jsonl")
    if shared.is_file():
        w4 += [json.loads(line) for line in shared.read_text().splitlines() if line.strip()]
    w4_texts = {_norm(m["content"]) for p in w4 for m in p["messages"]}
    ours = [_norm(m["content"]) for p in prompts for m in p["messages"]]
    assert len(set(ours)) == len(ours)
    assert not set(ours) & w4_texts
    # Nor does a W4 prompt sit inside one of ours (or the reverse).
    assert not [a for a in ours for b in w4_texts if a in b or b in a]
