"""The MLP speculator (spec/mlp_speculator.py): it drafts from the hidden state the target's
last step returned, so that hidden state must be exactly the right row; output stays lossless
for chains, trees and merged trees, and seeded sampling stays reproducible."""
import json

import pytest
import torch

from spruce import SamplingParams

PROMPTS = [
    "a a a a a a a a a a a a a a a a",   # the untrained head (next state = this state) hits here
    "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "1, 2, 3, 4, 5, 6, 7, 8,",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def speculator(smollm, tmp_path_factory):
    """An untrained head: its first state is the target's own (so it proposes the root's token
    again), which repeats text accepts and other text rejects."""
    from spruce.spec.mlp_speculator import SpeculatorHead, save_speculator
    m = smollm.model
    head = SpeculatorHead(m.config.hidden_size, 256, m.config.rms_norm_eps).init_(m.norm.detach())
    stops = sorted(smollm.tokenizer.stop_token_ids)
    vocab = stops + [t for t in range(8192) if t not in stops]
    return str(save_speculator(head, tmp_path_factory.mktemp("spec") / "s", smollm.tokenizer, "smollm2-135m",
                               m.config.vocab_size, vocab))


@pytest.fixture(scope="module")
def reference(make_llm):
    out = make_llm().generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


@pytest.mark.parametrize("spec,batch", [
    ({"num_speculative_tokens": 4}, 1),
    ({"num_speculative_tokens": 4}, 4),
    ({"tree": [3, 2, 1]}, 4),
    ({"beam_width": 3, "num_speculative_tokens": 3, "max_tree_nodes": 8}, 1),
])
def test_greedy_is_lossless_and_drafts_get_accepted(make_llm, speculator, reference, spec, batch):
    llm = make_llm(speculative_config={"method": "mlp_speculator", "model": speculator, **spec})
    got = []
    for i in range(0, len(PROMPTS), batch):
        out = llm.generate(PROMPTS[i:i + batch], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        got += [o.outputs[0].token_ids for o in out]
    assert got == reference
    stats = llm.engine.spec_stats
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_usable_blocks
    assert not llm.engine.proposer.hidden, "hidden states of finished requests were kept"


def test_the_hidden_state_is_the_row_that_gave_the_last_token(make_llm, speculator, smollm):
    """After plain and tree steps alike, the stored hidden is the target's final-normed state at
    the token before the root (what a dense forward over the whole text gives there)."""
    from spruce.spec.distill import dense_forward
    llm = make_llm(speculative_config={"method": "mlp_speculator", "model": speculator, "tree": [2, 1]})
    engine = llm.engine
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30))
    checked = 0
    while engine.has_unfinished_requests():
        engine.step()
        req = engine.scheduler.requests.get(rid)
        if req is None or req.is_finished:
            break
        n, h = engine.proposer.hidden[rid]
        assert n == req.num_tokens
        want = dense_forward(smollm.model, torch.tensor([req.all_token_ids]))[0, n - 2]
        torch.testing.assert_close(h.float(), want.float(), atol=2e-3, rtol=2e-3)
        checked += 1
    assert checked > 3 and engine.spec_stats.num_accepted_tokens > 0


def test_seeded_sampling_is_reproducible_and_merged_is_lossless(make_llm, speculator, reference):
    llm = make_llm(speculative_config={"method": "merged", "num_speculative_tokens": 3, "methods": [
        {"method": "ngram"}, {"method": "mlp_speculator", "model": speculator}]})
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == reference
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=16)
    runs = [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, seeded, use_tqdm=False)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_bad_checkpoints_are_refused_by_name(make_llm, speculator, tmp_path):
    with pytest.raises(ValueError, match="not an MLP speculator"):
        make_llm(speculative_config={"method": "mlp_speculator", "model": str(tmp_path)})
    bad = tmp_path / "wide"
    bad.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "draft_vocab.json"):
        (bad / f).write_bytes(open(f"{speculator}/{f}", "rb").read())
    cfg = json.loads(open(f"{speculator}/config.json").read())
    cfg["hidden_size"] = 960
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size 960"):
        make_llm(speculative_config={"method": "mlp_speculator", "model": str(bad)})
    with pytest.raises(ValueError, match="needs 'model'"):
        make_llm(speculative_config={"method": "mlp_speculator"})


def test_distill_mlp_speculator_tiny_budget_writes_a_loadable_checkpoint(smollm, make_llm, reference, tmp_path):
    from spruce.spec.distill import distill
    path = distill("smollm2-135m", str(tmp_path / "m"), kind="mlp_speculator", num_prompts=4, samples_per_prompt=1,
                   max_tokens=8, max_steps=3, draft_vocab=512, _loaded=smollm, kv_cache_memory="64MiB",
                   log=lambda m: None)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["spruce_draft"]["kind"] == "mlp_speculator" and cfg["spruce_draft"]["steps"] == 3
    assert len(json.loads((path / "draft_vocab.json").read_text())["token_ids"]) <= 512
    llm = make_llm(speculative_config={"method": "mlp_speculator", "model": str(path)})
    out = llm.generate(PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference[1]


def test_training_positions_are_the_generated_ones():
    from spruce.spec.distill_data import Sample
    from spruce.spec.distill_mlp import _Data
    samples = [Sample(list(range(10)), 4, torch.zeros(6, 1, dtype=torch.long), torch.zeros(6, 1)),
               Sample(list(range(5)), 3, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))]
    tokens = torch.arange(15)
    data = _Data(tokens, torch.zeros(15, 4), samples, [0, 10], unroll=2)
    # p from the last prompt token (its next token is generated) to len - 1 - unroll.
    assert data.starts.tolist() == [3, 4, 5, 6, 7] + [12]
